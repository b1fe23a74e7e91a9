"""The serving loop on a fake decoder: completeness and order of results under any scheduler, exact tokens,
continuous batching within the KV budget, bad input, failing schedulers and forwards. Hypothesis drives the
workloads; a ManualClock makes every time exact."""

import warnings

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from moeoffload.errors import BudgetError
from moeoffload.serving import FirstCome, ManualClock, Request, Result, Server, TokenEvent, serve

from .serving_fakes import VOCAB, FakeDecoder, reference


class Shuffled:
    """A legal scheduler in another order: each round reversed, then split."""

    name = "shuffled"

    def plan(self, pool, max_batch):
        ids = [s.id for s in reversed(pool)]
        return [ids[i : i + max_batch] for i in range(0, len(ids), max_batch)]


class Raises:
    name = "raises"

    def plan(self, pool, max_batch):
        raise RuntimeError("scheduler bug")


class Drops:
    """Returns an illegal plan: the first request left out."""

    name = "drops"

    def plan(self, pool, max_batch):
        return [[s.id] for s in pool[1:]]


SCHEDULERS = {"first-come": FirstCome, "shuffled": Shuffled, "raises": Raises, "drops": Drops}

requests_st = st.lists(st.tuples(st.lists(st.integers(0, VOCAB - 1), max_size=9), st.integers(0, 5),
                                 st.floats(0, 20, allow_nan=False)), max_size=8)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(specs=requests_st, budget=st.one_of(st.none(), st.integers(1, 24)), max_batch=st.integers(1, 4),
       chunk=st.integers(1, 5), scheduler=st.sampled_from(sorted(SCHEDULERS)))
def test_every_request_gets_exactly_one_result_with_its_own_tokens(specs, budget, max_batch, chunk, scheduler):
    clock = ManualClock()
    model = FakeDecoder(clock)
    requests = [Request(f"r{i}", p, n, t) for i, (p, n, t) in enumerate(specs)]
    server = Server(model, scheduler=SCHEDULERS[scheduler](), kv_budget=budget, max_batch=max_batch,
                    prefill_chunk=chunk, eos_token_id=None, clock=clock)
    events = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        run = server.run(requests, on_token=events.append)
    assert [r.request_id for r in run.results] == [q.id for q in requests]
    for q, r in zip(requests, run.results):
        never_fits = budget is not None and q.kv_tokens > budget
        if not q.prompt or never_fits:
            assert r.status == "failed" and r.error and r.tokens == [], (q, r)
            continue
        assert r.status == "finished", r
        assert r.tokens == reference(q.prompt, q.max_new_tokens)
        assert r.arrival <= r.admitted <= (r.first_token if r.tokens else r.finished) <= r.finished
        assert r.token_times == sorted(r.token_times) and len(r.token_times) == len(r.tokens)
        assert [e.token for e in events if e.request_id == q.id] == r.tokens
    if scheduler in ("raises", "drops") and any(s.kind == "decode" and len(s.requests) for s in run.steps):
        assert run.scheduler_errors
    for step in run.steps:
        assert step.kind == "prefill" and len(step.requests) == 1 and step.tokens <= chunk or \
            step.kind == "decode" and 1 <= len(step.requests) <= max_batch


def test_stream_yields_tokens_then_one_result_per_request():
    clock = ManualClock()
    events = list(Server(FakeDecoder(clock), eos_token_id=None, clock=clock).stream(
        [Request("a", [1, 2], 3), Request("b", [4], 2)]))
    results = [e for e in events if isinstance(e, Result)]
    assert sorted(r.request_id for r in results) == ["a", "b"]
    for r in results:
        tokens = [e.token for e in events if isinstance(e, TokenEvent) and e.request_id == r.request_id]
        assert tokens == r.tokens
        assert events.index(r) > max(i for i, e in enumerate(events) if isinstance(e, TokenEvent)
                                     and e.request_id == r.request_id)


def test_continuous_batching_admits_a_queued_request_when_another_finishes():
    """KV for two requests at a time: the third starts when the first ends, not when the batch does."""
    clock = ManualClock()
    requests = [Request(0, [1, 2], 2), Request(1, [3, 4], 6), Request(2, [5, 6], 2)]  # 3, 7, 3 KV tokens
    run = Server(FakeDecoder(clock), kv_budget=10, eos_token_id=None, clock=clock).run(requests)
    first, second, third = run.results
    assert all(r.ok for r in run.results)
    assert third.admitted == first.finished < second.finished
    assert third.finished < second.finished


def test_eos_ends_a_request_early():
    prompt = [3, 1]
    full = reference(prompt, 5)
    eos = full[1]
    run = serve(FakeDecoder(), [Request(0, prompt, 5)], eos_token_id=eos, clock=ManualClock())
    assert run.results[0].tokens == reference(prompt, 5, eos=(eos,))
    assert run.results[0].tokens[-1] == eos and len(run.results[0].tokens) <= 2


def test_bad_requests_fail_clearly_and_the_others_finish():
    clock = ManualClock()
    requests = [Request("empty", [], 3), Request("huge", list(range(30)), 4), Request("none", [1, 2], 0),
                Request("fine", [1, 2, 3], 3)]
    run = serve(FakeDecoder(clock), requests, kv_budget=16, eos_token_id=None, clock=clock)
    by_id = {r.request_id: r for r in run.results}
    assert by_id["empty"].status == "failed" and "empty prompt" in by_id["empty"].error
    assert by_id["huge"].status == "failed" and "33 KV tokens" in by_id["huge"].error
    assert "kv_budget" in by_id["huge"].error
    assert by_id["none"].status == "finished" and by_id["none"].tokens == []
    assert by_id["fine"].tokens == reference([1, 2, 3], 3)


def test_a_forward_that_raises_fails_its_requests_only():
    clock = ManualClock()
    model = FakeDecoder(clock, fail_on=lambda ids: bool((ids == 42).any()))
    requests = [Request("bad", [42, 1], 3), Request("good", [1, 2], 3)]
    run = serve(model, requests, eos_token_id=None, clock=clock)
    bad, good = run.results
    assert bad.status == "failed" and "RuntimeError: injected failure" in bad.error
    assert good.ok and good.tokens == reference([1, 2], 3)


def test_a_raising_scheduler_warns_once_and_first_come_serves():
    clock = ManualClock()
    requests = [Request(i, [i + 1], 4) for i in range(5)]
    with pytest.warns(RuntimeWarning, match="scheduler 'raises' failed"):
        run = serve(FakeDecoder(clock), requests, scheduler=Raises(), max_batch=2, eos_token_id=None, clock=clock)
    assert all(r.ok and r.tokens == reference(q.prompt, 4) for q, r in zip(requests, run.results))
    assert run.scheduler_errors and "RuntimeError: scheduler bug" in run.scheduler_errors[0]


def test_arrivals_wait_on_the_clock():
    clock = ManualClock()
    run = serve(FakeDecoder(clock, step_s=0.5, per_token_s=0), [Request("late", [1], 2, arrival=100.0)],
                eos_token_id=None, clock=clock)
    r = run.results[0]
    assert r.admitted == 100.0 and r.first_token == 100.5 and r.finished == 101.0 and r.ttft == 0.5


@pytest.mark.parametrize("bad, match", [
    (dict(max_batch=0), "max_batch must be a positive int"),
    (dict(prefill_chunk=1.5), "prefill_chunk must be a positive int"),
    (dict(kv_budget=0), "positive number of tokens"),
    (dict(kv_budget="50%"), "no total to take a share of"),
    (dict(scheduler="fastest"), "scheduler 'fastest' is unknown"),
])
def test_bad_options_are_refused_with_the_fix(bad, match):
    with pytest.raises((ValueError, BudgetError), match=match):
        Server(FakeDecoder(), **bad)


def test_bad_requests_are_refused_where_they_enter():
    with pytest.raises(ValueError, match="max_new_tokens must be an int >= 0"):
        Request(0, [1], -1)
    with pytest.raises(ValueError, match="arrival must be a time >= 0"):
        Request(0, [1], 1, arrival=float("nan"))
    with pytest.raises(ValueError, match="used twice"):
        serve(FakeDecoder(), [Request(0, [1], 1), Request(0, [2], 1)], clock=ManualClock())
    with pytest.raises(TypeError, match="Request objects"):
        serve(FakeDecoder(), [([1], 1)], clock=ManualClock())
