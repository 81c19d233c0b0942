#!/usr/bin/env bash
# Install what rawtransfer needs on a fresh Debian/Ubuntu machine, idempotently:
# system tools (fpack/funpack, fitsverify, sshd and PostgreSQL for the tests) when they
# are missing, then a virtual environment in .venv with the package and its dev tools.
set -euo pipefail
cd "$(dirname "$0")/.."

SUDO=""
if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi

need=()
command -v fpack >/dev/null 2>&1 && command -v funpack >/dev/null 2>&1 || need+=(libcfitsio-bin)
command -v fitsverify >/dev/null 2>&1 || need+=(fitsverify)
if [ "${RAWTRANSFER_SETUP_SERVERS:-1}" = 1 ]; then
  [ -x /usr/sbin/sshd ] || need+=(openssh-server)
  ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || need+=(postgresql)
  # the deployment tests check the unit files with systemd-analyze (no running systemd)
  command -v systemd-analyze >/dev/null 2>&1 || need+=(systemd)
  # the fault suite moves the service's clock around the backfill windows
  command -v faketime >/dev/null 2>&1 || need+=(faketime)
  # the benchmarks' baselines (python -m benchmarks, and its smoke test) use scp and rsync
  command -v scp >/dev/null 2>&1 || need+=(openssh-client)
  command -v rsync >/dev/null 2>&1 || need+=(rsync)
  # ... and the backfill scan's second baseline reads the catalog with sqlite3
  command -v sqlite3 >/dev/null 2>&1 || need+=(sqlite3)
fi
PY="${PYTHON:-python3}"
if ! command -v "$PY" >/dev/null 2>&1; then need+=(python3 python3-venv); PY=python3; fi
if command -v "$PY" >/dev/null 2>&1 && ! "$PY" -c 'import ensurepip, venv' >/dev/null 2>&1; then
  need+=(python3-venv)
fi
if [ "${#need[@]}" -gt 0 ]; then
  echo "setup: installing ${need[*]}"
  export DEBIAN_FRONTEND=noninteractive
  $SUDO apt-get update -qq
  # policy-rc.d-free: the packages' own services are not used (the tests start their own)
  $SUDO apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi

"$PY" -c 'import sys; sys.exit(sys.version_info < (3, 11))' \
  || { echo "setup: Python 3.11 or newer is needed ($PY is $("$PY" -V))" >&2; exit 2; }
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
.venv/bin/python -m pip install -q --disable-pip-version-check --upgrade pip >/dev/null
.venv/bin/python -m pip install -q --disable-pip-version-check -e ".[dev]"
echo "setup: ready ($(.venv/bin/raw-transfer --version), $(fpack -V 2>&1 | head -1))"
