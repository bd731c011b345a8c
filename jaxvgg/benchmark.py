"""The benchmark's machinery: jaxvgg against its PyTorch originals, step by step, in one process.

`experiments.benchmark` is the command (``python -m experiments.benchmark --help``); this module holds
what it measures with: the cases (the same weights in both frameworks), the step runners of each
framework, alternating rounds, FLOP counts and the markdown table. It imports torch and torch_ref
lazily, so importing it costs nothing where they are missing.

Each case runs in a precision (`Case.precision`, ``with_precision``): "fp32", or "bf16", the same
weights on both sides computing in bfloat16 -- JAX with the model's policy ``.with_dtype("bfloat16")``
(bf16 x bf16 -> f32 products, float32 parameters and outputs), PyTorch as its AMP recipe does on the CPU:
forward and loss under ``torch.autocast("cpu", dtype=torch.bfloat16)``, backward and optimizer step
outside it, float32 parameters. `matmul_peak` measures both frameworks' float32 and bfloat16 peaks.
"""

from __future__ import annotations

import dataclasses
import os
import platform
import statistics
import time
from functools import partial
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from jaxvgg import convert, gemm, models, optim, parallel
from jaxvgg.policy import NATIVE, PRECISIONS, YNN_FUSION_OPTION, Policy
from jaxvgg.train import TrainState, train_step

BENCHMARK_MODELS = ("cifar_cnn", "vgg11", "mnist_lenet", "transfer_head")
TRANSFER_CLASSES = 100  # the transfer head's registry default
FEATURES = 4096
PEAK_LABELS = {"fp32": "float32", "bf16": "bfloat16 (bf16 x bf16 -> f32)"}  # the table's names of the peaks


# --- FLOPs -----------------------------------------------------------------------------------------

def _eqn_flops(eqn: Any) -> float:
    prim = eqn.primitive.name
    if prim == "dot_general":
        (lhs_contract, _), _ = eqn.params["dimension_numbers"]
        lhs = eqn.invars[0].aval.shape
        return 2.0 * np.prod(eqn.outvars[0].aval.shape) * np.prod([lhs[d] for d in lhs_contract])
    if prim == "conv_general_dilated":
        rhs = eqn.invars[1].aval.shape
        spec = eqn.params["dimension_numbers"].rhs_spec  # (out, in, spatial...)
        per_output = rhs[spec[1]] * np.prod([rhs[d] for d in spec[2:]])
        return 2.0 * np.prod(eqn.outvars[0].aval.shape) * per_output
    if prim == "ffi_call" and eqn.params["target_name"] == gemm.FFI_TARGET:  # MKL's sgemm: (m, k) x (k, n)
        lhs = eqn.invars[0].aval.shape
        k = lhs[0] if dict(eqn.params["attributes"])["trans_a"] else lhs[1]
        return 2.0 * np.prod(eqn.outvars[0].aval.shape) * k
    return 0.0


def _all_eqns(jaxpr: Any):
    """Every equation of a (closed) jaxpr, those of its sub-jaxprs included."""
    jaxpr = getattr(jaxpr, "jaxpr", jaxpr)
    for eqn in jaxpr.eqns:
        yield eqn
        for param in eqn.params.values():
            for sub in (param if isinstance(param, (list, tuple)) else [param]):
                if hasattr(getattr(sub, "jaxpr", sub), "eqns"):
                    yield from _all_eqns(sub)


def jaxpr_flops(jaxpr: Any) -> float:
    """Multiply-add FLOPs (2 per MAC) of the matmuls and convolutions in a (closed) jaxpr, sub-jaxprs included."""
    return sum(_eqn_flops(eqn) for eqn in _all_eqns(jaxpr))


def program_flops(fn: Callable, *args: Any) -> float:
    """FLOPs of ``fn(*args)`` as XLA counts them (``compiled.cost_analysis()``: every op, element-wise ones
    included), plus our count of MKL's sgemm custom calls, which XLA cannot see into."""
    traced = jax.jit(fn).trace(*args)  # one trace for both counts
    compiled = traced.lower().compile()
    analysis = compiled.cost_analysis()
    analysis = analysis[0] if isinstance(analysis, (list, tuple)) else analysis
    custom = sum(_eqn_flops(eqn) for eqn in _all_eqns(traced.jaxpr) if eqn.primitive.name == "ffi_call")
    # XLA counts each custom call it cannot see into as -1 FLOP: take those back out
    unknown = compiled.as_text().count(f'custom_call_target="{gemm.FFI_TARGET}"')
    return float(analysis.get("flops", 0.0)) + unknown + custom


def model_flops(case: Case, x: np.ndarray) -> float:
    """Forward FLOPs of ``case``'s model on the batch ``x`` (`program_flops`), counted in the native form.

    The fast forms compute the same sums, but in forms (LeNet's single-channel "direct" conv, im2col's
    patch copies) whose count would not be the network's.
    """
    model = case.jax_model.clone(policy=NATIVE)
    return program_flops(lambda p, v: model.apply({"params": p}, v), case.params, x)


def matmul_peak(n: int = 2048, repeats: int = 5, precision: str = "fp32") -> dict[str, float]:
    """Best GFLOP/s of an n x n matmul, jitted jnp.dot and torch.mm, in ``precision`` ("fp32" or "bf16").

    bf16 is the product the models compute: bf16 x bf16 -> f32 in JAX (``preferred_element_type``; XLA:CPU
    only uses the bf16 units for that form) and torch.mm on bf16 tensors, as autocast runs it.
    """
    import torch

    if precision not in PRECISIONS:
        raise ValueError(f"precision={precision!r}; expected one of {', '.join(PRECISIONS)}")
    a = jnp.asarray(np.random.default_rng(0).random((n, n), np.float32), PRECISIONS[precision])
    dot = jax.jit(partial(jnp.dot, preferred_element_type=jnp.float32))
    dot(a, a).block_until_ready()
    torch_dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    ta = torch.from_numpy(np.array(a, np.float32)).to(torch_dtype)  # a writable copy of the same values
    torch.mm(ta, ta)
    best = {"jax": np.inf, "torch": np.inf}
    for _ in range(repeats):
        t = time.perf_counter()
        dot(a, a).block_until_ready()
        best["jax"] = min(best["jax"], time.perf_counter() - t)
        t = time.perf_counter()
        torch.mm(ta, ta)
        best["torch"] = min(best["torch"], time.perf_counter() - t)
    return {k: 2.0 * n ** 3 / v / 1e9 for k, v in best.items()}


# --- the two sides of one case ----------------------------------------------------------------------

@dataclasses.dataclass
class Case:
    """One model in both frameworks, same weights."""

    name: str
    input_shape: tuple[int, ...]  # per example, jax layout (H, W, C) or (features,)
    jax_model: Any
    params: Any
    torch_model: Any
    log_probs: bool
    optimizer: str  # "sgd" or "adam", as the model's tutorial
    precision: str = "fp32"  # "fp32" or "bf16" (`with_precision`)


def _transfer_head_case(key: jax.Array, policy: Policy | None) -> Case:
    import torch
    from torch import nn

    name = "transfer_head"
    head = models.create_model(name, TRANSFER_CLASSES, policy=policy)
    params = models.init_params(name, key, TRANSFER_CLASSES, (FEATURES,))["params"]
    torch_head = nn.Sequential(nn.Dropout(0.5), nn.Linear(FEATURES, 256), nn.ReLU(), nn.Dropout(0.4),
                               nn.Linear(256, TRANSFER_CLASSES), nn.LogSoftmax(dim=1))
    with torch.no_grad():
        for index, layer in ((1, "classifier_6_0"), (4, "classifier_6_3")):
            torch_head[index].weight.copy_(torch.from_numpy(np.asarray(params[layer]["kernel"]).T.copy()))
            torch_head[index].bias.copy_(torch.from_numpy(np.array(params[layer]["bias"])))
    return Case(name, (FEATURES,), head, params, torch_head, log_probs=True, optimizer="adam")


def build_case(name: str, key: jax.Array, policy: Policy | None = None) -> Case:
    """The jaxvgg model (with ``policy``, default the model's auto policy) and its torch_ref original for a
    benchmark name, with identical weights."""
    import torch

    from torch_ref import models as torch_models

    if name == "transfer_head":
        return _transfer_head_case(key, policy)
    if name not in BENCHMARK_MODELS:
        raise ValueError(f"unknown benchmark model {name!r}; expected one of {', '.join(BENCHMARK_MODELS)}")
    spec = models.get_spec(name)
    shape = (32, 32, 3) if name == "vgg11" else spec.input_shape
    num_classes = 10
    params = models.init_params(name, key, num_classes=num_classes, input_shape=shape)
    torch_model = torch_models.build(name, num_classes=num_classes, image_size=shape[0])
    state_dict = {k: torch.from_numpy(np.array(v)) for k, v in convert.to_torch(name, params).items()}  # writable
    torch_model.load_state_dict(state_dict)
    return Case(name, shape, models.create_model(name, num_classes=num_classes, policy=policy), params["params"],
                torch_model, log_probs=spec.log_probs, optimizer="sgd")


def with_precision(case: Case, precision: str) -> Case:
    """``case`` computing in ``precision`` ("fp32" or "bf16"): the same weights, the jax model with its policy
    in that dtype (`jaxvgg.policy.Policy.with_dtype`), the torch side under autocast for bf16."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision={precision!r}; expected one of {', '.join(PRECISIONS)}")
    policy = case.jax_model.policy.with_dtype(PRECISIONS[precision])
    return dataclasses.replace(case, jax_model=case.jax_model.clone(policy=policy), precision=precision)


def _autocast(case: Case):
    """torch.autocast to bfloat16 on the CPU for a bf16 case; a no-op context for fp32."""
    import torch

    return torch.autocast("cpu", dtype=torch.bfloat16, enabled=case.precision == "bf16")


def _batch(case: Case, batch_size: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = rng.random((batch_size, *case.input_shape), np.float32)
    y = rng.integers(0, TRANSFER_CLASSES if case.name == "transfer_head" else 10, batch_size).astype(np.int64)
    return x, y


def _torch_input(x: np.ndarray):
    import torch

    t = torch.from_numpy(x)
    return t.permute(0, 3, 1, 2).contiguous() if t.ndim == 4 else t


def _jax_tx(case: Case):
    return optim.adam(1e-3) if case.optimizer == "adam" else optim.sgd(0.01, momentum=0.9, weight_decay=5e-4)


def _torch_optimizer(case: Case, model: Any):
    import torch

    ps = model.parameters()
    if case.optimizer == "adam":
        return torch.optim.Adam(ps, lr=1e-3)
    return torch.optim.SGD(ps, lr=0.01, momentum=0.9, weight_decay=5e-4)


def forward_max_abs_diff(case: Case, batch_size: int = 8) -> float:
    """max |jax - torch| of evaluation-mode outputs on one batch: both sides compute the same function
    (in bf16, jax's bf16 policy against torch's autocast: within bfloat16's rounding, ~1e-2, not ~1e-6)."""
    import torch

    x, _ = _batch(case, batch_size, seed=2)
    out = np.asarray(case.jax_model.apply({"params": case.params}, jnp.asarray(x)), np.float32)
    case.torch_model.eval()
    with torch.inference_mode(), _autocast(case):
        ref = case.torch_model(_torch_input(x)).float().numpy()
    return float(np.abs(out - ref).max())


def jax_runner(case: Case, mode: str,
               batch_size: int) -> tuple[Callable[[int], None], float, float, int, dict[str, Any] | None]:
    """(run(n) that does n steps and waits for them, compile seconds, forward FLOPs per image, devices,
    the XLA compile options of the step).

    The step runs as `jaxvgg.train.fit` runs it: compiled by `parallel.compile_step` with the model's
    policy, data parallel over `parallel.auto_num_devices` devices.
    """
    x, y = _batch(case, batch_size, seed=1)
    forward = partial(case.jax_model.apply, train=False)
    flops = model_flops(case, x) / batch_size
    mesh = parallel.make_mesh(parallel.auto_num_devices(case.params, batch_size))
    policy = case.jax_model.policy
    params = parallel.replicate(case.params, mesh)  # a copy: the training step donates its state
    batch = parallel.shard_batch({"image": x, "label": y.astype(np.int32)}, mesh)
    if mode == "train":
        state = TrainState.create(apply_fn=case.jax_model.apply, params=params, tx=_jax_tx(case),
                                  rng=jax.random.PRNGKey(0), log_probs=case.log_probs, policy=policy)
        state = parallel.replicate(state, mesh)
        t = time.perf_counter()
        step = parallel.compile_step(train_step, policy, "train", mesh, donate_state=True).lower(state, batch).compile()
        compile_s = time.perf_counter() - t
        box = [state]

        def run(n: int) -> None:
            s = box[0]
            for _ in range(n):
                s, metrics = step(s, batch)
            jax.block_until_ready(metrics)
            box[0] = s
    else:
        t = time.perf_counter()
        apply = parallel.compile_step(lambda p, v: forward({"params": p}, v), policy, "infer",
                                      mesh).lower(params, batch["image"]).compile()
        compile_s = time.perf_counter() - t

        def run(n: int) -> None:
            for _ in range(n):
                out = apply(params, batch["image"])
            jax.block_until_ready(out)
    return run, compile_s, flops, mesh.size, policy.compiler_options(mode)


def torch_runner(case: Case, mode: str, batch_size: int, compiled: bool = False) -> Callable[[int], None]:
    """run(n): n torch steps (training) or inference_mode forwards; eager, or through ``torch.compile``
    (forward and backward compiled by inductor, the optimizer step eager). Training steps a copy of the
    model, so every row starts from the case's weights. In bf16, the forward (and loss) under autocast;
    backward and optimizer step outside it, on float32 parameters (PyTorch's AMP recipe)."""
    import copy

    import torch
    import torch.nn.functional as F

    x, y = _batch(case, batch_size, seed=1)
    images, labels = _torch_input(x), torch.from_numpy(y)
    model = copy.deepcopy(case.torch_model) if compiled or mode == "train" else case.torch_model
    if compiled:
        model = torch.compile(model)
    if mode == "train":
        opt = _torch_optimizer(case, model)
        loss_fn = F.nll_loss if case.log_probs else F.cross_entropy
        model.train()

        def run(n: int) -> None:
            for _ in range(n):
                opt.zero_grad(set_to_none=True)
                with _autocast(case):
                    loss = loss_fn(model(images), labels)
                loss.backward()
                opt.step()
    else:
        model.eval()

        def run(n: int) -> None:
            with torch.inference_mode(), _autocast(case):
                for _ in range(n):
                    model(images)
    return run


def _compiled_torch_runner(case: Case, mode: str, batch_size: int,
                           say: Callable[[str], None]) -> tuple[Callable[[int], None] | None, dict]:
    """torch.compile's runner, warmed up, and its row fields; where it fails, None and the error."""
    t = time.perf_counter()
    try:
        run = torch_runner(case, mode, batch_size, compiled=True)
        run(1)  # inductor compiles on the first call (and the backward on the first backward)
        run(1)
    except Exception as e:  # noqa: BLE001 -- "where it works": a missing compiler or an inductor bug is reported
        say(f"  torch.compile failed: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
        return None, {"torch_compile_img_s": None, "torch_compile_s": None,
                      "torch_compile_error": f"{type(e).__name__}: {e}"[:500]}
    return run, {"torch_compile_s": time.perf_counter() - t}


def measure(case: Case, mode: str, batch_size: int, steps: int, rounds: int, say: Callable[[str], None],
            torch_compile: bool = False) -> dict:
    """Alternating rounds of the frameworks (jax, torch eager, optionally torch.compile) in the case's
    precision; one result row."""
    jax_run, compile_s, flops, devices, options = jax_runner(case, mode, batch_size)
    runners = {"jax": jax_run, "torch": torch_runner(case, mode, batch_size)}
    extra: dict[str, Any] = {}
    if torch_compile:
        compiled, extra = _compiled_torch_runner(case, mode, batch_size, say)
        if compiled is not None:
            runners["torch_compile"] = compiled
    jax_run(1), runners["torch"](1)  # warm-up: first-touch allocations, torch's lazy init
    rates: dict[str, list[float]] = {k: [] for k in runners}
    for r in range(rounds):
        order = list(runners.items())
        for framework, run in order if r % 2 == 0 else order[::-1]:
            t = time.perf_counter()
            run(steps)
            rates[framework].append(steps * batch_size / (time.perf_counter() - t))
        say(f"  round {r + 1}/{rounds}: " + ", ".join(f"{k} {v[-1]:.0f} img/s" for k, v in rates.items()))
    jax_img_s, torch_img_s = statistics.median(rates["jax"]), statistics.median(rates["torch"])
    ratios = [j / t for j, t in zip(rates["jax"], rates["torch"])]
    step_flops = flops * (3 if mode == "train" else 1)
    if "torch_compile" in rates:
        compiled_img_s = statistics.median(rates["torch_compile"])
        extra.update(torch_compile_img_s=compiled_img_s, torch_compile_ratio=jax_img_s / compiled_img_s,
                     torch_compile_rounds=rates["torch_compile"])
    return {**extra,
        "model": case.name, "mode": mode, "precision": case.precision, "batch": batch_size, "steps": steps,
        "rounds": rounds, "jax_devices": devices,
        "jax_img_s": jax_img_s, "torch_img_s": torch_img_s, "ratio": jax_img_s / torch_img_s,
        "ratio_min": min(ratios), "ratio_max": max(ratios),
        "jax_rounds": rates["jax"], "torch_rounds": rates["torch"],
        "mflop_per_img": step_flops / 1e6, "gflops": step_flops * jax_img_s / 1e9,
        "torch_gflops": step_flops * torch_img_s / 1e9, "compile_s": compile_s,
        "xla_options": options or {}, "gemm": case.jax_model.policy.gemm, "forms": case.jax_model.policy.forms,
    }


def machine() -> str:
    """A one-line description of this machine."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    dev = jax.devices()[0]
    where = f"{cpu}, {os.cpu_count()} cores"
    return where if dev.platform == "cpu" else f"{dev.device_kind} ({where})"


def _options_label(options: dict | None) -> str:
    """The table's name for a step's XLA compile options (`jaxvgg.policy.Policy.compiler_options`)."""
    if not options:
        return "default"
    if options == {YNN_FUSION_OPTION: ""}:
        return "YNNPACK off"
    return " ".join(f"{k}={v!r}" for k, v in sorted(options.items()))


def table(rows: list[dict]) -> str:
    """The rows as a markdown table, the epoch timings and both precisions' matmul peaks below it; a row's
    "% of jax matmul peak" is against the peak of its own precision."""
    compiled = any("torch_compile_s" in r for r in rows)
    lines = ["| model | mode | precision | allocator | jax devices | XLA:CPU | GEMM | jax img/s | torch img/s "
             "| jax/torch (range) | jax GFLOP/s (torch) | % of jax matmul peak | compile s |"
             + (" torch.compile img/s (compile s) | jax/compiled |" if compiled else ""),
             "|---|---|---|---|---:|---|---|---:|---:|---|---:|---:|---:|" + ("---:|---:|" if compiled else "")]
    for r in rows:
        if r["mode"] == "epoch":
            continue
        line = (f"| {r['model']} | {r['mode']} | {r.get('precision', 'fp32')} | {r['allocator']} | "
                f"{r['jax_devices']} | {_options_label(r.get('xla_options'))} | {r.get('gemm', 'xla')} | "
                f"{r['jax_img_s']:,.0f} | {r['torch_img_s']:,.0f} | "
                f"{r['ratio']:.2f}x ({r['ratio_min']:.2f}-{r['ratio_max']:.2f}) | "
                f"{r['gflops']:.0f} ({r['torch_gflops']:.0f}) | "
                f"{100 * r['gflops'] / r['peak_gflops_jax']:.0f} % | {r['compile_s']:.1f} |")
        if compiled:
            line += (f" {r['torch_compile_img_s']:,.0f} ({r['torch_compile_s']:.0f}) | "
                     f"{r['torch_compile_ratio']:.2f}x |" if r.get("torch_compile_img_s") else " failed | – |")
        lines.append(line)
    lines.append("")
    for e in (r for r in rows if r["mode"] == "epoch"):
        lines.append(f"One CIFAR-10 epoch of {e['model']} through `fit` ({e['images']:,} images, batch {e['batch']}, "
                     f"{e['allocator']}): {e['epoch_s']:.1f} s ({e['jax_img_s']:,.0f} img/s, first-step compile "
                     f"included); the host input pipeline alone takes {e['pipeline_s']:.2f} s = "
                     f"{100 * e['pipeline_fraction']:.1f} % of the epoch.")
    peaks: dict[tuple[str, str, int], tuple[float, float]] = {}  # (allocator, precision, n) -> (jax, torch) GFLOP/s
    for r in rows:
        n = r.get("peak_size", 2048)  # rows written before --peak-size: 2048
        for p in PRECISIONS:
            if f"peak_gflops_jax_{p}" in r:
                peaks[r["allocator"], p, n] = (r[f"peak_gflops_jax_{p}"], r[f"peak_gflops_torch_{p}"])
        peaks.setdefault((r["allocator"], r.get("precision", "fp32"), n),
                         (r["peak_gflops_jax"], r["peak_gflops_torch"]))
    lines += [f"{PEAK_LABELS[p]} matmul peak, {n}^3 ({a}): jax {j:.0f}, torch {t:.0f} GFLOP/s."
              for (a, p, n), (j, t) in peaks.items()]
    return "\n".join(lines)


