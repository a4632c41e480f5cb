#!/usr/bin/env bash
# The default test run: lint, architecture contracts, then the CPU test suite (slow tests excluded).
# Extra arguments go to pytest (e.g. `bash scripts/test.sh -m slow`).
set -euo pipefail
cd "$(dirname "$0")/.."
[ -f .venv/bin/activate ] && . .venv/bin/activate
ruff check src tests benchmarks
lint-imports
python -m pytest -q -p no:cacheprovider "$@"
