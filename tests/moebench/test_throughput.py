"""The throughput workload runner: one record per run, first-come and ExpertFlow at one budget, and an I/O floor
that no run of the same steps beats (what the cache moved is never below it)."""

import math

import pytest
import torch
from tests.moeoffload.models import tiny_mixtral

import moeoffload
from moebench.throughput import MOE_GEN, ThroughputWorkload, io_floor_bytes, run_workload
from moebench.workload import Arrivals
from moeoffload import predictors as P
from moeoffload.predictors.expertflow import ExpertFlowPredictor
from moeoffload.serving import ManualClock

SMALL = ThroughputWorkload(requests=6, prompt_tokens=6, new_tokens=3, max_batch=2, prefill_chunk=4)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_moe_gen_is_the_published_workload():
    assert (MOE_GEN.prompt_tokens, MOE_GEN.new_tokens, MOE_GEN.arrivals) == (512, 256, None)


def test_records_of_first_come_and_expertflow_at_one_budget():
    model = tiny_mixtral(seed=1)
    model.set_experts_implementation("eager")
    train = [torch.randint(3, 96, (4, 12), generator=torch.Generator().manual_seed(s)) for s in range(3)]
    predictor = ExpertFlowPredictor.train(P.collect_trace(model, train, 4, show_progress=False), steps=30,
                                          show_progress=False)
    records = []
    for policy, kw in (("lru", {}), ("expertflow", {"predictor": predictor})):
        with moeoffload.offload(model, policy, "50%", **kw):
            records.append(run_workload(model, SMALL, h2d_bandwidth=1e9))
    fc, ef = records
    assert (fc["scheduler"], ef["scheduler"]) == ("first-come", "expertflow")
    for r in records:
        assert r["finished"] == 6 and r["generated_tokens"] == 18 and r["arrivals"] == "offline"
        assert r["h2d_bytes"] >= r["io_floor_bytes"] > 0
        assert r["io_floor_s"] == r["io_floor_bytes"] / 1e9 and r["x_io_floor"] > 0
        assert 0 < r["experts_per_decode_step"] <= r["max_experts_per_decode_step"]
    assert fc["budget_bytes"] == ef["budget_bytes"]


def test_poisson_arrivals_and_a_latency_bound_reach_the_record():
    model = tiny_mixtral(seed=1)
    wl = ThroughputWorkload(requests=3, prompt_tokens=4, new_tokens=2, arrivals=Arrivals(rate_per_s=1.0, requests=3),
                            ttft_bound_s=1e9, tpot_bound_s=1e9)
    with moeoffload.offload(model, "lru", "50%"):
        record = run_workload(model, wl, clock=ManualClock())
    assert record["arrivals"]["rate_per_s"] == 1.0 and record["valid"] is True
    assert math.isnan(record["io_floor_s"])


def test_io_floor_counts_only_what_the_slots_cannot_hold():
    from moeoffload.serving import ServingRun, StepRecord

    steps = [StepRecord("decode", (0,), 1, 0, 1, experts=e, h2d_bytes=0) for e in (10, 3, None, 6)]
    assert io_floor_bytes(ServingRun([], steps, "first-come", None), n_slots=4, expert_bytes=100) == (6 + 2) * 100


@pytest.mark.parametrize("bad, match", [
    (dict(requests=0), "requests must be a positive int"),
    (dict(ttft_bound_s=1.0), "both ttft_bound_s and tpot_bound_s"),
    (dict(requests=2, arrivals=Arrivals(rate_per_s=1.0, requests=3)), "make them equal"),
])
def test_bad_workloads_are_refused(bad, match):
    with pytest.raises(ValueError, match=match):
        ThroughputWorkload(**bad)


def test_an_unoffloaded_model_is_refused():
    with pytest.raises(ValueError, match="moeoffload.offload"):
        run_workload(tiny_mixtral(), SMALL)
