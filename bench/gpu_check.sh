#!/usr/bin/env bash
# One command for every GPU target (issue 15): bench/gpu_check.py with the project's environment.
# Under 8 minutes on one GPU; on a machine without CUDA it runs its fail-soft mode (GPU rows
# skipped with the reason, CPU smoke checks) and still exits 0. Arguments go to gpu_check.py
# (--out FILE, --quick, --batch N, --cpu). Run it from anywhere: it works from the repository root.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-.venv/bin/python}"
[ -x "$PY" ] || PY=python3
exec "$PY" bench/gpu_check.py "$@"
