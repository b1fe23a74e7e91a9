"""Baselines: limits, files (atomic, never overwriting foreign ones), verdicts on fake records, and the plugin flow
on a tiny suite: plain runs write no baseline, --moebench-save-baseline does, comparisons run automatically, an
injected delay is flagged, corrupt baselines stop the session before work, Ctrl-C marks the run interrupted."""

import json

import numpy as np
import pytest

from moebench import baseline as bl
from moebench import history

pytest_plugins = ["pytester"]

TINY_SUITE = '''
from moebench.suite import ModelSpec, Suite
from moebench.workload import Workload


def build(tier, dtype, device):
    import torch
    from transformers import SwitchTransformersConfig, SwitchTransformersForConditionalGeneration

    torch.manual_seed(0)
    cfg = SwitchTransformersConfig(vocab_size=64, d_model=16, d_ff=32, num_layers=2, num_decoder_layers=2,
                                   num_heads=2, d_kv=8, num_experts=4, expert_capacity=64, encoder_sparse_step=1,
                                   decoder_sparse_step=1, decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)
    return SwitchTransformersForConditionalGeneration(cfg).to(dtype).eval(), "synthetic tiny"


SUITE = Suite(name="tiny", models=[ModelSpec("tiny-switch", build)], budgets=["50%"], policies=["resident", "lru"],
              workload=Workload(batch_size=1, prompt_len=4, new_tokens=3))
'''


def _rec(case="m[lru-50%]", tps=None, peak=100, **kw):
    tps = [100.0] * 10 if tps is None else list(tps)
    r = {"suite": "s", "case": case, "model": "m", "policy": "lru", "budget": "50%",
         "tokens_per_s": float(np.mean(tps)),
         "samples": {"tokens_per_s": tps, "p50_ms": [1000 / t for t in tps]}, "torch_peak_bytes": peak,
         "cache_bytes": 10, "passed": True}
    r.update(kw)
    return r


@pytest.mark.parametrize("spec, match", [
    ("throughput:5", "malformed"), ("throughput=5%", "malformed"), ("speed:5%", "unknown metric"),
    ("throughput:0%", "between 0% and 100%"), ("throughput:5%,throughput:2%", "given twice"), ("", "empty"),
])
def test_malformed_limits(spec, match):
    with pytest.raises(ValueError, match=match):
        bl.parse_limits(spec)


def test_limits_parse():
    assert bl.parse_limits("throughput:5%, gpu_memory:2.5%") == {"throughput": 0.05, "gpu_memory": 0.025}


def test_verdicts_on_fake_records():
    rng = np.random.default_rng(0)
    base = _rec(tps=100 * np.exp(rng.normal(0, 0.01, 30)))
    same = _rec(tps=100 * np.exp(rng.normal(0, 0.01, 30)))
    slow = _rec(tps=90 * np.exp(rng.normal(0, 0.01, 30)))
    fat = _rec(tps=100 * np.exp(rng.normal(0, 0.01, 30)), peak=105)
    limits = bl.parse_limits("throughput:5%,gpu_memory:2%")
    assert bl.compare_case(base, same, limits)["status"] == "unchanged"
    v = bl.compare_case(base, slow, limits)
    assert v["status"] == "regressed" and "throughput" in v["message"] and v["ratio"] == pytest.approx(0.9, rel=0.02)
    assert bl.compare_case(base, fat, limits)["status"] == "regressed"  # memory: deterministic, beyond 2%
    assert bl.compare_case(base, fat, {"throughput": 0.05})["status"] == "unchanged"
    assert bl.compare_case(None, same, limits)["status"] == "new"
    # significant but below the limit: 2% slower with tiny noise is not a regression at a 5% limit
    assert bl.compare_case(base, _rec(tps=98 * np.exp(rng.normal(0, 0.001, 30))), limits)["status"] != "regressed"
    old = _rec(samples=None)  # a schema-1 record: no per-round samples
    assert bl.compare_case(old, same, limits)["status"] == "inconclusive"


def _baseline_run():
    return history.make_run([_rec(), _rec("m[resident-all]")], ["s"], "/nonexistent", machine={"gpu": None},
                            command="pytest --moebench x")


def test_save_load_and_refusals(tmp_path):
    run = _baseline_run()
    path = bl.save(bl.path_for(tmp_path, "cpu", "s"), bl.from_run(run, "s"))
    assert path == tmp_path / "cpu" / "s.json"
    data = bl.load(path)
    assert data["command"] == "pytest --moebench x" and data["source_run_id"] == run["run_id"]
    assert data["cases"]["m[lru-50%]"]["samples"]["tokens_per_s"] == [100.0] * 10 and "machine" in data
    assert not list(tmp_path.glob("cpu/.*tmp"))  # no temporary file left behind
    with pytest.raises(bl.BaselineError, match="interrupted"):
        bl.from_run(dict(run, status="interrupted"), "s")
    delayed = history.make_run([_rec(inject_delay_ms=0.2)], ["s"], "/nonexistent", machine={"gpu": None})
    with pytest.raises(bl.BaselineError, match="injected delay"):
        bl.from_run(delayed, "s")
    with pytest.raises(bl.BaselineError, match="no records of suite 'other'"):
        bl.from_run(run, "other")


@pytest.mark.parametrize("content, match", [
    ("{not json", "corrupt"), ('{"schema": "other"}', "not a moebench baseline"),
    ('{"schema": "moebench-baseline", "version": 7}', "version 7"), ("[]", "not a moebench baseline"),
])
def test_corrupt_or_foreign_baseline_is_an_error_and_left_alone(tmp_path, content, match):
    path = tmp_path / "s.json"
    path.write_text(content)
    with pytest.raises(bl.BaselineError, match=match) as err:
        bl.load(path)
    assert str(path) in str(err.value)
    with pytest.raises(bl.BaselineError):
        bl.save(path, bl.from_run(_baseline_run(), "s"))
    assert path.read_text() == content
    bl.save(path, bl.from_run(_baseline_run(), "s"), force=True)  # only on explicit force
    assert bl.load(path)["suite"] == "s"


# ------------------------------------------------------------------------------------------ through the plugin
@pytest.fixture
def tiny(pytester):
    suite = pytester.path / "suites" / "tiny"
    suite.mkdir(parents=True)
    (suite / "suite.py").write_text(TINY_SUITE)
    return pytester


def _args(tiny, *extra, rounds="6"):
    return ("--moebench", "suites/tiny", "--moebench-rounds", rounds, "--moebench-history", str(tiny.path / "hist"),
            "--moebench-baseline-dir", str(tiny.path / "baselines"), "-p", "no:cacheprovider", *extra)


def test_plugin_baseline_flow(tiny):
    base = tiny.path / "baselines" / "cpu" / "tiny.json"
    r = tiny.runpytest_subprocess(*_args(tiny))
    r.assert_outcomes(passed=2)
    assert not base.exists()  # a plain run never writes a baseline
    runs, _ = history.read_history(tiny.path / "hist")
    rec = runs[-1]["records"][1]
    assert len(rec["samples"]["tokens_per_s"]) == 6 and rec["inject_delay_ms"] == 0.0

    r = tiny.runpytest_subprocess(*_args(tiny, "--moebench-save-baseline"))
    r.assert_outcomes(passed=2)
    r.stdout.fnmatch_lines([f"baseline: wrote {base}*"])
    data = json.loads(base.read_text())
    assert "pytest" in data["command"] and "--moebench suites/tiny" in data["command"] and len(data["cases"]) == 2

    r = tiny.runpytest_subprocess(*_args(tiny))  # compared automatically: the baseline exists for this class
    r.stdout.fnmatch_lines(["*baseline tok/s*delta*verdict*"])
    assert json.loads(base.read_text()) == data  # and left as it was

    # 300 ms before each of 8 MoE layer calls per round: far beyond the noise of a tiny model's round
    r = tiny.runpytest_subprocess(*_args(tiny, "--moebench-inject-delay=300ms", "--moebench-policy", "lru"))
    r.stdout.fnmatch_lines(["*REGRESSED (injected 300 ms per MoE layer)*", "FAILED*tiny-switch?lru-50%?*: reg*"])
    assert r.ret == 1
    runs, _ = history.read_history(tiny.path / "hist")
    assert all(rec["inject_delay_ms"] == 300 for rec in runs[-1]["records"])
    assert "INJECTED DELAY" in history.format_run_header(runs[-1])

    # a stretch doubles every round whatever the machine's speed
    r = tiny.runpytest_subprocess(*_args(tiny, "--moebench-inject-delay=100%", "--moebench-policy", "lru"))
    r.stdout.fnmatch_lines(["*REGRESSED (injected 100% stretch)*"])
    assert r.ret == 1
    runs, _ = history.read_history(tiny.path / "hist")
    assert all(rec["inject_slowdown"] == 1.0 for rec in runs[-1]["records"])

    # a baseline that keeps earlier runs of the history (the injected ones are never among them)
    r = tiny.runpytest_subprocess(*_args(tiny, "--moebench-save-baseline", "--moebench-baseline-runs=3"))
    r.stdout.fnmatch_lines([f"baseline: wrote {base} (run * and 2 earlier)"])
    data = json.loads(base.read_text())
    assert len(data["runs"]) == 3 and all(len(c["earlier_runs"]) == 2 for c in data["cases"].values())
    r = tiny.runpytest_subprocess(*_args(tiny))
    r.stdout.fnmatch_lines(["*3 runs/6*"])  # the verdict now tests at run level


@pytest.mark.parametrize("opt, match", [
    ("--moebench-compare-fail=throughput:5", "*--moebench-compare-fail: malformed limit 'throughput:5'*"),
    ("--moebench-inject-delay=5", "*--moebench-inject-delay: malformed delay '5'*"),
    ("--moebench-inject-delay=0%", "*--moebench-inject-delay: slowdown '0%' must be above 0%*"),
    ("--moebench-compare=/nonexistent/x.json", "*--moebench-compare: /nonexistent/x.json is neither*"),
])
def test_plugin_usage_errors(tiny, opt, match):
    r = tiny.runpytest_subprocess(*_args(tiny, opt))
    assert r.ret == 4
    r.stderr.fnmatch_lines([match])


def test_plugin_corrupt_baseline_stops_before_work_and_is_untouched(tiny):
    base = tiny.path / "baselines" / "cpu" / "tiny.json"
    base.parent.mkdir(parents=True)
    base.write_text('{"schema": "something-else"}')
    r = tiny.runpytest_subprocess(*_args(tiny, "--moebench-save-baseline"))
    r.stdout.fnmatch_lines([f"*{base}: not a moebench baseline*"])
    assert r.ret != 0 and "passed" not in r.stdout.str().split("short test summary")[-1]
    assert base.read_text() == '{"schema": "something-else"}'
    r = tiny.runpytest_subprocess(*_args(tiny, "--moebench-compare"), "--moebench-baseline-dir", str(tiny.path / "x"))
    r.stdout.fnmatch_lines(["*--moebench-compare: no baseline*tiny.json*"])


INTERRUPT_CONFTEST = '''
def pytest_runtest_teardown(item, nextitem):
    if "resident" in item.name:
        raise KeyboardInterrupt  # Ctrl-C after the first case
'''


def test_ctrl_c_marks_the_run_interrupted_and_saves_no_baseline(tiny):
    (tiny.path / "conftest.py").write_text(INTERRUPT_CONFTEST)
    base = tiny.path / "baselines" / "cpu" / "tiny.json"
    r = tiny.runpytest_subprocess(*_args(tiny, "--moebench-save-baseline"))
    assert r.ret == 2  # pytest's INTERRUPTED
    r.stdout.fnmatch_lines(["*KeyboardInterrupt*"])
    r.stdout.fnmatch_lines(["*baseline: NOT saved, the run was interrupted*"])
    runs, problems = history.read_history(tiny.path / "hist")
    assert problems == [] and len(runs) == 1
    assert runs[0]["status"] == "interrupted" and len(runs[0]["records"]) == 1
    assert "[INTERRUPTED]" in history.format_run_header(runs[0])
    assert not base.exists()


def test_plugin_reports_incomparable_cases_and_too_few_rounds_once(tiny):
    """A case whose baseline ran another tier on an H100 is 'not comparable' (never a failure) with the reason under
    the table; 3/3 rounds, which cannot reach p<0.01, give one hint for the whole session."""
    base = tiny.path / "baselines" / "cpu" / "tiny.json"
    tiny.runpytest_subprocess(*_args(tiny, "--moebench-save-baseline", rounds="3")).assert_outcomes(passed=2)
    data = json.loads(base.read_text())
    data["machine"] = {"gpu": {"count": 1, "names": ["NVIDIA H100 80GB HBM3"], "driver": "580"}}
    resident = next(c for name, c in data["cases"].items() if "resident" in name)
    resident.update(tier="full", device="cuda:0", tokens_per_s=1e6)
    resident["samples"]["tokens_per_s"] = [1e6] * 3  # the CPU run is far "slower": still no failure
    base.write_text(json.dumps(data))
    r = tiny.runpytest_subprocess(*_args(tiny, rounds="3"))
    assert r.ret == 0
    r.assert_outcomes(passed=2)
    r.stdout.fnmatch_lines(["*rounds b/r*verdict*", "*resident*-  not comparable (tier, device)",
                            "*lru*3/3 too few*"])
    out = r.stdout.str()
    assert out.count("cannot reach p<0.01") == 1 and "use --moebench-rounds >= 7" in out
    assert out.count("not comparable with") == 1
    assert "baseline tier full on NVIDIA H100 80GB HBM3, this run tier quick on cpu" in out


def test_a_new_policy_is_set_against_the_best_stored_policy_of_its_case(tiny):
    """A policy the baseline lacks reads 'new' no more: its row names the best stored policy of the same model,
    budget and workload, the tokens/s ratio with its interval, both hit rates and a verdict (moebench.versus)."""
    suite = tiny.path / "suites" / "tiny" / "suite.py"
    suite.write_text(TINY_SUITE.replace('policies=["resident", "lru"]', 'policies=["resident", "lru", "lfu"]'))
    r = tiny.runpytest_subprocess(*_args(tiny, "--moebench-save-baseline", "--moebench-policy", "lru"))
    r.assert_outcomes(passed=2)
    r = tiny.runpytest_subprocess(*_args(tiny, "--moebench-policy", "lfu"))
    r.assert_outcomes(passed=2)
    r.stdout.fnmatch_lines(["*tiny-switch*lfu*new; * vs lru: *x [[]*, hit *"])
    runs, _ = history.read_history(tiny.path / "hist")
    lfu = next(rec for rec in runs[-1]["records"] if rec["policy"] == "lfu")
    assert lfu["comparison"]["status"] == "new" and lfu["versus"]["rival"] == "lru"
    assert lfu["versus"]["verdict"] in ("better", "worse", "tie", "inconclusive")
