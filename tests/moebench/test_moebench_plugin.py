"""The plugin end to end, in subprocesses: the real suites/switch with one policy, and the skip without the flag."""

import json
import re
from pathlib import Path

pytest_plugins = ["pytester"]  # here, not in tests/moebench/conftest.py: pytest refuses it in a non-root conftest

SUITE = Path(__file__).resolve().parents[2] / "suites" / "switch"


def test_suite_skipped_without_flag(pytester):
    result = pytester.runpytest_subprocess(str(SUITE), "-p", "no:cacheprovider", "-rs")
    result.assert_outcomes(skipped=1)
    result.stdout.fnmatch_lines(["*moebench suites run only with --moebench*"])
    assert result.ret == 0


def test_unknown_policy_is_a_usage_error(pytester):
    result = pytester.runpytest_subprocess("--moebench", str(SUITE), "--moebench-policy", "nope")
    assert result.ret == 4
    result.stderr.fnmatch_lines(["*--moebench-policy: unknown policy 'nope'; available: resident*lru*"])


def test_switch_suite_with_lru(pytester, tmp_path):
    hist = tmp_path / "hist"
    result = pytester.runpytest_subprocess(
        "--moebench", str(SUITE), "--moebench-policy", "lru", "--moebench-rounds", "1",
        "--moebench-history", str(hist), "-p", "no:cacheprovider", "-v")
    result.assert_outcomes(passed=6)
    result.stdout.fnmatch_lines([
        "*switch-base-8?lru-25%?*PASSED*",
        "*moebench: 6 cases*",
        "model*policy*budget*tokens/s*p50 ms*p99 ms*hit rate*H2D MiB/round*acc drop*result*",
        "switch-base-8*resident*all*pass",
        "switch-base-64*lru*50%*pass",
        f"history: appended to {hist}*",
    ])
    lines = (hist / "history.jsonl").read_text().splitlines()
    assert len(lines) == 1
    run = json.loads(lines[0])
    assert run["suites"] == ["switch"] and run["machine"]["torch"] and "commit" in run["git"]
    assert sorted(r["case"] for r in run["records"]) == sorted(
        f"{m}[{c}]" for m in ("switch-base-8", "switch-base-64") for c in ("resident-all", "lru-25%", "lru-50%"))
    assert all(r["passed"] and r["cache_bytes"] <= r["budget_bytes"] for r in run["records"])


def test_kernels_option_offers_the_engines_kernel_names(pytester):
    result = pytester.runpytest_subprocess("--moebench", str(SUITE), "--moebench-kernels", "torch")
    assert result.ret == 4
    offered = result.stderr.str().split("choose from ")[1].split(")")[0]
    assert re.findall(r"'([^']+)'", offered) == ["auto", "exact", "triton", "reference"]


def test_kernels_option_serves_every_case_and_the_reference_on_those_kernels(pytester, tmp_path):
    """--moebench-kernels reference: the grouped algorithm in plain torch serves every case, the resident reference
    included, so an exact policy must give the reference's tokens; the reference's agreement with the exact loop is
    reported beside it."""
    hist = tmp_path / "hist"
    result = pytester.runpytest_subprocess(
        "--moebench", str(SUITE), "--moebench-policy", "lru", "--moebench-rounds", "1", "-k", "switch-base-8",
        "--moebench-kernels", "reference", "--moebench-history", str(hist), "-p", "no:cacheprovider")
    result.assert_outcomes(passed=3)
    result.stdout.fnmatch_lines(["moebench: device cpu*kernels reference, fetch auto*",
                                 "model*policy*budget*kernels*tokens/s*agree w/ exact loop*KL w/ exact loop*",
                                 "switch-base-8*resident*all*reference*"])
    run = json.loads((hist / "history.jsonl").read_text().splitlines()[0])
    assert run["options"]["kernels"] == "reference"
    assert {(r["kernels"], r["exact"]) for r in run["records"]} == {("reference", True)}
    assert all(r["tokens_identical"] for r in run["records"])
    resident = next(r for r in run["records"] if r["policy"] == "resident")
    assert 0 <= resident["eager_agreement"] <= 1 and resident["eager_kl"] >= 0


def test_fetch_device_serves_the_lru_cases_and_matches_the_host_fetch(pytester, tmp_path):
    """--moebench-fetch device: the LRU cases keep their cache directory on the device (resident, which holds every
    expert, has nothing to fetch); they copy the same bytes as the host fetch, and their records say how they ran."""
    runs = {}
    for fetch in ("host", "device"):
        hist = tmp_path / fetch
        result = pytester.runpytest_subprocess(
            "--moebench", str(SUITE), "--moebench-policy", "lru", "--moebench-rounds", "1", "-k", "switch-base-8",
            "--moebench-kernels", "reference", "--moebench-fetch", fetch, "--moebench-history", str(hist),
            "-p", "no:cacheprovider")
        result.assert_outcomes(passed=3)
        runs[fetch] = json.loads((hist / "history.jsonl").read_text().splitlines()[0])
    assert runs["device"]["options"]["fetch"] == "device"
    by_case = {f: {r["case"]: r for r in run["records"]} for f, run in runs.items()}
    for case, record in by_case["device"].items():
        assert record["fetch"] == ("host" if "resident" in case else "device")
        assert record["h2d_bytes_per_round"] == by_case["host"][case]["h2d_bytes_per_round"]
        assert record["hit_rate"] == by_case["host"][case]["hit_rate"]


def test_fetch_device_needs_the_grouped_kernels(pytester):
    result = pytester.runpytest_subprocess("--moebench", str(SUITE), "--moebench-kernels", "exact",
                                           "--moebench-fetch", "device")
    assert result.ret == 4
    assert "--moebench-kernels auto" in result.stderr.str()


def test_time_limit_starts_no_case_that_would_end_past_it(pytester, tmp_path):
    """A CI job's wall-time limit: cases that would not end in time are skipped with the reason (here all of them:
    the limit has passed before the first case), and the run still exits 0."""
    result = pytester.runpytest_subprocess(
        "--moebench", str(SUITE), "--moebench-policy", "lru", "--moebench-rounds", "1", "--moebench-time-limit",
        "0.000001", "--moebench-history", str(tmp_path / "hist"), "-p", "no:cacheprovider", "-rs")
    result.assert_outcomes(skipped=6)
    result.stdout.fnmatch_lines(["*--moebench-time-limit 1e-06s: not started at *s (a case that builds its model "
                                 "took up to 0s so far)*"])
    assert result.ret == 0


def test_time_limit_must_be_positive(pytester):
    result = pytester.runpytest_subprocess("--moebench", str(SUITE), "--moebench-time-limit", "0")
    assert result.ret == 4
    result.stderr.fnmatch_lines(["*--moebench-time-limit must be a positive number of seconds, got 0*"])
