"""Renders a parity report (JSON rows of model, check, max |Δ|, tolerance) as a markdown table.

    python -m parity_tests.report [build/parity_report.json]
"""

from __future__ import annotations

import argparse
import json


def markdown_table(rows: list[dict]) -> str:
    """The README's parity table."""
    def cell(text: str) -> str:
        return str(text).replace("|", "\\|")  # "|Δ|" must not end a markdown cell

    lines = ["| model | check | max abs diff | tolerance |", "|---|---|---:|---|"]
    lines += [f"| {cell(r['model'])} | {cell(r['check'])} | {r['max_abs_diff']:.2e} | {cell(r['tolerance'])} |"
              for r in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("report", nargs="?", default="build/parity_report.json", help="JSON written by pytest parity_tests")
    args = parser.parse_args(argv)
    with open(args.report) as f:
        print(markdown_table(json.load(f)))


if __name__ == "__main__":
    main()
