#!/usr/bin/env bash
# The default test run: lint, architecture contracts, then the whole CPU test suite (the tests marked
# `slow` run too; GPU tests are left out). Extra arguments go to pytest (e.g. `-m "not slow"`).
set -euo pipefail
cd "$(dirname "$0")/.."
[ -f .venv/bin/activate ] && . .venv/bin/activate
ruff check src tests benchmarks
lint-imports
python -m pytest -q -p no:cacheprovider "$@"
