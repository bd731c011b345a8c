#!/usr/bin/env bash
# Fresh machine to green tests: set-up, then the unit tests and the parity suite.
# `scripts/test.sh --all` also runs the tests marked slow; other arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
marker=(-m "not slow")
if [ "${1:-}" = "--all" ]; then marker=(); shift; fi
exec .venv/bin/python -m pytest "${marker[@]}" -q --durations=25 "$@" tests parity_tests
