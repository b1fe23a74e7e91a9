"""The next-use eviction rule (Belady's choice for the decode cycle) and the cache's guard for a call's own keys."""

from hypothesis import given, settings
from hypothesis import strategies as st

from moeoffload.cache import ExpertCache
from moeoffload.eviction import NextUse, make_rule

from .test_cache_properties import filled_store


def decode_steps(cache: ExpertCache, layers: int, used, steps: int) -> list[int]:
    """Run `steps` decode steps; `used(step, layer)` lists the experts a layer needs. Misses per step."""
    misses = []
    for step in range(steps):
        before = cache.stats.misses
        for layer in range(layers):
            keys = [(layer, e) for e in used(step, layer)]
            cache.enter_layer(layer)
            cache.acquire(keys)
            cache.release(keys)
        misses.append(cache.stats.misses - before)
    return misses


@settings(max_examples=60, deadline=None)
@given(layers=st.integers(2, 6), experts=st.integers(1, 6), data=st.data())
def test_next_use_misses_the_minimum_when_every_expert_is_used_every_step(layers, experts, data):
    """A large batch touches every expert of every layer each step, in layer order. A hit must stay cached for a
    whole cycle, so while layer l computes its E experts the cache also holds every later hit of the other layers:
    hits of the other layers <= C - E for each l, hence misses per step >= L*E - (C - E) * L / (L - 1) for any
    rule. Next-use meets that bound within one expert a step (whole experts); LRU never does better."""
    total = layers * experts
    slots = data.draw(st.integers(experts, total - 1), label="slots")
    every = lambda step, layer: range(experts)  # noqa: E731
    store = filled_store(layers, experts)
    next_use = decode_steps(ExpertCache(store, slots, "cpu", make_rule("next-use")), layers, every, 14)
    lru = decode_steps(ExpertCache(store, slots, "cpu", make_rule("lru")), layers, every, 14)
    assert next_use[0] == total and lru[0] == total  # a cold cache misses everything once
    bound = total - (slots - experts) * layers / (layers - 1)
    steady = next_use[2:]  # a few steps settle into the rotation
    assert sum(steady) / len(steady) <= bound + 1, (next_use, bound)
    assert sum(lru[1:]) >= sum(next_use[1:]), (lru, next_use)


def test_mixtral_shape_at_75_percent_lru_misses_everything_next_use_a_quarter():
    """Mixtral-8x7B at batch 16 (32 layers x 8 experts, all used each step) with 192 slots: the full-size case."""
    store = filled_store(32, 8)
    every = lambda step, layer: range(8)  # noqa: E731
    lru = decode_steps(ExpertCache(store, 192, "cpu", make_rule("lru")), 32, every, 4)
    next_use = decode_steps(ExpertCache(store, 192, "cpu", make_rule("next-use")), 32, every, 4)
    assert lru[1:] == [256, 256, 256]
    assert max(next_use[1:]) <= 256 - (192 - 8) * 32 / 31 + 1  # 66.1: the bound of the test above


def test_next_use_evicts_the_layer_just_computed_first():
    rule = NextUse()
    for layer in range(4):
        rule.on_layer(layer)
        rule.on_insert((layer, 0))
    rule.on_layer(0)  # a new step: layer 0 computes again, so layer 3 (just done) is needed last, layer 1 next
    assert rule.victim([(1, 0), (2, 0), (3, 0)]) == (3, 0)
    assert rule.score((1, 0)) < rule.score((2, 0)) < rule.score((3, 0))


def test_next_use_prefers_to_evict_an_expert_its_layer_skipped():
    rule = NextUse()
    for step in range(3):
        for layer in range(2):
            rule.on_layer(layer)
            (rule.on_insert if step == 0 else rule.on_access)((layer, 0))
            if step == 0:
                rule.on_insert((layer, 1))  # used once, then skipped by two visits of its layer
    rule.on_layer(0)
    # same distance (layer 1), but (1, 1) was not used at its layer's last two visits
    assert rule.victim([(1, 0), (1, 1)]) == (1, 1)


def test_a_prefetched_expert_counts_for_its_layers_next_visit():
    rule = NextUse()
    for layer in range(3):
        rule.on_layer(layer)
        rule.on_insert((layer, 0))
    rule.on_layer(0)
    rule.on_insert((1, 5))  # prefetched for layer 1 while layer 0 computes: not a skipped expert
    assert rule.score((1, 5)) == rule.score((1, 0))


def test_without_layer_signals_next_use_is_lru():
    store = filled_store(1, 4)
    cache = ExpertCache(store, 3, "cpu", make_rule("next-use"))
    for e in [0, 1, 2, 0]:
        cache.acquire([(0, e)])
        cache.release([(0, e)])
    cache.acquire([(0, 3)])
    assert (0, 1) not in cache.resident()


def test_a_miss_never_evicts_an_expert_of_the_same_call():
    """Acquiring [miss, hit] with a full cache must evict some other expert, not the hit it is about to use."""
    store = filled_store(1, 4)
    cache = ExpertCache(store, 3, "cpu", make_rule("lru"))
    for e in [1, 2, 3]:  # expert 1 is now the least recently used
        cache.acquire([(0, e)])
        cache.release([(0, e)])
    cache.acquire([(0, 0), (0, 1)])  # 0 misses; LRU's victim would be 1, which this call needs
    assert cache.stats.hits == 1 and cache.stats.misses == 4
    assert {(0, 0), (0, 1)} <= cache.resident()


@settings(max_examples=100, deadline=None)
@given(data=st.data(), layers=st.integers(1, 5), experts=st.integers(1, 5))
def test_next_use_victim_is_the_highest_score_among_all_candidates(data, layers, experts):
    """The fast victim (each layer's oldest evictable key) equals scoring every candidate, ties to the oldest."""
    rule, resident, order = NextUse(), set(), []
    keys = [(lay, e) for lay in range(layers) for e in range(experts)]
    for _ in range(data.draw(st.integers(1, 40), label="events")):
        kind = data.draw(st.sampled_from(["layer", "use", "remove"]))
        if kind == "layer":
            rule.on_layer(data.draw(st.integers(0, layers - 1)))
            continue
        key = data.draw(st.sampled_from(keys))
        if kind == "remove":
            if key in resident:
                resident.discard(key)
                order.remove(key)
                rule.on_remove(key)
            continue
        (rule.on_access if key in resident else rule.on_insert)(key)
        resident.add(key)
        if key in order:
            order.remove(key)
        order.append(key)
    if not resident:
        return
    allowed = set(data.draw(st.lists(st.sampled_from(sorted(resident)), min_size=1), label="allowed"))
    top = max(rule.score(k) for k in allowed)
    expected = next(k for k in order if k in allowed and rule.score(k) == top)
    assert rule.victim(allowed) == expected
