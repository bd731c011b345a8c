"""Training state and pure train/eval steps.

Steps are module-level pure functions ``(state, batch) -> (state, metrics)``; `fit`, `evaluate` and
`predict` jit them through `jaxvgg.parallel.compile_step` with the state's policy (see flax
examples/imagenet). A batch is ``{"image": float32 (B, H, W, C), "label": int32 (B,)}``,
optionally with ``"mask"`` (B,) marking real examples in a padded final batch.
"""

from __future__ import annotations

import dataclasses
import math
import time
from functools import partial
from pathlib import Path
from typing import Any, Callable, Iterator

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import struct
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

    @classmethod
    def create(cls, *, apply_fn: Callable, params: Any, tx: optax.GradientTransformation, rng: jax.Array,
               log_probs: bool = False, label_smoothing: float = 0.0, policy: Policy | None = None,
               batch_stats: Any = None) -> "TrainState":
        """A step-0 state with a fresh optimizer state.

        ``params`` may be the model's whole variables (``{"params": ..., "batch_stats": ...}``): its
        batch_stats are then the state's. ``policy`` defaults to that of ``apply_fn``'s module.
        """
        if "params" in params:
            batch_stats = params.get("batch_stats", batch_stats)
            params = params["params"]
        if policy is None:
            policy = getattr(getattr(apply_fn, "__self__", None), "policy", NATIVE)
        return cls(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params), rng=rng,
                   batch_stats=batch_stats, apply_fn=apply_fn, tx=tx, log_probs=log_probs,
                   label_smoothing=label_smoothing, policy=policy)

    @property
    def variables(self) -> dict:
        """What ``apply_fn`` takes: ``{"params": ...}``, with ``"batch_stats"`` when the model has BatchNorm."""
        if self.batch_stats is None:
            return {"params": self.params}
        return {"params": self.params, "batch_stats": self.batch_stats}

    @classmethod
    def for_model(cls, name: str, model: Any, params: Any, tx: optax.GradientTransformation, rng: jax.Array,
                  label_smoothing: float = 0.0) -> "TrainState":
        """A state for a registry model: its loss follows whether it ends in log_softmax."""
        return cls.create(apply_fn=model.apply, params=params, tx=tx, rng=rng,  # params: or all the variables
                          log_probs=models.get_spec(name).log_probs, label_smoothing=label_smoothing,
                          policy=model.policy)

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
    return state.apply_gradients(grads).replace(batch_stats=stats), metrics


def eval_step(state: TrainState, batch: dict) -> dict:
    """Summed loss, correct count and example count (sums, so partial batches aggregate exactly)."""
    outputs = state.apply_fn(state.variables, batch["image"])  # BatchNorm: the running statistics
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


def _transformed_predict(state: TrainState, images: jax.Array, transform: EvalTransform) -> jax.Array:
    return state.apply_fn(state.variables, transform(images))


def evaluate(state: TrainState, dataset: Any, transform: EvalTransform, batch_size: int = 500,
             mesh: Any = None) -> dict[str, float]:
    """Mean loss and accuracy over every example of ``dataset`` (the last partial batch included)."""
    mesh = mesh or parallel.make_mesh(1)
    step = parallel.compile_step(partial(_transformed_eval_step, transform=transform), state.policy, "infer", mesh)
    return _evaluate(step, state, dataset, batch_size, mesh)


def _global_padded_batches(dataset: Any, batch_size: int, mesh: Any) -> Iterator[dict]:
    """The padded batches of ``dataset`` (the size rounded up to a multiple of the mesh's), each split over
    the mesh: every process reads only its rows, so over all processes each example counts once."""
    batch_size = _round_up(batch_size, mesh.size)
    for batch in data.padded_batches(dataset, batch_size, parallel.batch_rows(batch_size, mesh)):
        yield parallel.shard_batch(batch, mesh)


def _evaluate(step: Callable, state: TrainState, dataset: Any, batch_size: int, mesh: Any) -> dict[str, float]:
    """`evaluate` with an already jitted eval step (fit reuses one, so it compiles once per run)."""
    totals = {"loss_sum": 0.0, "correct": 0.0, "count": 0.0}
    for batch in _global_padded_batches(dataset, batch_size, mesh):  # sums over the whole (global) batch
        sums = step(state, batch)
        totals = {k: totals[k] + float(sums[k]) for k in totals}
    return {"loss": totals["loss_sum"] / totals["count"], "accuracy": totals["correct"] / totals["count"]}


def predict(state: TrainState, dataset: Any, transform: EvalTransform, batch_size: int = 500,
            mesh: Any = None) -> np.ndarray:
    """Model outputs (logits or log-probs, as the model returns) for every example, in order.

    With a ``mesh`` (`jaxvgg.parallel.make_mesh`; over several processes, every process calls this with
    the same arguments) each process reads only its rows of every padded batch, the batch is split over
    the mesh's devices, and every process gets all the outputs. Without one, one device computes them.
    """
    fn = parallel.compile_step(partial(_transformed_predict, transform=transform), state.policy, "infer", mesh)
    if mesh is None:
        outs = [np.asarray(fn(state, b["image"]))[: int(b["mask"].sum())]
                for b in data.padded_batches(dataset, batch_size)]
        return np.concatenate(outs)
    placed = parallel.replicate(state, mesh)
    # the outputs are replicated: each process reads the whole global batch's; the padding is at the end
    outs = [distributed.to_numpy(fn(placed, b["image"])) for b in _global_padded_batches(dataset, batch_size, mesh)]
    return np.concatenate(outs)[: len(dataset)]


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def _new_history() -> dict:
    return {"batch": {k: [] for k in ("step", "epoch", "loss", "accuracy", "lr")},
            "epoch": {k: [] for k in ("epoch", "train_loss", "train_accuracy", "val_loss", "val_accuracy", "lr",
                                      "time_s", "images_per_s")}}


StepHook = Callable[[int, int, dict], None]  # (epoch, batch of the epoch, {"loss", "accuracy", "lr"}) -> None


def fit(state: TrainState, train_data: Any, val_data: Any, config: FitConfig, *, train_transform: Transform,
        eval_transform: EvalTransform, on_step: StepHook | None = None) -> tuple[TrainState, dict]:
    """Trains ``state`` for ``config.epochs`` epochs; the pure steps are jitted here.

    Args:
      state: from `TrainState.create` / `for_model`; its optimizer must come from `jaxvgg.optim`
        when a plateau rule is configured (the lr is rewritten in the optimizer state).
      train_data, val_data: `jaxvgg.data.Dataset` of uint8 images (val_data may be None).
      config: see `FitConfig`.
      train_transform: jittable ``(key, uint8 images) -> float32`` run on the device per batch
        (augmentation + normalisation).
      eval_transform: jittable ``uint8 images -> float32``.
      on_step: called on the host of every process as ``on_step(epoch, batch, metrics)`` once a step's
        metrics have been read (``batch`` counts from 1 within the epoch; metrics are floats: loss,
        accuracy, lr) and its history entry written, before a mid-epoch save after that batch: for
        logging, or for a test that stops the run at a step it chooses.

    Returns:
      (final state, history). With early stopping the state holds the best epoch's parameters (and
      BatchNorm statistics).
      History: ``{"batch": {step, epoch, loss, accuracy, lr}, "epoch": {epoch, train_loss,
      train_accuracy, val_loss, val_accuracy, lr, time_s, images_per_s}}`` (epoch in epoch units).

    Several processes (`jaxvgg.distributed`): every process calls `fit` with the same arguments; the
    mesh spans all their devices, each process reads only its rows of every global batch, every
    process takes part in the checkpoint saves, and only process 0 prints and writes history.json.
    The data order and the global batch do not depend on the process or device count. The state comes
    back as each process's own copy (`jaxvgg.parallel.unreplicate`), for single-process code after it.

    Raises:
      FloatingPointError: when the loss becomes NaN/inf, naming the step and lr; checkpoints of
        earlier epochs are kept.
      jaxvgg.distributed.ProcessLostError: another process died; relaunch all with resume.
    """
    mesh = parallel.make_mesh(config.num_devices if config.num_devices is not None
                              else parallel.auto_num_devices(state.params, config.batch_size))
    parallel.check_batch_size(config.batch_size, mesh)
    steps_per_epoch = data.num_batches(len(train_data), config.batch_size, drop_last=True)
    if steps_per_epoch == 0:
        raise ValueError(f"batch_size {config.batch_size} is larger than the {len(train_data)} training images")
    if val_data is None and (config.plateau_patience or config.early_stopping_patience):
        raise ValueError("the plateau rule and early stopping need validation data")

    base_lr = float(optim.current_lr(state.opt_state))
    if config.plateau_patience is not None and state.plateau is None:
        state = state.replace(plateau=optim.plateau_init(
            patience=config.plateau_patience, threshold=config.plateau_threshold, factor=config.plateau_factor,
            min_scale=config.plateau_factor ** config.plateau_max_reductions))
    if config.early_stopping_patience is not None and state.early_stopping is None:
        state = state.replace(early_stopping=optim.early_stopping_init())

    rows = parallel.batch_rows(config.batch_size, mesh)  # this process's share of every global batch
    quiet = config.quiet or not distributed.is_main_process()
    workdir = Path(config.workdir) if config.workdir else None
    checkpoints, history, first_epoch, resume_at = None, _new_history(), 1, None
    if workdir is not None:
        workdir.mkdir(parents=True, exist_ok=True)
        best_metric = "neg_val_loss" if config.early_stopping_patience else "val_accuracy"
        checkpoints = ckpt.Checkpoints(workdir / "checkpoints", config.keep_checkpoints,
                                       best_metric if val_data is not None else None)
        latest, partial_meta = checkpoints.latest_epoch(), checkpoints.partial_meta()
        if (latest is not None or partial_meta is not None) and not config.resume:
            held = f"epoch {latest}" if latest is not None else f"a save in epoch {partial_meta['epoch']}"
            raise FileExistsError(f"{workdir / 'checkpoints'} already holds {held}; pass resume=True "
                                  "(--resume) to continue it, or choose another workdir")
        if latest is not None:
            template = state
            state, meta = checkpoints.restore(template)
            history, first_epoch = meta["history"], meta["epoch"] + 1
            _log(f"resumed from {workdir / 'checkpoints'} after epoch {meta['epoch']}")
        if partial_meta is not None and partial_meta["epoch"] == first_epoch:  # newer: a save within that epoch
            state, meta = checkpoints.restore_partial(state)
            history, resume_at = meta["history"], meta
            _log(f"resumed from {workdir / 'checkpoints' / 'partial'} in epoch {meta['epoch']}, "
                 f"after batch {meta['batch']} of {steps_per_epoch}")

    train_fn = parallel.compile_step(partial(augmented_train_step, transform=train_transform), state.policy,
                                     "train", mesh, donate_state=True)
    eval_fn = parallel.compile_step(partial(_transformed_eval_step, transform=eval_transform), state.policy,
                                    "infer", mesh)
    state = parallel.replicate(state, mesh)
    try:
        state, best_params = _epochs(state, train_data, val_data, config, train_fn, eval_fn, mesh, rows, quiet,
                                     checkpoints, history, first_epoch, base_lr, steps_per_epoch, workdir, resume_at,
                                     on_step)
    except Exception as e:  # a dead peer fails the next collective: say which process, not gloo's socket error
        if distributed.is_collective_failure(e):
            raise distributed.describe_lost(e) from e
        raise

    if state.early_stopping is not None:
        if best_params is None and checkpoints is not None and checkpoints.best_epoch() is not None:
            best = checkpoints.restore(state, best=True)[0]  # resumed run: best is on disk
            best_params = (best.params, best.batch_stats)
        if best_params is not None:
            _log(f"restoring the parameters of epoch {int(state.early_stopping.best_epoch)} "
                         f"(lowest val loss {float(state.early_stopping.best_loss):.4f})")
            state = state.replace(params=best_params[0], batch_stats=best_params[1])
    if checkpoints is not None:
        checkpoints.close()
    return parallel.unreplicate(state), history


def _epochs(state: TrainState, train_data: Any, val_data: Any, config: FitConfig, train_fn: Callable,
            eval_fn: Callable, mesh: Any, rows: slice, quiet: bool, checkpoints: Any, history: dict,
            first_epoch: int, base_lr: float, steps_per_epoch: int, workdir: Path | None,
            resume_at: dict | None = None, on_step: StepHook | None = None) -> tuple[TrainState, Any]:
    """`fit`'s epoch loop: train, validate, apply the epoch rules, write history and checkpoints.

    ``resume_at``: the meta of a mid-epoch save of ``first_epoch`` to continue from (its batch, input state).
    """
    best_params = None
    for epoch in range(first_epoch, config.epochs + 1):
        if state.early_stopping is not None and bool(state.early_stopping.should_stop):
            break
        start, sums = time.perf_counter(), np.zeros(3)
        batches = data.iterate_batches(train_data, config.batch_size, seed=config.seed, epoch=epoch, drop_last=True,
                                       rows=rows)  # this process's rows of each global batch
        done = 0  # batches of this epoch already trained (a mid-epoch resume)
        if resume_at is not None:
            done = int(resume_at["batch"])
            if resume_at.get("data_state") is not None and hasattr(batches, "set_state"):
                batches.set_state(resume_at["data_state"])  # a stream continues from its saved iterator state
            else:
                batches = data.iterate_batches(train_data, config.batch_size, seed=config.seed, epoch=epoch,
                                               drop_last=True, rows=rows, start_batch=done)
            h = history["batch"]
            mine = [j for j, e in enumerate(h["epoch"]) if e > epoch - 1]  # this epoch's batches so far
            n = config.batch_size
            sums[:] = (sum(h["loss"][j] for j in mine) * n, sum(h["accuracy"][j] for j in mine) * n, len(mine) * n)
            resume_at = None
        bar = tqdm(batches, total=steps_per_epoch, initial=done, desc=f"epoch {epoch}/{config.epochs}",
                   unit="batch", disable=quiet, leave=False, dynamic_ncols=True)
        step0 = int(state.step) - done
        counted0 = sums[2]  # images/s counts what this process trains now, not what a resumed epoch did before
        pending = None  # the previous step's metrics, read only after the next step is dispatched

        def record_step(i: int, metrics: dict, n: int) -> None:
            # float() waits for that step; the step after it is already queued, so the device never idles
            # while the host gathers the next batch or writes the history.
            loss, acc, lr = float(metrics["loss"]), float(metrics["accuracy"]), float(metrics["lr"])
            if not math.isfinite(loss):
                where = f" (epochs up to {epoch - 1} are in {workdir / 'checkpoints'})" if workdir else ""
                raise FloatingPointError(f"loss is {loss} at step {step0 + i + 1} (epoch {epoch}, batch {i + 1}), "
                                         f"lr {lr:g}; stopping{where}")
            sums[:] += (loss * n, acc * n, n)
            h = history["batch"]
            h["step"].append(step0 + i + 1), h["epoch"].append(epoch - 1 + (i + 1) / steps_per_epoch)
            h["loss"].append(loss), h["accuracy"].append(acc), h["lr"].append(lr)
            bar.set_postfix(loss=f"{loss:.4f}", acc=f"{acc:.3f}", lr=f"{lr:.2g}",
                            img_s=f"{(sums[2] - counted0) / (time.perf_counter() - start):.0f}", refresh=False)
            if on_step is not None:
                on_step(epoch, i + 1, {"loss": loss, "accuracy": acc, "lr": lr})

        every = config.checkpoint_every_steps if checkpoints is not None else None
        for i, batch in enumerate(bar, start=done):
            state, metrics = train_fn(state, parallel.shard_batch(batch, mesh))
            if pending is not None:
                record_step(*pending)
            pending = (i, metrics, config.batch_size)  # the global batch
            if every and (i + 1) % every == 0 and i + 1 < steps_per_epoch:
                record_step(*pending)
                pending = None
                data_state = batches.get_state() if hasattr(batches, "get_state") else None
                checkpoints.save_partial(int(state.step), state, {"epoch": epoch, "batch": i + 1, "history": history,
                                                                  "data_state": data_state})
        if pending is not None:
            record_step(*pending)
        if hasattr(batches, "close"):
            batches.close()
        lr = history["batch"]["lr"][-1]
        elapsed = time.perf_counter() - start
        record = {"epoch": epoch, "train_loss": float(sums[0] / sums[2]), "train_accuracy": float(sums[1] / sums[2]),
                  "val_loss": None, "val_accuracy": None, "lr": lr, "time_s": elapsed,
                  "images_per_s": float((sums[2] - counted0) / elapsed)}
        if val_data is not None:
            val = _evaluate(eval_fn, state, val_data, config.eval_batch_size, mesh)
            record.update(val_loss=val["loss"], val_accuracy=val["accuracy"])
            if state.plateau is not None or state.early_stopping is not None:
                # the rules run eagerly on this process's copy (host-side numbers), then go back to the mesh
                new, best_params = _end_of_epoch_rules(parallel.unreplicate(state), config, base_lr, val, epoch,
                                                       best_params)
                state = new if mesh.is_multi_process is False else parallel.replicate(new, mesh)
        for k, v in record.items():
            history["epoch"][k].append(v)
        _log("epoch {epoch}: train loss {train_loss:.4f} acc {train_accuracy:.4f}".format(**record)
             + ("" if val_data is None else " | val loss {val_loss:.4f} acc {val_accuracy:.4f}".format(**record))
             + f" | lr {lr:.3g} | {elapsed:.0f} s, {record['images_per_s']:.0f} img/s")
        if workdir is not None:
            if distributed.is_main_process():
                ckpt.write_json(workdir / "history.json", history)
            metrics = None if val_data is None else {"val_accuracy": record["val_accuracy"],
                                                      "neg_val_loss": -record["val_loss"]}
            checkpoints.save(epoch, state, {"epoch": epoch, "history": history}, metrics)
    return state, best_params


def _end_of_epoch_rules(state: TrainState, config: FitConfig, base_lr: float, val: dict, epoch: int,
                        best_params: Any) -> tuple[TrainState, Any]:
    """The plateau lr rule and early stopping, applied after each epoch's validation."""
    if state.plateau is not None:
        plateau = optim.plateau_update(state.plateau, val["accuracy"])
        lr = base_lr * float(optim.plateau_scale(plateau))
        state = state.replace(plateau=plateau, opt_state=optim.set_lr(state.opt_state, lr))
    if state.early_stopping is not None:
        early, improved = optim.early_stopping_update(state.early_stopping, val["loss"], epoch,
                                                      patience=config.early_stopping_patience)
        state = state.replace(early_stopping=early)
        if improved:
            best_params = jax.tree_util.tree_map(lambda x: x.copy(), (state.params, state.batch_stats))
    return state, best_params


def _log(message: str) -> None:
    if distributed.is_main_process():
        tqdm.write(message)  # prints above any progress bar
