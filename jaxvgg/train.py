"""Training state and pure train/eval steps.

Steps are module-level pure functions ``(state, batch) -> (state, metrics)``; `fit`, `evaluate` and
`predict` jit them through `jaxvgg.parallel.compile_step` with the state's policy (see flax
examples/imagenet). A batch is ``{"image": float32 (B, H, W, C), "label": int32 (B,)}``,
optionally with ``"mask"`` (B,) marking real examples in a padded final batch; the data sets `fit`
reads are `jaxvgg.data.BatchSource`s.

Several processes (`jaxvgg.distributed`): every process calls `fit` with the same arguments; the
mesh spans all their devices, each process reads only its rows of every global batch, every
process takes part in the checkpoint saves, and only process 0 prints and writes history.json.
The data order and the global batch do not depend on the process or device count. The state comes
back as each process's own copy (`jaxvgg.parallel.unreplicate`), for single-process code after it.
"""

from __future__ import annotations

import dataclasses
import math
import time
from functools import partial
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import struct
from jax.sharding import Mesh
from tqdm.auto import tqdm

from jaxvgg import checkpoint as ckpt
from jaxvgg import data, distributed, models, optim, parallel
from jaxvgg.policy import NATIVE, Policy


class TrainState(struct.PyTreeNode):
    """Everything a step reads and writes; a pytree, so a checkpoint of it resumes a run."""

    step: jax.Array
    params: Any
    opt_state: optax.OptState
    rng: jax.Array  # folded with the step for per-step dropout keys
    apply_fn: Callable = struct.field(pytree_node=False)
    tx: optax.GradientTransformation = struct.field(pytree_node=False)
    log_probs: bool = struct.field(pytree_node=False, default=False)  # outputs are log-probs: NLL loss
    label_smoothing: float = struct.field(pytree_node=False, default=0.0)
    # how the network runs (its module's policy): `fit` compiles the steps with its XLA options
    policy: Policy = struct.field(pytree_node=False, default=NATIVE)
    batch_stats: Any = None  # BatchNorm running statistics (flax's batch_stats collection); None without BN
    plateau: Any = None  # optim.plateau_init() state when the plateau lr rule is on
    early_stopping: Any = None  # optim.early_stopping_init() state when early stopping is on
    # (params, batch_stats) averaged over the steps (`optim.ema_update`), what evaluation applies; None: off
    ema: Any = None
    ema_decay: float = struct.field(pytree_node=False, default=0.0)

    @classmethod
    def create(cls, *, apply_fn: Callable, params: Any, tx: optax.GradientTransformation, rng: jax.Array,
               log_probs: bool = False, label_smoothing: float = 0.0, policy: Policy | None = None,
               ema_decay: float = 0.0) -> "TrainState":
        """A step-0 state with a fresh optimizer state.

        ``params``: the parameters, or the model's whole variables (``{"params": ..., "batch_stats": ...}``,
        whose batch_stats, BatchNorm's running statistics, are then the state's). ``policy`` defaults
        to that of ``apply_fn``'s module.
        ``ema_decay`` > 0 keeps a moving average of the parameters and BatchNorm statistics, updated
        after every step and evaluated in their place (`eval_variables`).
        """
        batch_stats = None
        if "params" in params:
            batch_stats = params.get("batch_stats")
            params = params["params"]
        if policy is None:
            policy = getattr(getattr(apply_fn, "__self__", None), "policy", NATIVE)
        if not 0.0 <= ema_decay < 1.0:
            raise ValueError(f"ema_decay must be in [0, 1), got {ema_decay}")
        ema = jax.tree_util.tree_map(jnp.copy, (params, batch_stats)) if ema_decay else None
        return cls(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params), rng=rng,
                   batch_stats=batch_stats, apply_fn=apply_fn, tx=tx, log_probs=log_probs,
                   label_smoothing=label_smoothing, policy=policy, ema=ema, ema_decay=ema_decay)

    @property
    def variables(self) -> dict:
        """What ``apply_fn`` takes: ``{"params": ...}``, with ``"batch_stats"`` when the model has BatchNorm."""
        if self.batch_stats is None:
            return {"params": self.params}
        return {"params": self.params, "batch_stats": self.batch_stats}

    @property
    def eval_variables(self) -> dict:
        """What evaluation applies: the moving average of the weights (and statistics) when one is kept."""
        if self.ema is None:
            return self.variables
        params, stats = self.ema
        return {"params": params} if stats is None else {"params": params, "batch_stats": stats}

    @classmethod
    def for_model(cls, name: str, model: Any, params: Any, tx: optax.GradientTransformation, rng: jax.Array,
                  label_smoothing: float = 0.0, ema_decay: float = 0.0) -> "TrainState":
        """A state for a registry model: its loss follows whether it ends in log_softmax."""
        return cls.create(apply_fn=model.apply, params=params, tx=tx, rng=rng,  # params: or all the variables
                          log_probs=models.get_spec(name).log_probs, label_smoothing=label_smoothing,
                          policy=model.policy, ema_decay=ema_decay)

    def apply_gradients(self, grads: Any) -> "TrainState":
        """One optimizer update."""
        updates, opt_state = self.tx.update(grads, self.opt_state, self.params)
        return self.replace(step=self.step + 1, params=optax.apply_updates(self.params, updates),
                            opt_state=opt_state)


def per_example_loss(outputs: jax.Array, labels: jax.Array, log_probs: bool,
                     label_smoothing: float = 0.0) -> jax.Array:
    """NLL of log-prob outputs, or cross-entropy of logits (torch's F.nll_loss / F.cross_entropy)."""
    logp = outputs if log_probs else jax.nn.log_softmax(outputs, axis=-1)
    nll = -jnp.take_along_axis(logp, labels[:, None], axis=-1)[:, 0]
    if label_smoothing:
        # torch's F.cross_entropy(label_smoothing=s): (1 - s) * nll + s * mean over classes of -logp
        nll = (1.0 - label_smoothing) * nll - label_smoothing * logp.mean(axis=-1)
    return nll


def _mask(batch: dict) -> jax.Array:
    return batch.get("mask", jnp.ones(batch["label"].shape, jnp.float32)).astype(jnp.float32)


def train_step(state: TrainState, batch: dict) -> tuple[TrainState, dict]:
    """One optimizer step on the batch mean loss; returns the new state and batch metrics."""
    dropout_key = jax.random.fold_in(state.rng, state.step)
    mask = _mask(batch)

    def loss_fn(params):
        variables = {**state.variables, "params": params}
        if state.batch_stats is None:
            outputs, stats = state.apply_fn(variables, batch["image"], train=True, rngs={"dropout": dropout_key}), None
        else:  # BatchNorm: batch statistics normalise, the running ones move (every example counts: no mask)
            outputs, updates = state.apply_fn(variables, batch["image"], train=True, rngs={"dropout": dropout_key},
                                              mutable=["batch_stats"])
            stats = updates["batch_stats"]
        losses = per_example_loss(outputs, batch["label"], state.log_probs, state.label_smoothing)
        return jnp.sum(losses * mask) / jnp.sum(mask), (outputs, stats)

    (loss, (outputs, stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    correct = (jnp.argmax(outputs, -1) == batch["label"]).astype(jnp.float32)
    metrics = {"loss": loss, "accuracy": jnp.sum(correct * mask) / jnp.sum(mask)}
    state = state.apply_gradients(grads).replace(batch_stats=stats)
    if state.ema is not None:
        state = state.replace(ema=optim.ema_update(state.ema, (state.params, stats), state.ema_decay, state.step))
    return state, metrics


def eval_step(state: TrainState, batch: dict) -> dict:
    """Summed loss, correct count and example count (sums, so partial batches aggregate exactly)."""
    outputs = state.apply_fn(state.eval_variables, batch["image"])  # BatchNorm: the running statistics
    mask = _mask(batch)
    losses = per_example_loss(outputs, batch["label"], state.log_probs)
    correct = (jnp.argmax(outputs, -1) == batch["label"]).astype(jnp.float32)
    return {"loss_sum": jnp.sum(losses * mask), "correct": jnp.sum(correct * mask), "count": jnp.sum(mask)}


# --- the epoch loop --------------------------------------------------------------------------------

Transform = Callable[[jax.Array, jax.Array], jax.Array]  # (key, uint8 images) -> float32 images
EvalTransform = Callable[[jax.Array], jax.Array]  # uint8 images -> float32 images


@dataclasses.dataclass(frozen=True)
class FitConfig:
    """How `fit` runs; every field has the value a quick run would want."""

    epochs: int = 1
    batch_size: int = 128  # global, split across devices
    eval_batch_size: int = 500
    seed: int = 0  # data order: permutation of epoch e comes from (seed, e)
    workdir: str | None = None  # checkpoints/ and history.json go here
    resume: bool = False  # continue from the newest checkpoint in workdir
    keep_checkpoints: int = 3
    plateau_patience: int | None = None  # divide lr by 10 after this many epochs without val-accuracy gain
    plateau_factor: float = 0.1
    plateau_max_reductions: int = 3
    plateau_threshold: float = 1e-4  # absolute val-accuracy gain that counts as improvement
    early_stopping_patience: int | None = None  # stop after this many epochs without val-loss gain
    num_devices: int | None = None  # None: parallel.auto_num_devices (all, or one for big nets on the CPU)
    quiet: bool = False  # no progress bars, one line per epoch
    # also save every this many steps within an epoch (checkpoints/partial, with the input iterator's state),
    # so a resumed run continues mid-epoch: for epochs of hours (an image-folder stream); None: at epoch ends
    checkpoint_every_steps: int | None = None


def augmented_train_step(state: TrainState, batch: dict, transform: Transform) -> tuple[TrainState, dict]:
    """`train_step` on ``transform``-ed uint8 images, with an augmentation key derived from (rng, step):
    the step `fit` jits (``partial(augmented_train_step, transform=...)``); metrics also hold the lr used."""
    key = jax.random.fold_in(jax.random.fold_in(state.rng, state.step), 0x5EED)
    state, metrics = train_step(state, {**batch, "image": transform(key, batch["image"])})
    return state, {**metrics, "lr": optim.current_lr(state.opt_state)}  # the lr this step used


def _transformed_eval_step(state: TrainState, batch: dict, transform: EvalTransform) -> dict:
    return eval_step(state, {**batch, "image": transform(batch["image"])})


def _transformed_predict(state: TrainState, batch: dict, transform: EvalTransform) -> jax.Array:
    return state.apply_fn(state.eval_variables, transform(batch["image"]))


def padded_outputs(fn: Callable, first: Any, batches: Iterable[dict], num_examples: int, batch_size: int,
                   mesh: Mesh | None = None) -> Iterator[tuple[Any, int]]:
    """``(fn(first, batch), real examples in it)`` for each padded batch, in order: the one prediction loop.

    ``batches``: padded to ``batch_size`` (`jaxvgg.data.padded_batches`, `BatchSource.padded_batches`),
    each this process's rows when there is a ``mesh`` (then split over it: ``fn`` jitted with it).
    The padding is at the end, so a batch's real examples are its first ones.
    """
    for b, batch in enumerate(batches):
        yield (fn(first, batch if mesh is None else parallel.shard_batch(batch, mesh)),
               min(batch_size, num_examples - b * batch_size))


def _mesh_padded_outputs(fn: Callable, first: Any, dataset: data.BatchSource, batch_size: int,
                         mesh: Mesh | None) -> Iterator[tuple[Any, int]]:
    """`padded_outputs` over ``dataset``: with a mesh, the batch rounded up to a multiple of its size and
    each process reading only its rows, so over all processes each example counts once."""
    if mesh is not None:
        batch_size = _round_up(batch_size, mesh.size)
    rows = None if mesh is None else parallel.batch_rows(batch_size, mesh)
    return padded_outputs(fn, first, dataset.padded_batches(batch_size, rows), len(dataset), batch_size, mesh)


def evaluate(state: TrainState, dataset: data.BatchSource, transform: EvalTransform, batch_size: int = 500,
             mesh: Mesh | None = None) -> dict[str, float]:
    """Mean loss and accuracy over every example of ``dataset`` (the last partial batch included)."""
    mesh = mesh or parallel.make_mesh(1)
    step = parallel.compile_step(partial(_transformed_eval_step, transform=transform), state.policy, "infer", mesh)
    return _evaluate(step, state, dataset, batch_size, mesh)


def _evaluate(step: Callable, state: TrainState, dataset: data.BatchSource, batch_size: int,
              mesh: Mesh) -> dict[str, float]:
    """`evaluate` with an already jitted eval step (fit reuses one, so it compiles once per run)."""
    totals = {"loss_sum": 0.0, "correct": 0.0, "count": 0.0}
    for sums, _ in _mesh_padded_outputs(step, state, dataset, batch_size, mesh):  # sums over the global batch
        totals = {k: totals[k] + float(sums[k]) for k in totals}
    return {"loss": totals["loss_sum"] / totals["count"], "accuracy": totals["correct"] / totals["count"]}


def predict(state: TrainState, dataset: data.BatchSource, transform: EvalTransform, batch_size: int = 500,
            mesh: Mesh | None = None) -> np.ndarray:
    """Model outputs (logits or log-probs, as the model returns) for every example, in order.

    With a ``mesh`` (`jaxvgg.parallel.make_mesh`; over several processes, every process calls this with
    the same arguments) each process reads only its rows of every padded batch, the batch is split over
    the mesh's devices, and every process gets all the outputs. Without one, one device computes them.
    """
    fn = parallel.compile_step(partial(_transformed_predict, transform=transform), state.policy, "infer", mesh)
    state = state if mesh is None else parallel.replicate(state, mesh)
    # the outputs are replicated: each process reads the whole global batch's
    return np.concatenate([distributed.to_numpy(out)[:real]
                           for out, real in _mesh_padded_outputs(fn, state, dataset, batch_size, mesh)])


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def _new_history() -> dict:
    return {"batch": {k: [] for k in ("step", "epoch", "loss", "accuracy", "lr")},
            "epoch": {k: [] for k in ("epoch", "train_loss", "train_accuracy", "val_loss", "val_accuracy", "lr",
                                      "time_s", "images_per_s")}}


# on_step(epoch, batch, metrics): ``batch`` counts from 1 within the epoch; metrics are floats: loss, accuracy, lr
StepHook = Callable[[int, int, dict], None]


@dataclasses.dataclass
class _Run:
    """What one `fit` call holds beside the state: its config, mesh, compiled steps, checkpoints and history."""

    config: FitConfig
    mesh: Mesh
    steps_per_epoch: int
    base_lr: float  # the lr the plateau rule scales
    checkpoints: ckpt.Checkpoints | None
    on_step: StepHook | None
    history: dict = dataclasses.field(default_factory=_new_history)
    train_fn: Callable | None = None
    eval_fn: Callable | None = None
    best: Any = None  # (params, batch_stats) of early stopping's best epoch, once this run has seen it

    @property
    def workdir(self) -> Path | None:
        return Path(self.config.workdir) if self.config.workdir else None

    @property
    def rows(self) -> slice:  # this process's share of every global batch
        return parallel.batch_rows(self.config.batch_size, self.mesh)

    @property
    def quiet(self) -> bool:
        return self.config.quiet or not distributed.is_main_process()


def fit(state: TrainState, train_data: data.BatchSource, val_data: data.BatchSource | None, config: FitConfig, *,
        train_transform: Transform, eval_transform: EvalTransform,
        on_step: StepHook | None = None) -> tuple[TrainState, dict]:
    """Trains ``state`` for ``config.epochs`` epochs; the pure steps are jitted here.

    Args:
      state: from `TrainState.create` / `for_model`; its optimizer must come from `jaxvgg.optim`
        when a plateau rule is configured (the lr is rewritten in the optimizer state).
      train_data, val_data: `jaxvgg.data.BatchSource`s (val_data may be None).
      config: see `FitConfig`.
      train_transform: jittable ``(key, uint8 images) -> float32`` run on the device per batch
        (augmentation + normalisation).
      eval_transform: jittable ``uint8 images -> float32``.
      on_step: a `StepHook`, called on every process once a step's metrics are read and its history
        entry written, before a mid-epoch save after that batch (logging; a test stopping at a step).

    Returns:
      (final state, history). With early stopping the state holds the best epoch's parameters (and
      BatchNorm statistics).
      History: ``{"batch": {step, epoch, loss, accuracy, lr}, "epoch": {epoch, train_loss,
      train_accuracy, val_loss, val_accuracy, lr, time_s, images_per_s}}`` (epoch in epoch units).

    Several processes: see the module's docstring.

    Raises:
      FloatingPointError: when the loss becomes NaN/inf, naming the step and lr; checkpoints of
        earlier epochs are kept.
      jaxvgg.distributed.ProcessLostError: another process died; relaunch all with resume.
    """
    run = _start_run(state, train_data, val_data, config, on_step)
    state, first_epoch, resume_at = _restore_or_start(run, _with_epoch_rules(state, config))
    run.train_fn = parallel.compile_step(partial(augmented_train_step, transform=train_transform), state.policy,
                                         "train", run.mesh, donate_state=True)
    run.eval_fn = parallel.compile_step(partial(_transformed_eval_step, transform=eval_transform), state.policy,
                                        "infer", run.mesh)
    state = parallel.replicate(state, run.mesh)
    try:
        for epoch in range(first_epoch, config.epochs + 1):
            if state.early_stopping is not None and bool(state.early_stopping.should_stop):
                break
            state, record = _train_epoch(run, state, train_data, epoch, resume_at if epoch == first_epoch else None)
            state = _end_epoch(run, state, val_data, record)
    except Exception as e:  # a dead peer fails the next collective: say which process, not gloo's socket error
        if distributed.is_collective_failure(e):
            raise distributed.describe_lost(e) from e
        raise
    state = _best_of_early_stopping(run, state)
    if run.checkpoints is not None:
        run.checkpoints.close()
    return parallel.unreplicate(state), run.history


def _start_run(state: TrainState, train_data: data.BatchSource, val_data: data.BatchSource | None,
               config: FitConfig, on_step: StepHook | None) -> _Run:
    """Checks what `fit` was given and sets up its mesh and checkpoints (nothing trained or restored yet)."""
    mesh = parallel.make_mesh(config.num_devices if config.num_devices is not None
                              else parallel.auto_num_devices(state.params, config.batch_size))
    parallel.check_batch_size(config.batch_size, mesh)
    steps_per_epoch = data.num_batches(len(train_data), config.batch_size, drop_last=True)
    if steps_per_epoch == 0:
        raise ValueError(f"batch_size {config.batch_size} is larger than the {len(train_data)} training images")
    if val_data is None and (config.plateau_patience or config.early_stopping_patience):
        raise ValueError("the plateau rule and early stopping need validation data")
    checkpoints = None
    if config.workdir:
        Path(config.workdir).mkdir(parents=True, exist_ok=True)
        best_metric = "neg_val_loss" if config.early_stopping_patience else "val_accuracy"
        checkpoints = ckpt.Checkpoints(Path(config.workdir) / "checkpoints", config.keep_checkpoints,
                                       best_metric if val_data is not None else None)
    return _Run(config, mesh, steps_per_epoch, float(optim.current_lr(state.opt_state)), checkpoints, on_step)


def _with_epoch_rules(state: TrainState, config: FitConfig) -> TrainState:
    """``state`` with the fresh plateau and early-stopping states its config asks for (kept when resumed)."""
    if config.plateau_patience is not None and state.plateau is None:
        state = state.replace(plateau=optim.plateau_init(
            patience=config.plateau_patience, threshold=config.plateau_threshold, factor=config.plateau_factor,
            min_scale=config.plateau_factor ** config.plateau_max_reductions))
    if config.early_stopping_patience is not None and state.early_stopping is None:
        state = state.replace(early_stopping=optim.early_stopping_init())
    return state


def _restore_or_start(run: _Run, state: TrainState) -> tuple[TrainState, int, dict | None]:
    """(state, first epoch, the meta of a mid-epoch save of that epoch to continue from, or None).

    Restores the newest epoch's checkpoint, then a newer save within the next epoch; without
    checkpoints, the given state at epoch 1. A workdir holding a run needs ``config.resume``.
    """
    checkpoints = run.checkpoints
    if checkpoints is None:
        return state, 1, None
    where = run.workdir / "checkpoints"
    latest, partial_meta = checkpoints.latest_epoch(), checkpoints.partial_meta()
    if (latest is not None or partial_meta is not None) and not run.config.resume:
        held = f"epoch {latest}" if latest is not None else f"a save in epoch {partial_meta['epoch']}"
        raise FileExistsError(f"{where} already holds {held}; pass resume=True (--resume) to continue it, or "
                              "choose another workdir")
    first_epoch, resume_at = 1, None
    if latest is not None:
        state, meta = checkpoints.restore(state)
        run.history, first_epoch = meta["history"], meta["epoch"] + 1
        _log(f"resumed from {where} after epoch {meta['epoch']}")
    if partial_meta is not None and partial_meta["epoch"] == first_epoch:  # newer: a save within that epoch
        state, resume_at = checkpoints.restore_partial(state)
        run.history = resume_at["history"]
        _log(f"resumed from {where / 'partial'} in epoch {resume_at['epoch']}, "
             f"after batch {resume_at['batch']} of {run.steps_per_epoch}")
    return state, first_epoch, resume_at


def _epoch_batches(run: _Run, train_data: data.BatchSource, epoch: int,
                   resume_at: dict | None) -> tuple[data.EpochBatches, int]:
    """This process's batches of ``epoch`` and how many of them were already trained (a mid-epoch resume)."""
    layout = {"seed": run.config.seed, "epoch": epoch, "drop_last": True, "rows": run.rows}
    if resume_at is None:
        return train_data.batches(run.config.batch_size, **layout), 0
    done = int(resume_at["batch"])
    if resume_at.get("data_state") is None:  # saved before in-memory sets kept an iterator state
        return train_data.batches(run.config.batch_size, start_batch=done, **layout), done
    batches = train_data.batches(run.config.batch_size, **layout)
    batches.set_state(resume_at["data_state"])  # continues from the saved iterator state
    return batches, done


class _EpochMeter:
    """One epoch's running loss/accuracy sums, its history entries, progress bar and `StepHook` calls."""

    def __init__(self, run: _Run, epoch: int, first_step: int, done: int):
        self.run, self.epoch, self.first_step = run, epoch, first_step
        self.sums, self.start = np.zeros(3), time.perf_counter()
        if done:  # a mid-epoch resume: the running sums of the batches trained before the save
            h, n = run.history["batch"], run.config.batch_size
            mine = [j for j, e in enumerate(h["epoch"]) if e > epoch - 1]
            self.sums[:] = (sum(h["loss"][j] for j in mine) * n, sum(h["accuracy"][j] for j in mine) * n,
                            len(mine) * n)
        self.counted0 = self.sums[2]  # images/s counts what this process trains now, not what it did before
        self.bar: Any = None

    def record(self, i: int, metrics: dict) -> None:
        """Reads step ``i``'s metrics (waiting for it) and logs them; a NaN/inf loss stops the run."""
        loss, acc, lr = float(metrics["loss"]), float(metrics["accuracy"]), float(metrics["lr"])
        step, run = self.first_step + i + 1, self.run
        if not math.isfinite(loss):
            where = f" (epochs up to {self.epoch - 1} are in {run.workdir / 'checkpoints'})" if run.workdir else ""
            raise FloatingPointError(f"loss is {loss} at step {step} (epoch {self.epoch}, batch {i + 1}), "
                                     f"lr {lr:g}; stopping{where}")
        n = run.config.batch_size  # the global batch
        self.sums[:] += (loss * n, acc * n, n)
        h = run.history["batch"]
        h["step"].append(step), h["epoch"].append(self.epoch - 1 + (i + 1) / run.steps_per_epoch)
        h["loss"].append(loss), h["accuracy"].append(acc), h["lr"].append(lr)
        self.bar.set_postfix(loss=f"{loss:.4f}", acc=f"{acc:.3f}", lr=f"{lr:.2g}",
                             img_s=f"{(self.sums[2] - self.counted0) / (time.perf_counter() - self.start):.0f}",
                             refresh=False)
        if run.on_step is not None:
            run.on_step(self.epoch, i + 1, {"loss": loss, "accuracy": acc, "lr": lr})

    def epoch_record(self) -> dict:
        elapsed = time.perf_counter() - self.start
        return {"epoch": self.epoch, "train_loss": float(self.sums[0] / self.sums[2]),
                "train_accuracy": float(self.sums[1] / self.sums[2]), "val_loss": None, "val_accuracy": None,
                "lr": self.run.history["batch"]["lr"][-1], "time_s": elapsed,
                "images_per_s": float((self.sums[2] - self.counted0) / elapsed)}


def _train_epoch(run: _Run, state: TrainState, train_data: data.BatchSource, epoch: int,
                 resume_at: dict | None) -> tuple[TrainState, dict]:
    """One epoch of steps (from a mid-epoch save's batch when resuming), with its mid-epoch saves."""
    batches, done = _epoch_batches(run, train_data, epoch, resume_at)
    meter = _EpochMeter(run, epoch, int(state.step) - done, done)
    meter.bar = tqdm(batches, total=run.steps_per_epoch, initial=done, desc=f"epoch {epoch}/{run.config.epochs}",
                     unit="batch", disable=run.quiet, leave=False, dynamic_ncols=True)
    every = run.config.checkpoint_every_steps if run.checkpoints is not None else None
    pending = None  # the previous step's metrics: read after the next step is dispatched, so the device never
    for i, batch in enumerate(meter.bar, start=done):  # idles while the host gathers a batch or writes history
        state, metrics = run.train_fn(state, parallel.shard_batch(batch, run.mesh))
        if pending is not None:
            meter.record(*pending)
        pending = (i, metrics)
        if every and (i + 1) % every == 0 and i + 1 < run.steps_per_epoch:
            meter.record(*pending)
            pending = None
            run.checkpoints.save_partial(int(state.step), state, {"epoch": epoch, "batch": i + 1,
                                                                  "history": run.history,
                                                                  "data_state": batches.get_state()})
    if pending is not None:
        meter.record(*pending)
    batches.close()
    return state, meter.epoch_record()


def _end_epoch(run: _Run, state: TrainState, val_data: data.BatchSource | None, record: dict) -> TrainState:
    """Validation, the epoch rules, the history entry, the epoch's line and its checkpoint."""
    if val_data is not None:
        val = _evaluate(run.eval_fn, state, val_data, run.config.eval_batch_size, run.mesh)
        record.update(val_loss=val["loss"], val_accuracy=val["accuracy"])
        if state.plateau is not None or state.early_stopping is not None:
            # the rules run eagerly on this process's copy (host-side numbers), then go back to the mesh
            new = _end_of_epoch_rules(run, parallel.unreplicate(state), val, record["epoch"])
            state = new if run.mesh.is_multi_process is False else parallel.replicate(new, run.mesh)
    for k, v in record.items():
        run.history["epoch"][k].append(v)
    _log("epoch {epoch}: train loss {train_loss:.4f} acc {train_accuracy:.4f}".format(**record)
         + ("" if val_data is None else " | val loss {val_loss:.4f} acc {val_accuracy:.4f}".format(**record))
         + f" | lr {record['lr']:.3g} | {record['time_s']:.0f} s, {record['images_per_s']:.0f} img/s")
    if run.checkpoints is not None:
        if distributed.is_main_process():
            ckpt.write_json(run.workdir / "history.json", run.history)
        metrics = None if val_data is None else {"val_accuracy": record["val_accuracy"],
                                                  "neg_val_loss": -record["val_loss"]}
        run.checkpoints.save(record["epoch"], state, {"epoch": record["epoch"], "history": run.history}, metrics)
    return state


def _end_of_epoch_rules(run: _Run, state: TrainState, val: dict, epoch: int) -> TrainState:
    """The plateau lr rule and early stopping, applied after each epoch's validation."""
    if state.plateau is not None:
        plateau = optim.plateau_update(state.plateau, val["accuracy"])
        lr = run.base_lr * float(optim.plateau_scale(plateau))
        state = state.replace(plateau=plateau, opt_state=optim.set_lr(state.opt_state, lr))
    if state.early_stopping is not None:
        early, improved = optim.early_stopping_update(state.early_stopping, val["loss"], epoch,
                                                      patience=run.config.early_stopping_patience)
        state = state.replace(early_stopping=early)
        if improved:
            run.best = jax.tree_util.tree_map(lambda x: x.copy(), (state.params, state.batch_stats))
    return state


def _best_of_early_stopping(run: _Run, state: TrainState) -> TrainState:
    """With early stopping, ``state`` with its best epoch's parameters (from disk when that epoch came
    before a resume); else ``state``."""
    if state.early_stopping is None:
        return state
    best = run.best
    if best is None and run.checkpoints is not None and run.checkpoints.best_epoch() is not None:
        restored = run.checkpoints.restore(state, best=True)[0]
        best = (restored.params, restored.batch_stats)
    if best is None:
        return state
    _log(f"restoring the parameters of epoch {int(state.early_stopping.best_epoch)} "
         f"(lowest val loss {float(state.early_stopping.best_loss):.4f})")
    return state.replace(params=best[0], batch_stats=best[1])


def _log(message: str) -> None:
    if distributed.is_main_process():
        tqdm.write(message)  # prints above any progress bar
