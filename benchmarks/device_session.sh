#!/usr/bin/env bash
# One command on a GPU machine that runs several named steps, each under its own time limit, and leaves few files
# (for a runner that returns only a handful): every step's full output goes into $OUT/results.tar.gz; summary.txt
# has the closing lines of each step.
#
#   OUT=/some/dir STEPS="gpu_tests expertflow predictors" bash benchmarks/device_session.sh
#
# Steps: gpu_tests, gpu_exact, grouped_width, gpu_staged, zero_copy, gpu_fetch (fetch="device" and the kernels), plugin_fetch
# (a suite with --moebench-fetch host, then device), exact_loop (benchmarks/exact_loop.py), mixtral (benchmarks/mixtral_e2e.py:
# full size, every plan, and the peer), expertflow, predictors, stats (benchmarks/stats_device.sh), nightly_switch (ci/nightly.sh on
# switch-base-8 with the policies of baselines/h100/switch.json), full_<suite> (that suite's full tier), suite_default
# (a suite's default plan, every policy), host_experts, low_precision, serving (their benchmarks/*.py), machine
# (CPU quota and throttling), ab_same / ab_slow (moebench
# ab: A/A, and B stretched by AB_SLOW; AB_N runs each;
# AB_ROUNDS, AB_CASE, AB_GRAIN=round|step), abk_<name> (moebench ab --processes AB_PROCESSES, resumed from AB_STATE
# until the call's DEADLINE_S).
# Runs from a bare checkout (the package need not be installed): PYTHONPATH=src. A copy of the tree whose .git is
# stale records a wrong commit: pass the real one, MOEBENCH_COMMIT=<hash> (moebench.fingerprint).
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
OUT="${OUT:-$PWD/device-out}"
work="$OUT/work"
mkdir -p "$work"
STEPS="${STEPS:-gpu_tests}"
summary="$OUT/summary.txt"
{
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  python3 -c "import sys, torch, transformers; print('python', sys.version.split()[0], 'torch', torch.__version__,
'transformers', transformers.__version__)"
  if [[ -n "${MOEBENCH_COMMIT:-}" ]]; then echo "commit $MOEBENCH_COMMIT (given by the caller)"
  else echo "commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown)$(git diff --quiet 2>/dev/null || echo ' (dirty)')"; fi
} > "$work/device.txt" 2>&1
cp "$work/device.txt" "$summary"

run_step() {  # run_step NAME LIMIT_S -- command...
  local name="$1" limit="$2"; shift 3
  local t0=$SECONDS
  echo "== $name (limit ${limit}s)" | tee -a "$summary"
  timeout --signal=INT --kill-after=20 "$limit" "$@" > "$work/$name.log" 2>&1
  local rc=$?
  { tail -n "${TAIL:-25}" "$work/$name.log"; echo "-- $name: rc=$rc, $((SECONDS - t0)) s"; } >> "$summary"
}

for step in $STEPS; do
  case "$step" in
    gpu_tests)
      run_step gpu_tests 300 -- python3 -m pytest -p moebench.plugin -p no:cacheprovider -m gpu tests -q -rs ;;
    gpu_staged)  # the staged exact loop against eager on CUDA: published widths, every family, every exact policy
      run_step gpu_staged "${GPU_STAGED_LIMIT_S:-240}" -- python3 -m pytest -p moebench.plugin -p no:cacheprovider -m gpu \
        -q -rs tests/moeoffload/test_staged_gpu.py tests/moeoffload/test_families_gpu.py tests/moeoffload/test_gpu.py ;;
    exact_loop)  # one MoE layer at published widths: eager, grouped_mm, loop, staged (benchmarks/exact_loop.py)
      run_step exact_loop "${EXACT_LOOP_LIMIT_S:-200}" -- python3 benchmarks/exact_loop.py --out "$work/exact_loop" \
        ${EXACT_LOOP_ARGS:-} ;;
    gpu_exact)  # the CUDA exactness and prefetch-race tests alone (every exact built-in policy)
      run_step gpu_exact 200 -- python3 -m pytest -p moebench.plugin -p no:cacheprovider -m gpu -q -rs \
        tests/moeoffload/test_gpu.py tests/moeoffload/test_prefetch_races_gpu.py ;;
    mixtral)  # full-size Mixtral-8x7B through each plan, and accelerate's cpu_offload on the same model
      run_step mixtral "${MIXTRAL_LIMIT_S:-420}" -- python3 benchmarks/mixtral_e2e.py ${MIXTRAL_ARGS:-} \
        --steps "${MIXTRAL_STEPS:-6}" --warm "${MIXTRAL_WARM:-2}" --policies ${MIXTRAL_POLICIES:-lru} \
        --out "$work/mixtral" ;;
    expertflow)
      run_step expertflow "${EXPERTFLOW_LIMIT_S:-200}" -- env OUT="$work" \
        EXPERTFLOW_DEADLINE_S="${EXPERTFLOW_DEADLINE_S:-110}" python3 benchmarks/expertflow.py ;;
    predictors)
      run_step predictors 280 -- env OUT="$work" PREDICTORS_DEADLINE_S=170 python3 benchmarks/predictors.py ;;
    stats)
      run_step stats "${STATS_LIMIT_S:-540}" -- env OUT="$work/stats" BUDGET_S="${STATS_BUDGET_S:-300}" \
        bash benchmarks/stats_device.sh ;;
    nightly_switch)
      run_step nightly_switch 200 -- env OUT="$work/nightly" MOEBENCH_SKIP_GPU_TESTS=1 MOEBENCH_ROUNDS=6 \
        MOEBENCH_PYTEST_ARGS="-k switch-base-8 --moebench-policy resident --moebench-policy on-demand --moebench-policy lru --moebench-policy lookahead" \
        bash ci/nightly.sh suites/switch ;;
    full_*)  # FULL_K (or FULL_K_<suite>): a pytest -k expression choosing cases; FULL_ROUNDS(_<suite>) likewise;
      # with DEADLINE_S the step ends by then (pytest starts no case it expects to end later: --moebench-time-limit)
      suite="${step#full_}"; limit="${FULL_LIMIT_S:-300}"
      [[ -n "${DEADLINE_S:-}" ]] && (( DEADLINE_S - SECONDS - 10 < limit )) && limit=$(( DEADLINE_S - SECONDS - 10 ))
      if (( limit < 60 )); then echo "== $step: not started, ${limit} s left" >> "$summary"; continue; fi
      k_var="FULL_K_$suite"; k="${!k_var:-${FULL_K:-}}"; kexpr=(); [[ -n "$k" ]] && kexpr=(-k "$k")
      r_var="FULL_ROUNDS_$suite"; rounds="${!r_var:-${FULL_ROUNDS:-2}}"
      run_step "$step" "$limit" -- python3 -m pytest -p moebench.plugin -p no:cacheprovider \
        "suites/$suite" --moebench --moebench-tier full --moebench-rounds "$rounds" \
        --moebench-history "$work/history_$suite" --moebench-time-limit $(( limit - 40 )) -v "${kexpr[@]}" \
        ${FULL_ARGS:-} ;;
    zero_copy)  # the SMs' own loads from page-locked host memory against the copy engine (benchmarks/zero_copy.py)
      run_step zero_copy "${ZERO_COPY_LIMIT_S:-120}" -- python3 benchmarks/zero_copy.py --out "$work/zero_copy" ;;
    gpu_fetch)  # fetch="device" on CUDA (the directory's kernels, mapped host memory) and the grouped kernels
      run_step gpu_fetch "${GPU_FETCH_LIMIT_S:-200}" -- python3 -m pytest -p moebench.plugin -p no:cacheprovider -m gpu \
        -q -rs ${GPU_FETCH_FILES:-tests/moeoffload/test_directory_gpu.py tests/moeoffload/test_kernels.py} ;;
    plugin_fetch)  # the suites through fetch="device" beside fetch="host" (--moebench-fetch), the same cases
      for f in ${PLUGIN_FETCH_MODES:-host device}; do
        run_step "plugin_fetch_$f" "${PLUGIN_FETCH_LIMIT_S:-150}" -- python3 -m pytest -p moebench.plugin \
          -p no:cacheprovider "suites/${PLUGIN_FETCH_SUITE:-olmoe}" --moebench --moebench-tier full --moebench-rounds 2 \
          --moebench-kernels auto --moebench-fetch "$f" --moebench-history "$work/history_fetch_$f" \
          --moebench-time-limit $(( ${PLUGIN_FETCH_LIMIT_S:-150} - 30 )) -v -k "${PLUGIN_FETCH_K:-lru-25 or lru-50}" \
          -o faulthandler_timeout="${PLUGIN_FETCH_FAULT_S:-90}"
      done ;;
    grouped_width)  # fetch="device"'s grouped GEMM over pools of several widths (benchmarks/grouped_width.py)
      run_step grouped_width "${GROUPED_WIDTH_LIMIT_S:-90}" -- python3 benchmarks/grouped_width.py --out "$work/grouped_width" ;;
    store)  # pinned bytes and copy rate of the per-layer registered slabs (benchmarks/store_pinning.py)
      run_step store "${STORE_LIMIT_S:-150}" -- python3 benchmarks/store_pinning.py --out "$work/store" ;;
    machine)  # CPU quota and throttling of this VM (a guess at the two speeds in results/h100-2026-11-23e)
      run_step machine 30 -- bash -c 'for f in /sys/fs/cgroup/cpu.max /sys/fs/cgroup/cpu.stat /sys/fs/cgroup/cpu.weight \
        /proc/pressure/cpu; do echo "## $f"; cat "$f" 2>&1; done; nproc; grep -m1 "model name" /proc/cpuinfo;
        cat /sys/devices/system/clocksource/clocksource0/current_clocksource 2>&1' ;;
    ab_*)  # interleaved A/B runs (moebench ab) of one case: ab_same (A = B), ab_slow (B stretched by AB_SLOW)
      kind="${step#ab_}"; n="${AB_N:-1}"
      for i in $(seq 1 "$n"); do
        extra=(); [[ "$kind" == slow ]] && extra=("--b-args=--moebench-inject-delay=${AB_SLOW:-5%}")
        run_step "${step}_$i" "${AB_LIMIT_S:-280}" -- python3 -m moebench.cli ab --rounds "${AB_ROUNDS:-100}" \
          --out "$work/${step}_$i" --no-progress --grain "${AB_GRAIN:-round}" --timeout $(( ${AB_LIMIT_S:-280} - 40 )) "${extra[@]}" -- suites/switch --moebench-tier full \
          -k "${AB_CASE:-switch-base-8 and lru-50}"
        cat /sys/fs/cgroup/cpu.stat >> "$work/${step}_$i.log" 2>&1
      done ;;
    abk_*)  # moebench ab --processes, resumable over device calls: AB_STATE is a folder carried in the tree (the
      # call brings it back as ab_state.tar.gz); abk_same* is A = B, abk_slow* stretches B by AB_SLOW
      name="${step#abk_}"; dir="${AB_STATE:?set AB_STATE to a folder in the tree}/$name"; mkdir -p "$dir"
      if [[ -f "$dir/ab.json" ]] && python3 -c "import json, sys; sys.exit(bool(json.load(open(sys.argv[1]))['problems']))" "$dir/ab.json"; then
        echo "== $step: finished in an earlier call" >> "$summary"; continue
      fi
      left=$(( ${DEADLINE_S:-540} - SECONDS ))
      if (( left < 90 )); then echo "== $step: not started, ${left} s left" >> "$summary"; continue; fi
      extra=(); [[ "$name" == slow* ]] && extra=("--b-args=--moebench-inject-delay=${AB_SLOW:-5%}")
      [[ -f "$dir/ab-run.json" ]] && extra+=(--resume)
      run_step "$step" $(( left + 40 )) -- python3 -m moebench.cli ab --processes "${AB_PROCESSES:-12}" \
        --rounds "${AB_ROUNDS:-20}" --out "$dir" --no-progress --timeout "$left" "${extra[@]}" -- suites/switch \
        --moebench-tier full -k "${AB_CASE:-switch-base-8 and resident}" ;;
    suite_default)  # a suite as a user runs it (the default plan), every policy: exact ones judged bit for bit
      run_step suite_default "${SUITE_DEFAULT_LIMIT_S:-300}" -- python3 -m pytest -p moebench.plugin -p no:cacheprovider \
        "suites/${SUITE_DEFAULT:-switch}" --moebench --moebench-rounds "${SUITE_DEFAULT_ROUNDS:-5}" \
        --moebench-history "$work/history_default" --moebench-time-limit $(( ${SUITE_DEFAULT_LIMIT_S:-300} - 40 )) \
        -v -rs -k "${SUITE_DEFAULT_K:-switch-base-8}" ;;
    host_experts)  # copy-only against host-assisted policies on full-size Mixtral (benchmarks/host_experts.py)
      run_step host_experts "${HOST_EXPERTS_LIMIT_S:-540}" -- python3 benchmarks/host_experts.py \
        ${HOST_EXPERTS_ARGS:---batches 1 16 --budgets 25% 50%} --out "$work/host_experts" ;;
    low_precision)  # lru against lru-int4, hobbit and lru-int8 on full-size Mixtral (benchmarks/low_precision.py)
      run_step low_precision "${LOW_PRECISION_LIMIT_S:-540}" -- python3 benchmarks/low_precision.py \
        ${LOW_PRECISION_ARGS:-} --out "$work/low_precision" ;;
    serving)  # first-come against ExpertFlow's scheduling through moeoffload.serving (benchmarks/serving.py)
      run_step serving "${SERVING_LIMIT_S:-540}" -- python3 benchmarks/serving.py \
        ${SERVING_ARGS:---model mixtral-8x7b --device cuda --dtype bfloat16 --budget 50%} --out "$work/serving" ;;
    *) echo "unknown step $step" | tee -a "$summary" ;;
  esac
done
tar -czf "$OUT/results.tar.gz" -C "$work" . 2>/dev/null
[[ -n "${AB_STATE:-}" && -d "$AB_STATE" ]] && tar -czf "$OUT/ab_state.tar.gz" -C "$AB_STATE" .
rm -rf "$work"
cat "$summary"
