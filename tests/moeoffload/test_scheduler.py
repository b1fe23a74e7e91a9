"""Token scheduler: a bijection that is undone exactly, never worse than first-come, and output-neutral."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from moeoffload.scheduler import Schedule, compare, experts_per_batch, first_come, group_by_route

from .models import tiny_mixtral


@st.composite
def pools(draw, max_n=40):
    n = draw(st.integers(0, max_n))
    batch_size = draw(st.integers(1, 9))
    layers, experts = draw(st.integers(1, 4)), draw(st.integers(1, 12))
    seed = draw(st.integers(0, 2**31 - 1))
    density = draw(st.sampled_from([0.05, 0.2, 0.5]))
    gen = torch.Generator().manual_seed(seed)
    routes = torch.rand(n, layers, experts, generator=gen) < density
    return routes, batch_size


@settings(max_examples=200, deadline=None)
@given(pools())
def test_schedule_is_a_bijection_with_first_come_batch_sizes_and_is_undone_exactly(pool):
    routes, batch_size = pool
    n = routes.shape[0]
    sched = group_by_route(routes, batch_size)
    assert sorted(sched.order) == list(range(n))
    assert [len(b) for b in sched.batches] == [len(b) for b in first_come(n, batch_size).batches]
    assert [sched.order[p] for p in sched.inverse] == list(range(n))
    items = torch.arange(n) * 10 + 3
    assert torch.equal(sched.restore(items[list(sched.order)]), items)
    assert torch.equal(sched.restore(sched.split(items)), items)  # one output tensor per batch


@settings(max_examples=200, deadline=None)
@given(pools())
def test_schedule_never_activates_more_experts_than_first_come_on_its_routes(pool):
    routes, batch_size = pool
    gain = compare(routes, batch_size)
    assert gain.scheduled <= gain.first_come
    assert gain.batches == len(first_come(routes.shape[0], batch_size).batches)


def test_schedule_groups_sequences_of_a_structured_trace():
    """Four request types, each with its own experts, arriving interleaved: first-come batches mix all four,
    the scheduler puts each type together."""
    gen = torch.Generator().manual_seed(0)
    layers, experts, types = 4, 16, 4
    routes = torch.zeros(64, layers, experts, dtype=torch.bool)
    for i in range(64):
        t = i % types
        routes[i, :, 4 * t : 4 * t + 2] = True  # the type's experts
        routes[i, torch.arange(layers), torch.randint(4 * t, 4 * t + 4, (layers,), generator=gen)] = True
    gain = compare(routes, batch_size=8)
    assert gain.first_come > 3.5 * layers * 3  # every batch holds every type
    assert gain.scheduled <= layers * 4  # one type a batch: at most its 4 experts per layer
    assert gain.reduction > 0.6
    assert all(len({i % types for i in batch}) == 1 for batch in group_by_route(routes, 8).batches)


def test_experts_per_batch_counts_distinct_layer_expert_pairs():
    routes = torch.zeros(3, 2, 4, dtype=torch.bool)
    routes[0, 0, 1] = routes[1, 0, 1] = routes[1, 1, 3] = routes[2, 0, 0] = True
    assert experts_per_batch(first_come(3, 2), routes) == [2, 1]
    assert experts_per_batch(Schedule(((0, 2), (1,))), routes) == [2, 2]


def test_bad_input_names_the_problem():
    with pytest.raises(ValueError, match="exactly once"):
        Schedule(((0, 1), (1,)))
    with pytest.raises(ValueError, match="batch_size"):
        first_come(4, 0)
    with pytest.raises(TypeError, match="boolean tensor"):
        group_by_route([[True]], 2)
    with pytest.raises(ValueError, match="2 routes for a schedule of 3"):
        experts_per_batch(first_come(3, 2), torch.ones(2, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="outputs for a schedule"):
        first_come(3, 2).restore(torch.zeros(2))


_MODEL = None


def _model():
    global _MODEL
    if _MODEL is None:
        _MODEL = tiny_mixtral(seed=3)
    return _MODEL


def _generate(model, ids):
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=3, min_new_tokens=3,
                             do_sample=False)
    return out[:, -3:]


@settings(max_examples=3, deadline=None)
@given(st.integers(3, 6), st.integers(2, 3), st.integers(0, 2**31 - 1))
def test_outputs_under_a_schedule_restored_equal_first_come_outputs(n, batch_size, seed):
    model = _model()
    gen = torch.Generator().manual_seed(seed)
    pool = torch.randint(2, 96, (n, 5), generator=gen)
    routes = torch.rand(n, 2, 8, generator=gen) < 0.3
    sched = group_by_route(routes, batch_size)
    if sched == first_come(n, batch_size):  # make sure the order really changes
        sched = Schedule(tuple(reversed(first_come(n, batch_size).batches)))
    fc = torch.cat([_generate(model, batch) for batch in first_come(n, batch_size).split(pool)])
    scheduled = sched.restore([_generate(model, batch) for batch in sched.split(pool)])
    assert torch.equal(scheduled, fc)
