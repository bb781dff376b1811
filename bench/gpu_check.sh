#!/usr/bin/env bash
# The GPU check: one table of what every CUDA path does on this machine's GPU (see bench/gpu_check.py), under 8
# minutes on one H100/H200. `--cpu` walks the same steps on the CPU at tiny sizes (no GPU needed).
# Usage: bench/gpu_check.sh [--cpu] [--trials 16] [--epochs 3]      (run from anywhere; uses .venv if present)
set -euo pipefail
cd "$(dirname "$0")/.."
python=.venv/bin/python
[ -x "$python" ] || python=python3
limit=480  # the GPU run's promise; the CPU walk-through on a busy machine may take longer
[[ " $* " == *" --cpu "* ]] && limit=1800
exec timeout "$limit" "$python" bench/gpu_check.py "$@"
