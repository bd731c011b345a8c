"""Collects the max |Δ| every parity check measured; prints the table and writes it as JSON.

Every test that builds a model runs twice, once per form of the convolutions, max-pools and matrix
products (``jaxvgg.policy``): "native" is lax.conv / reduce_window and XLA's dots, "fast" is im2col /
Toeplitz / direct convs, reshape max-pools, MKL's products and oneDNN's convolutions where they are built
(oneDNN's where it has kernels for the layer and the precision) and each model's
XLA:CPU options. The test builds its model with ``common.policy(case, impl)``: speed must never
change the function computed. Tests in
`FORM_INDEPENDENT_MODULES` / `FORM_INDEPENDENT_TESTS` compute no model output and run once
(recorded as "native"); the fast-form copies of the 10-step optimizer runs are marked slow.

The report goes to ``$JAXVGG_PARITY_REPORT`` (default ``build/parity_report.json``);
``python -m parity_tests.report`` renders it as markdown (``--out docs/parity.md``: the whole page).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

pytest.importorskip("torch", reason="parity tests compare against PyTorch: pip install -e '.[torch,dev]'")

import jax  # noqa: E402

from jaxvgg import gemm, onednn  # noqa: E402
from jaxvgg.policy import make_policy  # noqa: E402
from parity_tests.report import FORMS, markdown_table  # noqa: E402

# test modules (by file stem) and tests that compute no model output: the form cannot matter, so they run once
FORM_INDEPENDENT_MODULES = {"test_schedules"}
FORM_INDEPENDENT_TESTS = {"test_parameter_counts_equal_the_cited_constants",
                          "test_torchvision_vgg16_round_trip_is_bit_exact",
                          "test_torchvision_bn_round_trip_is_bit_exact"}
FAST_FORM_SLOW_TESTS = {"test_ten_optimizer_steps_give_the_same_parameters",
                        "test_bn_ten_sgd_steps_give_the_same_parameters_and_statistics"}
# what each form's policy must resolve a large layer to in inference (guards against the switch being ignored)
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
def impl(request):
    """The form ("native" or "fast") this test builds its models with (`parity_tests.common.policy`)."""
    form = getattr(request, "param", "native")
    policy = make_policy(None, forms=form)
    assert (policy.conv_form(4096, False, 3), policy.pool_form(False)) == _EXPECTED[form]
    # and the matrix products: XLA's in the native form, MKL's in the fast one where it is built
    assert policy.gemm == ("mkl" if form == "fast" and gemm.problem() is None and jax.device_count() == 1 else "xla")
    # and the convolutions: oneDNN's in the fast form where its handler is built (jaxvgg.onednn)
    assert policy.conv == ("onednn" if form == "fast" and onednn.problem() is None and jax.device_count() == 1
                           else "xla")
    yield form


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
