"""fetch="device": the cache directory on the device makes the host cache's choices (LRU and next-use), slot for
slot, and a model served through it computes what the host path computes.

The directory's Triton kernels run here through Triton's interpreter (a subprocess with TRITON_INTERPRET=1); their
CUDA run, with experts streamed from mapped host memory, is in test_directory_gpu.py.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import moeoffload
from moeoffload.cache import ExpertCache
from moeoffload.eviction import make_rule

from .models import tiny_mixtral
from .test_cache_properties import filled_store, tag_of


def host_and_device(layers, experts, n_slots, backend="torch", mover="cpu", eviction="lru"):
    """Two caches over one store: the host's, and fetch="device" whose bytes move in place ("cpu") or through a
    Courier thread ("copy-engine": the CUDA protocol, with a condition variable for the flag)."""
    store = filled_store(layers, experts)
    host = ExpertCache(store, n_slots, "cpu", make_rule(eviction))
    device = ExpertCache(store, n_slots, "cpu", make_rule(eviction), fetch="device")
    device.directory.backend = backend
    device.mover = mover
    return store, host, device


def step(host: ExpertCache, device: ExpertCache, layer: int, ids: list[list[int]], experts: int,
         guess: tuple[int, list[list[int]]] | None = None) -> None:
    """One layer call on both caches, with a prefetch of `guess` (next layer, guessed ids) as the layers make it
    (the host's after the call's acquire, when it needs any expert); then the same residency, slot for slot, and
    the right weights in each slot."""
    wanted = sorted({i for row in ids for i in row if 0 <= i < experts})
    keys = [(layer, e) for e in wanted]
    host.enter_layer(layer)  # as a layer on the host path does (the device's lookup counts its layer's start)
    host.acquire(keys)
    if guess is not None and wanted:
        host.prefetch([(guess[0], e) for e in sorted({i for row in guess[1] for i in row})])
    host.release(keys)
    ahead = None if guess is None else (lambda: (guess[0], torch.tensor(guess[1], dtype=torch.int64)))
    row = device.fetch_on_device(layer, torch.tensor(ids, dtype=torch.int64), ahead)
    for e in wanted:  # the layer's table row names a slot for every expert the call needs
        assert row[e].item() >= 0
    assert row[experts].item() == device.n_slots  # and ends with the "no expert" sentinel
    assert device.slot_of() == host.slot_of()
    for key, slot in device.slot_of().items():
        assert tag_of(device, slot) == key[0] * 1000 + key[1]


routing = st.tuples(st.integers(1, 4), st.integers(2, 9), st.data())


@pytest.mark.parametrize("eviction", ["lru", "next-use"])
@pytest.mark.parametrize("mover", ["cpu", "copy-engine"])
@settings(max_examples=120, deadline=None)
@given(shape=routing)
def test_device_directory_evicts_as_the_host_cache(mover, eviction, shape):
    layers, experts, data = shape
    tokens = data.draw(st.integers(1, 4), label="tokens")
    top_k = data.draw(st.integers(1, min(3, experts)), label="top_k")
    # every expert one call may name fits at once (the layer takes the host path otherwise)
    n_slots = data.draw(st.integers(min(experts, tokens * top_k), layers * experts), label="slots")
    store, host, device = host_and_device(layers, experts, n_slots, mover=mover, eviction=eviction)
    prefetching = data.draw(st.booleans(), label="prefetch")
    cyclic = data.draw(st.booleans(), label="layers in decode order")  # next-use's case; else any order
    by_host = 0  # copies made by host-path calls, not the courier
    for call in range(data.draw(st.integers(1, 30), label="calls")):
        layer = call % layers if cyclic else data.draw(st.integers(0, layers - 1))
        ids = [data.draw(st.lists(st.integers(-1, experts), min_size=top_k, max_size=top_k)) for _ in range(tokens)]
        guess = draw_guess(data, layers, experts, tokens, top_k) if prefetching else None
        step(host, device, layer, ids, experts, guess)
        if data.draw(st.booleans(), label="host reads in between"):
            assert device.stats.misses == host.stats.misses
        if eviction == "next-use" and data.draw(st.booleans(), label="a host-path call in between"):
            by_host += host_path_call(host, device, data.draw(st.integers(0, layers - 1)), experts)
    d, h = device.stats, host.stats
    assert counts(d) == counts(h)
    moved = (h.misses + h.prefetches) * store.expert_bytes
    assert device.transfer.stats.bytes == host.transfer.stats.bytes == moved
    courier = device._courier
    device.free()
    if mover == "copy-engine" and courier is not None:
        assert courier.copies + by_host == h.misses + h.prefetches and not courier._thread.is_alive()


def host_path_call(host: ExpertCache, device: ExpertCache, layer: int, experts: int) -> int:
    """A call that takes the host path on both caches (as one naming more experts than the device path serves):
    the device's view, next-use's visits included, goes to the host and back. The copies it made on the host."""
    keys = [(layer, e) for e in range(min(experts, host.n_slots))]
    device.to_host()
    before = device.transfer.stats.copies
    for cache in (host, device):
        cache.enter_layer(layer)
        cache.acquire(keys)
        cache.release(keys)
    assert device.slot_of() == host.slot_of()
    return device.transfer.stats.copies - before


def counts(stats) -> tuple[int, ...]:
    return stats.hits, stats.misses, stats.evictions, stats.prefetches, stats.prefetch_hits


def draw_guess(data, layers: int, experts: int, tokens: int, top_k: int) -> tuple[int, list[list[int]]]:
    """A lookahead gate's guess: a layer (any: the directory does not assume which comes next) and top-k ids."""
    layer = data.draw(st.integers(0, layers - 1), label="guessed layer")
    ids = [data.draw(st.lists(st.integers(0, experts - 1), min_size=top_k, max_size=top_k, unique=True))
           for _ in range(tokens)]
    return layer, ids


def test_a_hit_on_a_slot_a_prefetch_is_still_filling_waits_for_its_copy():
    """A call whose experts are all resident would set the flag itself, but a prefetch may still be copying into
    one of its slots: then the courier must write the flag after that copy (`owed`). Here the prefetch's copy is
    slow, and the next call reads the slots with no host sync in between."""
    import time

    store, host, device = host_and_device(2, 4, 4, mover="copy-engine")
    device.fetch_on_device(0, torch.tensor([[0, 1]]))  # starts the courier
    courier = device.courier
    carry = courier._carry
    courier._carry = lambda layer, fills: (time.sleep(0.3), carry(layer, fills))
    device.fetch_on_device(0, torch.tensor([[0, 1]]), lambda: (1, torch.tensor([[2, 3]])))  # hits; prefetch 2, 3
    device.fetch_on_device(1, torch.tensor([[3, 2]]))  # hits on both prefetched slots: waits for their copies
    for e in (2, 3):
        assert tag_of(device, int(device.directory.table[1, e])) == 1000 + e
    d = device.stats
    assert (d.hits, d.misses, d.prefetches, d.prefetch_hits) == (4, 2, 2, 2)
    device.free()


@pytest.mark.parametrize("eviction", ["lru", "next-use"])
def test_host_path_in_between_keeps_both_views(eviction):
    """A call too large for the device path runs on the host (pull), the next device call pushes the host's view."""
    store, host, device = host_and_device(3, 4, 5, eviction=eviction)
    step(host, device, 0, [[0, 1]], 4)
    host_path_call(host, device, 1, 3)
    step(host, device, 2, [[3, 0], [1, 1]], 4)
    step(host, device, 0, [[0, 2]], 4)
    for layer in range(3):  # a whole decode step, every expert: next-use keeps what LRU would evict
        step(host, device, layer, [[0, 1], [2, 3]], 4)
    assert device.stats.misses == host.stats.misses


def test_fetch_device_refuses_what_it_cannot_serve():
    store = filled_store(2, 4)
    with pytest.raises(ValueError, match="LRU or next-use .* 'lfu'"):
        ExpertCache(store, 4, "cpu", make_rule("lfu"), fetch="device")
    with pytest.raises(ValueError, match="fetch='nowhere' is unknown"):
        ExpertCache(store, 4, "cpu", make_rule("lru"), fetch="nowhere")


def test_offload_fetch_device_refusals():
    model = tiny_mixtral()
    with pytest.raises(ValueError, match="'reference' on a CPU"):
        moeoffload.offload(model, "lru", "50%", device="cpu", fetch="device")
    with pytest.raises(ValueError, match="policy 'lfu'"):
        moeoffload.offload(model, "lfu", "50%", device="cpu", kernels="reference", fetch="device")
    assert getattr(model, "_moeoffload", None) is None  # every refusal left the model as it was


def test_courier_sequence_numbers_wrap_around():
    """The flag is 32 bits; the wait compares (int32)(flag - seq) >= 0, so a long run wraps without a false pass."""
    from moeoffload.kernels.streamops import as_int32, reached

    assert reached(5, 5) and reached(6, 5) and not reached(4, 5)
    assert reached(as_int32(2), (1 << 32) - 1) and not reached(as_int32((1 << 32) - 1), 2)
    store, host, device = host_and_device(2, 4, 3, mover="copy-engine")
    step(host, device, 0, [[0, 1]], 4)
    device._courier._seq = (1 << 32) - 3
    for i in range(8):  # through the wrap, hits and misses mixed
        step(host, device, i % 2, [[i % 4, (i + 1) % 4]], 4)
    assert device._courier._seq == 5
    assert device.stats.misses == host.stats.misses
    device.free()


def test_courier_drain_returns_once_every_call_is_handled():
    """`drain` (after a model's last MoE layer, before the host view is read) returns only when the thread has
    handled every call queued so far, those without a fill included."""
    store, host, device = host_and_device(2, 4, 3, mover="copy-engine")
    for i in range(12):
        step(host, device, i % 2, [[i % 4, 0]], 4)
    courier = device.courier
    device.settle_device()
    assert courier._handled == courier._queued == 12
    assert device.stats.misses == host.stats.misses  # to_host drains first, then reads
    assert courier.copies == device.stats.misses > 0 and courier.carried_calls > 0
    device.reset_stats()  # the courier's counters restart with the cache's
    assert courier.copies == courier.carried_calls == 0 and courier.issue_s == 0.0
    device.free()
    assert not courier._thread.is_alive()


def test_courier_failure_is_raised_and_never_hangs():
    """A failure in the courier thread (here: the store cannot give a slab) still releases the compute stream's
    wait, and the next call raises it with the fix named."""
    store, host, device = host_and_device(2, 4, 3, mover="copy-engine")

    def broken_slab(layer):
        raise OSError("slab gone")

    device.fetch_on_device(0, torch.tensor([[0, 1]]))  # starts the courier
    device._courier._slab = broken_slab
    device._courier._slabs.clear()
    device.fetch_on_device(1, torch.tensor([[2, 3]]))  # misses: the courier fails, the wait still returns
    with pytest.raises(RuntimeError, match="courier .* failed .*slab gone.* fetch='host'"):
        device.fetch_on_device(1, torch.tensor([[0, 1]]))
    device._courier.close()
    assert not device._courier._thread.is_alive()


def test_a_cache_dropped_without_free_stops_its_courier():
    """The courier's thread keeps the courier alive, so only the cache's finaliser can stop it when the cache is
    dropped unfreed: the thread must end, or every dropped cache would leave one behind (and the lowered interval)."""
    import gc

    _, _, device = host_and_device(2, 4, 3, mover="copy-engine")
    device.fetch_on_device(0, torch.tensor([[0, 1]]))
    courier = device.courier
    assert courier is not None and courier._thread.is_alive()
    del device
    gc.collect()
    assert not courier._thread.is_alive() and not courier._holds_switch


def test_courier_lowers_the_switch_interval_only_when_asked(monkeypatch):
    """A courier takes the GIL back after each wake-up. As shipped it leaves the switch interval alone; with
    SWITCH_INTERVAL_S set, the interval is at most that while any courier runs, and the last holder to let go
    restores the caller's value, or leaves one set meanwhile."""
    import sys

    from moeoffload import courier as courier_module

    before = sys.getswitchinterval()
    assert courier_module.SWITCH_INTERVAL_S is None  # as shipped: measured no faster on the H100 (courier.py)
    try:
        _, _, device = host_and_device(2, 4, 3, mover="copy-engine")
        device.fetch_on_device(0, torch.tensor([[0, 1]]))
        assert sys.getswitchinterval() == before  # left alone
        device.free()
        monkeypatch.setattr(courier_module, "SWITCH_INTERVAL_S", 1e-4)
        _, _, device = host_and_device(2, 4, 3, mover="copy-engine")
        device.fetch_on_device(0, torch.tensor([[0, 1]]))
        assert sys.getswitchinterval() <= 1e-4 * 1.01
        device.free()
        assert sys.getswitchinterval() == pytest.approx(before)

        switch = courier_module._SwitchInterval()  # its own count: couriers other tests leaked hold the module's
        sys.setswitchinterval(0.004)
        assert switch.hold(1e-4) and switch.hold(1e-4)
        assert sys.getswitchinterval() == pytest.approx(1e-4)
        switch.release()
        assert sys.getswitchinterval() == pytest.approx(1e-4)  # one holder is left
        switch.release()
        assert sys.getswitchinterval() == pytest.approx(0.004)
        assert not switch.hold(None)  # SWITCH_INTERVAL_S = None: leave it alone
        switch.hold(1e-4)
        sys.setswitchinterval(0.002)  # the caller's own choice while a courier runs survives its close
        switch.release()
        assert sys.getswitchinterval() == pytest.approx(0.002)
    finally:
        sys.setswitchinterval(before)


@pytest.mark.parametrize("budget", ["one per layer", "25%", "50%", "75%"])
@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("mover", ["cpu", "copy-engine"])
@pytest.mark.parametrize("policy", ["lru", "lookahead", "next-use", "lookahead-next-use"])
def test_model_through_device_fetch_matches_the_host_path(policy, budget, batch, mover):
    """Greedy tokens through fetch="device" equal the host path's on the same grouped kernels, and the caches end in
    the same state with the same counts, with and without the lookahead gate's prefetch. (The prompt's prefill may
    run on either path: batch 3 x 6 tokens x top-2 names every expert of a layer, more than one slot per layer
    holds, so it takes the host path there.)"""
    model = tiny_mixtral()
    ids = torch.randint(0, model.config.vocab_size, (batch, 6), generator=torch.Generator().manual_seed(batch))
    if budget == "one per layer":
        budget = model.config.num_hidden_layers * moeoffload.hooks.discover(model).layout.nbytes
    outs = {}
    for fetch in ("host", "device"):
        handle = moeoffload.offload(model, policy, budget, device="cpu", kernels="reference", fetch=fetch)
        if fetch == "device":
            handle.cache.mover = mover
        with torch.no_grad():
            tokens = model.generate(ids, max_new_tokens=5, do_sample=False)
        outs[fetch] = (tokens, handle.stats(), handle.cache.slot_of())
        handle.unload()
    (t_h, s_h, r_h), (t_d, s_d, r_d) = outs["host"], outs["device"]
    assert torch.equal(t_h, t_d)
    assert counts(s_h) + (s_h.h2d_bytes,) == counts(s_d) + (s_d.h2d_bytes,)
    assert r_h == r_d
    if policy.startswith("lookahead") and budget in ("25%", "50%") and batch == 1:  # else no slot to prefetch into
        assert s_d.prefetches > 0


def test_resident_experts_compute_before_the_wait_for_a_copy(monkeypatch):
    """With copies in flight (the courier, here slowed down), a layer runs the tiles of its resident slots before
    it waits, and those of slots being filled after: some call must have had both, and the tokens are the host
    path's."""
    import time

    from moeoffload import kernels

    model = tiny_mixtral()
    ids = torch.randint(0, model.config.vocab_size, (1, 6), generator=torch.Generator().manual_seed(4))
    with moeoffload.offload(model, "lru", "50%", device="cpu", kernels="reference", fetch="host") as handle:
        with torch.no_grad():
            want = model.generate(ids, max_new_tokens=6, do_sample=False)
    calls = []
    real_ffn = kernels.grouped_ffn_by_tiles

    def spy(spec, x, pool, tiles, max_rows, **kw):
        calls.append(bool((tiles[1] > tiles[0]).any()))  # this table has a tile
        return real_ffn(spec, x, pool, tiles, max_rows, **kw)

    monkeypatch.setattr(kernels, "grouped_ffn_by_tiles", spy)
    with moeoffload.offload(model, "lru", "50%", device="cpu", kernels="reference", fetch="device") as handle:
        handle.cache.mover = "copy-engine"
        real_fetch = handle.cache.fetch_on_device

        def fetch_then_slow_courier(*args, **kwargs):
            row = real_fetch(*args, **kwargs)
            courier = handle.cache.courier
            if not getattr(courier, "slowed", False):
                carry = courier._carry
                courier._carry = lambda layer, fills: (time.sleep(0.02), carry(layer, fills))
                courier.slowed = True
            return row

        handle.cache.fetch_on_device = fetch_then_slow_courier
        with torch.no_grad():
            got = model.generate(ids, max_new_tokens=6, do_sample=False)
    assert torch.equal(got, want)
    pairs = list(zip(calls[::2], calls[1::2]))  # (resident slots' table, slots being filled) of each call
    assert any(now and later for now, later in pairs), "no call computed a resident expert before its wait"


INTERPRETED = r"""
import torch
from hypothesis import given, settings, strategies as st
from moeoffload.cache import ExpertCache
from moeoffload.eviction import make_rule
from tests.moeoffload.test_directory import counts, draw_guess, host_and_device, host_path_call, step

def decode(eviction, seed):
    # a long sparse decode in layer order (hypothesis' runs are short): next-use's missed visits decide here
    gen = torch.Generator().manual_seed(seed)
    store, host, device = host_and_device(3, 4, 6, backend="triton", mover="copy-engine", eviction=eviction)
    for call in range(90):
        ids = torch.randint(0, 4, (2, 1), generator=gen).tolist()
        guess = ((call + 1) % 3, torch.randint(0, 4, (2, 1), generator=gen).tolist()) if seed % 2 else None
        step(host, device, call % 3, ids, 4, guess)
    assert counts(device.stats) == counts(host.stats)
    device.free()

for seed in range(4):
    decode("next-use", seed)

@settings(max_examples=40, deadline=None)
@given(layers=st.integers(1, 3), experts=st.integers(2, 6), data=st.data())
def check(layers, experts, data):
    tokens, top_k = data.draw(st.integers(1, 3)), data.draw(st.integers(1, 2))
    n_slots = data.draw(st.integers(min(experts, tokens * top_k), layers * experts))
    mover = data.draw(st.sampled_from(["cpu", "copy-engine"]))  # the lookup kernel signals the courier or not
    eviction = data.draw(st.sampled_from(["lru", "next-use"]))
    store, host, device = host_and_device(layers, experts, n_slots, backend="triton", mover=mover, eviction=eviction)
    prefetching = data.draw(st.booleans())
    cyclic = data.draw(st.booleans())
    for call in range(data.draw(st.integers(1, 12))):
        ids = [data.draw(st.lists(st.integers(-1, experts), min_size=top_k, max_size=top_k)) for _ in range(tokens)]
        guess = draw_guess(data, layers, experts, tokens, top_k) if prefetching else None
        layer = call % layers if cyclic else data.draw(st.integers(0, layers - 1))
        step(host, device, layer, ids, experts, guess)
        if eviction == "next-use" and data.draw(st.booleans()):
            host_path_call(host, device, data.draw(st.integers(0, layers - 1)), experts)
    assert counts(device.stats) == counts(host.stats)
    device.free()

check()
print("interpreted directory ok")
"""


def test_triton_directory_kernels_under_the_interpreter():
    pytest.importorskip("triton")
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": os.pathsep.join([root, os.path.join(root, "src")])}
    done = subprocess.run([sys.executable, "-c", INTERPRETED], env=env, capture_output=True, text=True, timeout=600,
                          cwd=root)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "interpreted directory ok" in done.stdout


def test_an_encoder_decoder_drains_the_courier_after_its_encoder(monkeypatch):
    """The layers drain the courier after the model's last MoE layer, a decoder layer in Switch; the encoder ends
    earlier, and what generate runs before the decoder may block in the driver, so the encoder drains too. Greedy
    tokens still equal the host path's, and the hook goes with the cache."""
    from .models import tiny_switch

    model = tiny_switch(seed=3)
    ids = torch.randint(2, 96, (2, 7), generator=torch.Generator().manual_seed(5))
    with moeoffload.offload(model, "lru", "50%", device="cpu", kernels="reference", fetch="host") as h:
        with torch.no_grad():
            want = model.generate(ids, max_new_tokens=4, do_sample=False)
    drains = []
    with moeoffload.offload(model, "lru", "50%", device="cpu", kernels="reference", fetch="device") as h:
        assert h.stats().fetch == "device"
        real = h.cache.settle_device
        monkeypatch.setattr(h.cache, "settle_device", lambda: (drains.append(1), real())[1])
        with torch.no_grad():
            model.get_encoder()(input_ids=ids)
        assert len(drains) == 1  # the encoder's own forward drained; no decoder layer ran
        with torch.no_grad():
            got = model.generate(ids, max_new_tokens=4, do_sample=False)
        assert len(drains) >= 2  # generate drained after its encoder, and the decoder layers after their last
        h.switch("lru", "50%", kernels="reference", fetch="host")  # the old cache's hook is gone
        seen = len(drains)  # (freeing the old cache read its statistics, which drains too)
        with torch.no_grad():
            model.get_encoder()(input_ids=ids)
        assert len(drains) == seen
    assert torch.equal(got, want)
