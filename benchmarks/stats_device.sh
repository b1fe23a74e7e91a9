#!/usr/bin/env bash
# Device confirmation of the regression verdict (issue 6), one command, about 7 minutes on an H100:
#   1. benchmarks/stats_device.py: one switch-base-8 case, one process: a baseline run, then N unchanged and N slowed
#      (5% stretch) runs, each compared with the baseline on raw and on machine-normalized tokens/s
#   2. the same through the pytest plugin: --moebench-save-baseline, an unchanged run (auto-compared), a run with
#      --moebench-inject-delay=5% (expect REGRESSED, exit 1)
# The noise of step 1's history is then resampled on a CPU: python benchmarks/stats_power.py --noise-from OUT/history
# Usage: OUT=/some/dir bash benchmarks/stats_device.sh     (env: TIER=full|quick, ROUNDS=20, BUDGET_S=300)
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/stats_device_out}
TIER=${TIER:-full}
ROUNDS=${ROUNDS:-20}
BUDGET_S=${BUDGET_S:-300}
export PYTHONPATH=src
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,driver_version --format=csv > "$OUT/gpu.txt" 2>&1
git rev-parse HEAD > "$OUT/commit.txt" 2>&1

python benchmarks/stats_device.py --out "$OUT" --tier "$TIER" --rounds "$ROUNDS" --budget-s "$BUDGET_S" \
  2>&1 | tee "$OUT/stats_device.txt"

PT=(python -m pytest -p moebench.plugin --moebench suites/switch --moebench-tier "$TIER" --moebench-policy lru
    -k "switch-base-8 and lru-50" --moebench-rounds "$ROUNDS" --moebench-history "$OUT/plugin_history"
    --moebench-baseline-dir "$OUT/baselines" -p no:cacheprovider -q)
"${PT[@]}" --moebench-save-baseline > "$OUT/plugin_1_save.txt" 2>&1; rc1=$?
"${PT[@]}" > "$OUT/plugin_2_unchanged.txt" 2>&1; rc2=$?
"${PT[@]}" "--moebench-inject-delay=5%" > "$OUT/plugin_3_slowed.txt" 2>&1; rc3=$?

echo "=== plugin: save baseline rc=$rc1 (want 0), unchanged rc=$rc2 (want 0), slowed 5% rc=$rc3 (want 1)"
grep -h -E "lru +50%|baseline:" "$OUT"/plugin_*.txt
echo "=== repeated runs"; grep -B3 -A3 "^SUMMARY" "$OUT/stats_device.txt"
