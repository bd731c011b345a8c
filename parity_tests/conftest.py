"""Collects the max |Δ| every parity check measured; prints the table and writes it as JSON.

The report goes to ``$JAXVGG_PARITY_REPORT`` (default ``build/parity_report.json``);
``python -m parity_tests.report`` renders it as the README's markdown table.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

pytest.importorskip("torch", reason="parity tests compare against PyTorch: pip install -e '.[torch,dev]'")

from parity_tests.report import markdown_table  # noqa: E402

_RECORDS: list[dict] = []


@pytest.fixture
def record():
    """record(model, check, max_abs, tol): log one measured max |Δ| against its tolerance."""

    def _record(model: str, check: str, max_abs: float, tol: str) -> None:
        row = {"model": model, "check": check, "max_abs_diff": float(max_abs), "tolerance": tol}
        _RECORDS.append(row)
        print(f"[parity] {model:<28} {check:<40} max|Δ| = {max_abs:.3g}  ({tol})")

    return _record


def pytest_sessionfinish(session, exitstatus):
    if not _RECORDS:
        return
    path = Path(os.environ.get("JAXVGG_PARITY_REPORT", "build/parity_report.json"))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(sorted(_RECORDS, key=lambda r: (r["model"], r["check"])), indent=1))
    os.replace(tmp, path)


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    if not _RECORDS:
        return
    terminalreporter.section("parity: max |Δ| measured (jaxvgg vs PyTorch)")
    terminalreporter.write_line(markdown_table(sorted(_RECORDS, key=lambda r: (r["model"], r["check"]))))
    terminalreporter.write_line(f"written to {os.environ.get('JAXVGG_PARITY_REPORT', 'build/parity_report.json')}")
