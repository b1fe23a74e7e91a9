"""The decayed-frequency rule (`eviction.DecayedLFU`, the `hybrid` policy's): uses fade with a half-life in decode
steps, so an expert used often long ago leaves before one used a little just now; its growing-unit bookkeeping and
its rescaling choose exactly the victims of the decayed sums."""

from hypothesis import given, settings
from hypothesis import strategies as st

from moeoffload.eviction import LFU, DecayedLFU

KEYS = [(layer, e) for layer in range(3) for e in range(4)]


def steps(rule, layers=3):
    for layer in range(layers):
        getattr(rule, "on_layer", lambda _: None)(layer)  # plain LFU has no steps


def test_old_popularity_fades_where_plain_lfu_keeps_it():
    old, new = (0, 0), (0, 1)
    decayed, plain = DecayedLFU(), LFU()
    for rule in (decayed, plain):
        steps(rule)
        rule.on_insert(old)
        for _ in range(5):  # five uses in the first step
            rule.on_access(old)
        for _ in range(20):  # 20 steps later: 5 half-lives
            steps(rule)
        rule.on_insert(new)
        rule.on_access(new)  # two uses now
    assert plain.victim({old, new}) == new
    assert decayed.victim({old, new}) == old


class HalfEachStep(DecayedLFU):
    """A half-life of one step: every score is a sum of powers of two, so the decayed sums below are exact and ties
    are ties in both forms."""

    HALF_LIFE_STEPS = 1.0


def reference(ops):
    """The decayed sums written out: every score halved at each new step."""
    score: dict = {}
    recency: list = []
    last_layer = -1
    victims = []
    for op, key, allowed, layer in ops:
        if op == "layer":
            if layer <= last_layer:
                score = {k: v / 2 for k, v in score.items()}
            last_layer = layer
        elif op == "insert" and key not in recency or op == "access" and key in recency:
            score[key] = score.get(key, 0.0) + 1.0
            if key in recency:
                recency.remove(key)
            recency.append(key)
        elif op == "remove" and key in recency:
            recency.remove(key)
        elif op == "victim" and allowed & set(recency):
            candidates = [k for k in recency if k in allowed]
            low = min(score[k] for k in candidates)
            victims.append(next(k for k in candidates if score[k] == low))
    return victims


def run(rule, ops):
    recency: list = []
    victims = []
    for op, key, allowed, layer in ops:
        if op == "layer":
            rule.on_layer(layer)
        elif op == "insert" and key not in recency:
            rule.on_insert(key)
            recency.append(key)
        elif op == "access" and key in recency:
            rule.on_access(key)
            recency.remove(key)
            recency.append(key)
        elif op == "remove" and key in recency:
            rule.on_remove(key)
            recency.remove(key)
        elif op == "victim" and allowed & set(recency):
            victims.append(rule.victim({k for k in recency if k in allowed}))
    return victims


operations = st.lists(st.tuples(st.sampled_from(["insert", "access", "access", "remove", "victim", "layer", "layer"]),
                                st.sampled_from(KEYS), st.sets(st.sampled_from(KEYS)), st.integers(0, 2)),
                      min_size=20, max_size=120)


@settings(max_examples=200, deadline=None)
@given(ops=operations)
def test_victims_are_the_lowest_decayed_sum_then_the_least_recent(ops):
    assert run(HalfEachStep(), ops) == reference(ops)


@settings(max_examples=100, deadline=None)
@given(ops=operations)
def test_rescaling_changes_no_victim(ops):
    class Rescaling(HalfEachStep):
        RESCALE_AT = 3.0  # rescale every other step

    assert run(Rescaling(), ops) == run(HalfEachStep(), ops)
