"""Per-request latency and run throughput on exact clock times: TTFT, TPOT percentiles, offline and Poisson
arrivals, and the server scenario's verdict on its stated latency bound."""

import math

import numpy as np
import pytest

from moeoffload.serving import (
    LatencyBound,
    ManualClock,
    Request,
    Result,
    ServingRun,
    offline,
    poisson,
    serve,
    summarize,
)

from .serving_fakes import FakeDecoder


def _run(results, steps=()):
    return ServingRun(results, list(steps), "first-come", None)


def test_ttft_counts_queueing_and_tpot_the_gaps_after_the_first_token():
    r = Result(0, "finished", tokens=[1, 2, 3], arrival=1.0, first_token=4.0, finished=8.0,
               token_times=[4.0, 6.0, 8.0])
    assert r.ttft == 3.0 and r.tpot == 2.0
    assert Result(1, "finished", tokens=[1], token_times=[2.0]).tpot is None


def test_summary_percentiles_and_throughput():
    results = [Result(i, "finished", tokens=[0] * 3, arrival=0.0, first_token=1.0 + i, finished=3.0 + 2 * i,
                      token_times=[1.0 + i, 2.0 + 1.5 * i, 3.0 + 2 * i]) for i in range(5)]
    results.append(Result(5, "failed", error="empty prompt", arrival=0.0, finished=0.0))
    s = summarize(_run(results))
    assert (s.requests, s.finished, s.failed, s.failed_ids) == (6, 5, 1, (5,))
    # TPOT of request i: (3 + 2i - (1 + i)) / 2 = 1 + i/2, median 2
    assert s.generated_tokens == 15 and s.duration_s == 11.0 and s.tokens_per_s == 15 / 11.0
    assert s.ttft_p50_s == 3.0 and s.ttft_p99_s == pytest.approx(np.percentile([1, 2, 3, 4, 5], 99))
    assert s.tpot_p50_s == 2.0 and s.valid is None and math.isnan(s.experts_per_decode_step)


def test_a_run_that_misses_its_bound_is_invalid_and_says_why():
    results = [Result(i, "finished", tokens=[0, 0], arrival=0.0, first_token=1.0 * (i + 1), finished=2.0 * (i + 1),
                      token_times=[1.0 * (i + 1), 2.0 * (i + 1)]) for i in range(4)]
    ok = summarize(_run(results), LatencyBound(ttft_s=5.0, tpot_s=5.0))
    assert ok.valid is True and ok.invalid_reason is None
    late = summarize(_run(results), LatencyBound(ttft_s=2.0, tpot_s=5.0, percentile=90))
    assert late.valid is False and "TTFT p90" in late.invalid_reason and "TPOT" not in late.invalid_reason
    none = summarize(_run([Result(0, "failed", error="x")]), LatencyBound(1.0, 1.0))
    assert none.valid is False


def test_latency_bound_refuses_nonsense():
    with pytest.raises(ValueError, match="percentile"):
        LatencyBound(1.0, 1.0, percentile=0)
    with pytest.raises(ValueError, match="seconds must be > 0"):
        LatencyBound(0.0, 1.0)


def test_offline_and_poisson_workloads():
    prompts = [[1, 2]] * 50
    assert all(r.arrival == 0.0 for r in offline(prompts, 4))
    a, b = poisson(prompts, 4, rate=5.0, seed=3), poisson(prompts, 4, rate=5.0, seed=3)
    times = [r.arrival for r in a]
    assert times == [r.arrival for r in b] and times == sorted(times) and times[0] > 0
    assert 0.1 < np.mean(np.diff(times)) < 0.4  # mean gap 1/rate = 0.2 s
    assert times != [r.arrival for r in poisson(prompts, 4, rate=5.0, seed=4)]
    with pytest.raises(ValueError, match="requests per second"):
        poisson(prompts, 4, rate=0)


def test_a_run_on_a_manual_clock_has_exact_latencies():
    """One forward takes 1 s: a lone request's TTFT is one prefill step, its TPOT one decode step."""
    clock = ManualClock()
    requests = [Request(i, [1, 2, 3], 3, arrival=100.0 * i) for i in range(3)]  # no two overlap
    run = serve(FakeDecoder(clock, step_s=1.0, per_token_s=0.0), requests, eos_token_id=None, clock=clock)
    s = summarize(run, LatencyBound(ttft_s=1.0, tpot_s=1.0))
    assert s.ttft_p99_s == 1.0 and s.tpot_p99_s == 1.0 and s.valid
    assert s.duration_s == pytest.approx(run.results[-1].finished - requests[0].arrival)
