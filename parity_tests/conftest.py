"""Collects the max |Δ| every parity check measured; prints the table and writes it as JSON.

Every test that builds a model runs twice, once per form of the convolutions, max-pools and matrix
products (``jaxvgg.models``, ``jaxvgg.gemm``): "native" is lax.conv / reduce_window and XLA's dots,
"fast" is im2col / reshape max-pool and MKL's products where they are built. The form is forced
through ``$JAXVGG_IMPL``: speed must never change the function computed. Tests in
`FORM_INDEPENDENT_MODULES` / `FORM_INDEPENDENT_TESTS` compute no model output and run once
(recorded as "native"); the fast-form copies of the 10-step optimizer runs are marked slow.

The report goes to ``$JAXVGG_PARITY_REPORT`` (default ``build/parity_report.json``);
``python -m parity_tests.report`` renders it as the README's markdown table.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

pytest.importorskip("torch", reason="parity tests compare against PyTorch: pip install -e '.[torch,dev]'")

import jax  # noqa: E402

from jaxvgg import gemm, models  # noqa: E402
from parity_tests.report import FORMS, markdown_table  # noqa: E402

# test modules (by file stem) and tests that compute no model output: the form cannot matter, so they run once
FORM_INDEPENDENT_MODULES = {"test_schedules"}
FORM_INDEPENDENT_TESTS = {"test_parameter_counts_equal_the_cited_constants",
                          "test_torchvision_vgg16_round_trip_is_bit_exact"}
FAST_FORM_SLOW_TESTS = {"test_ten_optimizer_steps_give_the_same_parameters"}
# what each forced form must resolve an "auto" layer to (guards against the switch being ignored)
_EXPECTED = {"native": ("lax", "reduce_window"), "fast": ("im2col", "reshape")}

_RECORDS: list[dict] = []


def _sort_key(row: dict) -> tuple:
    return row["model"], row["check"], row["impl"]


def pytest_generate_tests(metafunc):
    if Path(metafunc.definition.fspath).stem in FORM_INDEPENDENT_MODULES or metafunc.function.__name__ in \
            FORM_INDEPENDENT_TESTS:
        return
    # the 10-step runs add only the optimizer (form-independent) to what the gradient tests prove in
    # both forms; their fast-form copies run with the slow ones (scripts/test.sh --all)
    slow_fast = metafunc.function.__name__ in FAST_FORM_SLOW_TESTS
    metafunc.parametrize("impl", [pytest.param(form, id=form, marks=[pytest.mark.slow] if slow_fast and form == "fast"
                                               else []) for form in FORMS], indirect=True)


@pytest.fixture(autouse=True)
def impl(request, monkeypatch):
    """The form of convs and max-pools this test runs with: JAXVGG_IMPL, set for the test's duration.

    The variable is read at trace time and jax's caches do not key on it (flax modules compare equal
    by their fields), so a trace cached under one form could be reused under the other: the caches
    are cleared on the way in and out.
    """
    form = getattr(request, "param", "native")
    monkeypatch.setenv(models.IMPL_ENV, form)
    assert (models.resolve_conv_impl("auto", 1, False), models.resolve_pool_impl("auto", False)) == _EXPECTED[form]
    # and the matrix products: XLA's in the native form, MKL's in the fast one where it is built
    assert gemm.backend() == ("mkl" if form == "fast" and gemm._load() is None else "xla")
    jax.clear_caches()
    yield form
    jax.clear_caches()


@pytest.fixture
def record(impl):
    """record(model, check, max_abs, tol): log one measured max |Δ| against its tolerance."""

    def _record(model: str, check: str, max_abs: float, tol: str) -> None:
        row = {"model": model, "check": check, "impl": impl, "max_abs_diff": float(max_abs), "tolerance": tol}
        _RECORDS.append(row)
        print(f"[parity] {model:<28} {check:<40} {impl:<6} max|Δ| = {max_abs:.3g}  ({tol})")

    return _record


def pytest_sessionfinish(session, exitstatus):
    if not _RECORDS:
        return
    path = Path(os.environ.get("JAXVGG_PARITY_REPORT", "build/parity_report.json"))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(sorted(_RECORDS, key=_sort_key), indent=1))
    os.replace(tmp, path)


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    if not _RECORDS:
        return
    terminalreporter.section("parity: max |Δ| measured (jaxvgg vs PyTorch)")
    terminalreporter.write_line(markdown_table(sorted(_RECORDS, key=_sort_key)))
    terminalreporter.write_line(f"written to {os.environ.get('JAXVGG_PARITY_REPORT', 'build/parity_report.json')}")
