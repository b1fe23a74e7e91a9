"""Faults inside a suite run: an out-of-memory in one case fails that case with a record and a one-line report,
its memory is given back, and the session goes on with the other cases.

The out-of-memory is injected through the test hook $MOEBENCH_INJECT_OOM (moebench.measure.inject_out_of_memory):
torch.OutOfMemoryError exists on CPU builds of torch too, so the whole path is tested here without a GPU.
(A predictor that raises or names experts outside the store: tests/moeoffload/test_prefetch.py.)
"""

import gc
import json
import os
import weakref
from pathlib import Path

import pytest
import torch
from tests.moeoffload.models import tiny_switch

from moebench.measure import INJECT_OOM_ENV, CaseFailed, Session, is_out_of_memory
from moebench.suite import Case, ModelSpec, Suite
from moebench.workload import Workload

pytest_plugins = ["pytester"]

SUITE = Path(__file__).resolve().parents[2] / "suites" / "switch"


def _tiny_suite() -> Suite:
    return Suite(name="tiny", models=[ModelSpec("tiny-switch", lambda tier, dtype, device: (tiny_switch(), "seeded"))],
                 budgets=["50%"], workload=Workload(batch_size=2, prompt_len=6, new_tokens=4), policies=["lru"])


def test_out_of_memory_fails_only_that_case_and_frees_the_offloaded_model(monkeypatch):
    session = Session(_tiny_suite(), device="cpu", tier="quick", rounds=1)
    model, _ = session.model("tiny-switch")
    handles = []
    import moeoffload

    real_offload = moeoffload.offload

    def tracking_offload(*args, **kwargs):
        handle = real_offload(*args, **kwargs)
        handles.append(weakref.ref(handle.cache))
        return handle

    monkeypatch.setattr(moeoffload, "offload", tracking_offload)
    monkeypatch.setenv(INJECT_OOM_ENV, "lru-50%")
    with pytest.raises(CaseFailed, match=r"tiny-switch\[lru-50%\]: out of memory: injected") as failed:
        session.run(Case("tiny-switch", "lru", "50%"))
    record = failed.value.record
    assert record["passed"] is False and record["error"] == "out_of_memory" and record["policy"] == "lru"
    assert json.loads(json.dumps(record)) == record  # history-ready
    assert not hasattr(model, "_moeoffload"), "the failed case left its model offloaded"
    del failed
    gc.collect()
    assert handles and handles[-1]() is None, "the failed case's expert cache is still referenced"

    monkeypatch.delenv(INJECT_OOM_ENV)
    assert session.run(Case("tiny-switch", "lru", "50%"))["passed"]  # the same session goes on


def test_out_of_memory_in_the_reference_fails_it_and_a_later_case_retries(monkeypatch):
    session = Session(_tiny_suite(), device="cpu", tier="quick", rounds=1)
    monkeypatch.setenv(INJECT_OOM_ENV, "resident-all")
    with pytest.raises(CaseFailed, match="out of memory"):
        session.run(Case("tiny-switch", "resident", "all"))
    monkeypatch.delenv(INJECT_OOM_ENV)
    assert session.run(Case("tiny-switch", "lru", "50%"))["passed"]


def test_what_counts_as_out_of_memory():
    assert is_out_of_memory(torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"))
    assert is_out_of_memory(RuntimeError("CUDA error: out of memory"))
    assert not is_out_of_memory(RuntimeError("shape mismatch"))
    assert not is_out_of_memory(ValueError("out of memory"))  # only torch/CUDA errors are absorbed


def test_out_of_memory_case_is_reported_and_the_suite_goes_on(pytester, tmp_path):
    hist = tmp_path / "hist"
    env_before = os.environ.get(INJECT_OOM_ENV)
    os.environ[INJECT_OOM_ENV] = "lru-25%"
    try:
        result = pytester.runpytest_subprocess(
            "--moebench", str(SUITE), "--moebench-tier", "quick", "--moebench-policy", "lru", "--moebench-rounds",
            "1", "-k", "switch-base-8", "--moebench-history", str(hist), "-p", "no:cacheprovider", "-v")
    finally:
        if env_before is None:
            del os.environ[INJECT_OOM_ENV]
        else:
            os.environ[INJECT_OOM_ENV] = env_before
    result.assert_outcomes(passed=2, failed=1)
    assert result.ret == 1
    result.stdout.fnmatch_lines([
        "*switch-base-8?lru-25%?*FAILED*",
        "*switch-base-8?lru-50%?*PASSED*",
        "*switch-base-8[[]lru-25%[]]: out of memory: injected by $MOEBENCH_INJECT_OOM*",  # the failure report
        "*moebench: 3 cases*",
        "switch-base-8*lru*25%*FAIL",
        "switch-base-8*lru*50%*pass",
    ])
    run = json.loads((hist / "history.jsonl").read_text().splitlines()[-1])
    by_case = {r["case"]: r for r in run["records"]}
    assert by_case["switch-base-8[lru-25%]"]["error"] == "out_of_memory"
    assert by_case["switch-base-8[lru-50%]"]["passed"]
