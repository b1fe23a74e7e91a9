"""`--moebench-workload throughput` (moebench.serving_case): each case serves many requests through
moeoffload.serving; records carry the workload as part of their identity, an exact policy's served tokens must be
the resident model's, a token-scheduling policy is set against first-come on its own cache, and an
encoder-decoder is skipped with the reason."""


from tests.moebench.suite_runs import run_tiny_suite

from moebench.baseline import comparability
from moebench.serving_case import WORKLOADS, workload_identity
from moebench.table import render

pytest_plugins = ["pytester"]

TINY_SUITE = """
from tests.moeoffload.models import tiny_mixtral, tiny_switch
from moebench.suite import ModelSpec, Suite
from moebench.workload import Workload

SUITE = Suite(name="tiny", models=[ModelSpec("tiny-mixtral", lambda tier, dtype, device: (tiny_mixtral(), "seeded")),
                                   ModelSpec("tiny-switch", lambda tier, dtype, device: (tiny_switch(), "seeded"))],
              budgets=["50%"], policies=["lru", "expertflow"],
              workload=Workload(batch_size=2, prompt_len=6, new_tokens=4))
"""


def _run(pytester, monkeypatch, *args):
    return run_tiny_suite(pytester, monkeypatch, TINY_SUITE, "--moebench-rounds", "2", "-rs", *args)


def test_throughput_run_stores_serving_records_and_sets_expertflow_against_first_come(pytester, monkeypatch):
    result, runs = _run(pytester, monkeypatch, "--moebench-workload", "throughput")
    result.assert_outcomes(passed=3, skipped=3)
    result.stdout.fnmatch_lines(["*serving loop serves decoder-only models*"])  # the encoder-decoder's reason
    assert runs[-1]["options"]["workload"] == "throughput"
    records = {r["policy"]: r for r in runs[-1]["records"]}
    assert set(records) == {"resident", "lru", "expertflow"}
    for r in records.values():
        assert r["workload"]["kind"] == "throughput" and r["workload"]["requests"] == WORKLOADS["quick"].requests
        assert r["tokens_per_s"] > 0 and len(r["samples"]["tokens_per_s"]) == 2
        assert r["finished"] == WORKLOADS["quick"].requests and r["failed"] == 0
    assert records["lru"]["tokens_identical"] is True  # exact, first-come: the resident model's served tokens
    assert records["expertflow"]["scheduler"] == "expertflow"
    assert set(records["expertflow"]["first_come"]) >= {"h2d_bytes_per_token", "experts_per_decode_step"}
    assert "vs first-come" in render(runs[-1]["records"])


def test_a_bad_workload_name_is_a_usage_error(pytester, monkeypatch):
    result, _ = _run(pytester, monkeypatch, "--moebench-workload", "burst")
    assert result.ret == 4
    result.stderr.fnmatch_lines(["*--moebench-workload*invalid choice*burst*"])


def test_a_throughput_record_is_not_comparable_with_a_decode_baseline():
    decode = {"tier": "quick", "workload": {"batch_size": 2, "prompt_len": 16, "new_tokens": 8, "seed": 0}}
    throughput = {"tier": "quick", "workload": workload_identity(WORKLOADS["quick"])}
    fields, reason = comparability(decode, throughput)
    assert fields == ["workload"] and "kind" in reason
    assert comparability(throughput, dict(throughput))[0] == []
