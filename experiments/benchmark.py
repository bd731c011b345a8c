"""Throughput of jaxvgg against the PyTorch originals, measured in one process in alternating rounds.

    python -m experiments.benchmark --json build/benchmark.json
    python -m experiments.benchmark --models cifar_cnn --modes train --rounds 3 --precisions bf16

For every model (cifar_cnn, vgg11 at 32x32, mnist_lenet, and the vgg16_transfer head on cached
4096-d features), precision (``--precisions``, below) and mode (train: SGD/Adam step with backward;
infer: evaluation-mode forward), both frameworks start from the same weights (converted with
`jaxvgg.to_torch`) and run ``steps`` batches per round; the rounds alternate which framework goes
first, so a neighbour taking a core hurts both. The table gives the median images/s of each, their
ratio with its range over rounds, the achieved GFLOP/s (forward FLOPs as XLA counts them in the
native-form program, x3 for a training step) against the matmul peak of the row's precision measured
here, and the XLA compile time of the first step. The JAX steps are compiled as `jaxvgg.train.fit`
compiles them, by `jaxvgg.parallel.compile_step` with the model's policy: its XLA:CPU options (the
table's "XLA:CPU" column) and matrix products (`jaxvgg.gemm`: MKL's sgemm where built, the "GEMM"
column); ``JAXVGG_IMPL=native`` turns both off with the CPU conv forms.
The machinery lives in `jaxvgg.benchmark`.

Precisions: "fp32" rows compute in float32 on both sides. "bf16" rows are the same weights in bfloat16
mixed precision: JAX with the model's policy ``.with_dtype("bfloat16")`` (bf16 x bf16 -> f32 convs and
matmuls forward and backward, XLA's dots, XLA:CPU's default options; float32 parameters, optimizer and
loss), PyTorch eager (and torch.compile) with its AMP recipe on the CPU: forward and loss under
``torch.autocast("cpu", dtype=torch.bfloat16)``, backward and optimizer step outside it, float32
parameters; inference under inference_mode + autocast. Their outputs agree within bfloat16's rounding
(the printed max |Δ| is ~1e-2, against ~1e-6 in float32). Both precisions' matmul peaks (float32, and
bf16 x bf16 -> f32 as the models multiply) are measured in every run, and each row is set against its own.

Allocators: each one (``--allocators``) runs in a child process of its own with ``LD_PRELOAD`` set
accordingly, and both frameworks share it; ``auto`` = system and, where installed, tcmalloc. The
JAX side runs data parallel over `jaxvgg.parallel.auto_num_devices` devices, as `fit` does (one CPU
device unless XLA_FLAGS asks for more); torch runs with its default intra-op threads (one per core).
``--allocators current`` runs in this process as it is.

The real input pipeline is timed too: one CIFAR-10 training epoch through `jaxvgg.train.fit`
(uint8 gather on the host, augmentation on the device), with the host-side batch pipeline timed on
its own (needs ``--data-dir`` or ``$JAXVGG_DATA_DIR``; skipped otherwise).
"""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
import tempfile
import time
from functools import partial
from pathlib import Path
from typing import Callable

import jax

from experiments.common import ConfigError, at_least, default_policy, parse_config
from jaxvgg import augment, data, models, optim, parallel, runtime
from jaxvgg.benchmark import (BENCHMARK_MODELS, build_case, forward_max_abs_diff, machine, matmul_peak, measure, table,
                              with_precision)
from jaxvgg.policy import PRECISIONS
from jaxvgg.checkpoint import write_json
from jaxvgg.train import FitConfig, TrainState, fit

# Steps per round at the default batch sizes: about a second of work per framework per round here.
DEFAULT_STEPS = {("cifar_cnn", "train"): 6, ("cifar_cnn", "infer"): 6, ("vgg11", "train"): 2,
                 ("vgg11", "infer"): 2, ("mnist_lenet", "train"): 30, ("mnist_lenet", "infer"): 30,
                 ("transfer_head", "train"): 100, ("transfer_head", "infer"): 100}


@dataclasses.dataclass
class Config:
    models: str = dataclasses.field(default=",".join(BENCHMARK_MODELS), metadata={
        "help": f"comma-separated, from {', '.join(BENCHMARK_MODELS)}"})
    modes: str = dataclasses.field(default="train,infer", metadata={"help": "train, infer or both"})
    precisions: str = dataclasses.field(default=",".join(PRECISIONS), metadata={
        "help": f"comma-separated, from {', '.join(PRECISIONS)} (bf16: jax's bf16 policy, torch autocast)"})
    rounds: int = dataclasses.field(default=5, metadata={"help": "alternating rounds per model and mode"})
    steps: int | None = dataclasses.field(default=None, metadata={
        "help": "batches per framework per round (default: per model, about 1 s of work here)"})
    train_batch: int = dataclasses.field(default=128, metadata={"help": "training batch size"})
    infer_batch: int = dataclasses.field(default=256, metadata={"help": "inference batch size"})
    allocators: str = dataclasses.field(default="auto", metadata={
        "help": "auto (system + tcmalloc where installed), current, system, tcmalloc, or a comma list"})
    epoch_model: str = dataclasses.field(default="cifar_cnn", metadata={
        "help": "model for the timed real CIFAR-10 epoch (cifar_cnn, vgg11), or none"})
    epoch_limit: int | None = dataclasses.field(default=None, metadata={
        "help": "train on the first N CIFAR-10 images in the epoch timing (default: all 50,000)"})
    data_dir: str | None = dataclasses.field(default=None, metadata={
        "help": "CIFAR-10 folder or tar for the epoch timing (default $JAXVGG_DATA_DIR)"})
    torch_compile: bool = dataclasses.field(default=False, metadata={
        "help": "also time torch.compile'd PyTorch (inductor; needs a C compiler, compiles slowly on a small CPU)"})
    torch_threads: int | None = dataclasses.field(default=None, metadata={
        "help": "torch.set_num_threads (default: torch's own, one per core)"})
    peak_size: int = dataclasses.field(default=2048, metadata={
        "help": "n of the n x n x n matmul whose GFLOP/s is each precision's peak (small: a quick run)",
        "check": at_least(16)})
    json: str | None = dataclasses.field(default=None, metadata={"help": "write the rows as JSON here"})
    quiet: bool = dataclasses.field(default=False, metadata={"help": "no per-round lines"})
    child: bool = dataclasses.field(default=False, metadata={
        "help": "internal: run everything in this process and write its rows to --json"})


# --- one real epoch ---------------------------------------------------------------------------------

def time_cifar_epoch(cfg: Config, say: Callable[[str], None]) -> dict | None:
    """One CIFAR-10 training epoch of ``cfg.epoch_model`` through `fit`, and the host pipeline alone."""
    if cfg.epoch_model == "none":
        return None
    folder = data.resolve_data_dir(cfg.data_dir)
    if folder is None:
        say(f"epoch timing skipped: no CIFAR-10 folder (--data-dir or ${data.DATA_DIR_ENV})")
        return None
    t = time.perf_counter()
    train = data.load_cifar10(folder)["train"]
    load_s = time.perf_counter() - t
    if cfg.epoch_limit:
        train = data.Dataset(train.images[:cfg.epoch_limit], train.labels[:cfg.epoch_limit], train.class_names)
    batch_size = cfg.train_batch
    mesh = parallel.make_mesh(None)

    t = time.perf_counter()  # the host side alone: index, gather uint8, put on the device
    for batch in train.batches(batch_size, seed=0, epoch=1, drop_last=True):
        jax.block_until_ready(parallel.shard_batch(batch, mesh))
    pipeline_s = time.perf_counter() - t

    name = cfg.epoch_model
    model = models.create_model(name, num_classes=10, policy=default_policy(name))
    params = models.init_params(name, jax.random.PRNGKey(0), num_classes=10, input_shape=(32, 32, 3))
    state = TrainState.for_model(name, model, params, optim.sgd(0.01, momentum=0.9, weight_decay=5e-4),
                                 jax.random.PRNGKey(1))
    mean, std = augment.CIFAR10_MEAN, augment.CIFAR10_STD
    say(f"timing one CIFAR-10 epoch of {name} ({len(train)} images, batch {batch_size}) through fit ...")
    _, history = fit(state, train, None, FitConfig(epochs=1, batch_size=batch_size, quiet=True),
                     train_transform=partial(augment.cifar_train_transform, mean=mean, std=std),
                     eval_transform=partial(augment.eval_transform, mean=mean, std=std))
    epoch_s = history["epoch"]["time_s"][0]
    # a row like the others (no torch side: the torch tutorial's DataLoader is not what is measured)
    return {"model": name, "mode": "epoch", "precision": "fp32", "batch": batch_size, "images": len(train),
            "epoch_s": epoch_s,
            "jax_img_s": len(train) // batch_size * batch_size / epoch_s, "torch_img_s": None, "ratio": None,
            "gflops": None, "compile_s": None, "pipeline_s": pipeline_s, "pipeline_fraction": pipeline_s / epoch_s,
            "load_s": load_s}


# --- driver -----------------------------------------------------------------------------------------

def _split(text: str, allowed: tuple[str, ...], what: str) -> list[str]:
    items = [s.strip() for s in text.split(",") if s.strip()]
    bad = [s for s in items if s not in allowed]
    if bad or not items:
        raise ConfigError(what, f"expected a comma list from {', '.join(allowed)}", text)
    return items


def run_here(cfg: Config, say: Callable[[str], None]) -> list[dict]:
    """The whole benchmark in this process, under whatever allocator it has."""
    import torch

    if cfg.torch_threads:
        torch.set_num_threads(cfg.torch_threads)
    names = _split(cfg.models, BENCHMARK_MODELS, "models")
    modes = _split(cfg.modes, ("train", "infer"), "modes")
    precisions = _split(cfg.precisions, tuple(PRECISIONS), "precisions")
    allocator = runtime.allocator_in_use()
    say(f"allocator {allocator}; jax {jax.__version__} on {jax.default_backend()} ({jax.devices()[0].device_kind}), "
        f"torch {torch.__version__} with {torch.get_num_threads()} threads")
    n = cfg.peak_size
    peaks = {p: matmul_peak(n, precision=p) for p in PRECISIONS}  # both, whichever rows are asked for
    for p, peak in peaks.items():
        say(f"{p} matmul peak ({n}^3): jax {peak['jax']:.0f} GFLOP/s, torch {peak['torch']:.0f} GFLOP/s")
    rows = []
    for i, name in enumerate(names):
        base = build_case(name, jax.random.PRNGKey(i), default_policy(name))
        for precision in precisions:
            case = with_precision(base, precision)
            diff = forward_max_abs_diff(case)
            say(f"{name} {precision}: same weights in both, outputs agree to max |Δ| {diff:.2g}")
            for mode in modes:
                batch_size = cfg.train_batch if mode == "train" else cfg.infer_batch
                steps = cfg.steps or DEFAULT_STEPS[(name, mode)]
                say(f"{name} {precision} {mode} (batch {batch_size}, {steps} steps x {cfg.rounds} rounds)")
                row = measure(case, mode, batch_size, steps, cfg.rounds, say, torch_compile=cfg.torch_compile)
                row["output_max_abs_diff"] = diff
                rows.append(row)
    epoch = time_cifar_epoch(cfg, say)
    if epoch is not None:
        rows.append(epoch)
    every_peak = {f"peak_gflops_{framework}_{p}": peak[framework] for p, peak in peaks.items()
                  for framework in ("jax", "torch")}
    for row in rows:
        own = peaks[row["precision"]]  # "% of peak" is against the row's own precision
        row.update(allocator=allocator, backend=jax.default_backend(), torch_threads=torch.get_num_threads(),
                   peak_gflops_jax=own["jax"], peak_gflops_torch=own["torch"], peak_size=n, **every_peak)
    return rows


def _allocators(text: str) -> list[str]:
    if text == "current":
        return []
    if text == "auto":
        return ["system"] + (["tcmalloc"] if runtime.find_tcmalloc() else [])
    return _split(text, runtime.ALLOCATORS, "allocators")


def main(argv: list[str] | None = None) -> list[dict]:
    cfg = parse_config(Config, argv, description=__doc__.split("\n\n")[0])
    say = (lambda _: None) if cfg.quiet else (lambda msg: print(msg, flush=True))
    # fail before any work
    _split(cfg.models, BENCHMARK_MODELS, "models"), _split(cfg.modes, ("train", "infer"), "modes")
    _split(cfg.precisions, tuple(PRECISIONS), "precisions")
    if cfg.epoch_model not in ("none", "cifar_cnn", "vgg11"):
        raise ConfigError("epoch_model", "expected cifar_cnn, vgg11 or none", cfg.epoch_model)
    allocators = [] if cfg.child else _allocators(cfg.allocators)
    if not allocators:
        rows = run_here(cfg, say)
    else:
        rows = []
        for allocator in allocators:
            say(f"== allocator: {allocator} (child process)")
            with tempfile.TemporaryDirectory() as tmp:
                out = Path(tmp) / "part.json"
                cmd = [sys.executable, "-m", "experiments.benchmark", *(sys.argv[1:] if argv is None else argv),
                       "--child", "true", "--json", str(out)]
                if allocator != allocators[-1]:  # time the epoch once, under the last (the entry points') allocator
                    cmd += ["--epoch-model", "none"]
                env = runtime.environ_with_allocator(allocator)
                subprocess.run(cmd, env=env, check=True)
                rows += json.loads(out.read_text())
    where = machine()
    for row in rows:
        row["machine"] = where
    if cfg.json:
        Path(cfg.json).parent.mkdir(parents=True, exist_ok=True)
        write_json(cfg.json, rows)
    if not cfg.child:
        print(f"\n{where}\n" + table(rows))
    return rows


if __name__ == "__main__":
    # No allocator re-exec here: the allocators are the benchmark's subject, chosen per child process.
    try:
        main(sys.argv[1:])
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
