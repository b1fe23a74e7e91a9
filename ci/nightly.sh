#!/usr/bin/env bash
# Nightly GPU job: the GPU tests, then every suite compared with its stored baseline, the run appended to the
# history, and the report (plots + one HTML page) made from that history. Exit status: 0 when everything passed;
# 1 when a test or a case failed, a case regressed against its baseline, or the report could not be made.
#
#   bash ci/nightly.sh                       # every suite under suites/
#   bash ci/nightly.sh suites/switch         # only these suites
#
# Works where the package is installed (pip install -e .) and where it is not (a bare checkout on a machine that
# cannot pip-install: PYTHONPATH=src and `-p moebench.plugin` are then added by this script).
# Everything it writes goes under $OUT (default ./nightly-out): logs, junit XML, history/, report/, summary.txt.
# Settings (environment): MOEBENCH_TIER (full), MOEBENCH_ROUNDS (10: with fewer than 5 rounds on a side, and fewer
# than 7 against a 3-round baseline, no change can reach p < 0.01), MOEBENCH_HISTORY ($OUT/history),
# MOEBENCH_BASELINE_DIR (baselines), MOEBENCH_SAVE_BASELINE=1 (store this run as the baseline: only when a
# person decided so), MOEBENCH_STEP_TIMEOUT (seconds per pytest call, none by default; a suite starts no case
# that would end past 90% of it), MOEBENCH_SKIP_GPU_TESTS=1,
# MOEBENCH_PYTEST_ARGS (more pytest arguments for every suite run, e.g. "--moebench-policy lru -k switch-base-8").
# Where `nvidia-smi -L` lists several GPUs and pytest-xdist is installed, each suite runs with `-n auto`: one worker
# per GPU, a model's cases on one worker, one run in the history (MOEBENCH_SPREAD=0 keeps one process).
# MOEBENCH_AB_AGAINST=<git ref> adds an interleaved A/B run of that ref against this tree (moebench ab: the verdict
# that survives a noisy machine), on MOEBENCH_AB_ARGS (pytest arguments, shell-quoted; default one switch-base-8
# case) with MOEBENCH_AB_PROCESSES process pairs (24) of MOEBENCH_AB_ROUNDS rounds a side (10) at MOEBENCH_AB_GRAIN
# (step); a regression there fails the night too.
set -uo pipefail
cd "$(dirname "$0")/.."

out="${OUT:-nightly-out}"
history="${MOEBENCH_HISTORY:-$out/history}"
tier="${MOEBENCH_TIER:-full}"
rounds="${MOEBENCH_ROUNDS:-10}"
baselines="${MOEBENCH_BASELINE_DIR:-baselines}"
mkdir -p "$out" "$history"
py="${PYTHON:-python3}"

if ! "$py" -c "import moebench" 2>/dev/null; then
  export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
fi
plugin=()
if ! "$py" -c "import sys; from importlib.metadata import entry_points as e
sys.exit(0 if any(p.name == 'moebench' for p in e(group='pytest11')) else 1)"; then
  plugin=(-p moebench.plugin)  # not installed: load the plugin by module name (installed: its entry point does)
fi
limit=()
time_limit=()  # suites stop starting cases in time, so that their finished cases are stored before the timeout
if [[ -n "${MOEBENCH_STEP_TIMEOUT:-}" ]]; then
  limit=(timeout --signal=INT --kill-after=30 "$MOEBENCH_STEP_TIMEOUT")
  time_limit=(--moebench-time-limit $(( MOEBENCH_STEP_TIMEOUT * 9 / 10 )))
fi

spread=()
gpus=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)
if [[ "${MOEBENCH_SPREAD:-1}" != 0 && "${gpus:-0}" -gt 1 ]] && "$py" -c "import xdist" 2>/dev/null; then
  spread=(-n auto)  # one worker per visible GPU (moebench.workers)
fi

if [[ $# -gt 0 ]]; then suites=("$@"); else suites=(suites/*/); fi
status=0
summary=()

step() {  # step NAME LOG -- command...: run, log, and remember the pytest result line and the exit code
  local name="$1" log="$2"; shift 3
  echo "== $name" >&2
  "$@" 2>&1 | tee "$log"
  local rc=${PIPESTATUS[0]}
  local result regressed
  result=$(grep -E "(passed|failed|skipped|error|no tests ran).* in [0-9.]+s" "$log" | tail -1 | sed -E 's/^=+ //; s/ =+$//')
  [[ -n "$result" ]] || result=$(grep -v '^\s*$' "$log" | tail -1 | cut -c1-100)
  regressed=$(grep -c "REGRESSED" "$log" || true)
  summary+=("$(printf '%-26s %-4s %-10s %s' "$name" "$rc" "${regressed:-0}" "${result:-see $log}")")
  # exit 5 = nothing collected (a suite with no case for this tier/filter): reported, not a failure
  if [[ $rc -ne 0 && $rc -ne 5 ]]; then status=1; fi
}

if [[ "${MOEBENCH_SKIP_GPU_TESTS:-0}" != 1 ]]; then
  step "gpu tests" "$out/gpu_tests.log" -- "${limit[@]}" "$py" -m pytest "${plugin[@]}" -m gpu tests -q -rs \
    -p no:cacheprovider --junitxml "$out/gpu_tests.xml"
fi

save=()
if [[ "${MOEBENCH_SAVE_BASELINE:-0}" == 1 ]]; then save=(--moebench-save-baseline); fi
for suite in "${suites[@]}"; do
  name=$(basename "$suite")
  # no --moebench-compare value: a suite with a baseline for this machine class is compared, one without is run
  # and reported "no baseline" (the first night on a new machine class)
  step "suite $name" "$out/suite_$name.log" -- "${limit[@]}" "$py" -m pytest "${plugin[@]}" "$suite" --moebench \
    --moebench-tier "$tier" --moebench-rounds "$rounds" --moebench-history "$history" \
    --moebench-baseline-dir "$baselines" "${save[@]}" "${time_limit[@]}" "${spread[@]}" -p no:cacheprovider -v \
    --junitxml "$out/suite_$name.xml" ${MOEBENCH_PYTEST_ARGS:-}
done

if [[ -n "${MOEBENCH_AB_AGAINST:-}" ]]; then
  eval "ab_args=(${MOEBENCH_AB_ARGS:-suites/switch -k \"switch-base-8 and lru-50\"})"  # keeps the quoting
  step "a/b vs $MOEBENCH_AB_AGAINST" "$out/ab.log" -- "${limit[@]}" "$py" -m moebench.cli ab \
    --a "$MOEBENCH_AB_AGAINST" --b . --processes "${MOEBENCH_AB_PROCESSES:-24}" --rounds "${MOEBENCH_AB_ROUNDS:-10}" --grain "${MOEBENCH_AB_GRAIN:-step}" \
    --out "$out/ab" --no-progress -- --moebench-tier "$tier" "${ab_args[@]}"
fi

if "$py" -m moebench.cli report --help >/dev/null 2>&1; then
  step "report" "$out/report.log" -- "$py" -m moebench.cli report --history "$history" --out "$out/report"
else
  echo "report: skipped, this checkout's moebench has no 'report' command" | tee "$out/report.log"
  summary+=("$(printf '%-26s %-4s %-10s %s' report - - "skipped: no 'report' command")")
fi

{
  echo "moebench nightly: tier $tier, rounds $rounds, output $out, history $history, ${gpus:-0} GPU(s)${spread:+, ${spread[*]}}"
  printf '%-26s %-4s %-10s %s\n' step rc regressed result
  printf '%s\n' "${summary[@]}"
  if [[ $status -eq 0 ]]; then echo "verdict: PASS"; else echo "verdict: FAIL (see the logs above)"; fi
} | tee "$out/summary.txt"
exit $status
