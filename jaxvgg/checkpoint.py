"""Checkpoints with orbax: the last k epochs and the best one, each written atomically.

Layout under ``directory``::

    last/<epoch>/{state, meta}   the k most recent epochs (resume from the newest)
    best/<epoch>/{state, meta}   the epoch with the best monitored metric
    partial/<step>/{state, meta} the newest mid-epoch save (``FitConfig.checkpoint_every_steps``); its
                                 meta holds the epoch, the batches done and the input iterator's state

orbax writes each step into a temporary folder and renames it when complete, so a run killed while
saving leaves the earlier checkpoints intact, and a half-written one is cleaned up on the next start.
``state`` is any pytree of arrays (a `TrainState` without its static fields, plus schedule state);
``meta`` is JSON (epoch, history, config) so nothing is ever unpickled.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp


def write_json(path: str | os.PathLike, obj: Any, **dumps_kwargs: Any) -> Path:
    """Writes ``obj`` as JSON to ``path`` atomically: a sibling temporary file, flushed to disk, then
    renamed over ``path``, so a reader (or a killed run) sees the old file or the new one, never half of one."""
    path = Path(path)
    text = json.dumps(obj, **{"indent": 1, **dumps_kwargs})  # fails before anything is touched
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return path


def saved_epochs(directory: str | os.PathLike) -> list[int]:
    """The epochs saved in ``directory/last``, read from the layout above without opening (or creating) it;
    a half-written save (orbax's temporary folder) is not an epoch."""
    last = Path(directory) / "last"
    return sorted(int(p.name) for p in last.iterdir() if p.name.isdigit()) if last.is_dir() else []


def has_checkpoints(directory: str | os.PathLike) -> bool:
    """Whether ``directory`` holds a finished save, an epoch's or a mid-epoch one."""
    partial = Path(directory) / "partial"
    return bool(saved_epochs(directory)) or (partial.is_dir() and any(p.name.isdigit() for p in partial.iterdir()))


def _manager(directory: Path, keep: int, best_metric: str | None) -> ocp.CheckpointManager:
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep,
        best_fn=(lambda metrics: metrics[best_metric]) if best_metric else None,
        best_mode="max",
        enable_async_checkpointing=False,  # the epoch loop waits: a finished save is a safe save
        cleanup_tmp_directories=True,  # remove what a killed save left behind
    )
    return ocp.CheckpointManager(directory, options=options, item_names=("state", "meta"))


def _restore_state(manager: ocp.CheckpointManager, step: int, abstract: Any) -> dict:
    """``{"state", "meta"}`` of ``step``, the state shaped like ``abstract`` (None: as saved).

    A checkpoint written before the state gained a field that is None in ``abstract`` (`TrainState.ema`,
    say) lacks that field's key: it restores too, that field staying None. A field it lacks that
    ``abstract`` needs is the mismatch error it always was.
    """
    try:
        return manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract),
                                                             meta=ocp.args.JsonRestore()))
    except ValueError as error:
        if abstract is None or "structures do not match" not in str(error):
            raise
        mismatch = error
    reader = ocp.CheckpointManager(manager.directory, item_names=("state", "meta"))  # its own handlers
    try:
        restored = reader.restore(step, args=ocp.args.Composite(
            state=ocp.args.PyTreeRestore(item=abstract, partial_restore=True), meta=ocp.args.JsonRestore()))
    finally:
        reader.close()
    if any(isinstance(leaf, jax.ShapeDtypeStruct) for leaf in jax.tree_util.tree_leaves(restored["state"])):
        raise mismatch  # the checkpoint lacks arrays the state needs
    return restored


class Checkpoints:
    """The last ``keep`` epochs in ``directory/last`` and the best one in ``directory/best``.

    Args:
      directory: created if missing.
      keep: how many recent epochs to keep.
      best_metric: key of the ``metrics`` dict passed to `save` that ranks epochs (higher is better);
        None keeps no best checkpoint.
    """

    def __init__(self, directory: str | os.PathLike, keep: int = 3, best_metric: str | None = "val_accuracy"):
        if keep < 1:
            raise ValueError(f"keep must be >= 1, got {keep}")
        self.directory = Path(directory).absolute()
        self.best_metric = best_metric
        self._last = _manager(self.directory / "last", keep, None)
        self._best = _manager(self.directory / "best", 1, best_metric) if best_metric else None
        self._partial = _manager(self.directory / "partial", 1, None)

    def save(self, epoch: int, state: Any, meta: dict, metrics: dict | None = None) -> None:
        """Writes epoch ``epoch``: always to ``last``, and to ``best`` when its metric beats the best so far."""
        meta = {**meta, "metrics": metrics or {}}
        args = ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta))
        self._last.save(epoch, args=args)
        value = (metrics or {}).get(self.best_metric)
        if self._best is None or value is None:
            return
        best = self._best.best_step()
        previous = -np.inf if best is None else self.restore_meta(best, best=True)["metrics"][self.best_metric]
        if float(value) > previous:
            # one slot: orbax writes the new step completely, then deletes the old one
            self._best.save(epoch, args=args, metrics={self.best_metric: float(value)})

    def save_partial(self, step: int, state: Any, meta: dict) -> None:
        """A mid-epoch save at global step ``step`` (the previous one is removed once it is complete)."""
        self._partial.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                         meta=ocp.args.JsonSave(meta)))

    def restore_partial(self, target: Any) -> tuple[Any, dict] | None:
        """(state, meta) of the newest mid-epoch save, or None."""
        step = self._partial.latest_step()
        if step is None:
            return None
        restored = _restore_state(self._partial, step, jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, target))
        return restored["state"], restored["meta"]

    def partial_meta(self) -> dict | None:
        """Only the JSON part of the newest mid-epoch save, or None."""
        step = self._partial.latest_step()
        if step is None:
            return None
        return self._partial.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]

    def latest_epoch(self) -> int | None:
        """The newest saved epoch, or None."""
        return self._last.latest_step()

    def best_epoch(self) -> int | None:
        """The epoch in ``best``, or None."""
        return self._best.best_step() if self._best is not None else None

    def _restore(self, abstract: Any, epoch: int | None, best: bool) -> tuple[Any, dict, int, Path]:
        manager = self._best if best else self._last
        if manager is None:
            raise ValueError("this Checkpoints keeps no best checkpoint (best_metric=None)")
        epoch = (manager.best_step() if best else manager.latest_step()) if epoch is None else epoch
        if epoch is None:
            raise FileNotFoundError(f"no checkpoint in {manager.directory}")
        restored = _restore_state(manager, epoch, abstract)
        return restored["state"], restored["meta"], epoch, manager.directory

    def restore(self, target: Any, epoch: int | None = None, best: bool = False) -> tuple[Any, dict]:
        """Restores (state shaped like ``target``, meta) of ``epoch`` (default: the newest / the best)."""
        abstract = jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, target)
        state, meta, _, _ = self._restore(abstract, epoch, best)
        return state, meta

    def restore_params(self, epoch: int | None = None, best: bool = False) -> tuple[Any, dict]:
        """(the ``params`` of a saved `TrainState` as numpy arrays, meta), without a template of the state.

        For reading a finished run's weights (a transfer backbone, say) without rebuilding its optimizer.
        """
        variables, meta = self.restore_variables(epoch, best)
        return variables["params"], meta

    def restore_variables(self, epoch: int | None = None, best: bool = False) -> tuple[dict, dict]:
        """(``{"params": ...}`` of a saved `TrainState`, with ``"batch_stats"`` when it has BatchNorm
        statistics, as numpy arrays; meta), without a template of the state: what ``model.apply`` takes."""
        state, meta, epoch, directory = self._restore(None, epoch, best)
        if not isinstance(state, dict) or "params" not in state:
            raise ValueError(f"checkpoint {epoch} in {directory} holds no TrainState params")
        variables = {c: state[c] for c in ("params", "batch_stats") if state.get(c) is not None}
        return jax.tree_util.tree_map(np.asarray, variables), meta

    def restore_meta(self, epoch: int, best: bool = False) -> dict:
        """Only the JSON part of a checkpoint."""
        manager = self._best if best else self._last
        return manager.restore(epoch, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]

    def close(self) -> None:
        self._last.close()
        self._partial.close()
        if self._best is not None:
            self._best.close()
