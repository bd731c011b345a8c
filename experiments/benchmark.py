"""Throughput of jaxvgg against the PyTorch originals, measured in one process in alternating rounds.

    python -m experiments.benchmark --json build/benchmark.json
    python -m experiments.benchmark --models cifar_cnn --modes train --rounds 3

For every model (cifar_cnn, vgg11 at 32x32, mnist_lenet, and the vgg16_transfer head on cached
4096-d features) and mode (train: SGD/Adam step with backward; infer: evaluation-mode forward), both
frameworks start from the same weights (converted with `jaxvgg.to_torch`) and run ``steps`` batches per
round; the rounds alternate which framework goes first, so a neighbour taking a core hurts both. The
table gives the median images/s of each, their ratio with its range over rounds, the achieved GFLOP/s
(forward FLOPs counted from the jaxpr, x3 for a training step) against a float32 matmul peak measured
here, and the XLA compile time of the first step. The JAX steps are compiled as `jaxvgg.train.fit`
compiles them: with the model's XLA:CPU options (`jaxvgg.models.resolve_compiler_options`, the table's
"XLA:CPU" column) and matrix products (`jaxvgg.gemm`: MKL's sgemm where built, the "GEMM" column);
``JAXVGG_IMPL=native`` turns both off with the CPU conv forms.

Allocators: each one (``--allocators``) runs in a child process of its own with ``LD_PRELOAD`` set
accordingly, and both frameworks share it; ``auto`` = system and, where installed, tcmalloc. The
children also get the experiments' CPU setting (one XLA device per core, `jaxvgg.runtime`), and the
JAX side runs data parallel over `jaxvgg.parallel.auto_num_devices` devices, as `fit` does; torch
runs with its default intra-op threads (one per core). ``--allocators current`` runs in this process
as it is.

The real input pipeline is timed too: one CIFAR-10 training epoch through `jaxvgg.train.fit`
(uint8 gather on the host, augmentation on the device), with the host-side batch pipeline timed on
its own (needs ``--data-dir`` or ``$JAXVGG_DATA_DIR``; skipped otherwise).
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from functools import partial
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from experiments.common import parse_config
from jaxvgg import augment, convert, data, gemm, models, optim, parallel, runtime
from jaxvgg.checkpoint import write_json
from jaxvgg.train import FitConfig, TrainState, fit, train_step

MODEL_NAMES = ("cifar_cnn", "vgg11", "mnist_lenet", "transfer_head")
# Steps per round at the default batch sizes: about a second of work per framework per round here.
DEFAULT_STEPS = {("cifar_cnn", "train"): 6, ("cifar_cnn", "infer"): 6, ("vgg11", "train"): 2,
                 ("vgg11", "infer"): 2, ("mnist_lenet", "train"): 30, ("mnist_lenet", "infer"): 30,
                 ("transfer_head", "train"): 100, ("transfer_head", "infer"): 100}
# Issue 5's targets, jax/torch eager on the same allocator: training VGG-A >= 1.0x, CNN and LeNet >= 1.3x
# (none for the transfer head), inference >= 1.2x for every model.
TARGETS = {("vgg11", "train"): 1.0, ("cifar_cnn", "train"): 1.3, ("mnist_lenet", "train"): 1.3,
           **{(name, "infer"): 1.2 for name in MODEL_NAMES}}
TRANSFER_CLASSES = 100  # vgg16_transfer's registry default
FEATURES = 4096


@dataclasses.dataclass
class Config:
    models: str = dataclasses.field(default=",".join(MODEL_NAMES), metadata={
        "help": f"comma-separated, from {', '.join(MODEL_NAMES)}"})
    modes: str = dataclasses.field(default="train,infer", metadata={"help": "train, infer or both"})
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
    json: str | None = dataclasses.field(default=None, metadata={"help": "write the rows as JSON here"})
    quiet: bool = dataclasses.field(default=False, metadata={"help": "no per-round lines"})
    child: bool = dataclasses.field(default=False, metadata={
        "help": "internal: run everything in this process and write its rows to --json"})


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


def jaxpr_flops(jaxpr: Any) -> float:
    """Multiply-add FLOPs (2 per MAC) of the matmuls and convolutions in a (closed) jaxpr, sub-jaxprs included."""
    jaxpr = getattr(jaxpr, "jaxpr", jaxpr)
    total = 0.0
    for eqn in jaxpr.eqns:
        total += _eqn_flops(eqn)
        for param in eqn.params.values():
            for sub in (param if isinstance(param, (list, tuple)) else [param]):
                if hasattr(sub, "eqns") or hasattr(getattr(sub, "jaxpr", None), "eqns"):
                    total += jaxpr_flops(sub)
    return total


def model_flops(case: Case, x: np.ndarray) -> float:
    """Forward FLOPs of ``case``'s model on the batch ``x``, counted in the native form.

    The fast forms compute the same sums (im2col as one matmul, counted the same), but LeNet's
    single-channel "direct" conv is elementwise multiply-adds the jaxpr count would miss.
    """
    model = case.jax_model
    if hasattr(model, "conv_impl"):
        model = model.clone(conv_impl="lax")
    return jaxpr_flops(jax.make_jaxpr(lambda p, v: model.apply({"params": p}, v))(case.params, x))


def matmul_peak(n: int = 2048, repeats: int = 5) -> dict[str, float]:
    """Best float32 GFLOP/s of an n x n matmul: jitted jnp.dot and torch.mm."""
    import torch

    a = jnp.asarray(np.random.default_rng(0).random((n, n), np.float32))
    dot = jax.jit(jnp.dot)
    dot(a, a).block_until_ready()
    ta = torch.from_numpy(np.array(a))  # a writable copy
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


def _transfer_head_case(key: jax.Array) -> Case:
    import torch
    from torch import nn

    from experiments.vgg16_transfer import TransferHead

    head = TransferHead(TRANSFER_CLASSES)
    params = jax.jit(head.init)(key, jnp.zeros((1, FEATURES), jnp.float32))["params"]
    torch_head = nn.Sequential(nn.Dropout(0.5), nn.Linear(FEATURES, 256), nn.ReLU(), nn.Dropout(0.4),
                               nn.Linear(256, TRANSFER_CLASSES), nn.LogSoftmax(dim=1))
    with torch.no_grad():
        for index, layer in ((1, "classifier_6_0"), (4, "classifier_6_3")):
            torch_head[index].weight.copy_(torch.from_numpy(np.asarray(params[layer]["kernel"]).T.copy()))
            torch_head[index].bias.copy_(torch.from_numpy(np.asarray(params[layer]["bias"])))
    return Case(models.TRANSFER_HEAD, (FEATURES,), head, params, torch_head, log_probs=True, optimizer="adam")


def build_case(name: str, key: jax.Array) -> Case:
    """The jaxvgg model and its torch_ref original for a benchmark name, with identical weights."""
    import torch

    from torch_ref import models as torch_models

    if name == "transfer_head":
        return _transfer_head_case(key)
    if name not in MODEL_NAMES:
        raise ValueError(f"unknown benchmark model {name!r}; expected one of {', '.join(MODEL_NAMES)}")
    spec = models.get_spec(name)
    shape = (32, 32, 3) if name == "vgg11" else spec.input_shape
    num_classes = 10
    params = models.init_params(name, key, num_classes=num_classes, input_shape=shape)
    torch_model = torch_models.build(name, num_classes=num_classes, image_size=shape[0])
    state_dict = {k: torch.from_numpy(v) for k, v in convert.to_torch(name, params).items()}
    torch_model.load_state_dict(state_dict)
    return Case(name, shape, models.create_model(name, num_classes=num_classes), params["params"], torch_model,
                log_probs=spec.log_probs, optimizer="sgd")


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
    """max |jax - torch| of evaluation-mode outputs on one batch: both sides compute the same function."""
    import torch

    x, _ = _batch(case, batch_size, seed=2)
    out = np.asarray(case.jax_model.apply({"params": case.params}, jnp.asarray(x)))
    case.torch_model.eval()
    with torch.inference_mode():
        ref = case.torch_model(_torch_input(x)).numpy()
    return float(np.abs(out - ref).max())


def jax_runner(case: Case, mode: str,
               batch_size: int) -> tuple[Callable[[int], None], float, float, int, dict[str, Any] | None]:
    """(run(n) that does n steps and waits for them, compile seconds, forward FLOPs per image, devices,
    the XLA compile options of the step).

    The step runs as `jaxvgg.train.fit` runs it: data parallel over `parallel.auto_num_devices` devices.
    """
    x, y = _batch(case, batch_size, seed=1)
    forward = partial(case.jax_model.apply, train=False)
    flops = model_flops(case, x) / batch_size
    mesh = parallel.make_mesh(parallel.auto_num_devices(case.params, batch_size))
    options = models.resolve_compiler_options(case.name, mode)
    params = parallel.replicate(case.params, mesh)  # a copy: the training step donates its state
    batch = parallel.shard_batch({"image": x, "label": y.astype(np.int32)}, mesh)
    if mode == "train":
        state = TrainState.create(apply_fn=case.jax_model.apply, params=params, tx=_jax_tx(case),
                                  rng=jax.random.PRNGKey(0), log_probs=case.log_probs, model=case.name)
        state = parallel.replicate(state, mesh)
        t = time.perf_counter()
        step = parallel.data_parallel(train_step, mesh, compiler_options=options).lower(state, batch).compile()
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
        apply = jax.jit(lambda p, v: forward({"params": p}, v),
                        in_shardings=(parallel.replicated(mesh), parallel.batch_sharded(mesh)),
                        compiler_options=options).lower(params, batch["image"]).compile()
        compile_s = time.perf_counter() - t

        def run(n: int) -> None:
            for _ in range(n):
                out = apply(params, batch["image"])
            jax.block_until_ready(out)
    return run, compile_s, flops, mesh.size, options


def torch_runner(case: Case, mode: str, batch_size: int, compiled: bool = False) -> Callable[[int], None]:
    """run(n): n torch steps (training) or inference_mode forwards; eager, or through ``torch.compile``
    (a copy of the model, forward and backward compiled by inductor, the optimizer step eager)."""
    import copy

    import torch
    import torch.nn.functional as F

    x, y = _batch(case, batch_size, seed=1)
    images, labels = _torch_input(x), torch.from_numpy(y)
    model = case.torch_model
    if compiled:
        model = torch.compile(copy.deepcopy(model))
    if mode == "train":
        opt = _torch_optimizer(case, model)
        loss_fn = F.nll_loss if case.log_probs else F.cross_entropy
        model.train()

        def run(n: int) -> None:
            for _ in range(n):
                opt.zero_grad(set_to_none=True)
                loss_fn(model(images), labels).backward()
                opt.step()
    else:
        model.eval()

        def run(n: int) -> None:
            with torch.inference_mode():
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
    """Alternating rounds of the frameworks (jax, torch eager, optionally torch.compile); one result row."""
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
        "model": case.name, "mode": mode, "batch": batch_size, "steps": steps, "rounds": rounds, "jax_devices": devices,
        "jax_img_s": jax_img_s, "torch_img_s": torch_img_s, "ratio": jax_img_s / torch_img_s,
        "ratio_min": min(ratios), "ratio_max": max(ratios),
        "jax_rounds": rates["jax"], "torch_rounds": rates["torch"],
        "mflop_per_img": step_flops / 1e6, "gflops": step_flops * jax_img_s / 1e9,
        "torch_gflops": step_flops * torch_img_s / 1e9, "compile_s": compile_s,
        "xla_options": options or {}, "gemm": gemm.backend(), "target": TARGETS.get((case.name, mode)),
    }


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
    for batch in data.iterate_batches(train, batch_size, seed=0, epoch=1, drop_last=True):
        jax.block_until_ready(parallel.shard_batch(batch, mesh))
    pipeline_s = time.perf_counter() - t

    name = cfg.epoch_model
    model = models.create_model(name, num_classes=10)
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
    return {"model": name, "mode": "epoch", "batch": batch_size, "images": len(train), "epoch_s": epoch_s,
            "jax_img_s": len(train) // batch_size * batch_size / epoch_s, "torch_img_s": None, "ratio": None,
            "gflops": None, "compile_s": None, "pipeline_s": pipeline_s, "pipeline_fraction": pipeline_s / epoch_s,
            "load_s": load_s}


# --- driver -----------------------------------------------------------------------------------------

def _split(text: str, allowed: tuple[str, ...], what: str) -> list[str]:
    items = [s.strip() for s in text.split(",") if s.strip()]
    bad = [s for s in items if s not in allowed]
    if bad or not items:
        raise ValueError(f"--{what} {text!r}: expected a comma list from {', '.join(allowed)}")
    return items


def run_here(cfg: Config, say: Callable[[str], None]) -> list[dict]:
    """The whole benchmark in this process, under whatever allocator it has."""
    import torch

    if cfg.torch_threads:
        torch.set_num_threads(cfg.torch_threads)
    names = _split(cfg.models, MODEL_NAMES, "models")
    modes = _split(cfg.modes, ("train", "infer"), "modes")
    allocator = runtime.allocator_in_use()
    say(f"allocator {allocator}; jax {jax.__version__} on {jax.default_backend()} ({jax.devices()[0].device_kind}), "
        f"torch {torch.__version__} with {torch.get_num_threads()} threads")
    peak = matmul_peak()
    say(f"float32 matmul peak (2048^3): jax {peak['jax']:.0f} GFLOP/s, torch {peak['torch']:.0f} GFLOP/s")
    rows = []
    for i, name in enumerate(names):
        case = build_case(name, jax.random.PRNGKey(i))
        diff = forward_max_abs_diff(case)
        say(f"{name}: same weights in both, outputs agree to max |Δ| {diff:.2g}")
        for mode in modes:
            batch_size = cfg.train_batch if mode == "train" else cfg.infer_batch
            steps = cfg.steps or DEFAULT_STEPS[(name, mode)]
            say(f"{name} {mode} (batch {batch_size}, {steps} steps x {cfg.rounds} rounds)")
            row = measure(case, mode, batch_size, steps, cfg.rounds, say, torch_compile=cfg.torch_compile)
            row["output_max_abs_diff"] = diff
            rows.append(row)
    epoch = time_cifar_epoch(cfg, say)
    if epoch is not None:
        rows.append(epoch)
    for row in rows:
        row.update(allocator=allocator, backend=jax.default_backend(), torch_threads=torch.get_num_threads(),
                   peak_gflops_jax=peak["jax"], peak_gflops_torch=peak["torch"])
    return rows


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


def _allocators(text: str) -> list[str]:
    if text == "current":
        return []
    if text == "auto":
        return ["system"] + (["tcmalloc"] if runtime.find_tcmalloc() else [])
    return _split(text, runtime.ALLOCATORS, "allocators")


def _options_label(options: dict | None) -> str:
    """The table's name for a step's XLA compile options (`models.resolve_compiler_options`)."""
    if not options:
        return "default"
    if options == {models.YNN_FUSION_OPTION: ""}:
        return "YNNPACK off"
    return " ".join(f"{k}={v!r}" for k, v in sorted(options.items()))


def _target_label(target: float | None, ratio: float) -> str:
    """"≥ 1.3x met" / "≥ 1.3x not met" for the table; "–" where issue 5 sets no target."""
    if target is None:
        return "–"
    return f"≥ {target:.1f}x {'met' if ratio >= target else 'not met'}"


def table(rows: list[dict]) -> str:
    """The rows as a markdown table, the epoch timings and matmul peaks below it."""
    compiled = any("torch_compile_s" in r for r in rows)
    lines = ["| model | mode | allocator | jax devices | XLA:CPU | GEMM | jax img/s | torch img/s | jax/torch (range) "
             "| target | jax GFLOP/s (torch) | % of jax matmul peak | compile s |"
             + (" torch.compile img/s (compile s) | jax/compiled |" if compiled else ""),
             "|---|---|---|---:|---|---|---:|---:|---|---|---:|---:|---:|" + ("---:|---:|" if compiled else "")]
    for r in rows:
        if r["mode"] == "epoch":
            continue
        line = (f"| {r['model']} | {r['mode']} | {r['allocator']} | {r['jax_devices']} | "
                f"{_options_label(r.get('xla_options'))} | {r.get('gemm', 'xla')} | {r['jax_img_s']:,.0f} | "
                f"{r['torch_img_s']:,.0f} | {r['ratio']:.2f}x ({r['ratio_min']:.2f}-{r['ratio_max']:.2f}) | "
                f"{_target_label(r.get('target'), r['ratio'])} | {r['gflops']:.0f} ({r['torch_gflops']:.0f}) | "
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
    peaks = {r["allocator"]: (r["peak_gflops_jax"], r["peak_gflops_torch"]) for r in rows}
    lines += [f"float32 matmul peak, 2048^3 ({a}): jax {j:.0f}, torch {t:.0f} GFLOP/s." for a, (j, t) in peaks.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[dict]:
    cfg = parse_config(Config, argv, description=__doc__.split("\n\n")[0])
    say = (lambda _: None) if cfg.quiet else (lambda msg: print(msg, flush=True))
    _split(cfg.models, MODEL_NAMES, "models"), _split(cfg.modes, ("train", "infer"), "modes")  # fail before any work
    if cfg.epoch_model not in ("none", "cifar_cnn", "vgg11"):
        raise ValueError(f"--epoch-model {cfg.epoch_model!r}: expected cifar_cnn, vgg11 or none")
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
                env = runtime.environ_with_cpu_devices(runtime.cpu_device_count(),
                                                       runtime.environ_with_allocator(allocator))
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
