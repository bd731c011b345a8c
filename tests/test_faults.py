"""tests/faults.py itself: a child that reaches its stop step is parked there; one that exits first fails the wait."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests import faults

ROOT = Path(__file__).resolve().parents[1]

_CHILD = """
import argparse, sys
sys.path.insert(0, {root!r})
from tests import faults
parser = argparse.ArgumentParser()
faults.add_arguments(parser)
hook = faults.hook_from(parser.parse_args())
for epoch in (1, 2):
    for batch in (1, 2, 3):
        print(epoch, batch, flush=True)
        hook(epoch, batch, {{}})
"""


def _start(stop: faults.StopSignal, epoch: int, batch: int) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", _CHILD.format(root=str(ROOT)), *stop.child_args(epoch, batch)],
                            stdout=subprocess.PIPE, text=True, pass_fds=stop.pass_fds)
    stop.started()
    return proc


def test_a_child_signals_its_stop_step_and_waits_there_to_be_killed():
    stop = faults.StopSignal()
    proc = _start(stop, 2, 1)
    try:
        assert stop.wait(proc, timeout_s=60) == "2:1"
        assert proc.poll() is None  # parked, not finished
    finally:
        os.kill(proc.pid, signal.SIGKILL)
    out, _ = proc.communicate()
    assert out.split("\n")[-2] == "2 1"  # nothing ran after the stop step


def test_waiting_for_a_step_the_child_never_reaches_fails_when_it_exits():
    stop = faults.StopSignal()
    proc = _start(stop, 3, 1)
    with pytest.raises(AssertionError, match="exited"):
        stop.wait(proc, timeout_s=60)
    proc.communicate()
