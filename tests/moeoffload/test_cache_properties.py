"""Property tests of the expert cache: random budgets, routing sequences, rules and seeds."""

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from moeoffload.cache import CapacityError, ExpertCache
from moeoffload.eviction import EVICTION_RULES, make_rule
from moeoffload.layer import OffloadedMoELayer
from moeoffload.layout import ExpertLayout
from moeoffload.plan import ExecutionPlan
from moeoffload.store import ExpertStore

EXACT_LOOP = ExecutionPlan(device="cpu", kernels="exact", fetch="host", why="as asked")

LAYOUT = ExpertLayout(names=("a", "b"), shapes=((3, 2), (2,)), dtype=torch.float32)


def filled_store(layers: int, experts: int) -> ExpertStore:
    store = ExpertStore(LAYOUT, layers, experts, pin_memory=False)
    for layer in range(layers):
        for expert in range(experts):
            tag = float(layer * 1000 + expert)  # every element of an expert's buffer names it
            store.put((layer, expert), {"a": torch.full((3, 2), tag), "b": torch.full((2,), tag)})
    return store


def tag_of(cache: ExpertCache, slot: int) -> float:
    values = cache.pool[slot].unique()
    assert values.numel() == 1, "a slot holds a mix of two experts"
    return values.item()


shapes = st.tuples(st.integers(1, 4), st.integers(1, 9))


@settings(max_examples=150, deadline=None)
@given(shape=shapes, data=st.data(), rule=st.sampled_from(sorted(EVICTION_RULES)), retain=st.booleans())
def test_budget_residency_and_pins_hold_under_random_requests(shape, data, rule, retain):
    layers, experts = shape
    store = filled_store(layers, experts)
    n_slots = data.draw(st.integers(1, layers * experts), label="slots")
    cache = ExpertCache(store, n_slots, "cpu", make_rule(rule), retain=retain)
    budget = n_slots * store.expert_bytes
    held: list[tuple[int, int]] = []  # acquired, not yet released
    for _ in range(data.draw(st.integers(1, 40), label="steps")):
        layer = data.draw(st.integers(0, layers - 1))
        want = data.draw(st.lists(st.integers(0, experts - 1), min_size=1, max_size=experts))
        keys = [(layer, e) for e in want]
        free_slots = n_slots - len({k for k in held})
        fresh = [k for k in dict.fromkeys(keys) if k not in held]
        try:
            slots = cache.acquire(keys)
        except CapacityError:
            assert len(dict.fromkeys(keys)) > n_slots or len(fresh) > free_slots
            continue
        # every expert handed out is resident, in the slot the cache says, with its own weights
        for key, slot in zip(dict.fromkeys(keys), slots):
            assert tag_of(cache, slot) == key[0] * 1000 + key[1]
        for key in held:  # pinned experts survived whatever this acquire evicted
            assert key in cache.resident()
        held.extend(dict.fromkeys(keys))
        if data.draw(st.booleans(), label="prefetch"):
            guess = data.draw(st.lists(st.integers(0, experts - 1), max_size=experts), label="guess")
            guessed = [(data.draw(st.integers(0, layers - 1)), e) for e in guess]
            already = {k for k in guessed if k in cache.resident()}
            cache.prefetch(guessed)
            for key in held:  # a prefetch never evicts what a computation holds
                assert key in cache.resident()
            assert already <= cache.resident()  # nor a key it was asked for that was already there
        assert cache.pool_bytes <= budget and cache.resident_bytes <= budget
        for table_layer in range(layers):  # the device-routing table: only when nothing can ever move again
            table = cache.resident_table(table_layer, experts)
            if table is not None:
                assert retain and n_slots >= layers * experts
                assert [tag_of(cache, s) for s in table.tolist()] == [table_layer * 1000 + e for e in range(experts)]
        if data.draw(st.booleans(), label="release"):
            cache.release(keys)
            for k in dict.fromkeys(keys):
                held.remove(k)
    s = cache.stats
    assert s.hits + s.misses == s.requests
    assert cache.transfer.stats.bytes == (s.misses + s.prefetches) * store.expert_bytes


@settings(max_examples=100, deadline=None)
@given(shape=shapes, data=st.data(), rule=st.sampled_from(sorted(EVICTION_RULES)))
def test_layer_output_is_independent_of_cache_size(shape, data, rule):
    """The layer computes with whatever slots it gets, in waves: any budget gives the same output."""
    layers, experts = shape
    store = filled_store(layers, experts)
    tokens = data.draw(st.integers(1, 12))
    top_k = data.draw(st.integers(1, min(2, experts)))
    seed = data.draw(st.integers(0, 2**16))
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(tokens, 2, generator=g)
    index = torch.stack([torch.randperm(experts, generator=g)[:top_k] for _ in range(tokens)])
    weights = torch.rand(tokens, top_k, generator=g)

    def ffn(x, w):
        return x @ w["a"].T @ w["a"] + w["b"]

    layer_idx = data.draw(st.integers(0, layers - 1), label="layer")
    outs = []
    for n_slots in sorted({1, max(1, experts // 2), layers * experts}):
        cache = ExpertCache(store, n_slots, "cpu", make_rule(rule))
        layer = OffloadedMoELayer(layer_idx, experts, cache, ffn, EXACT_LOOP)
        outs.append(layer(hidden, index, weights))
        assert not any(cache.is_pinned(k) for k in cache.resident())
    for out in outs[1:]:
        assert torch.equal(out, outs[0])


def use(cache, key):
    cache.acquire([key])
    cache.release([key])


def test_lru_and_lfu_pick_the_textbook_victims():
    store = filled_store(1, 4)
    for rule, expected in [("lru", (0, 0)), ("lfu", (0, 2))]:
        cache = ExpertCache(store, 3, "cpu", make_rule(rule))
        for e in [0, 1, 0, 2, 1, 1]:  # counts 0:2 1:3 2:1 ; recency order 0, 2, 1
            use(cache, (0, e))
        use(cache, (0, 3))
        evicted = ({(0, 0), (0, 1), (0, 2)} - cache.resident()).pop()
        assert evicted == expected, (rule, evicted)


def test_pinned_expert_is_never_evicted():
    store = filled_store(1, 3)
    cache = ExpertCache(store, 2, "cpu", make_rule("lru"))
    cache.acquire([(0, 0)])  # pinned
    use(cache, (0, 1))
    use(cache, (0, 2))  # must evict (0,1), not the pinned (0,0)
    assert (0, 0) in cache.resident() and (0, 1) not in cache.resident()
    cache.acquire([(0, 2)])
    try:
        cache.acquire([(0, 1)])
    except CapacityError as exc:
        assert "pinned" in str(exc)
    else:
        raise AssertionError("acquire succeeded with every slot pinned")
