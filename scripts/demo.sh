#!/usr/bin/env bash
# Set everything up, make a handful of realistic raw frames in a scratch area and move
# them into a local archive with the embedded catalog; then say what happened.
set -euo pipefail
cd "$(dirname "$0")/.."
RAWTRANSFER_SETUP_SERVERS=0 ./scripts/setup.sh
exec .venv/bin/python -m rawtransfer.demo "$@"
