"""Faults at a step the test chooses, never after a sleep: the child tells the parent over a pipe that it
reached (epoch, batch) and then waits to be killed, so a kill lands at the same point on any machine.

Parent::

    stop = StopSignal()
    proc = subprocess.Popen([..., *stop.child_args(2, 25)], pass_fds=stop.pass_fds)
    stop.started()
    stop.wait(proc, timeout_s=300)     # returns once the child is parked at epoch 2, batch 25
    os.kill(proc.pid, signal.SIGKILL)

or all of it in one call: ``kill_at(command, 2, 25, env)``.

Child (a `jaxvgg.train.fit` script): ``fit(..., on_step=pause_at(fd, epoch, batch))``, the numbers from the
``--stop-at EPOCH:BATCH --stop-fd FD`` arguments (`add_arguments`, `hook_from`).
"""

from __future__ import annotations

import argparse
import os
import select
import signal
import subprocess
import threading
import time

from jaxvgg.train import StepHook


def pause_at(fd: int, epoch: int, batch: int) -> StepHook:
    """A `fit` ``on_step`` hook: at (epoch, batch) it writes ``"epoch:batch"`` to ``fd`` and waits forever."""

    def on_step(e: int, b: int, metrics: dict) -> None:
        if (e, b) == (epoch, batch):
            os.write(fd, f"{e}:{b}\n".encode())
            threading.Event().wait()  # parked until the parent kills this process

    return on_step


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--stop-at", help="EPOCH:BATCH at which to signal --stop-fd and wait to be killed")
    parser.add_argument("--stop-fd", type=int)


def hook_from(args: argparse.Namespace) -> StepHook | None:
    """`pause_at` for ``--stop-at``/``--stop-fd``, or None when they were not given."""
    if args.stop_at is None:
        return None
    epoch, batch = (int(x) for x in args.stop_at.split(":"))
    return pause_at(args.stop_fd, epoch, batch)


def kill_at(command: list[str], epoch: int, batch: int, env: dict, timeout_s: float = 300) -> None:
    """Runs ``command`` (a `fit` script taking ``--stop-at/--stop-fd``) in its own session until it signals
    (epoch, batch), then kills it and all its children with SIGKILL."""
    stop = StopSignal()
    proc = subprocess.Popen(command + stop.child_args(epoch, batch), env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True, pass_fds=stop.pass_fds)
    stop.started()
    try:
        assert stop.wait(proc, timeout_s) == f"{epoch}:{batch}"
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


class StopSignal:
    """The parent's end of one child's stop signal (a pipe: the child holds the write end)."""

    def __init__(self) -> None:
        self._read, self._write = os.pipe()

    @property
    def pass_fds(self) -> tuple[int]:
        return (self._write,)

    def child_args(self, epoch: int, batch: int) -> list[str]:
        return ["--stop-at", f"{epoch}:{batch}", "--stop-fd", str(self._write)]

    def started(self) -> None:
        """Call once the child runs: only it holds the write end now, so its exit ends the pipe."""
        os.close(self._write)

    def wait(self, proc: subprocess.Popen, timeout_s: float) -> str:
        """Blocks until the child signals (its ``"epoch:batch"``); fails if it exits first or after ``timeout_s``."""
        deadline = time.monotonic() + timeout_s
        line = b""
        try:
            while not line.endswith(b"\n"):
                ready, _, _ = select.select([self._read], [], [], max(0.0, deadline - time.monotonic()))
                if not ready:
                    raise AssertionError(f"the child did not reach its stop step within {timeout_s} s")
                chunk = os.read(self._read, 64)
                if not chunk:  # every writer closed: the child ended without reaching the step
                    raise AssertionError(f"the child exited ({proc.wait()}) before its stop step")
                line += chunk
        finally:
            os.close(self._read)
        return line.decode().strip()
