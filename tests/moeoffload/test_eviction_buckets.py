"""LFU and prior-frequency keep their residents in score buckets (moeoffload.eviction.ScoreBuckets), and Belady
stops at the least recent key never needed again, or, bound to the oracle, pops the farthest from a heap, instead of
scoring every resident per eviction; they must choose
exactly the victims of the plain definition: among the allowed keys the lowest score (Belady: the farthest next
use), and among those the least recently inserted or accessed."""

import math
from unittest import mock

from hypothesis import given, settings
from hypothesis import strategies as st

from moeoffload.eviction import LFU, Belady, PriorFrequency
from moeoffload.predictors.oracle import OracleReplay
from moeoffload.predictors.traces import CallTrace

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


def replay(rule, ops, score, on_use=None, bind=None, events=None, view=set):
    """Apply `ops` to `rule` and to a plain recency list side by side; every victim must match the definition.
    `bind` = (position in ops, callable): called before that operation (a prior bound mid-run). `events`: op name
    -> callable for ops that move the future, not the cache. `view`: how the candidates are handed to the rule."""
    resident: list = []  # recency order, oldest first
    for i, (op, key, allowed) in enumerate(ops):
        if bind is not None and i == bind[0]:
            bind[1]()
        if events is not None and op in events:
            events[op]()
            continue
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
                    assert rule.victim(view(subset)) == reference_victim(resident, score, subset)
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


class Evictable(set):
    """A set the rules treat as the cache's lazy view of evictable keys (what turns on Belady's heap)."""

    fast_membership = True


@settings(max_examples=300, deadline=None)
@given(calls=st.lists(st.tuples(st.integers(0, 2), st.sets(st.integers(0, 3), min_size=1)), min_size=1,
                      max_size=30),
       ops=st.lists(st.tuples(st.sampled_from(["insert", "access", "remove", "victim", "advance", "advance",
                                               "diverge"]),
                              st.sampled_from(KEYS), st.sets(st.sampled_from(KEYS))), min_size=20, max_size=120),
       rebuild_after=st.sampled_from([0, 2, 256]))
def test_belady_heap_on_the_oracles_positions_matches_the_definition(calls, ops, rebuild_after):
    """Bound to the oracle (which gives positions), Belady pops the farthest from a heap that is brought up to date
    only for the keys whose next use moved; its victims must be the definition's at every cursor, through
    pins, removals, re-accesses, heap rebuilds and the oracle stepping aside."""
    future = OracleReplay(CallTrace([(layer, tuple(sorted(e))) for layer, e in calls], past_end="lru"), None,
                          prefetch=False)
    rule = Belady()
    rule.bind(future)

    def advance():
        nxt = future.cursor + 1
        future.tap(calls[nxt][0] if nxt < len(calls) else 0, None, None, None)

    def diverge():
        future.diverged = True

    with mock.patch("moeoffload.predictors.oracle.REBUILD_AFTER_CALLS", rebuild_after):
        replay(rule, ops, lambda k: -future.next_use(k), events={"advance": advance, "diverge": diverge},
               view=Evictable)


def test_belady_heap_follows_a_resident_whose_next_use_moved_on():
    """Expert (0, 0) is needed at calls 0 and 3, (1, 0) at call 2: once the cursor passes call 0, (0, 0) is the
    farther one, though nothing touched it since it was inserted."""
    future = OracleReplay(CallTrace([(0, (0,)), (2, (1,)), (1, (0,)), (0, (0,))]), None, prefetch=False)
    rule = Belady()
    rule.bind(future)
    rule.on_insert((0, 0))
    rule.on_insert((1, 0))
    assert rule.victim(Evictable({(0, 0), (1, 0)})) == (1, 0)  # cursor before call 0: (0, 0) is needed first
    future.tap(0, None, None, None)
    future.tap(2, None, None, None)  # past call 0: (0, 0) is next needed at call 3, after (1, 0) at call 2
    assert rule.victim(Evictable({(0, 0), (1, 0)})) == (0, 0)
