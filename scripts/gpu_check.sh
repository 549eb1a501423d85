#!/usr/bin/env bash
# The checks that need an NVIDIA GPU, in stages that fit a short loan of a GPU machine (README, "GPU check"):
#
#   bash scripts/gpu_check.sh [quick|full|CHECK ...] [--out DIR] [--budget SECONDS] [--wheels DIR] [--list]
#
# quick (default, ~6 min on an H100) then full (~8 min); each check under its own timeout, a summary line as it
# ends, a table at the end, logs and gpu_check.json in --out (default $OUT, else /tmp/gpu_check). What each check
# runs, its timeout and expected time: scripts/gpu_check.py (or --list). Runs on the machine's own python3
# (PYTHON=... for another) with the repository on PYTHONPATH: no venv, no registry.
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
exec "${PYTHON:-python3}" scripts/gpu_check.py "$@"
