"""The run-level verdict: baselines that keep several runs, and a test against how much those runs differ.

On an H100 80GB HBM3 runs of unchanged code differed by an offset (log-sd 2.6% between run medians,
benchmarks/RESULTS.md); the per-round rule reads such an offset as a change once the rounds are many. These tests
show both sides on simulated runs with that structure, then the baseline plumbing (keeping earlier runs, choosing
the run-level verdict)."""

import numpy as np
import pytest

from moebench import baseline as bl
from moebench import history
from moebench.stats import compare, compare_runs


def _runs(rng, m, n, offset_sd=0.03, round_sd=0.10, level=100.0):
    return [level * np.exp(rng.normal(rng.normal(0, offset_sd), round_sd, n)) for _ in range(m)]


def test_run_level_keeps_false_alarms_at_alpha_where_the_per_round_rule_does_not():
    rng = np.random.default_rng(7)
    reps, n = 300, 300
    run_level = per_round = 0
    for _ in range(reps):
        base = _runs(rng, 8, n)
        cur = _runs(rng, 1, n)[0]
        run_level += compare_runs(base, cur, higher_is_better=True).status == "regressed"
        per_round += compare(base[0], cur, higher_is_better=True, n_boot=300).status == "regressed"
    assert run_level / reps <= 0.025  # alpha = 1%, with room for 300 draws
    assert per_round / reps >= 0.10  # with many rounds, the per-round rule flags run offsets


def test_run_level_flags_a_change_beyond_the_run_spread_and_mirrors_for_latency():
    rng = np.random.default_rng(1)
    base = _runs(rng, 8, 20)
    slow = 100 * 0.7 * np.exp(rng.normal(0, 0.10, 20))
    v = compare_runs(base, slow, higher_is_better=True)
    assert v.status == "regressed" and v.ratio == pytest.approx(0.7, rel=0.1) and "8 baseline runs" in v.message
    assert compare_runs([1 / r for r in base], 1 / slow, higher_is_better=False).status == "regressed"
    assert compare_runs(base, 100 * 1.4 * np.exp(rng.normal(0, 0.1, 20)), higher_is_better=True).status == "improved"


def test_run_level_needs_three_runs_and_says_how_to_get_them():
    rng = np.random.default_rng(2)
    v = compare_runs(_runs(rng, 2, 10), _runs(rng, 1, 10)[0], higher_is_better=True)
    assert v.status == "inconclusive" and "--moebench-baseline-runs" in v.message
    with pytest.raises(ValueError, match="baseline run 1"):
        compare_runs([[1.0, 2.0, 3.0], [1.0, -2.0, 3.0], [1.0, 2.0, 3.0]], [1.0, 2.0], higher_is_better=True)


def _rec(tps, case="m[lru-50%]", **kw):
    tps = list(tps)
    r = {"suite": "s", "case": case, "model": "m", "policy": "lru", "budget": "50%", "tier": "full",
         "tokens_per_s": float(np.mean(tps)), "samples": {"tokens_per_s": tps, "tokens_per_probe": tps},
         "torch_peak_bytes": 100, "cache_bytes": 10, "passed": True}
    r.update(kw)
    return r


def _run(tps, **kw):
    return history.make_run([_rec(tps, **kw)], ["s"], "/nonexistent", machine={"gpu": None}, machine_cls="cpu")


def test_baseline_keeps_earlier_comparable_runs_and_the_verdict_uses_them():
    rng = np.random.default_rng(3)
    olds = [_run(r) for r in _runs(rng, 5, 10)]
    olds.append(_run([100.0] * 10, inject_slowdown=0.05))  # a test-hook run: never kept
    olds.append(_run([100.0] * 10, tier="quick"))  # another tier: not comparable, not kept
    newest = _run(_runs(rng, 1, 10)[0])
    earlier = list(reversed(olds))  # newest first
    b = bl.add_earlier_runs(bl.from_run(newest, "s"), earlier, keep=4)
    case = b["cases"]["m[lru-50%]"]
    assert len(b["runs"]) == 4 and len(case["earlier_runs"]) == 3
    assert "earlier_runs" not in newest["records"][0]  # the stored run itself is left as it was
    assert all(e["run_id"] in {r["run_id"] for r in olds[:5]} for e in case["earlier_runs"])
    limits = bl.parse_limits("throughput:5%")
    v = bl.compare_case(case, _rec(100 * 0.6 * np.exp(rng.normal(0, 0.1, 10))), limits)
    assert v["status"] == "regressed" and v["level"] == "runs" and v["rounds"] == [4, 10]
    assert "4 baseline runs" in v["message"] and "machine-normalized" in v["message"]
    single = bl.from_run(newest, "s")  # one run: the per-round verdict, as before
    assert "level" not in bl.compare_case(single["cases"]["m[lru-50%]"], _rec([100.0] * 10), limits)
    with pytest.raises(bl.BaselineError, match="at least 1 run"):
        bl.add_earlier_runs(bl.from_run(newest, "s"), earlier, keep=0)
