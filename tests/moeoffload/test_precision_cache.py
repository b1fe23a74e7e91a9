"""PrecisionCaches: both precisions of one expert resident at once, and every hit, miss and byte counted once."""

from collections import OrderedDict

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from moeoffload.cache import ExpertCache, PrecisionCaches
from moeoffload.eviction import make_rule
from moeoffload.layout import ExpertLayout
from moeoffload.store import ExpertStore

LAYOUT = ExpertLayout(("up", "down"), ((4, 32), (2, 16)), torch.float32)


def filled_store(layers: int, experts: int) -> ExpertStore:
    store = ExpertStore(LAYOUT, layers, experts, pin_memory=False)
    g = torch.Generator().manual_seed(layers * 100 + experts)
    for key in [(layer, e) for layer in range(layers) for e in range(experts)]:
        store.put(key, {n: torch.randn(s, generator=g) for n, s in zip(LAYOUT.names, LAYOUT.shapes)})
    return store


class Model:
    """LRU per precision, the rule PrecisionCaches is documented to follow."""

    def __init__(self, slots: dict[str, int]):
        self.slots = slots
        self.lru = {p: OrderedDict() for p in slots}
        self.hits = dict.fromkeys(slots, 0)
        self.misses = dict.fromkeys(slots, 0)
        self.upgrades = 0

    def request(self, key, wanted: str) -> str:
        order = list(self.slots)
        served = next((p for p in order[: order.index(wanted) + 1] if key in self.lru[p]), wanted)
        lru = self.lru[served]
        if key in lru:
            self.hits[served] += 1
            lru.move_to_end(key)
            return served
        if any(key in self.lru[p] for p in order):
            self.upgrades += 1
        self.misses[served] += 1
        if len(lru) == self.slots[served]:
            lru.popitem(last=False)
        lru[key] = None
        return served


@settings(max_examples=120, deadline=None)
@given(shape=st.tuples(st.integers(1, 3), st.integers(1, 6)), data=st.data(), low=st.sampled_from(["int8", "int4"]))
def test_bookkeeping_is_exact_with_both_precisions_resident(shape, data, low):
    layers, experts = shape
    store = filled_store(layers, experts)
    slots = {"full": data.draw(st.integers(1, layers * experts)), low: data.draw(st.integers(1, layers * experts))}
    caches = PrecisionCaches({p: ExpertCache(store if p == "full" else store.low_precision(p), n, "cpu",
                                             make_rule("lru")) for p, n in slots.items()})
    model = Model(slots)
    requests = data.draw(st.lists(st.tuples(st.integers(0, layers - 1), st.integers(0, experts - 1),
                                            st.sampled_from(["full", low])), max_size=60))
    for layer, expert, wanted in requests:
        key = (layer, expert)
        precision, slot = caches.acquire(key, wanted)
        assert precision == model.request(key, wanted)
        assert precision == "full" or wanted == low  # never less precise than asked
        cache = caches.caches[precision]
        assert torch.equal(cache.pool[slot], cache.store.buffer(key))  # the slot holds that expert, that precision
        caches.release(key, precision)
        assert caches.resident() == {p: set(lru) for p, lru in model.lru.items()}
    assert caches.upgrades == model.upgrades
    for precision, cache in caches.caches.items():
        stats = cache.stats
        assert (stats.hits, stats.misses) == (model.hits[precision], model.misses[precision])
        assert cache.transfer.stats.bytes == model.misses[precision] * cache.store.expert_bytes
        assert not any(cache.is_pinned(k) for k in cache.resident())


def test_the_quantized_copies_are_made_once_and_go_with_the_store():
    store = filled_store(2, 3)
    int4 = store.low_precision("int4")
    assert store.low_precision("int4") is int4 and len(int4) == 6
    assert int4.expert_bytes < store.expert_bytes
    store.drop_layer(0)
    assert sorted(int4.keys()) == [(1, 0), (1, 1), (1, 2)]
    store.clear()
    assert len(int4) == 0
