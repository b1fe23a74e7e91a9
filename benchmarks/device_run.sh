#!/usr/bin/env bash
# One run on a GPU machine: GPU tests, expert-load bandwidth, and the Switch suite at published size.
# Usage (from the repository root, package not installed there): OUT=/some/dir bash benchmarks/device_run.sh
set -uo pipefail
export PYTHONPATH=src PYTHONUNBUFFERED=1
OUT="${OUT:-/tmp/moebench-out}"; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$OUT/device.txt"
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)" \
  | tee -a "$OUT/device.txt"
python3 -m pytest -p moebench.plugin -p no:cacheprovider -m gpu tests -q 2>&1 | tail -3 | tee "$OUT/gpu_tests.txt"
python3 benchmarks/bandwidth.py --out "$OUT/bandwidth.json" 2>&1 | tee "$OUT/bandwidth.txt"
python3 -m pytest -p moebench.plugin -p no:cacheprovider --moebench suites/switch --moebench-tier full \
  --moebench-history "$OUT/history" "$@" 2>&1 | tee "$OUT/suite_switch.txt" | tail -40
