"""Data parallelism over a 1-D device mesh: one ``jax.jit`` code path for 1..N devices.

Design
------
The train state is replicated on every device and the batch is split along its leading axis over a
mesh axis named ``"data"``. The step itself is the ordinary single-device ``train_step`` written on
the *global* batch; ``jax.jit`` is given ``in_shardings``/``out_shardings`` (``NamedSharding``) and
XLA's SPMD partitioner turns the batch means into per-device partial sums plus an all-reduce. So the
loss and gradients are those of the single-device step on the same global batch, up to the order of
float32 additions, and there is no per-device code, no ``psum`` and no ``axis_name`` in the model or
the step.

Why jit + NamedSharding rather than ``pmap``: ``pmap`` (still present in jax 0.10, now built on
``jit`` and ``shard_map`` and documented as the old way) needs a leading device axis on every array,
an explicit ``lax.pmean`` in the step and unreplicating for checkpoints and logs. Here the arrays keep
their global shapes, so checkpoints, metrics and the step function are the same whatever the device
count. The mesh axis is ``AxisType.Auto`` (``jax.make_mesh`` defaults to ``Explicit``) so the
compiler, not the array types, propagates shardings through model code written without annotations.

With one device the mesh has a single entry, every sharding is trivial and the compiled program is
the plain single-device one: the same code path, no special case.

A global batch must divide evenly over the devices. Pad a final partial batch with `pad_batch`: it
repeats the last example and marks the copies with ``mask = 0``, which ``train_step`` and
``eval_step`` exclude from means and sums, so padded results equal unpadded ones.

    mesh = make_mesh()
    state = replicate(state, mesh)
    step = data_parallel(train_step, mesh)
    for batch in batches:
        state, metrics = step(state, shard_batch(pad_batch(batch, mesh.size), mesh))
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from jaxvgg import models

DATA_AXIS = "data"


def make_mesh(num_devices: int | None = None) -> Mesh:
    """A 1-D mesh with axis ``"data"`` over the first ``num_devices`` devices.

    Args:
      num_devices: how many devices to use; all of ``jax.devices()`` when None.

    Returns:
      A ``jax.sharding.Mesh`` of shape ``{"data": num_devices}`` with an ``Auto`` axis.
    """
    devices = jax.devices()
    n = len(devices) if num_devices is None else num_devices
    if n < 1:
        raise ValueError(f"num_devices must be at least 1, got {n}")
    if n > len(devices):
        raise ValueError(
            f"asked for {n} devices but only {len(devices)} exist ({devices[0].platform}); to test on CPU, "
            f"set XLA_FLAGS=--xla_force_host_platform_device_count={n} before jax is imported")
    return jax.make_mesh((n,), (DATA_AXIS,), axis_types=(AxisType.Auto,), devices=devices[:n])


# On the CPU, with one XLA device per core (opt-in, see `jaxvgg.runtime`), data parallelism over
# them pays off for small networks, whose steps are many small ops that XLA:CPU runs one at a time
# (measured on 2 cores: LeNet training +57 %, the CIFAR CNN +12 %), and costs for big ones, whose
# large matmuls already use every core and whose gradient all-reduce is large (VGG-A at 32x32, 28 M
# parameters: -24 %). `auto_num_devices` draws the line by parameter count.
CPU_DATA_PARALLEL_MAX_PARAMS = 4_000_000


def auto_num_devices(params: Any, batch_size: int | None = None) -> int:
    """How many devices `make_mesh` should use for a model with ``params`` when none is asked for.

    Every device, except on the CPU for networks above `CPU_DATA_PARALLEL_MAX_PARAMS` parameters (one
    device), and at most the largest count that ``batch_size`` divides evenly over.
    """
    devices = jax.devices()
    large = models.count_params(params) > CPU_DATA_PARALLEL_MAX_PARAMS
    n = 1 if devices[0].platform == "cpu" and large else len(devices)
    while batch_size and batch_size % n:
        n -= 1
    return n


def _num_shards(mesh: Mesh) -> int:
    return mesh.shape[DATA_AXIS]


def check_batch_size(batch_size: int, mesh: Mesh) -> None:
    """Raise unless ``batch_size`` splits evenly over the mesh's data axis."""
    n = _num_shards(mesh)
    if batch_size % n:
        raise ValueError(f"batch_size must divide across {n} devices, got {batch_size}")


def replicated(mesh: Mesh) -> NamedSharding:
    """The sharding that puts a full copy of an array on every device of the mesh."""
    return NamedSharding(mesh, P())


def batch_sharded(mesh: Mesh) -> NamedSharding:
    """The sharding that splits an array's leading (batch) axis over the data axis."""
    return NamedSharding(mesh, P(DATA_AXIS))


def replicate(tree: Any, mesh: Mesh) -> Any:
    """A copy of ``tree`` (e.g. a TrainState) with every leaf on all devices of the mesh."""
    # Copy first: device_put may hand back the caller's buffer as the copy on the first device (on a
    # 1-device mesh, and in jax 0.10 on larger meshes even with may_alias=False), and a step that
    # donates the replicated state would then delete the caller's original arrays too.
    owned = jax.tree_util.tree_map(lambda x: x.copy() if isinstance(x, jax.Array) else x, tree)
    return jax.device_put(owned, replicated(mesh))


def shard_batch(batch: dict, mesh: Mesh) -> dict:
    """Split every array of ``batch`` along its leading axis over the mesh's data axis."""
    sizes = {k: np.shape(v)[0] for k, v in batch.items()}
    if len(set(sizes.values())) != 1:
        raise ValueError(f"batch arrays disagree on the leading (batch) axis: {sizes}")
    check_batch_size(next(iter(sizes.values())), mesh)
    return jax.device_put(batch, batch_sharded(mesh))


def pad_batch(batch: dict, multiple: int) -> dict:
    """Pad the leading axis to a multiple of ``multiple`` by repeating the last example, with ``mask`` 0 on copies.

    The result always has a ``"mask"`` (ones for real examples unless the batch had one), so full and
    padded batches share one pytree structure and one compiled step. NumPy inputs stay NumPy.
    """
    if multiple < 1:
        raise ValueError(f"multiple must be at least 1, got {multiple}")
    size = np.shape(batch["label"])[0]
    if size == 0:
        raise ValueError("cannot pad an empty batch: there is no last example to repeat")
    batch = dict(batch)
    if "mask" not in batch:
        xp = np if isinstance(batch["label"], np.ndarray) else jnp
        batch["mask"] = xp.ones((size,), xp.float32)
    pad = -size % multiple
    if pad == 0:
        return batch

    def pad_one(key: str, x: Any) -> Any:
        xp = np if isinstance(x, np.ndarray) else jnp
        fill = xp.zeros((pad, *x.shape[1:]), x.dtype) if key == "mask" else xp.repeat(x[-1:], pad, axis=0)
        return xp.concatenate([x, fill], axis=0)

    return {key: pad_one(key, x) for key, x in batch.items()}


def data_parallel(step_fn: Callable[[Any, dict], tuple[Any, dict]], mesh: Mesh, *, donate_state: bool = True,
                  compiler_options: dict[str, Any] | None = None) -> Callable[[Any, dict], tuple[Any, dict]]:
    """Jit a ``(state, batch) -> (state, metrics)`` step with the state replicated and the batch split.

    Args:
      step_fn: a pure step on the global batch, e.g. ``jaxvgg.train.train_step``.
      mesh: from `make_mesh`.
      donate_state: reuse the input state's buffers for the output (do not read the old state after).
      compiler_options: XLA options for this compilation (`jaxvgg.models.resolve_compiler_options`).

    Returns:
      The jitted step. Inputs not yet placed are moved to these shardings (uncommitted arrays, NumPy);
      place them up front with `replicate` / `shard_batch` to transfer once and get the friendlier
      batch size error.
    """
    return jax.jit(step_fn,
                   in_shardings=(replicated(mesh), batch_sharded(mesh)),
                   out_shardings=(replicated(mesh), replicated(mesh)),
                   donate_argnums=(0,) if donate_state else (), compiler_options=compiler_options)


def data_parallel_eval(eval_fn: Callable[[Any, dict], dict], mesh: Mesh, *,
                       compiler_options: dict[str, Any] | None = None) -> Callable[[Any, dict], dict]:
    """Jit a ``(state, batch) -> metrics`` eval step with the state replicated and the batch split."""
    return jax.jit(eval_fn, in_shardings=(replicated(mesh), batch_sharded(mesh)),
                   out_shardings=replicated(mesh), compiler_options=compiler_options)
