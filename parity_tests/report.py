"""Renders a parity report (JSON rows of model, check, impl, max |Δ|, tolerance) as markdown.

    python -m parity_tests.report [build/parity_report.json]                 # the table, to stdout
    python -m parity_tests.report build/parity_report.json --out docs/parity.md --machine "2-core x86-64 CPU"

One table row per (model, check), with the max |Δ| of each form of the model's policy ("impl": native
or fast, see ``jaxvgg.policy``) in its own column; "–" where a check ran in one form only. ``--out``
writes the whole page: how the checks work, the highlights (worst case of each kind) and every row.
"""

from __future__ import annotations

import argparse
import json
import platform
from pathlib import Path

FORMS = ("native", "fast")
MISSING = "–"


def markdown_table(rows: list[dict]) -> str:
    """The README's parity table: one row per (model, check), in the order the rows first appear."""
    def cell(text: str) -> str:
        return str(text).replace("|", "\\|")  # "|Δ|" must not end a markdown cell

    grouped: dict[tuple[str, str], dict[str, dict]] = {}
    for r in rows:
        impl = r.get("impl")
        if impl not in FORMS:
            raise ValueError(f"parity row {r['model']!r} / {r['check']!r} has impl={impl!r}; expected one of "
                             f"{FORMS} (a report from before the forms were recorded: rerun pytest parity_tests)")
        by_form = grouped.setdefault((r["model"], r["check"]), {})
        if impl in by_form:
            raise ValueError(f"parity row {r['model']!r} / {r['check']!r} / {impl} recorded twice")
        by_form[impl] = r

    lines = ["| model | check | " + " | ".join(f"max abs diff ({f})" for f in FORMS) + " | tolerance |",
             "|---|---|" + "---:|" * len(FORMS) + "---|"]
    for (model, check), by_form in grouped.items():
        diffs = [f"{by_form[f]['max_abs_diff']:.2e}" if f in by_form else MISSING for f in FORMS]
        tols = {f: by_form[f]["tolerance"] for f in FORMS if f in by_form}
        # tolerances measured per run (e.g. "2 x f32 rounding = ...") can differ between the forms
        tol = (next(iter(tols.values())) if len(set(tols.values())) == 1
               else "; ".join(f"{f}: {t}" for f, t in tols.items()))
        lines.append(f"| {cell(model)} | {cell(check)} | " + " | ".join(diffs) + f" | {cell(tol)} |")
    return "\n".join(lines)


# the highlights: (label, which checks, which number of them)
_HIGHLIGHTS = (
    ("model outputs (evaluation mode)", lambda check: check.startswith("outputs") and "training mode" not in check),
    ("every layer's output, relative to its magnitude", lambda check: "layer outputs" in check),
    ("gradients of every parameter", lambda check: check.startswith("gradients") and "training mode" not in check),
    ("BatchNorm models in training mode (batch statistics): outputs",
     lambda check: check.startswith("outputs (training mode")),
    ("BatchNorm models in training mode: gradients (they reach O(1); the tolerance scales with each tensor)",
     lambda check: check.startswith("gradients") and "training mode" in check),
    ("parameters after 10 optimizer steps, float64",
     lambda check: check.endswith(("after 10 steps, float64", "params after each of 10 steps, float64"))),
    ("BatchNorm running mean/var (training mode) vs torch's buffers, float32",
     lambda check: check.startswith("running mean/var") or check.endswith("running mean/var after each of 10 steps, "
                                                                          "float32")),
    ("learning-rate schedules (relative)", lambda check: check.startswith("lr sequence")),
    ("bfloat16 outputs, relative error vs float64 (torch.autocast's is in the row's tolerance)",
     lambda check: check.startswith("bf16 outputs: rel. error")),
)

PAGE = """# Parity with PyTorch

Each row compares real numbers that jaxvgg and PyTorch computed from the same weights and inputs: the
PyTorch originals (`torch_ref/`, and `torchvision.models` for the torchvision VGGs) with their own
initialisation, converted with `jaxvgg.from_torch`, then run by both frameworks. Every model check runs
twice, once per execution policy: **native** (lax.conv, reduce_window max-pools, XLA's dots and default
compile options) and **fast** (im2col, Toeplitz and direct convs, reshape max-pools, MKL's products where
built, each model's XLA:CPU options), so the speed-ups are proven to compute the same function.

Optimizer steps: ten SGD (lr 0.01, momentum 0.9, weight decay 5e-4) and ten Adam (lr 1e-3) steps in
float64 and in float32 from the same weights and batches. In float64 they agree to ~1e-12 or better, the
same arithmetic; in float32, ten steps from a random init amplify rounding (Adam turns gradients of ~1e-7
into steps of ~lr), so the float32 check is "within 1e-5, or within twice the distance either framework's
own float32 run has from its float64 run". The 10-step runs of the torchvision VGGs and the fast-form
copies of every 10-step run are marked `slow` (`scripts/test.sh --all`); where the report comes from the
default suite, their cells read "–".

BatchNorm (the `*_bn` models, `parity_tests/test_batchnorm.py`): torchvision's `vgg11_bn` and `vgg16_bn`
and the CIFAR-native `vgg11_bn` of `torch_ref`, with their BatchNorm weights and buffers first drawn at
random (torchvision's identity init would hide a wrong normalisation), dropout off. Evaluation outputs and
every layer's output; the training-mode outputs (batch statistics) and the running mean/variance after one
forward pass against torch's buffers (`num_batches_tracked` exactly); the training-mode gradients; ten SGD
steps in training mode with parameters and running statistics compared after every step, float64 and
float32; the bit-exact round trip of the state_dicts, buffers included.

bfloat16 (rows "bf16 ..."): the model computes in bfloat16 (`create_model(..., dtype=jnp.bfloat16)`:
bfloat16 operands, float32 sums, float32 weights, optimizer and loss) and PyTorch runs under
`torch.autocast("cpu", dtype=torch.bfloat16)`, from the same weights and batch. Neither can match float64
to 1e-5, so each row gives jaxvgg's relative error from a float64 run of the same model (max |x - x64| /
max |x64|, the worst tensor), which must be at most twice torch.autocast's (the tolerance column states
torch's), and the distance between the two frameworks, which must be at most 1.5 times torch.autocast's
own error. For the 10 SGD steps the error is measured relative to how far the float64 run moved each
tensor. `parity_tests/test_bf16.py` explains why this is the test.

Generated by `python -m parity_tests.report build/parity_report.json --out docs/parity.md` from the
report that {command} wrote on {machine}.

## Highlights (worst case of each kind, native / fast)

{highlights}

## Every check ({count} rows)

{table}
"""


def _worst(rows: list[dict], form: str, select) -> float | None:
    values = [r["max_abs_diff"] for r in rows if r.get("impl") == form and select(r["check"])]
    return max(values) if values else None


def page(rows: list[dict], command: str, machine: str) -> str:
    """The whole docs/parity.md: how the checks work, the worst case of each kind, every row."""
    highlights = []
    for label, select in _HIGHLIGHTS:
        worst = [_worst(rows, form, select) for form in FORMS]
        if any(w is not None for w in worst):
            highlights.append(f"- {label}: " + " / ".join(MISSING if w is None else f"{w:.2g}" for w in worst))
    table = markdown_table(rows)
    return PAGE.format(command=command, machine=machine, highlights="\n".join(highlights),
                       count=len(table.splitlines()) - 2, table=table)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("report", nargs="?", default="build/parity_report.json",
                        help="JSON written by pytest parity_tests")
    parser.add_argument("--out", help="write the whole page (docs/parity.md) here instead of printing the table")
    parser.add_argument("--command", default="`bash scripts/test.sh` (the CI command)",
                        help="the command that produced the report, for the page")
    parser.add_argument("--machine", default=f"{platform.machine()} {platform.processor() or 'CPU'}",
                        help="the machine it ran on, for the page")
    args = parser.parse_args(argv)
    with open(args.report) as f:
        rows = json.load(f)
    if args.out is None:
        print(markdown_table(rows))
        return
    Path(args.out).write_text(page(rows, args.command, args.machine))
    print(f"wrote {args.out} ({len(rows)} measurements)")


if __name__ == "__main__":
    main()
