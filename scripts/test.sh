#!/usr/bin/env bash
# Set everything up, then run lint, type checks and the whole test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
echo "== ruff"; .venv/bin/ruff check rawtransfer tests benchmarks
.venv/bin/ruff format --check rawtransfer tests benchmarks
echo "== mypy"; .venv/bin/mypy
echo "== pytest"
exec .venv/bin/python -m pytest -p no:cacheprovider "$@"
