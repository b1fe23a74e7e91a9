"""Interleaved A/B runs: the paired verdict, the turn-taking that makes rounds pairs, and `moebench ab` itself.

Why pairs: on an H100 80GB HBM3 in a VM the machine's speed changed within and between runs, so two runs' rounds
differ by more than the change under test. Rounds of A and B measured back to back share that state; their ratio
does not."""

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import stats as sps

from moebench import cli
from moebench.stats import MIN_PAIRS, MIN_PROCESS_PAIRS, compare, compare_paired, compare_paired_groups, pairs_needed
from moebench.turns import Referee

ROOT = Path(__file__).resolve().parents[2]


def _pairs(rng, n, shift=0.0, drift_sd=0.3, pair_sd=0.05):
    """Rounds whose machine state (a common factor, wandering by drift_sd) dwarfs the change under test."""
    state = 100 * np.exp(np.cumsum(rng.normal(0, drift_sd / 3, n)))
    a = state * np.exp(rng.normal(0, pair_sd / np.sqrt(2), n))
    b = state * np.exp(rng.normal(0, pair_sd / np.sqrt(2), n)) * (1 - shift)
    return a, b


def test_signed_rank_p_value_is_scipys_exact_one():
    rng = np.random.default_rng(3)
    for n in (7, 12, 30):
        a, b = _pairs(rng, n, shift=0.02)
        d = np.log(b) - np.log(a)
        v = compare_paired(a, b, higher_is_better=True)
        assert v.p_value == pytest.approx(sps.wilcoxon(d, alternative="less", method="exact").pvalue, rel=1e-9)


def test_pairs_flag_a_5pct_slowdown_that_the_machine_drift_hides_from_unpaired_rounds():
    rng = np.random.default_rng(11)
    reps, n = 200, 40
    paired = {"fa": 0, "det": 0}
    unpaired_det = 0
    for _ in range(reps):
        a, b = _pairs(rng, n)
        paired["fa"] += compare_paired(a, b, higher_is_better=True).status == "regressed"
        a, b = _pairs(rng, n, shift=0.05)
        paired["det"] += compare_paired(a, b, higher_is_better=True).status == "regressed"
        unpaired_det += compare(a, b, higher_is_better=True, n_boot=200).status == "regressed"
    assert paired["fa"] / reps <= 0.02  # alpha = 1%, room for 200 draws
    assert paired["det"] / reps >= 0.95
    assert unpaired_det / reps <= 0.3  # the same rounds, unpaired, mostly cannot tell


@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(st.floats(1, 1e4), st.floats(0.5, 2.0)), min_size=MIN_PAIRS, max_size=40),
       st.floats(0.01, 100))
def test_paired_verdict_mirrors_on_swap_and_ignores_scale(pairs, scale):
    a = np.array([p[0] for p in pairs])
    b = a * np.array([p[1] for p in pairs])
    v = compare_paired(a, b, higher_is_better=True)
    w = compare_paired(b, a, higher_is_better=True)
    mirror = {"regressed": "improved", "improved": "regressed", "unchanged": "unchanged",
              "inconclusive": "inconclusive"}
    assert w.status == mirror[v.status]
    assert w.ratio == pytest.approx(1 / v.ratio, rel=1e-9)
    assert compare_paired(a * scale, b * scale, higher_is_better=True).status == v.status
    assert compare_paired(1 / a, 1 / b, higher_is_better=False).status == v.status  # latency = 1 / throughput


def test_pairs_needed_matches_the_simulated_power():
    """At a pair spread of 10%, the pairs the formula asks for flag a 5% slowdown in >= 95% of simulated runs."""
    need = pairs_needed(0.10)
    assert need > pairs_needed(0.05) and 50 <= need <= 90
    rng = np.random.default_rng(5)
    flagged = 0
    for _ in range(200):
        a = 100 * np.exp(rng.normal(0, 0.10 / np.sqrt(2), need))
        b = 100 * np.exp(rng.normal(0, 0.10 / np.sqrt(2), need)) * 0.95
        flagged += compare_paired(a, b, higher_is_better=True).status == "regressed"
    assert flagged / 200 >= 0.9


def test_paired_input_errors_name_the_fix():
    with pytest.raises(ValueError, match="one baseline round per current round"):
        compare_paired([1, 2, 3, 4, 5, 6, 7], [1, 2, 3], higher_is_better=True)
    v = compare_paired([1.0] * 5, [0.5] * 5, higher_is_better=True)
    assert v.status == "inconclusive" and f"need at least {MIN_PAIRS}" in v.message


def _groups(rng, k, n, shift=0.0, offset_sd=0.02, pair_sd=0.10):
    """k process pairs of n round pairs each; B of each process pair carries its own offset exp(N(0, offset_sd))."""
    out = []
    for _ in range(k):
        a, b = _pairs(rng, n, shift=shift, pair_sd=pair_sd)
        out.append((a, b * np.exp(rng.normal(0, offset_sd))))
    return out


def test_groups_verdict_is_a_one_sample_t_test_on_the_process_pairs_shifts():
    rng = np.random.default_rng(8)
    for k, n in ((3, 7), (5, 20), (8, 12)):
        groups = _groups(rng, k, n, shift=0.03)
        m = [np.mean(np.log(b) - np.log(a)) for a, b in groups]
        v = compare_paired_groups(groups, higher_is_better=True)
        assert v.p_value == pytest.approx(sps.ttest_1samp(m, 0.0, alternative="less").pvalue, rel=1e-9)
        ci = sps.ttest_1samp(m, 0.0).confidence_interval(0.99)
        assert (v.ci_low, v.ci_high) == pytest.approx((np.exp(ci.low), np.exp(ci.high)), rel=1e-9)
        assert v.ratio == pytest.approx(np.exp(np.mean(m)), rel=1e-12)
        assert f"over {k} process pairs of {k * n} round pairs" in v.message and "spread by s.d." in v.message


def test_groups_verdict_refuses_too_few_process_pairs_and_unpaired_rounds():
    rng = np.random.default_rng(1)
    with pytest.raises(ValueError, match=f"needs at least {MIN_PROCESS_PAIRS}.*--processes"):
        compare_paired_groups(_groups(rng, MIN_PROCESS_PAIRS - 1, 10), higher_is_better=True)
    groups = _groups(rng, 3, 10)
    groups[1] = (groups[1][0], groups[1][1][:9])
    with pytest.raises(ValueError, match="process pair 2 has 10 baseline and 9 current rounds"):
        compare_paired_groups(groups, higher_is_better=True)


@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(st.floats(1, 1e4), st.floats(0.5, 2.0)), min_size=2 * MIN_PROCESS_PAIRS, max_size=40),
       st.integers(MIN_PROCESS_PAIRS, 6), st.floats(0.01, 100))
def test_groups_verdict_mirrors_on_swap_and_ignores_scale(pairs, k, scale):
    a, b = np.array([p[0] for p in pairs]), np.array([p[0] * p[1] for p in pairs])
    groups = [(a[j::k], b[j::k]) for j in range(k) if a[j::k].size]
    v = compare_paired_groups(groups, higher_is_better=True)
    w = compare_paired_groups([(b, a) for a, b in groups], higher_is_better=True)
    mirror = {"regressed": "improved", "improved": "regressed", "unchanged": "unchanged",
              "inconclusive": "inconclusive"}
    assert w.status == mirror[v.status]
    assert w.ratio == pytest.approx(1 / v.ratio, rel=1e-9)
    assert compare_paired_groups([(a * scale, b * scale) for a, b in groups], higher_is_better=True).status == v.status
    assert compare_paired_groups([(1 / a, 1 / b) for a, b in groups], higher_is_better=False).status == v.status


def test_groups_verdict_holds_its_confidence_where_a_process_offset_fools_paired_rounds():
    """A 2% offset per process pair, no change: one process pair's signed-rank verdict counts its offset as a change
    (false alarms well above 1%), and pooling 8 process pairs' rounds gives an interval that misses "no change" far
    more often than 1%; the process pairs' t test measures the offset and keeps both at <= 1%."""
    rng = np.random.default_rng(21)
    reps, k, n = 300, 8, 40
    grouped = {"regressed": 0, "missed": 0}
    pooled_missed = single_alarms = 0
    for _ in range(reps):
        groups = _groups(rng, k, n, offset_sd=0.02, pair_sd=0.02)
        v = compare_paired_groups(groups, higher_is_better=True)
        grouped["regressed"] += v.status == "regressed"
        grouped["missed"] += not v.ci_low <= 1.0 <= v.ci_high
        a, b = np.concatenate([g[0] for g in groups]), np.concatenate([g[1] for g in groups])
        pooled = compare_paired(a, b, higher_is_better=True)
        pooled_missed += not pooled.ci_low <= 1.0 <= pooled.ci_high
        single_alarms += compare_paired(*groups[0], higher_is_better=True).status == "regressed"
    assert grouped["regressed"] / reps <= 0.01 and grouped["missed"] / reps <= 0.02  # 1%, room for 300 draws
    assert pooled_missed / reps > 0.2
    assert single_alarms / reps > 0.04


def _history_run(case_tokens: dict[str, list[float]], injected: str | None = None) -> dict:
    return {"records": [{"case": c, "samples": {"tokens_per_s": x, "step_p50_ms": [1000 / v for v in x]},
                         **({"inject_delay_ms": injected} if injected else {})} for c, x in case_tokens.items()]}


def test_combine_process_pairs_keeps_each_pairs_verdict_and_tests_the_groups():
    from moebench.ab import combine_process_pairs, render

    rng = np.random.default_rng(4)
    pair_runs = []
    for a, b in _groups(rng, 4, 12, shift=0.10, offset_sd=0.01, pair_sd=0.05):
        pair_runs.append((_history_run({"x": list(a), "y": list(a)}), _history_run({"x": list(b), "y": list(a)})))
    pair_runs[3] = (pair_runs[3][0], _history_run({"x": list(pair_runs[3][1]["records"][0]["samples"]
                                                               ["tokens_per_s"][:5]), "y": [1.0] * 12}))
    rows = {r["case"]: r for r in combine_process_pairs(pair_runs, {"throughput": 0.05})}
    t = rows["x"]["metrics"]["throughput"]
    assert t["processes"] == 3 and t["pairs"] == 36  # process pair 4 has only 5 round pairs of x: left out
    assert t["status"] == "regressed" and "over 3 process pairs" in t["message"]
    assert len(t["process_pairs"]) == 4 and t["process_pairs"][3]["status"] == "inconclusive"
    assert rows["y"]["metrics"]["throughput"]["processes"] == 4
    assert "x" in render(list(rows.values()))


def _fake_sides(monkeypatch, groups, wall_s=1.0) -> list[dict]:
    """Replace `ab.run_sides` (no pytest launched): each process pair stores the next group's rounds, cut to the
    command's --moebench-rounds, as its sides' runs; returns the calls (folder, first side, rounds option)."""
    from moebench import ab

    calls, stored = [], {}

    def fake_run_sides(trees, commands, out, *, timeout_s, progress, grain, first):
        rounds = next(c for c in commands["a"] if c.startswith("--moebench-rounds="))
        calls.append({"out": out, "first": first, "rounds": rounds})
        n = int(rounds.split("=")[1])
        a, b = next(groups)
        stored[out / "a"], stored[out / "b"] = _history_run({"x": list(a[:n])}), _history_run({"x": list(b[:n])})
        return {"returncode": {"a": 0, "b": 0}, "logs": {"a": "a.log", "b": "b.log"}, "turns": 40, "wall_s": wall_s,
                "package": {s: str(trees[s] / "src" / "moebench") for s in "ab"}, "referee_error": None,
                "interrupted": False, "grants": []}

    monkeypatch.setattr(ab, "run_sides", fake_run_sides)
    monkeypatch.setattr(ab, "_last_run", lambda folder: stored.get(folder))
    return calls


def test_ab_processes_runs_k_pairs_in_their_folders_and_combines_them(tmp_path, monkeypatch, capsys):
    """`--processes 3` without launching pytest: each process pair gets its own folder, the side that starts first
    alternates, the trees are resolved once, and ab.json holds the combined verdict and each pair's own."""
    rng = np.random.default_rng(2)
    calls = _fake_sides(monkeypatch, iter(_groups(rng, 3, 10, shift=0.2, offset_sd=0.01, pair_sd=0.05)))
    monkeypatch.chdir(ROOT)
    out = tmp_path / "ab"
    assert cli.main(["ab", "--processes", "3", "--rounds", "10", "--out", str(out), "--", "suites/switch"]) == 1
    assert [(c["out"], c["first"]) for c in calls] == [(out / "p1", "a"), (out / "p2", "b"), (out / "p3", "a")]
    report = json.loads((out / "ab.json").read_text())
    assert report["processes"] == 3 and report["problems"] == []
    (row,) = report["rows"]
    assert row["metrics"]["throughput"]["status"] == "regressed"
    assert "over 3 process pairs" in row["metrics"]["throughput"]["message"]
    assert [p["folder"] for p in report["process_pairs"]] == [str(out / f"p{k}") for k in (1, 2, 3)]
    assert all(p["rows"][0]["metrics"]["throughput"]["pairs"] == 10 for p in report["process_pairs"])
    assert "regressed" in capsys.readouterr().out
    assert cli.main(["ab", "--processes", "2", "--out", str(tmp_path / "two"), "--", "suites/switch"]) == 2
    assert "--processes 2" in capsys.readouterr().err



def test_ab_defaults_to_process_pairs(tmp_path, monkeypatch, capsys):
    """Without options a run is 24 process pairs of 10 rounds a side (what the H100's per-process offset needs);
    `--processes 1` alone falls back to 120 rounds and says what its verdict does not cover."""
    rng = np.random.default_rng(4)
    calls = _fake_sides(monkeypatch, iter(_groups(rng, 25, 120, offset_sd=0.0, pair_sd=0.05)))
    monkeypatch.chdir(ROOT)
    assert cli.main(["ab", "--out", str(tmp_path / "k"), "--", "suites/switch"]) == 0
    assert [c["rounds"] for c in calls] == ["--moebench-rounds=10"] * 24
    report = json.loads((tmp_path / "k" / "ab.json").read_text())
    assert "over 24 process pairs" in report["rows"][0]["metrics"]["throughput"]["message"]
    capsys.readouterr()
    assert cli.main(["ab", "--processes", "1", "--out", str(tmp_path / "one"), "--", "suites/switch"]) == 0
    assert [c["rounds"] for c in calls[24:]] == ["--moebench-rounds=120"]
    assert "does not cover the speed offset" in capsys.readouterr().err


def test_ab_processes_stops_before_a_pair_that_would_not_fit_and_resumes(tmp_path, monkeypatch, capsys):
    """A time-limited call (one device command) stops before a process pair that would overrun --timeout; --resume
    keeps the finished pairs, moves an unfinished one aside, runs the rest, and refuses changed settings."""
    rng = np.random.default_rng(3)
    calls = _fake_sides(monkeypatch, iter(_groups(rng, 4, 10, shift=0.2, offset_sd=0.01, pair_sd=0.05)), wall_s=200.0)
    monkeypatch.chdir(ROOT)
    out = tmp_path / "ab"
    argv = ["ab", "--processes", "3", "--rounds", "10", "--out", str(out)]
    assert cli.main([*argv, "--timeout", "150", "--", "suites/switch"]) == 2  # p1 took 200 s: p2 would not fit
    assert [c["out"].name for c in calls] == ["p1"] and "run the same command with --resume" in capsys.readouterr().err
    (out / "p2" / "a").mkdir(parents=True)  # what a killed call leaves: a pair without its pair.json
    (out / "p2" / "a" / "history.jsonl").write_text("partial\n")
    assert cli.main([*argv, "--rounds", "12", "--resume", "--", "suites/switch"]) == 2
    assert "rounds 10 -> 12" in capsys.readouterr().err and (out / "p2" / "a" / "history.jsonl").exists()
    assert cli.main([*argv, "--resume", "--", "suites/switch"]) == 1
    assert [c["out"].name for c in calls] == ["p1", "p2", "p3"]
    assert (out / "p2.unfinished" / "a" / "history.jsonl").read_text() == "partial\n"
    report = json.loads((out / "ab.json").read_text())
    assert report["problems"] == [] and [p["folder"] for p in report["process_pairs"]] == \
        [str(out / f"p{k}") for k in (1, 2, 3)]
    assert "over 3 process pairs" in report["rows"][0]["metrics"]["throughput"]["message"]
    assert cli.main([*argv[:2], "4", *argv[3:], "--resume", "--", "suites/switch"]) == 1  # one more pair
    assert [c["out"].name for c in calls] == ["p1", "p2", "p3", "p4"]
    assert cli.main(["ab", "--resume", "--out", str(tmp_path / "none"), "--", "suites/switch"]) == 2
    assert "holds no --processes run" in capsys.readouterr().err

SIDE = textwrap.dedent("""
    import sys, time
    from moebench.turns import Turns
    turns = Turns.from_env()
    side, rounds, crash_at = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    with open(sys.argv[4], "a") as f:  # start-up: runs without the floor
        f.write(f"up{side} ")
    for i in range(rounds):
        turns.take()
        if i == crash_at:
            raise SystemExit(3)
        with open(sys.argv[4], "a") as f:
            f.write(f"{side}{i} ")
        time.sleep(0.01)
    turns.close()
""")


def _run_sides(tmp_path, rounds, crash_b_at=-1):
    import os

    referee = Referee()
    referee.start()
    log = tmp_path / "order.txt"
    procs = []
    try:
        for side, crash in (("a", -1), ("b", crash_b_at)):
            env = {**os.environ, **referee.env(side), "PYTHONPATH": str(ROOT / "src")}
            procs.append(subprocess.Popen([sys.executable, "-c", SIDE, side, str(rounds), str(crash), str(log)],
                                          env=env))
        codes = [p.wait(timeout=60) for p in procs]
    finally:
        referee.close()
    order = log.read_text().split()
    assert sorted(order[:2]) == ["upa", "upb"], "each side's start-up must run before the first turn"
    return order[2:], codes


def test_two_processes_take_turns_in_balanced_order(tmp_path):
    """Round i of A and B run back to back, and each side goes first in every other pair; the first turn waits for
    both sides' start-up."""
    order, codes = _run_sides(tmp_path, 6)
    assert codes == [0, 0]
    assert order == ["a0", "b0", "b1", "a1", "a2", "b2", "b3", "a3", "a4", "b4", "b5", "a5"]


def test_balanced_order():
    assert "".join(Referee.next_side(n) for n in range(10)) == "abbaabbaab"


def test_when_one_side_dies_the_other_finishes_alone(tmp_path):
    order, codes = _run_sides(tmp_path, 5, crash_b_at=2)
    assert codes == [0, 3]
    assert order == ["a0", "b0", "b1", "a1", "a2", "a3", "a4"]


def test_ab_refuses_bad_input_without_touching_stored_runs(tmp_path, capsys):
    out = tmp_path / "ab"
    (out / "a").mkdir(parents=True)
    (out / "a" / "history.jsonl").write_text("keep me\n")
    assert cli.main(["ab", "--processes", "1", "--out", str(out), "--", "suites/switch"]) == 2
    assert "earlier A/B run" in capsys.readouterr().err
    assert (out / "a" / "history.jsonl").read_text() == "keep me\n"
    assert cli.main(["ab", "--rounds", "3", "--out", str(tmp_path / "x"), "--", "suites/switch"]) == 2
    assert "at least 7 round pairs" in capsys.readouterr().err
    assert cli.main(["ab", "--b", "no-such-ref-xyz", "--out", str(tmp_path / "y"), "--", "suites/switch"]) == 2
    assert "neither a folder nor a git ref" in capsys.readouterr().err


def test_token_clock_leaves_the_pauses_out_of_step_latencies(monkeypatch):
    """At step grain the other side runs between two steps; that wait must not count as this side's step."""
    from moebench import workload

    now = [0.0]
    monkeypatch.setattr(workload.time, "perf_counter", lambda: now[0])

    def pause():
        now[0] += 100.0  # the other side's step

    clock = workload.TokenClock("cpu", pause=pause)
    clock.start()
    for step in range(4):
        now[0] += 0.01 * (step + 1)  # this side's step
        clock(None, None)
    assert clock.step_seconds() == pytest.approx([0.01, 0.02, 0.03, 0.04])
    plain = workload.TokenClock("cpu")
    plain.start()
    now[0] += 0.5
    plain(None, None)
    now[0] += 0.25
    plain(None, None)
    assert plain.step_seconds() == pytest.approx([0.5, 0.25])


@pytest.mark.slow
@pytest.mark.parametrize("grain", ["round", "step"])
def test_ab_run_on_the_switch_quick_tier(tmp_path, monkeypatch, grain):
    """Both sides run one quick case as separate pytest processes, one round (or decode step) at a time; the stored
    runs are ordinary histories and ab.json pairs their rounds."""
    monkeypatch.chdir(ROOT)
    out = tmp_path / "ab"
    code = cli.main(["ab", "--processes", "1", "--rounds", "8", "--out", str(out), "--no-progress", "--grain", grain,
                     "--b-args=--moebench-inject-delay=0.01ms", "--", "suites/switch", "-k",
                     "switch-base-8 and lru-50"])
    report = json.loads((out / "ab.json").read_text())
    assert report["problems"] == [] and report["returncode"] == {"a": 0, "b": 0}, report
    assert code in (0, 1)
    assert report["turns"] >= 16  # a grant per round a side, plus the first and the hand-over at the end
    if grain == "step":  # and one per decode step: the reference's and the case's rounds, both sides
        assert report["turns"] >= 2 * 2 * 8 * 8
    (row,) = report["rows"]
    assert row["metrics"]["throughput"]["pairs"] == 8
    assert row["injected"] == {"a": None, "b": "0.01 ms per MoE layer"}
    from moebench.history import read_history

    (run,) = read_history(out / "b")[0]
    assert run["records"][0]["interleaved"] == grain
    pytest.importorskip("matplotlib")
    assert (out / "ab.png").stat().st_size > 1000  # the pairs' ratios, the estimate and the limit


@pytest.mark.slow
def test_ab_timeout_stops_both_sides_and_says_so(tmp_path, monkeypatch, capsys):
    """--timeout (like Ctrl-C) interrupts both sides with SIGINT: ab.json still comes out, naming the interruption."""
    monkeypatch.chdir(ROOT)
    out = tmp_path / "ab"
    code = cli.main(["ab", "--processes", "1", "--rounds", "500", "--timeout", "4", "--out", str(out), "--no-progress",
                     "--", "suites/switch", "-k", "switch-base-8 and lru-50"])
    assert code == 2
    assert "interrupted" in capsys.readouterr().err
    report = json.loads((out / "ab.json").read_text())
    assert report["interrupted"] is True and any("interrupted" in p for p in report["problems"])
    assert report["rows"] == []  # the only case was in progress: nothing to compare, and nothing made up


def test_step_grain_records_are_not_compared_with_plain_runs():
    from moebench.baseline import comparability

    fields, reason = comparability({"interleaved": "step"}, {"interleaved": None})
    assert fields == ["interleaved"] and "interleaved step" in reason
    assert comparability({"interleaved": "round"}, {})[0] == []  # timed like a plain run


def test_ab_stops_when_a_side_dies_before_reaching_the_referee(tmp_path, monkeypatch, capsys):
    """Side B refuses its options (0 rounds) before it connects; side A, already waiting for B, must not hang."""
    monkeypatch.chdir(ROOT)
    code = cli.main(["ab", "--processes", "1", "--rounds", "8", "--out", str(tmp_path / "ab"), "--no-progress",
                     "--timeout", "120", "--b-args=--moebench-rounds=0", "--", "suites/switch", "-k",
                     "switch-base-8 and lru-50"])
    assert code == 2
    err = capsys.readouterr().err
    assert "side b never reached the referee" in err and "interrupted" not in err
