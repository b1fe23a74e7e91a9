"""Verdicts beyond 'regressed': cases that cannot be compared (another tier, dtype, workload, device or GPU), round
counts too small to reach significance (and the one hint that says so), and how both read in the table and in
`moebench compare`."""

import numpy as np
import pytest

from moebench import baseline as bl
from moebench import history
from moebench.cli import main as cli_main
from moebench.table import comparison_cells, render

H100 = {"gpu": {"count": 1, "names": ["NVIDIA H100 80GB HBM3"], "driver": "580"}, "hostname": "vm"}
H200 = {"gpu": {"count": 1, "names": ["NVIDIA H200"], "driver": "580"}, "hostname": "vm2"}
CPU = {"gpu": None, "hostname": "laptop"}
WORKLOAD = {"batch_size": 8, "prompt_len": 32, "new_tokens": 32, "seed": 0, "arrivals": None}
LIMITS = bl.parse_limits(bl.DEFAULT_LIMITS)


def _rec(case="m[lru-50%]", tps=(100.0,) * 10, **kw):
    tps = [float(t) for t in tps]
    r = {"suite": "s", "case": case, "model": "m", "policy": "lru", "budget": "50%",
         "tokens_per_s": float(np.mean(tps)), "samples": {"tokens_per_s": tps, "p50_ms": [1000 / t for t in tps]},
         "torch_peak_bytes": 100,
         "passed": True, "tier": "full", "dtype": "bfloat16", "device": "cuda:0", "workload": dict(WORKLOAD),
         "rounds": len(tps)}
    r.update(kw)
    return r


# ------------------------------------------------------------------------------------------------ comparability
def test_same_setup_is_comparable():
    assert bl.comparability(_rec(), _rec(), H100, H100) == ([], "")
    assert bl.comparability(_rec(device="cuda:0"), _rec(device="cuda:1"), H100, H100) == ([], "")


def test_cpu_quick_run_against_h100_full_baseline_names_both_sides():
    """The issue's case: a CPU quick run compared with baselines/h100/switch.json."""
    fields, reason = bl.comparability(_rec(), _rec(tier="quick", device="cpu"), H100, CPU)
    assert fields == ["tier", "device"]
    assert reason == "baseline tier full on NVIDIA H100 80GB HBM3, this run tier quick on cpu"


@pytest.mark.parametrize("change, field, text", [
    ({"dtype": "float32"}, "dtype", "baseline dtype bfloat16 on"),
    ({"workload": dict(WORKLOAD, batch_size=1)}, "workload", "workload batch_size=8 on"),
    ({"device": "cpu"}, "device", "this run on cpu"),
    ({"kernels": "triton"}, "kernels", "baseline kernels exact on"),  # a baseline from before the field: the loop
    ({"fetch": "device"}, "fetch", "baseline fetch host on"),  # likewise fetched on the host
])
def test_each_field_makes_a_case_incomparable(change, field, text):
    fields, reason = bl.comparability(_rec(), _rec(**change), H100, H100)
    assert fields == [field] and text in reason


def test_another_gpu_model_is_not_comparable_and_unknown_fields_are_not_held_against_a_pair():
    fields, reason = bl.comparability(_rec(), _rec(), H100, H200)
    assert fields == ["GPU"] and reason == "baseline on NVIDIA H100 80GB HBM3, this run on NVIDIA H200"
    old = {k: v for k, v in _rec().items() if k not in ("tier", "dtype", "workload", "device")}
    assert bl.comparability(old, _rec(tier="quick"), None, H200) == ([], "")
    assert bl.comparability(_rec(), _rec(), H100, None) == ([], "")  # machine unknown: GPU model not checked


def test_not_comparable_never_regresses():
    halved = _rec(tps=[50.0] * 10, tier="quick", device="cpu", torch_peak_bytes=1000)
    v = bl.compare_case(_rec(), halved, LIMITS, base_machine=H100, cur_machine=CPU)
    assert v["status"] == "not comparable" and v["fields"] == ["tier", "device"] and not v["metrics"]
    assert "ratio" not in v and v["message"].startswith("not comparable: baseline tier full")
    cells = comparison_cells(v)
    assert cells == ["-"] * 5 + ["not comparable (tier, device)"]


# ---------------------------------------------------------------------------------------------- too few rounds
def test_halved_throughput_at_3_rounds_is_inconclusive_with_the_rounds_needed():
    v = bl.compare_case(_rec(tps=[100, 101, 99]), _rec(tps=[59, 60, 61]), LIMITS)
    assert v["status"] == "inconclusive" and v["too_few_rounds"] and v["rounds"] == [3, 3]
    assert v["rounds_needed"] == 7 and "cannot reach p<0.01" in v["message"]
    assert comparison_cells(v) == ["60.0", "100.0", "100.0 (no probe)", "-40.0%", "3/3 too few: need 7 this run",
                                   "inconclusive"]
    hint = bl.rounds_hint([v, None, {"status": "new"}])
    assert hint == ("moebench: 1 comparison(s) with 3/3 rounds (baseline/this run) cannot reach p<0.01, so no "
                    "change can be flagged: use --moebench-rounds >= 7")


def test_enough_rounds_give_no_hint_and_flag_the_change():
    v = bl.compare_case(_rec(tps=[100, 101, 99, 100.5, 99.5]), _rec(tps=[59, 60, 61, 60.5, 59.5]), LIMITS)
    assert v["status"] == "regressed" and not v["too_few_rounds"] and "rounds_needed" not in v
    assert comparison_cells(v)[4:] == ["5/5", "REGRESSED"]
    assert bl.rounds_hint([v]) is None


def test_a_row_reads_right_alone_when_the_machine_ran_at_another_speed():
    """An A/A run on a machine running slower than when the baseline was made: raw 150 -> 130 tokens/s, the same in
    machine-speed-probe units. The row shows the baseline at this run's speed, so median / it - 1 is the delta."""
    def rec(raw, per_probe):
        r = _rec(tps=raw)
        r["samples"]["tokens_per_probe"] = [t * per_probe for t in raw]
        return r

    base = rec([150, 151, 149, 150.5, 149.5, 150, 150.2, 149.8, 150.1, 149.9], 1.0)
    cur = rec([130, 131, 129, 130.5, 129.5, 130, 130.2, 129.8, 130.1, 129.9], 150 / 130 * 1.006)
    v = bl.compare_case(base, cur, LIMITS)
    median, stored, at_speed, delta, rounds, verdict = comparison_cells(v)
    assert (median, stored, delta, rounds) == ("130.0", "150.0", "+0.6%", "10/10")
    assert float(median) / float(at_speed) - 1 == pytest.approx(0.006, abs=0.001)
    assert verdict == "unchanged"


def test_hint_takes_the_worst_case_and_asks_for_a_new_baseline_when_it_is_too_small():
    a = bl.compare_case(_rec(tps=[100, 101, 99, 100]), _rec(tps=[100, 101, 99]), LIMITS)  # 4/3: 5 needed
    b = bl.compare_case(_rec(tps=[100, 101, 99]), _rec(tps=[100, 101, 99]), LIMITS)  # 3/3: 7 needed
    hint = bl.rounds_hint([a, b])
    assert "2 comparison(s) with as few as 3/3 rounds" in hint and hint.endswith(">= 7")
    tiny = bl.compare_case(_rec(tps=[100, 101]), _rec(tps=[100, 101, 99]), LIMITS)
    assert tiny["status"] == "inconclusive" and tiny["too_few_rounds"]
    assert "remake the baseline with --moebench-rounds >= 10" in bl.rounds_hint([tiny])


def test_verdict_notes_say_each_thing_once():
    records = []
    for i in range(3):
        r = _rec(case=f"m[lru-{i}]", tps=[100, 101, 99], tier="quick", device="cpu")
        r["comparison"] = bl.compare_case(_rec(), r, LIMITS, base_machine=H100, cur_machine=CPU)
        records.append(r)
    for i in range(2):
        r = _rec(case=f"m[lookahead-{i}]", tps=[60, 61, 59])
        r["comparison"] = bl.compare_case(_rec(tps=[100, 101, 99]), r, LIMITS)
        records.append(r)
    notes = bl.verdict_notes(records, {"s": "baselines/h100/s.json"})
    assert len(notes) == 2 and all(bad for _, bad in notes)
    assert notes[0][0] == ("baseline: 3 case(s) of suite 's' not comparable with baselines/h100/s.json: baseline "
                           "tier full on NVIDIA H100 80GB HBM3, this run tier quick on cpu; reported, not checked")
    assert notes[1][0].startswith("moebench: 2 comparison(s) with 3/3 rounds")
    table = render(records)
    assert "rounds b/r" in table.splitlines()[0] and table.count("not comparable (tier, device)") == 3
    assert table.count("3/3 too few") == 2 and table.count("inconclusive") == 2


# ------------------------------------------------------------------------------------------------ moebench compare
def test_cli_compare_across_devices_is_reported_not_failed(tmp_path, capsys):
    base = bl.from_run(history.make_run([_rec(), _rec("m[resident-all]")], ["s"], "/x", machine=H100), "s")
    path = bl.save(tmp_path / "h100" / "s.json", base)
    slow_cpu = [_rec(tps=[10.0] * 10, tier="quick", device="cpu"), _rec("m[resident-all]", tps=[10.0] * 10,
                                                                        tier="quick", device="cpu")]
    history.append(tmp_path / "hist", history.make_run(slow_cpu, ["s"], "/x", machine=CPU))
    assert cli_main(["compare", str(path), "-1", "--history", str(tmp_path / "hist")]) == 0
    out = capsys.readouterr().out
    assert out.count("not comparable (tier, device)") == 2 and "REGRESSED" not in out
    assert "2 case(s) of suite 's' not comparable with A" in out and "this run tier quick on cpu" in out


def test_cli_compare_with_too_few_rounds_prints_the_hint_once(tmp_path, capsys):
    hist = tmp_path / "hist"
    for tps in ([100, 101, 99], [59, 60, 61]):
        history.append(hist, history.make_run([_rec(tps=tps), _rec("m[resident-all]", tps=tps)], ["s"], "/x",
                                              machine=H100))
    assert cli_main(["compare", "0", "1", "--history", str(hist)]) == 0  # -40%, but 3/3 rounds cannot flag it
    out = capsys.readouterr().out
    assert out.count("3/3 too few") == 2 and out.count("inconclusive") == 2 and "unchanged" not in out
    assert out.count("cannot reach p<0.01") == 1 and "use --moebench-rounds >= 7" in out
