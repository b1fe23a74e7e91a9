"""ExpertStore: one contiguous slab per MoE layer, page-locked once and unlocked exactly once."""

import gc

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from moeoffload.errors import HostMemoryError, MoeOffloadError
from moeoffload.layout import ExpertLayout
from moeoffload.store import ExpertStore

LAYOUT = ExpertLayout(names=("w1", "w2"), shapes=((3, 4), (5,)), dtype=torch.float32)


class FakeHostRegister:
    """Records register/unregister calls; fails the registrations whose order numbers are in `fail_at`."""

    def __init__(self, fail_at: frozenset[int] = frozenset()):
        self.fail_at = fail_at
        self.calls = 0
        self.registered: dict[int, int] = {}  # ptr -> nbytes, currently locked
        self.log: list[tuple[str, int, int]] = []

    def register(self, ptr: int, nbytes: int) -> int:
        self.calls += 1
        if self.calls in self.fail_at:
            return 2  # cudaErrorMemoryAllocation
        assert ptr not in self.registered, "a range registered twice"
        self.registered[ptr] = nbytes
        self.log.append(("register", ptr, nbytes))
        return 0

    def unregister(self, ptr: int) -> int:
        assert ptr in self.registered, "unregister of a range never registered"
        self.log.append(("unregister", ptr, self.registered.pop(ptr)))
        return 0


def expert(tag: float) -> dict[str, torch.Tensor]:
    return {"w1": torch.full((3, 4), tag), "w2": torch.arange(5, dtype=torch.float32) + tag}


def fill(store: ExpertStore, layers=None) -> None:
    for layer in range(store.num_layers) if layers is None else layers:
        for e in range(store.num_experts):
            store.put((layer, e), expert(layer * 100 + e))


def test_one_layer_shares_one_contiguous_storage_without_overlap():
    store = ExpertStore(LAYOUT, 2, 4, pin_memory=False)
    fill(store)
    for layer in range(2):
        bufs = [store.buffer((layer, e)) for e in range(4)]
        base = bufs[0].untyped_storage().data_ptr()
        assert all(b.untyped_storage().data_ptr() == base for b in bufs)
        assert all(b.is_contiguous() and b.dim() == 1 and b.numel() == LAYOUT.numel for b in bufs)
        assert [b.storage_offset() for b in bufs] == [e * LAYOUT.numel for e in range(4)]
    assert store.buffer((0, 0)).untyped_storage().data_ptr() != store.buffer((1, 0)).untyped_storage().data_ptr()
    assert store.pinned_bytes == 0


def test_put_and_views_round_trip_and_rewrite_in_place():
    store = ExpertStore(LAYOUT, 2, 3, pin_memory=False)
    fill(store)
    for layer in range(2):
        for e in range(3):
            for name, t in expert(layer * 100 + e).items():
                assert torch.equal(store.views((layer, e))[name], t)
    ptr = store.buffer((1, 2)).data_ptr()
    store.put((1, 2), expert(-7.0))
    assert store.buffer((1, 2)).data_ptr() == ptr
    assert torch.equal(store.views((1, 2))["w1"], expert(-7.0)["w1"])
    assert torch.equal(store.views((1, 1))["w1"], expert(101)["w1"]), "a rewrite spilled into its neighbour"


def test_unstored_expert_in_an_allocated_layer_is_not_served():
    store = ExpertStore(LAYOUT, 1, 3, pin_memory=False)
    store.put((0, 1), expert(1))
    assert list(store.keys()) == [(0, 1)] and len(store) == 1
    with pytest.raises(KeyError, match="never stored"):
        store.buffer((0, 0))
    with pytest.raises(KeyError, match="outside this store"):
        store.put((1, 0), expert(1))


def test_drop_layer_frees_only_that_layer():
    reg = FakeHostRegister()
    store = ExpertStore(LAYOUT, 3, 2, pin_memory=True, host_register=reg)
    fill(store)
    slab_bytes = 2 * LAYOUT.nbytes
    assert store.pinned_bytes == 3 * slab_bytes
    store.drop_layer(1)
    assert sorted(store.keys()) == [(0, 0), (0, 1), (2, 0), (2, 1)]
    assert store.pinned_bytes == 2 * slab_bytes and len(reg.registered) == 2
    for layer in (0, 2):
        assert torch.equal(store.views((layer, 1))["w1"], expert(layer * 100 + 1)["w1"])
    with pytest.raises(KeyError):
        store.buffer((1, 0))
    store.drop_layer(1)  # dropping an empty layer is a no-op
    fill(store, layers=[1])  # a dropped layer can be filled again
    assert store.pinned_bytes == 3 * slab_bytes


def test_one_register_per_slab_with_its_size_and_one_unregister_each():
    reg = FakeHostRegister()
    store = ExpertStore(LAYOUT, 3, 4, pin_memory=True, host_register=reg)
    fill(store)
    registers = [entry for entry in reg.log if entry[0] == "register"]
    assert len(registers) == 3
    assert all(nbytes == 4 * LAYOUT.nbytes for _, _, nbytes in registers)
    assert {ptr for _, ptr, _ in registers} == {store.buffer((layer, 0)).data_ptr() for layer in range(3)}
    store.drop_layer(0)
    store.clear()
    assert reg.registered == {} and len(reg.log) == 6
    assert store.pinned_bytes == 0 and len(store) == 0
    store.clear()  # twice is harmless
    assert len(reg.log) == 6


def test_a_collected_store_unlocks_its_slabs():
    reg = FakeHostRegister()
    store = ExpertStore(LAYOUT, 2, 2, pin_memory=True, host_register=reg)
    fill(store)
    assert len(reg.registered) == 2
    del store
    gc.collect()
    assert reg.registered == {}, "a store collected without clear() left pages locked"
    assert [entry[0] for entry in reg.log].count("unregister") == 2


def test_registration_failure_raises_a_clear_error_and_changes_nothing():
    reg = FakeHostRegister(fail_at=frozenset({2}))
    store = ExpertStore(LAYOUT, 2, 2, pin_memory=True, host_register=reg)
    fill(store, layers=[0])
    with pytest.raises(HostMemoryError, match=r"could not page-lock .* GiB for MoE layer 1 .*ulimit -l.*pin_memory"):
        store.put((1, 0), expert(5))
    assert issubclass(HostMemoryError, MoeOffloadError)
    assert list(store.keys()) == [(0, 0), (0, 1)] and store.pinned_bytes == 2 * LAYOUT.nbytes
    assert len(reg.registered) == 1
    fill(store, layers=[1])  # the third try succeeds: the store stayed usable
    assert len(store) == 4 and torch.equal(store.views((1, 1))["w1"], expert(101)["w1"])
    store.clear()
    assert reg.registered == {}


def test_a_bad_first_put_leaves_no_locked_slab():
    reg = FakeHostRegister()
    store = ExpertStore(LAYOUT, 1, 2, pin_memory=True, host_register=reg)
    with pytest.raises(ValueError, match="layout expects"):
        store.put((0, 0), {"w1": torch.zeros(2, 2), "w2": torch.zeros(5)})
    assert reg.registered == {} and store.pinned_bytes == 0 and len(store) == 0


ops = st.lists(
    st.one_of(
        st.tuples(st.just("put"), st.integers(0, 2), st.integers(0, 3)),
        st.tuples(st.just("drop"), st.integers(0, 2), st.just(0)),
        st.tuples(st.just("clear"), st.just(0), st.just(0)),
        st.tuples(st.just("fail_next"), st.just(0), st.just(0)),
    ),
    max_size=40,
)


@settings(max_examples=150, deadline=None)
@given(ops=ops, end=st.sampled_from(["clear", "collect"]))
def test_store_matches_a_dict_model_and_pairs_every_lock(ops, end):
    """Under random puts, drops, clears and failed registrations: the store serves exactly what a plain dict
    would, each allocated layer is one locked slab with its experts at their offsets, and every lock is undone."""
    reg = FakeHostRegister()
    store = ExpertStore(LAYOUT, 3, 4, pin_memory=True, host_register=reg)
    model: dict[tuple[int, int], float] = {}
    for i, (op, layer, e) in enumerate(ops):
        if op == "put":
            layer_was_empty = not any(k[0] == layer for k in model)
            try:
                store.put((layer, e), expert(float(i)))
                model[(layer, e)] = float(i)
            except HostMemoryError:
                assert layer_was_empty, "a layer with a slab asked for a second registration"
        elif op == "drop":
            store.drop_layer(layer)
            model = {k: v for k, v in model.items() if k[0] != layer}
        elif op == "clear":
            store.clear()
            model.clear()
        else:
            reg.fail_at = frozenset({reg.calls + 1})
        assert sorted(store.keys()) == sorted(model)
        for key, tag in model.items():
            assert torch.equal(store.views(key)["w2"], expert(tag)["w2"])
            assert store.buffer(key).storage_offset() == key[1] * LAYOUT.numel
        layers = {k[0] for k in model}
        assert store.pinned_bytes == len(layers) * 4 * LAYOUT.nbytes == sum(reg.registered.values())
    if end == "clear":
        store.clear()
    else:
        del store
        gc.collect()
    assert reg.registered == {}
    kinds = [entry[0] for entry in reg.log]
    assert kinds.count("register") == kinds.count("unregister")


@pytest.mark.gpu
def test_registered_slab_is_pinned_and_copies_async_to_cuda():
    layout = ExpertLayout(names=("w",), shapes=((256, 1024),), dtype=torch.bfloat16)
    store = ExpertStore(layout, 2, 4, pin_memory=True)
    g = torch.Generator().manual_seed(0)
    keys = [(layer, e) for layer in range(2) for e in range(4)]
    experts = {key: torch.randn(256, 1024, generator=g).to(torch.bfloat16) for key in keys}
    for key, w in experts.items():
        store.put(key, {"w": w})
    assert store.pinned_bytes == 2 * 4 * layout.nbytes
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        copies = {key: store.buffer(key).to("cuda", non_blocking=True) for key in experts}
    stream.synchronize()
    for key, w in experts.items():
        assert store.buffer(key).is_pinned(), f"expert {key}'s view of a registered slab is not pinned"
        assert torch.equal(copies[key].view(256, 1024).cpu(), w)
    store.clear()
    assert store.pinned_bytes == 0


def test_slab_is_the_layers_experts_in_order_and_refuses_scattered_buffers():

    layout = ExpertLayout(names=("a",), shapes=((2, 3),), dtype=torch.float32)
    store = ExpertStore(layout, 2, 3, pin_memory=False)
    for e in range(3):
        store.put((1, e), {"a": torch.full((2, 3), float(e))})
    slab = store.slab(1)
    assert slab.shape == (3 * 6,) and torch.equal(slab.view(3, 6)[:, 0], torch.tensor([0.0, 1.0, 2.0]))
    scattered = ExpertStore(layout, 1, 2, pin_memory=False)  # buffers set by hand, not one slab (a benchmark's)
    scattered._buffers = {(0, 0): torch.zeros(6), (0, 1): torch.ones(6)}
    with pytest.raises(ValueError, match="not one contiguous slab"):
        scattered.slab(0)
    whole = torch.arange(12.0)
    scattered._buffers = {(0, 0): whole[:6], (0, 1): whole[6:]}
    assert torch.equal(scattered.slab(0), whole)
