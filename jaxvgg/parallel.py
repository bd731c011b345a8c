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

A global batch must divide evenly over the devices. Pad a final partial batch with
`jaxvgg.data.pad_batch`: it repeats the last example and marks the copies with ``mask = 0``, which
``train_step`` and ``eval_step`` exclude from means and sums, so padded results equal unpadded ones.

    mesh = make_mesh()
    state = replicate(state, mesh)
    step = compile_step(train_step, state.policy, "train", mesh, donate_state=True)
    for batch in batches:
        state, metrics = step(state, shard_batch(data.pad_batch(batch, mesh.size), mesh))

Several processes (`jaxvgg.distributed`): the mesh spans every process's devices, each process passes
`shard_batch` only its own rows of the global batch (`batch_rows`), and the replicated outputs can be
read on every process. The same code runs with one process.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from jaxvgg import distributed
from jaxvgg.models import count_params
from jaxvgg.policy import Policy

DATA_AXIS = "data"


def make_mesh(num_devices: int | None = None) -> Mesh:
    """A 1-D mesh with axis ``"data"`` over the first ``num_devices`` devices.

    Args:
      num_devices: how many devices to use; all of ``jax.devices()`` when None.

    Returns:
      A ``jax.sharding.Mesh`` of shape ``{"data": num_devices}`` with an ``Auto`` axis.
    """
    devices = jax.devices()  # every process's, ordered by process: each process's rows are one block
    n = len(devices) if num_devices is None else num_devices
    if n < 1:
        raise ValueError(f"num_devices must be at least 1, got {n}")
    if jax.process_count() > 1 and n != len(devices):
        raise ValueError(f"with {jax.process_count()} processes the mesh spans all {len(devices)} devices, "
                         f"got num_devices={n}")
    if n > len(devices):
        raise ValueError(
            f"asked for {n} devices but only {len(devices)} exist ({devices[0].platform}); to test on CPU, "
            f"set XLA_FLAGS=--xla_force_host_platform_device_count={n} before jax is imported")
    return jax.make_mesh((n,), (DATA_AXIS,), axis_types=(AxisType.Auto,), devices=devices[:n])


def all_processes_mesh() -> Mesh | None:
    """With several processes, the mesh over all their devices, for the evaluation they share after `fit`
    (`jaxvgg.train.predict`); None with one process (evaluation then runs on one device, as before)."""
    return make_mesh() if jax.process_count() > 1 else None


# On the CPU, with one XLA device per core (opt-in, see `jaxvgg.runtime`), data parallelism over
# them pays off for small networks, whose steps are many small ops that XLA:CPU runs one at a time,
# and costs for big ones, whose large matmuls already use every core and whose gradient all-reduce is
# large (VGG-A at 32x32, 28 M parameters; docs/performance.md has the figures). `auto_num_devices`
# draws the line by parameter count.
CPU_DATA_PARALLEL_MAX_PARAMS = 4_000_000


def auto_num_devices(params: Any, batch_size: int | None = None) -> int:
    """How many devices `make_mesh` should use for a model with ``params`` when none is asked for.

    Every device, except on the CPU for networks above `CPU_DATA_PARALLEL_MAX_PARAMS` parameters (one
    device), and at most the largest count that ``batch_size`` divides evenly over.
    """
    devices = jax.devices()
    if jax.process_count() > 1:  # every process takes part
        return len(devices)
    large = count_params(params) > CPU_DATA_PARALLEL_MAX_PARAMS
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


def batch_rows(batch_size: int, mesh: Mesh) -> slice:
    """The rows of a global batch of ``batch_size`` that this process feeds to `shard_batch` (all, with one process)."""
    check_batch_size(batch_size, mesh)
    return distributed.local_rows(batch_sharded(mesh), batch_size)


def replicate(tree: Any, mesh: Mesh) -> Any:
    """A copy of ``tree`` (e.g. a TrainState) with every leaf on all devices of the mesh.

    Over several processes every process passes the same values (its own copy of the state).
    """
    if not _is_local(mesh):  # each process gives its copy; device_put takes NumPy for a global sharding
        return jax.device_put(jax.tree_util.tree_map(distributed.to_numpy, tree), replicated(mesh))
    # Copy first: device_put may hand back the caller's buffer as the copy on the first device (on a
    # 1-device mesh, and in jax 0.10 on larger meshes even with may_alias=False), and a step that
    # donates the replicated state would then delete the caller's original arrays too.
    owned = jax.tree_util.tree_map(lambda x: x.copy() if isinstance(x, jax.Array) else x, tree)
    return jax.device_put(owned, replicated(mesh))


def unreplicate(tree: Any) -> Any:
    """This process's own copy of a replicated ``tree``, on its first local device: what code that runs in
    one process (prediction, plots) takes after a multi-process `fit`. Unchanged with one process."""
    if all(x.is_fully_addressable for x in jax.tree_util.tree_leaves(tree) if isinstance(x, jax.Array)):
        return tree
    device = jax.local_devices()[0]
    return jax.tree_util.tree_map(
        lambda x: jax.device_put(distributed.to_numpy(x), device) if isinstance(x, jax.Array) else x, tree)


def _is_local(mesh: Mesh) -> bool:
    return mesh.is_multi_process is False


def shard_batch(batch: dict, mesh: Mesh) -> dict:
    """Split every array of ``batch`` along its leading axis over the mesh's data axis.

    With several processes ``batch`` is this process's rows (`batch_rows`) of the global batch, which
    is assembled from every process's share with ``jax.make_array_from_process_local_data``.
    """
    sizes = {k: np.shape(v)[0] for k, v in batch.items()}
    if len(set(sizes.values())) != 1:
        raise ValueError(f"batch arrays disagree on the leading (batch) axis: {sizes}")
    local_size = next(iter(sizes.values()))
    if _is_local(mesh):
        check_batch_size(local_size, mesh)
        return jax.device_put(batch, batch_sharded(mesh))
    share = len(mesh.local_devices) / mesh.size  # every process holds the same number of the mesh's devices
    global_size = round(local_size / share)
    check_batch_size(global_size, mesh)
    sharding = batch_sharded(mesh)
    return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v), (global_size, *np.shape(v)[1:]))
            for k, v in batch.items()}


def compile_step(step_fn: Callable, policy: Policy, mode: str, mesh: Mesh | None = None, *,
                 donate_state: bool = False) -> Callable:
    """The one place jaxvgg jits a step: for a policy, a mode and (optionally) a mesh.

    Args:
      step_fn: a pure ``(state_or_variables, batch, ...) -> outputs`` function on the global batch, e.g.
        ``jaxvgg.train.train_step``.
      policy: the model's `jaxvgg.policy.Policy` (``state.policy``, ``model.policy``); its XLA compile
        options for ``mode`` go to the compiler.
      mode: "train" or "infer".
      mesh: from `make_mesh`: the first argument is replicated over it, the second (the batch) split along
        its leading axis, and every output replicated. None: plain ``jax.jit``, arrays where they are.
      donate_state: reuse the first argument's buffers for the output (do not read the old state after).

    Returns:
      The jitted step. Inputs not yet placed are moved to these shardings (uncommitted arrays, NumPy);
      place them up front with `replicate` / `shard_batch` to transfer once and get the friendlier
      batch size error.
    """
    options = policy.compiler_options(mode)
    donate = (0,) if donate_state else ()
    if mesh is None:
        return jax.jit(step_fn, donate_argnums=donate, compiler_options=options)
    return jax.jit(step_fn, in_shardings=(replicated(mesh), batch_sharded(mesh)), out_shardings=replicated(mesh),
                   donate_argnums=donate, compiler_options=options)
