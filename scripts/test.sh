#!/usr/bin/env bash
# The default test run: lint, architecture contracts, then the CPU test suite (slow tests excluded).
set -euo pipefail
cd "$(dirname "$0")/.."
ruff check src tests benchmarks
lint-imports
python -m pytest -q -p no:cacheprovider "$@"
