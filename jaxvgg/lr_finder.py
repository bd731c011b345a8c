"""Smith's learning-rate range test (Super-Convergence, Fig. 2a; fastai's ``lr_find``).

Train for one epoch while the lr rises exponentially from ``min_lr`` to ``max_lr``, one step per
batch, and record the loss of every batch; stop once the smoothed loss has blown up. A good lr lies
where the loss still falls steeply, well before its minimum.

    result = lr_range_test(state, train, transform=train_tf, batch_size=64, min_lr=1e-5, max_lr=1.0)
    plot_lr_range_result(result, "lr_range.png")
    lr = result.suggested_lr  # the lr at the minimum smoothed loss, halved

The running statistics are a NamedTuple state with pure ``range_test_init`` / ``range_test_update``
(host-side Python floats: one number per step), the suggestions a pure function of the curve
(``suggest_lrs``), so each part is testable without training.
"""

from __future__ import annotations

import math
from functools import partial
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
from tqdm.auto import tqdm

from jaxvgg import data, optim, parallel, plots
from jaxvgg.train import TrainState, Transform, augmented_train_step


class RangeTestState(NamedTuple):
    """The range test's running statistics (fastai's bias-corrected EWA of the loss)."""

    count: int  # losses seen so far
    avg_loss: float  # EWA of the loss without bias correction; starts at 0
    best_smoothed: float  # lowest bias-corrected EWA so far, +inf before the first loss
    diverged: bool  # the smoothed loss exceeded diverge_factor x best, or a loss was NaN/inf


def range_test_init() -> RangeTestState:
    """Statistics before the first step."""
    return RangeTestState(count=0, avg_loss=0.0, best_smoothed=math.inf, diverged=False)


def range_test_update(state: RangeTestState, loss: float, *, smoothing: float = 0.05,
                      diverge_factor: float = 4.0) -> tuple[RangeTestState, float]:
    """Feed one batch loss; returns the new state and the smoothed loss.

    The smoothed loss is ``avg / (1 - (1 - smoothing) ** count)`` with
    ``avg <- (1 - smoothing) * avg + smoothing * loss`` from ``avg = 0``: the first smoothed value is
    the first loss itself. ``diverged`` becomes (and stays) True when the smoothed loss exceeds
    ``diverge_factor`` times the best smoothed loss, or is not finite.

    Args:
      state: the statistics so far.
      loss: this batch's loss.
      smoothing: weight of the newest loss, in (0, 1] (fastai: 1 - beta = 0.02; 1 = no smoothing).
      diverge_factor: how many times the best smoothed loss counts as divergence (> 1).

    Returns:
      ``(new_state, smoothed_loss)``.
    """
    if not 0.0 < smoothing <= 1.0:
        raise ValueError(f"smoothing must be in (0, 1], got {smoothing}")
    if not diverge_factor > 1.0:
        raise ValueError(f"diverge_factor must be > 1, got {diverge_factor}")
    count = state.count + 1
    avg_loss = (1.0 - smoothing) * state.avg_loss + smoothing * float(loss)
    smoothed = avg_loss / (1.0 - (1.0 - smoothing) ** count)
    finite = math.isfinite(smoothed)
    diverged = state.diverged or not finite or smoothed > diverge_factor * state.best_smoothed
    best = min(state.best_smoothed, smoothed) if finite else state.best_smoothed
    return RangeTestState(count=count, avg_loss=avg_loss, best_smoothed=best, diverged=diverged), smoothed


def range_test_lrs(min_lr: float, max_lr: float, num_steps: int) -> np.ndarray:
    """The lr of each step: ``min_lr * (max_lr / min_lr) ** (i / (num_steps - 1))``, both ends exact."""
    if not 0.0 < min_lr < max_lr:
        raise ValueError(f"need 0 < min_lr < max_lr, got min_lr={min_lr} max_lr={max_lr}")
    if num_steps < 2:
        raise ValueError(f"num_steps must be >= 2 to span [min_lr, max_lr], got {num_steps}")
    return np.geomspace(min_lr, max_lr, num_steps)  # the formula above; numpy pins both end points


def default_burn_in(num_recorded: int) -> int:
    """Steps ignored by the suggestions: the first 10%, at least 1."""
    return max(1, num_recorded // 10)


def suggest_lrs(lrs: Any, smoothed: Any, burn_in: int | None = None) -> tuple[dict[str, float], int]:
    """Suggested learning rates from a range-test curve, ignoring its first ``burn_in`` steps.

    Args:
      lrs: (N,) increasing learning rates.
      smoothed: (N,) smoothed losses at those lrs.
      burn_in: steps to skip (default ``default_burn_in(N)``); clipped so that at least two steps
        remain (none are skipped when N < 3), because the first steps of a fresh network are noise.

    Returns:
      ``(suggestions, burn_in_used)``; suggestions ``{"min_loss_half": lr at the minimum smoothed loss / 2,
      "steepest": lr where d smoothed / d log10(lr) is most negative, between the burn-in and the minimum}``.
    """
    lrs, smoothed = np.asarray(lrs, np.float64), np.asarray(smoothed, np.float64)
    if lrs.ndim != 1 or lrs.shape != smoothed.shape:
        raise ValueError(f"lrs and smoothed must be 1-D of one length, got shapes {lrs.shape} and {smoothed.shape}")
    if lrs.size == 0:
        raise ValueError("the range test recorded no step: nothing to suggest")
    if not np.all(np.isfinite(smoothed)):
        raise ValueError(f"smoothed losses must be finite, got {smoothed[~np.isfinite(smoothed)][:3]}")
    burn_in = default_burn_in(lrs.size) if burn_in is None else burn_in
    if burn_in < 0:
        raise ValueError(f"burn_in must be >= 0, got {burn_in}")
    burn_in = min(burn_in, max(0, lrs.size - 2))
    kept_lrs, kept = lrs[burn_in:], smoothed[burn_in:]
    lowest = int(np.argmin(kept))
    suggestions = {"min_loss_half": float(kept_lrs[lowest] / 2.0)}
    # The steepest descent is sought up to the minimum only: past it the loss may fall again while
    # recovering from a spike, at lrs that already diverge.
    descent_lrs, descent = kept_lrs[: lowest + 1], kept[: lowest + 1]
    if descent.size >= 2:
        slopes = np.gradient(descent, np.log10(descent_lrs))  # central differences, one-sided at the ends
        suggestions["steepest"] = float(descent_lrs[np.argmin(slopes)])
    else:  # the minimum is the first kept step: no descent to measure
        suggestions["steepest"] = float(descent_lrs[0])
    return suggestions, burn_in


class LRRangeResult(NamedTuple):
    """What a range test saw: one entry per recorded step (finite losses only)."""

    lrs: np.ndarray  # float64 (n,), the lr each step trained with
    losses: np.ndarray  # float64 (n,), the batch loss at that step (before its update)
    smoothed: np.ndarray  # float64 (n,), bias-corrected EWA of losses
    stopped_early: bool  # diverged before the planned number of steps
    suggestions: dict[str, float]  # see suggest_lrs
    burn_in: int  # first steps the suggestions ignored
    num_steps: int  # steps planned

    @property
    def suggested_lr(self) -> float:
        """The lr the MNIST lab asks for: the minimum of the smoothed loss, halved."""
        return self.suggestions["min_loss_half"]

    def to_json(self) -> dict:
        """A JSON-ready dict of the curves and suggestions."""
        return {"lrs": self.lrs.tolist(), "losses": self.losses.tolist(), "smoothed": self.smoothed.tolist(),
                "stopped_early": self.stopped_early, "suggestions": dict(self.suggestions),
                "suggested_lr": self.suggested_lr, "burn_in": self.burn_in, "num_steps": self.num_steps,
                "steps_recorded": int(self.lrs.size)}


def lr_range_test(state: TrainState, train_data: data.BatchSource, *, transform: Transform, batch_size: int,
                  min_lr: float = 1e-5, max_lr: float = 0.1, num_steps: int | None = None, seed: int = 0,
                  diverge_factor: float = 4.0, smoothing: float = 0.05, burn_in: int | None = None,
                  num_devices: int | None = None, quiet: bool = False) -> LRRangeResult:
    """Runs the range test on a copy of ``state``; the caller's state is left as it was.

    Args:
      state: a `TrainState` whose optimizer comes from `jaxvgg.optim` with a constant (float) lr;
        its lr is overwritten each step with `optim.set_lr`.
      train_data: uint8 `jaxvgg.data.Dataset`; batches are drawn as `fit` draws them (drop_last),
        epoch after epoch if ``num_steps`` exceeds one epoch.
      transform: jittable ``(key, uint8 images) -> float32``, as `fit`'s ``train_transform``.
      batch_size: global batch size.
      min_lr, max_lr: the lr of the first and of the last planned step.
      num_steps: steps planned (>= 2); default one epoch of ``train_data``.
      seed: data order.
      diverge_factor: stop once the smoothed loss exceeds this many times its best value.
      smoothing: weight of the newest loss in the smoothed curve.
      burn_in: first steps the suggestions ignore (default: 10%, at least 1; see `suggest_lrs`).
      num_devices: devices for data parallel (`parallel.auto_num_devices` when None).
      quiet: no progress bar.

    Returns:
      An `LRRangeResult`. The trained copy is dropped, never returned. A NaN/inf loss ends the test
      without being recorded, so every array is finite.

    Raises:
      ValueError: bad lr range or step count, a batch larger than the data, an optimizer without a
        settable lr (a schedule, or not from `jaxvgg.optim`).
      FloatingPointError: the very first loss is NaN/inf (nothing to suggest from).
    """
    steps_per_epoch = data.num_batches(len(train_data), batch_size, drop_last=True)
    if steps_per_epoch == 0:
        raise ValueError(f"batch_size {batch_size} is larger than the {len(train_data)} training images")
    num_steps = steps_per_epoch if num_steps is None else num_steps
    lrs = range_test_lrs(min_lr, max_lr, num_steps)
    optim.set_lr(state.opt_state, min_lr)  # fail now, not after compiling, if the lr cannot be set

    mesh = parallel.make_mesh(num_devices if num_devices is not None
                              else parallel.auto_num_devices(state.params, batch_size))
    parallel.check_batch_size(batch_size, mesh)
    step_fn = parallel.compile_step(partial(augmented_train_step, transform=transform), state.policy, "train",
                                    mesh, donate_state=True)
    work = parallel.replicate(state, mesh)  # a copy: the step donates it, the caller's arrays survive

    stats, recorded = range_test_init(), {"lrs": [], "losses": [], "smoothed": []}
    bar = tqdm(total=num_steps, desc="lr range test", unit="batch", disable=quiet, leave=False, dynamic_ncols=True)
    epoch = 0
    while len(recorded["lrs"]) < num_steps and not stats.diverged:
        for batch in train_data.batches(batch_size, seed=seed, epoch=epoch, drop_last=True,
                                        rows=parallel.batch_rows(batch_size, mesh)):  # this process's rows
            lr = float(lrs[len(recorded["lrs"])])
            work = work.replace(opt_state=optim.set_lr(work.opt_state, lr))
            work, metrics = step_fn(work, parallel.shard_batch(batch, mesh))
            loss = float(metrics["loss"])
            stats, smoothed = range_test_update(stats, loss, smoothing=smoothing, diverge_factor=diverge_factor)
            if not math.isfinite(smoothed):
                break  # NaN/inf: nothing to record
            for key, value in (("lrs", lr), ("losses", loss), ("smoothed", smoothed)):
                recorded[key].append(value)
            bar.update()
            bar.set_postfix(lr=f"{lr:.2e}", loss=f"{smoothed:.4f}", refresh=False)
            if stats.diverged or len(recorded["lrs"]) == num_steps:
                break
        epoch += 1
    bar.close()
    del work  # the trained copy is of no use to anyone

    if not recorded["lrs"]:
        raise FloatingPointError(f"the loss was {loss} at the first step (lr {min_lr:g}); lower min_lr or check "
                                 "the data and the model")
    curves = {key: np.asarray(values, np.float64) for key, values in recorded.items()}
    suggestions, burn_in_used = suggest_lrs(curves["lrs"], curves["smoothed"], burn_in)
    return LRRangeResult(lrs=curves["lrs"], losses=curves["losses"], smoothed=curves["smoothed"],
                         stopped_early=len(curves["lrs"]) < num_steps, suggestions=suggestions,
                         burn_in=burn_in_used, num_steps=num_steps)


def plot_lr_range_result(result: LRRangeResult, path: str | Path) -> Path:
    """Loss and smoothed loss against lr (log x), with the suggestions as vertical lines."""
    return plots.plot_lr_range(result.lrs, result.losses, result.smoothed, path, result.suggestions)
