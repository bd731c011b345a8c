"""Multi-process (multi-controller) JAX: one process per host, one global mesh over all their devices.

Every process runs the same program. `initialize` joins them (``jax.distributed.initialize``: a
coordinator on process 0, heartbeats, gloo collectives between CPU processes, NCCL between GPUs);
afterwards ``jax.devices()`` lists every process's devices and `jaxvgg.parallel.make_mesh` spans them
all. Each process reads only the rows of every global batch that its own devices hold
(`local_rows`) and `jaxvgg.parallel.shard_batch` assembles the global batch with
``jax.make_array_from_process_local_data``; the train state is replicated, so every process holds
the whole model and the numbers do not depend on how many processes there are. Only process 0
writes logs, history and plots (`is_main_process`); every process takes part in orbax's saves.

With one process (nothing initialised) all of this reduces to the single-process code: the mesh
is the local devices and every row is local.

    distributed.initialize("10.0.0.1:1234", num_processes=2, process_id=0)   # on host 0
    distributed.initialize("10.0.0.1:1234", num_processes=2, process_id=1)   # on host 1
"""

from __future__ import annotations

import socket
import time

import jax
import numpy as np
from jax.sharding import Sharding

# How long a silent process counts as alive. JAX's default is 100 s; a dead process is found after
# this long, and the survivors must end within 2 minutes of a kill.
HEARTBEAT_TIMEOUT_S = 60
_heartbeat_timeout_s = HEARTBEAT_TIMEOUT_S  # the one `initialize` was given: how long finding a lost process takes


class ProcessLostError(RuntimeError):
    """A collective with the other processes failed: one of them died (or its host is unreachable)."""


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, *, cluster: str | None = None,
               heartbeat_timeout_s: int = HEARTBEAT_TIMEOUT_S, init_timeout_s: int = 300,
               shutdown_timeout_s: int = 3600) -> None:
    """Joins this process to the others, before anything else touches a device.

    Args:
      coordinator_address: ``HOST:PORT`` of the coordinator, which process 0 starts; all processes
        give the same one.
      num_processes: how many processes take part.
      process_id: this process's rank, 0 .. num_processes - 1.
      cluster: instead of the three above, let JAX read them from a cluster's environment
        ("slurm" under ``srun``, "ompi" under ``mpirun``).
      heartbeat_timeout_s: a process silent for this long is dead, and the others end.
      init_timeout_s: how long to wait for every process to join.
      shutdown_timeout_s: how long a process that is done waits at exit for the others (process 0
        evaluates and writes the report after training while the others wait); a dead one is found
        by the heartbeat sooner.
    """
    given = [v is not None for v in (coordinator_address, num_processes, process_id)]
    if any(given) and not all(given):
        raise ValueError("coordinator_address, num_processes and process_id go together: give all three or none")
    if not any(given) and cluster is None:
        raise ValueError("give coordinator_address, num_processes and process_id, or a cluster to read them from")
    global _heartbeat_timeout_s
    _heartbeat_timeout_s = heartbeat_timeout_s
    jax.distributed.initialize(coordinator_address, num_processes, process_id, cluster_detection_method=cluster,
                               initialization_timeout=init_timeout_s, heartbeat_timeout_seconds=heartbeat_timeout_s,
                               shutdown_timeout_seconds=shutdown_timeout_s)


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nobody listens on now (the OS picks it): a coordinator port for processes started on one host."""
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def is_main_process() -> bool:
    """True on process 0, the one that writes logs, history, summaries and plots."""
    return jax.process_index() == 0


def sync(name: str) -> None:
    """Waits until every process reaches ``sync(name)`` (e.g. until process 0 has written a file the others read)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def local_rows(sharding: Sharding, batch_size: int) -> slice:
    """The rows of a global batch of ``batch_size`` that this process's devices hold under ``sharding``.

    With a batch split over a mesh whose devices are ordered by process (``jax.devices()`` order),
    they are one contiguous block; the whole batch with one process.
    """
    rows = sorted({(idx[0].start or 0, batch_size if idx[0].stop is None else idx[0].stop)
                   for idx in sharding.addressable_devices_indices_map((batch_size,)).values()})
    start, stop = rows[0][0], rows[0][1]
    for lo, hi in rows[1:]:
        if lo > stop:
            raise ValueError(f"this process's rows of the batch are not contiguous under {sharding}: {rows}")
        stop = max(stop, hi)
    return slice(start, stop)


def live_processes() -> list[int] | None:
    """The processes the coordinator still hears from, or None when that cannot be asked (one process)."""
    from jax._src import distributed as _state  # the client jax.distributed.initialize made

    client = _state.global_state.client
    if client is None or jax.process_count() == 1:
        return None
    try:
        nodes = client.get_live_nodes(list(range(jax.process_count())))
    except Exception:  # noqa: BLE001 -- the coordinator itself may be the lost one
        return None
    return sorted(int(n) for n in (nodes.keys() if isinstance(nodes, dict) else nodes))


def lost_processes(wait_s: float | None = None) -> list[int] | None:
    """After a failed collective: the processes that stopped answering, waiting up to ``wait_s`` (default:
    the heartbeat timeout `initialize` was given, plus 10 s) for the coordinator to find them; None when it
    cannot tell (the coordinator is gone)."""
    deadline = time.monotonic() + (_heartbeat_timeout_s + 10 if wait_s is None else wait_s)
    everyone = set(range(jax.process_count()))
    while True:
        live = live_processes()
        if live is None:
            return None
        if set(live) != everyone or time.monotonic() > deadline:
            return sorted(everyone - set(live))
        time.sleep(1.0)


def describe_lost(error: BaseException, wait_s: float | None = None) -> ProcessLostError:
    """A `ProcessLostError` for a failed collective that names the processes which stopped, where known."""
    lost = lost_processes(wait_s)
    me = f"process {jax.process_index()} of {jax.process_count()}"
    if lost:
        who = f"lost process {', '.join(map(str, lost))} (no heartbeat)"
    elif lost is None:
        who = "the coordinator (process 0) does not answer: process 0 is lost"
    else:
        who = "every process still answers the coordinator"
    first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    return ProcessLostError(f"{me}: a collective failed; {who}. Relaunch every process with --resume true to "
                            f"continue from the last complete checkpoint. ({first_line[:300]})")


def is_collective_failure(error: BaseException) -> bool:
    """True for the errors a dead peer causes in a collective (gloo's reset connections, a failed barrier)."""
    text = str(error)
    return jax.process_count() > 1 and any(s in text for s in (
        "Gloo", "gloo", "Connection reset", "Connection closed", "heartbeat", "Barrier", "barrier", "UNAVAILABLE"))


def to_numpy(x) -> np.ndarray:
    """A replicated (or process-local) array as this process's NumPy copy."""
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        return np.asarray(x.addressable_data(0))
    return np.asarray(x)
