"""A suite run spread over pytest-xdist workers (moebench.workers): the controller stores one run with every case
once and the worker that ran it; a worker that dies fails its case and the run is still stored; `-n 0` and a run
without xdist store what they always did. CPU workers stand in for GPUs here."""


import pytest

from moebench.table import render
from moebench.workers import CRASH_ENV

pytest.importorskip("xdist")
from tests.moebench.suite_runs import run_tiny_suite

pytest_plugins = ["pytester"]

TINY_SUITE = """
from tests.moeoffload.models import tiny_switch
from moebench.suite import ModelSpec, Suite
from moebench.workload import Workload

def _model(seed):
    return ModelSpec(f"tiny-{seed}", lambda tier, dtype, device: (tiny_switch(seed=seed), "seeded"))

SUITE = Suite(name="tiny", models=[_model(1), _model(2)], budgets=["50%"], policies=["lru"],
              workload=Workload(batch_size=2, prompt_len=6, new_tokens=4))
"""
CASES = {"tiny-1[resident-all]", "tiny-1[lru-50%]", "tiny-2[resident-all]", "tiny-2[lru-50%]"}


def _run(pytester, monkeypatch, *args):
    """The tiny suite with --moebench in a subprocess; (result, the runs in its history)."""
    return run_tiny_suite(pytester, monkeypatch, TINY_SUITE, "--moebench-rounds", "1", *args)


def test_two_workers_store_one_run_with_every_case_once_and_where_it_ran(pytester, monkeypatch):
    result, runs = _run(pytester, monkeypatch, "-n", "2")
    result.assert_outcomes(passed=4)
    result.stdout.fnmatch_lines(["*moebench: 4 cases*", "*worker*", "tiny-1*gw? cpu*"])
    assert len(runs) == 1
    (run,) = runs
    assert sorted(r["case"] for r in run["records"]) == sorted(CASES)
    where: dict[str, set] = {}
    for r in run["records"]:
        where.setdefault(r["model"], set()).add(r["worker"])
    assert all(len(workers) == 1 for workers in where.values())  # a model's cases on one worker: built once
    assert set(run["workers"]) == {"gw0", "gw1"}
    assert {w["slot"] for w in run["workers"].values()} == {0, 1}
    assert all(w["device"] == "cpu" and "crashed" not in w for w in run["workers"].values())
    assert run["suites"] == ["tiny"] and run["status"] == "complete"


def test_a_worker_that_dies_fails_its_case_and_the_run_is_stored(pytester, monkeypatch):
    monkeypatch.setenv(CRASH_ENV, "tiny-2[lru-50%]")
    result, runs = _run(pytester, monkeypatch, "-n", "2")
    result.assert_outcomes(passed=3, failed=1)
    result.stdout.fnmatch_lines(["*crashed while running*tiny-2[[]lru-50%[]]*"])
    assert len(runs) == 1
    (run,) = runs
    assert sorted(r["case"] for r in run["records"]) == sorted(CASES - {"tiny-2[lru-50%]"})
    crashed = [w for w in run["workers"].values() if "crashed" in w]
    assert len(crashed) == 1 and "tiny-2[lru-50%]" in crashed[0]["crashed"]


@pytest.mark.parametrize("args", [("-n", "0"), ("-p", "no:xdist")], ids=["n0", "no-xdist"])
def test_without_workers_the_run_is_stored_as_before(pytester, monkeypatch, args):
    monkeypatch.setenv(CRASH_ENV, "tiny-2[lru-50%]")  # only a worker honours the crash hook
    result, runs = _run(pytester, monkeypatch, *args)
    result.assert_outcomes(passed=4)
    (run,) = runs
    assert sorted(r["case"] for r in run["records"]) == sorted(CASES)
    assert "workers" not in run and not any("worker" in r or "gpu" in r for r in run["records"])


def test_the_table_names_the_worker_only_for_a_spread_run():
    record = {"model": "m", "policy": "lru", "budget": "50%", "passed": True, "device": "cuda:1"}
    assert "worker" not in render([record])
    assert "gw1 cuda:1" in render([dict(record, worker="gw1")])


def test_a_case_compares_with_a_baseline_case_on_the_same_gpu_model():
    from moebench.baseline import comparability

    two = {"gpu": {"names": ["NVIDIA H100 80GB HBM3", "NVIDIA A100-SXM4-80GB"]}}
    base = {"device": "cuda:0", "gpu": "NVIDIA A100-SXM4-80GB"}
    assert comparability(base, dict(base, device="cuda:1"), two, two)[0] == []  # the machines' first GPUs differ
    fields, reason = comparability(base, {"device": "cuda:0", "gpu": "NVIDIA H100 80GB HBM3"}, two, two)
    assert fields == ["GPU"] and "A100" in reason and "H100" in reason
    assert comparability({"device": "cuda:0"}, {"device": "cuda:0"}, two, two)[0] == []  # older records: the machine
