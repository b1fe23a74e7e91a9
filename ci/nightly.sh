#!/usr/bin/env bash
# Nightly GPU job: GPU tests, then every suite at full size; history accumulates under $MOEBENCH_HISTORY.
# Exit status is non-zero when any test or suite case fails.
set -uo pipefail
cd "$(dirname "$0")/.."
history="${MOEBENCH_HISTORY:-.moebench}"
status=0
python3 -m pytest -m gpu -q tests || status=1
for suite in suites/*/; do
  python3 -m pytest --moebench "$suite" --moebench-tier full --moebench-history "$history" -q || status=1
done
exit $status
