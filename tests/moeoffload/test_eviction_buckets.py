"""LFU and prior-frequency keep their residents in score buckets (moeoffload.eviction.ScoreBuckets), and Belady
stops at the least recent key never needed again, instead of scoring every resident per eviction; they must choose
exactly the victims of the plain definition: among the allowed keys the lowest score (Belady: the farthest next
use), and among those the least recently inserted or accessed."""

import math

from hypothesis import given, settings
from hypothesis import strategies as st

from moeoffload.eviction import LFU, Belady, PriorFrequency

KEYS = [(layer, e) for layer in range(3) for e in range(4)]


class Prior:
    def __init__(self, values):
        self.values = values

    def frequency(self, key):
        return self.values[KEYS.index(key)]


def reference_victim(order, score, allowed):
    """The definition: `order` is recency (oldest first) of the resident keys, `score` their scores (lowest leaves)."""
    candidates = [k for k in order if k in allowed]
    lowest = min(score(k) for k in candidates)
    return next(k for k in candidates if score(k) == lowest)


operations = st.lists(st.tuples(st.sampled_from(["insert", "access", "remove", "victim"]), st.sampled_from(KEYS),
                                st.sets(st.sampled_from(KEYS))), min_size=20, max_size=80)


def replay(rule, ops, score, on_use=None, bind=None):
    """Apply `ops` to `rule` and to a plain recency list side by side; every victim must match the definition.
    `bind` = (position in ops, callable): called before that operation (a prior bound mid-run)."""
    resident: list = []  # recency order, oldest first
    for i, (op, key, allowed) in enumerate(ops):
        if bind is not None and i == bind[0]:
            bind[1]()
        if op == "insert" and key not in resident:
            rule.on_insert(key)
            resident.append(key)
        elif op == "access" and key in resident:
            rule.on_access(key)
            resident.remove(key)
            resident.append(key)
        elif op == "remove" and key in resident:
            rule.on_remove(key)
            resident.remove(key)
            continue
        elif op == "victim":  # among every resident, and among the drawn subset of them (pins excluded)
            for subset in (set(resident), allowed & set(resident)):
                if subset:
                    assert rule.victim(subset) == reference_victim(resident, score, subset)
            continue
        else:
            continue
        if on_use is not None:
            on_use(key)


@settings(max_examples=200, deadline=None)
@given(ops=operations)
def test_lfu_picks_the_least_used_then_the_least_recent(ops):
    counts: dict = {}

    def use(key):
        counts[key] = counts.get(key, 0) + 1

    replay(LFU(), ops, lambda k: counts.get(k, 0), on_use=use)


@settings(max_examples=200, deadline=None)
@given(ops=operations, values=st.lists(st.sampled_from([0.0, 1.0, 2.5, 7.0]), min_size=len(KEYS),
                                       max_size=len(KEYS)), bind_at=st.floats(0, 1))
def test_prior_frequency_picks_the_rarest_then_the_least_recent(ops, values, bind_at):
    """Bound at any point of the sequence: before `bind` the rule is LRU, after it every resident is scored."""
    rule, prior, bound = PriorFrequency(), Prior(values), []

    def bind():
        rule.bind(prior)
        bound.append(True)

    replay(rule, ops, lambda k: prior.frequency(k) if bound else 0.0, bind=(int(bind_at * len(ops)), bind))


@settings(max_examples=200, deadline=None)
@given(ops=operations, distances=st.lists(st.sampled_from([0.0, 1.0, 3.0, math.inf]), min_size=len(KEYS),
                                          max_size=len(KEYS)))
def test_belady_picks_the_farthest_next_use_then_the_least_recent(ops, distances):
    rule = Belady()
    future = Prior(distances)
    future.next_use = future.frequency
    rule.bind(future)
    replay(rule, ops, lambda k: -future.next_use(k))
