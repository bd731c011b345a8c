"""Launching several jaxvgg processes on loopback for tests: a free coordinator port, a bounded time, no leftovers."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from jaxvgg import distributed, runtime

ROOT = Path(__file__).resolve().parents[1]


free_port = distributed.free_port  # one launch's coordinator port


def env(devices: int = 1) -> dict:
    """The environment of one process with ``devices`` CPU devices, unbuffered, the repository importable."""
    return {**runtime.environ_with_cpu_devices(devices), "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(ROOT),
            "JAXVGG_ALLOCATOR": "system"}  # our device count replaces the caller's


def launch_flags(port: int, num_processes: int, process_id: int) -> list[str]:
    return ["--coordinator-address", f"127.0.0.1:{port}", "--num-processes", str(num_processes),
            "--process-id", str(process_id)]


def start(commands: list[list[str]], logs: Path, devices: int = 1,
          pass_fds: dict[int, tuple[int, ...]] | None = None) -> list[subprocess.Popen]:
    """Starts one process per command, each in its own session (so a kill takes its children too),
    stdout and stderr to ``logs/process<i>.log``; ``pass_fds[i]``: file descriptors process i inherits."""
    logs.mkdir(parents=True, exist_ok=True)
    procs = []
    for i, command in enumerate(commands):
        out = open(logs / f"process{i}.log", "w")
        procs.append(subprocess.Popen(command, env=env(devices), stdout=out, stderr=subprocess.STDOUT,
                                      cwd=ROOT, start_new_session=True, pass_fds=(pass_fds or {}).get(i, ())))
        out.close()
    return procs


def wait(procs: list[subprocess.Popen], timeout_s: float) -> list[int | None]:
    """Exit codes once all end, or None for each still running after ``timeout_s`` (then killed)."""
    deadline = time.monotonic() + timeout_s
    for p in procs:
        try:
            p.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            break
    codes = [p.poll() for p in procs]
    kill(procs)
    return codes


def kill(procs: list[subprocess.Popen]) -> None:
    for p in procs:
        if p.poll() is None:
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            p.wait()


def run(commands: list[list[str]], logs: Path, timeout_s: float, devices: int = 1) -> None:
    """Runs the commands together; asserts that every one ends with status 0 in time, showing the logs if not."""
    procs = start(commands, logs, devices)
    codes = wait(procs, timeout_s)
    if codes != [0] * len(commands):
        tails = "\n".join(f"--- process {i} (exit {c}):\n" + (logs / f"process{i}.log").read_text()[-3000:]
                          for i, c in enumerate(codes))
        raise AssertionError(f"exit codes {codes} (None: still running after {timeout_s} s)\n{tails}")


def python(*args: str) -> list[str]:
    return [sys.executable, *args]
