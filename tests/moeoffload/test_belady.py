"""Belady's eviction (farthest next use) is the best any demand cache can do: never below LRU, equal to the
brute-forced optimum on small request sequences."""

import functools
import math

from hypothesis import given, settings
from hypothesis import strategies as st

from moeoffload.cache import ExpertCache
from moeoffload.eviction import make_rule

from .test_cache_properties import filled_store


class SequenceFuture:
    """The future of a request sequence, one request per step (what OracleReplay gives per layer call)."""

    def __init__(self, requests):
        self.requests = requests
        self.now = -1

    def next_use(self, key):
        for i in range(max(self.now, 0), len(self.requests)):
            if self.requests[i] == key:
                return float(i - self.now)
        return math.inf


def hits(requests, slots, rule_name, experts):
    cache = ExpertCache(filled_store(1, experts), slots, "cpu", make_rule(rule_name))
    future = SequenceFuture(requests)
    if rule_name == "belady":
        cache.rule.bind(future)
    for i, key in enumerate(requests):
        future.now = i
        cache.acquire([key])
        cache.release([key])
    return cache.stats.hits


def optimum(requests, slots) -> int:
    """Most hits of any demand cache (evict only on a miss, any victim), by exhaustive search."""

    @functools.cache
    def best(i, resident):
        if i == len(requests):
            return 0
        key = requests[i]
        if key in resident:
            return 1 + best(i + 1, resident)
        if len(resident) < slots:
            return best(i + 1, resident | {key})
        return max(best(i + 1, (resident - {v}) | {key}) for v in resident)

    return best(0, frozenset())


requests_strategy = st.integers(4, 8).flatmap(
    lambda n: st.tuples(st.just(n), st.lists(st.integers(0, n - 1), min_size=1, max_size=40), st.integers(1, n - 1)))


@settings(max_examples=60, deadline=None)
@given(requests_strategy)
def test_belady_never_below_lru_or_lfu(case):
    experts, seq, slots = case
    requests = [(0, e) for e in seq]
    b = hits(requests, slots, "belady", experts)
    assert b >= hits(requests, slots, "lru", experts)
    assert b >= hits(requests, slots, "lfu", experts)


@settings(max_examples=40, deadline=None)
@given(st.integers(3, 5).flatmap(
    lambda n: st.tuples(st.just(n), st.lists(st.integers(0, n - 1), min_size=1, max_size=12), st.integers(1, n - 1))))
def test_belady_equals_brute_forced_optimum(case):
    experts, seq, slots = case
    requests = [(0, e) for e in seq]
    assert hits(requests, slots, "belady", experts) == optimum(tuple(requests), slots)


def test_unbound_belady_behaves_as_lru():
    requests = [(0, e) for e in [0, 1, 2, 0, 3, 0, 1, 2, 3]]
    cache_b = ExpertCache(filled_store(1, 4), 2, "cpu", make_rule("belady"))
    cache_l = ExpertCache(filled_store(1, 4), 2, "cpu", make_rule("lru"))
    for key in requests:
        for c in (cache_b, cache_l):
            c.acquire([key])
            c.release([key])
    assert cache_b.stats.hits == cache_l.stats.hits
