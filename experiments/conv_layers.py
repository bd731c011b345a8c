"""Per-layer convolution timings: XLA's forms against oneDNN's primitives, forward and training, on this CPU.

    python -m experiments.conv_layers                           # VGG-A's convs at 32x32, batch 128, fp32
    python -m experiments.conv_layers --precision bf16 --json build/conv_layers_bf16.json

For each stride-1 conv layer of ``--model`` at ``--image-size``, the milliseconds of one forward pass
(``infer``) and of one forward + backward pass (``train``: the input's and the kernel's gradients) of
every form that can run it: lax.conv, im2col, the Toeplitz form (maps smaller than the kernel's window)
and oneDNN (`jaxvgg.onednn`, where its handler is built and has kernels for the precision on this CPU).
Each is jitted alone and timed as the median of ``--rounds`` rounds of ``--steps`` calls. The table
names the fastest form of each row; what `jaxvgg.policy` picks is set from such tables.
"""

from __future__ import annotations

import dataclasses
import json
import statistics
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from experiments.common import at_least, parse_config, run_cli
from jaxvgg import benchmark, layers, onednn
from jaxvgg.models import VGG_CFGS, VGG_DEPTHS
from jaxvgg.policy import PRECISIONS


@dataclasses.dataclass(frozen=True)
class Config:
    model: str = dataclasses.field(default="vgg11", metadata={
        "help": "a VGG of the family (its conv layers)", "choices": [f"vgg{d}" for d in VGG_DEPTHS]})
    image_size: int = dataclasses.field(default=32, metadata={
        "help": "input side (at least 32: the five 2x2 pools)", "check": at_least(32)})
    layers: int | None = dataclasses.field(default=None, metadata={
        "help": "time only the first N distinct layers (default: all)", "check": at_least(1)})
    batch_size: int = dataclasses.field(default=128, metadata={"help": "images per call", "check": at_least(1)})
    precision: str = dataclasses.field(default="fp32", metadata={
        "help": "operands of the products (sums are float32)", "choices": list(PRECISIONS)})
    steps: int = dataclasses.field(default=5, metadata={"help": "calls per timed round", "check": at_least(1)})
    rounds: int = dataclasses.field(default=5, metadata={"help": "timed rounds (median)", "check": at_least(1)})
    json: str | None = dataclasses.field(default=None, metadata={"help": "also write the rows here"})


def conv_layers(model: str, image_size: int) -> list[tuple[int, int, int]]:
    """(side, C_in, C_out) of each 3x3 conv of ``model``, in order."""
    side, cin, out = image_size, 3, []
    for v in VGG_CFGS[VGG_DEPTHS[int(model.removeprefix("vgg"))]]:
        if v == "M":
            side //= 2
        else:
            out.append((side, cin, v))
            cin = v
    return out


def forms_for(side: int, cin: int, cout: int, batch_size: int, dtype: str) -> dict[str, object]:
    """The forms that can compute a 3x3, padding-1 layer on ``side`` x ``side`` maps: name -> fn(x, k)."""
    forms = {"lax": lambda x, k: layers.conv_lax(x, k, 1, dtype),
             "im2col": lambda x, k: layers.conv_im2col(x, k, 1, "xla", dtype)}
    if side * side < 9:
        forms["toeplitz"] = lambda x, k: layers.conv_toeplitz(x, k, 1, "xla", dtype)
    if onednn.supports((batch_size, side, side, cin), (3, 3, cin, cout), 1, dtype):
        forms["onednn"] = lambda x, k: onednn.conv(x, k, 1, dtype)
    return forms


def _timed(fn, args, steps: int, rounds: int) -> float:
    """Median milliseconds of one call of jitted ``fn`` (compiled and run once first)."""
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        for _ in range(steps):
            out = fn(*args)
        jax.block_until_ready(out)
        times.append((time.perf_counter() - start) / steps * 1e3)
    return statistics.median(times)


def measure_layer(side: int, cin: int, cout: int, cfg: Config, say=print) -> list[dict]:
    """One row per (form, mode) of the layer (side, C_in, C_out)."""
    dtype = PRECISIONS[cfg.precision]
    rng = np.random.default_rng(side * 1000 + cin)
    x = jnp.asarray(rng.standard_normal((cfg.batch_size, side, side, cin), np.float32))
    k = jnp.asarray(rng.standard_normal((3, 3, cin, cout), np.float32) / np.sqrt(9 * cin))
    ct = jnp.asarray(rng.standard_normal((cfg.batch_size, side, side, cout), np.float32))
    rows = []
    for name, form in forms_for(side, cin, cout, cfg.batch_size, dtype).items():
        infer = jax.jit(form)

        @jax.jit
        def train(x, k, form=form):
            y, vjp = jax.vjp(form, x, k)
            return vjp(ct.astype(y.dtype))

        for mode, fn in (("infer", infer), ("train", train)):
            ms = _timed(fn, (x, k), cfg.steps, cfg.rounds)
            rows.append({"side": side, "c_in": cin, "c_out": cout, "form": name, "mode": mode, "ms": ms})
            say(f"{side:>3}x{side:<3} {cin:>4} -> {cout:<4} {name:<9} {mode:<5} {ms:8.2f} ms")
    return rows


def table(rows: list[dict]) -> str:
    """Markdown: one line per (layer, mode), the forms' milliseconds side by side, the fastest named."""
    forms = list(dict.fromkeys(r["form"] for r in rows))
    lines = ["| layer | mode | " + " | ".join(f"{f} ms" for f in forms) + " | fastest | oneDNN vs best XLA |",
             "|---|---|" + "---:|" * len(forms) + "---|---:|"]
    keys = list(dict.fromkeys((r["side"], r["c_in"], r["c_out"], r["mode"]) for r in rows))
    for side, cin, cout, mode in keys:
        ms = {r["form"]: r["ms"] for r in rows if (r["side"], r["c_in"], r["c_out"], r["mode"]) == (side, cin, cout,
                                                                                                     mode)}
        xla = min(v for f, v in ms.items() if f != "onednn")
        ratio = f"{xla / ms['onednn']:.2f}x" if "onednn" in ms else "-"
        cells = " | ".join(f"{ms[f]:.2f}" if f in ms else "-" for f in forms)
        lines.append(f"| {side}x{side} {cin}->{cout} | {mode} | {cells} | {min(ms, key=ms.get)} | {ratio} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[dict]:
    cfg = parse_config(Config, argv, __doc__)
    dtype = PRECISIONS[cfg.precision]
    why = onednn.problem(dtype)
    print(f"{benchmark.machine()}; {cfg.model} at {cfg.image_size}, batch {cfg.batch_size}, {cfg.precision}; "
          + (f"oneDNN: {onednn.implementation('forward', dtype)}" if why is None else f"no oneDNN: {why}"))
    shapes = list(dict.fromkeys(conv_layers(cfg.model, cfg.image_size)))[:cfg.layers]  # a repeated one once
    rows = [row for side, cin, cout in shapes for row in measure_layer(side, cin, cout, cfg)]
    print(table(rows))
    if cfg.json:
        Path(cfg.json).parent.mkdir(parents=True, exist_ok=True)
        Path(cfg.json).write_text(json.dumps({"config": dataclasses.asdict(cfg), "machine": benchmark.machine(),
                                              "rows": rows}, indent=1))
    return rows


if __name__ == "__main__":
    sys.exit(run_cli(main, sys.argv[1:]))
