"""Renders a parity report (JSON rows of model, check, impl, max |Δ|, tolerance) as a markdown table.

    python -m parity_tests.report [build/parity_report.json]

One table row per (model, check), with the max |Δ| of each form of convs/max-pools ("impl": native
or fast, see ``jaxvgg.models.IMPL_ENV``) in its own column; "–" where a check ran in one form only.
"""

from __future__ import annotations

import argparse
import json

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


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("report", nargs="?", default="build/parity_report.json", help="JSON written by pytest parity_tests")
    args = parser.parse_args(argv)
    with open(args.report) as f:
        print(markdown_table(json.load(f)))


if __name__ == "__main__":
    main()
