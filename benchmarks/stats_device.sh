#!/usr/bin/env bash
# Device confirmation of the regression verdict (issue 6), one command, about 6 minutes on an H100:
#   1. benchmarks/stats_device.py: one switch-base-8 case, one process: baseline, calibration of the delay that makes
#      ~5% slowdown, then N unchanged and N slowed runs, each compared with the baseline (expect 0 flagged / all flagged)
#   2. the same through the pytest plugin: --moebench-save-baseline, an unchanged run (auto-compared), a run with
#      --moebench-inject-delay (expect REGRESSED, exit 1)
#   3. benchmarks/stats_power.py with the noise measured in step 1 (false alarms / detection by rounds per side)
# Usage: OUT=/some/dir bash benchmarks/stats_device.sh     (env: TIER=full|quick, ROUNDS=20, BUDGET_S=200)
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/stats_device_out}
TIER=${TIER:-full}
ROUNDS=${ROUNDS:-20}
BUDGET_S=${BUDGET_S:-200}
export PYTHONPATH=src
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,driver_version --format=csv > "$OUT/gpu.txt" 2>&1
git rev-parse HEAD > "$OUT/commit.txt" 2>&1

python benchmarks/stats_device.py --out "$OUT" --tier "$TIER" --rounds "$ROUNDS" --budget-s "$BUDGET_S" \
  2>&1 | tee "$OUT/stats_device.txt"
DELAY=$(cat "$OUT/delay_ms.txt" 2>/dev/null || echo 0.2)

PT=(python -m pytest -p moebench.plugin --moebench suites/switch --moebench-tier "$TIER" --moebench-policy lru
    -k "switch-base-8 and lru-50" --moebench-rounds 10 --moebench-history "$OUT/plugin_history"
    --moebench-baseline-dir "$OUT/baselines" -p no:cacheprovider -q)
"${PT[@]}" --moebench-save-baseline > "$OUT/plugin_1_save.txt" 2>&1; rc1=$?
"${PT[@]}" > "$OUT/plugin_2_unchanged.txt" 2>&1; rc2=$?
"${PT[@]}" "--moebench-inject-delay=${DELAY}ms" > "$OUT/plugin_3_slowed.txt" 2>&1; rc3=$?

timeout 60 python benchmarks/stats_power.py --noise-from "$OUT/history" --reps 500 --rounds 5 10 20 30 50 \
  --out "$OUT/power_measured.json" > "$OUT/power_measured.txt" 2>&1

echo "=== power simulation with the measured noise"; tail -22 "$OUT/power_measured.txt"
echo "=== plugin: save baseline rc=$rc1 (want 0), unchanged rc=$rc2 (want 0), slowed ${DELAY} ms rc=$rc3 (want 1)"
grep -h -E "lru +50%|baseline:" "$OUT"/plugin_*.txt
echo "=== repeated runs"; grep -A2 "^SUMMARY" "$OUT/stats_device.txt"
