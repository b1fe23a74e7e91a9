"""Missed experts computed on the host CPU (policies cpu-moe, fiddler, hybrid): the same outputs as the exact loop
within float tolerance on every family, the right misses on the host, a failing host computation that fails only its
own call. The cost model's choices are tested on injected measurements (test_costmodel.py)."""

import pytest
import torch

import moeoffload
from moeoffload import costmodel
from moeoffload.costmodel import Measurements
from moeoffload.hostexperts import HostComputeError, HostExperts, compute_dtype
from moeoffload.offload import hidden_size

from .test_families import FAMILIES, build

HOST_POLICIES = ["cpu-moe", "fiddler", "hybrid"]


def measurements(expert_bytes: int, copy_ms: float, host_ms: float) -> Measurements:
    """A machine where copying an expert takes `copy_ms` and computing it on the host `host_ms` at any token count."""
    return Measurements(expert_bytes, expert_bytes / (copy_ms * 1e-3), expert_bytes / (host_ms * 1e-3), 1, (1, 256),
                        (host_ms * 1e-3, host_ms * 1e-3))


@pytest.fixture
def host_cheaper(monkeypatch):
    """Offloads measure a machine where the host computes an expert in a tenth of its copy time."""
    monkeypatch.setattr(costmodel, "measure", lambda store, *a, **k: measurements(store.expert_bytes, 10.0, 1.0))


def random_call(hook, tokens: int, seed: int, width: int):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(tokens, width, generator=g) * 3
    index = torch.stack([torch.randperm(hook.num_experts, generator=g)[: hook.top_k] for _ in range(tokens)])
    if hook.family == "switch":
        index[0, 0] = hook.num_experts  # a token the capacity limit dropped
    return hidden, index, torch.rand(tokens, hook.top_k, generator=g)


def layer_output(model, policy: str, budget: int, call, kernels: str = "auto") -> tuple[torch.Tensor, dict]:
    with moeoffload.offload(model, policy, budget, device="cpu", kernels=kernels) as handle:
        out = handle.layers[0](*call)
        return out, handle.stats().as_dict()


@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("policy", HOST_POLICIES)
def test_host_misses_compute_what_the_exact_loop_computes(family, policy, host_cheaper):
    model = build(family, seed=3)
    hook = moeoffload.hooks.discover(model)
    width = hidden_size(hook)
    call = random_call(hook, 12, seed=7, width=width)
    budget = max(2, len(hook.layers)) * hook.layout.nbytes  # a few slots: most experts miss
    reference, _ = layer_output(model, "lru", budget, call, kernels="exact")
    got, stats = layer_output(model, policy, budget, call)
    torch.testing.assert_close(got, reference, rtol=1e-4, atol=1e-4)
    assert stats["host_misses"] > 0, f"{policy}: no expert computed on the host"
    assert stats["host_bytes"] == stats["host_misses"] * hook.layout.nbytes
    assert stats["misses"] >= stats["host_misses"]


@pytest.mark.parametrize("policy", HOST_POLICIES)
def test_host_misses_on_the_grouped_plan(policy, host_cheaper):
    model = build("mixtral", seed=3)
    hook = moeoffload.hooks.discover(model)
    call = random_call(hook, 9, seed=1, width=64)
    budget = 3 * hook.layout.nbytes
    reference, _ = layer_output(model, "lru", budget, call, kernels="exact")
    got, stats = layer_output(model, policy, budget, call, kernels="reference")
    torch.testing.assert_close(got, reference, rtol=1e-4, atol=1e-4)
    assert stats["host_misses"] > 0


@pytest.mark.parametrize("family", ["mixtral", "switch"])
@pytest.mark.parametrize("policy", HOST_POLICIES)
def test_generation_agrees_with_the_unoffloaded_model(family, policy, host_cheaper):
    from .test_families import run

    model = build(family, seed=2)
    ids = torch.randint(3, 90, (2, 6), generator=torch.Generator().manual_seed(0))
    tokens, logits = run(model, ids)
    with moeoffload.offload(model, policy, "25%", device="cpu") as handle:
        got_tokens, got_logits = run(model, ids)
        assert handle.plan.misses == moeoffload.get_policy(policy).misses
    assert torch.equal(got_tokens, tokens)
    torch.testing.assert_close(got_logits, logits, rtol=1e-4, atol=1e-4)


def test_cpu_moe_never_copies_and_keeps_the_last_layers_resident():
    model = build("mixtral", seed=2)
    ids = torch.randint(3, 90, (1, 5))
    with moeoffload.offload(model, "cpu-moe", "25%", device="cpu") as handle:
        resident = handle.cache.resident()
        from .test_families import run

        run(model, ids)
        stats = handle.stats()
        assert handle.cache.resident() == resident  # fixed: nothing copied, nothing evicted
    keys = sorted(resident)
    assert keys == [(1, e) for e in range(4, 8)]  # 25% of 2 layers x 8 experts: the last four of the last layer
    assert stats.h2d_copies == 0 and stats.evictions == 0
    assert stats.misses == stats.host_misses > 0 and stats.hits > 0


def test_fiddler_copies_when_the_copy_is_cheaper(monkeypatch):
    monkeypatch.setattr(costmodel, "measure", lambda store, *a, **k: measurements(store.expert_bytes, 1.0, 10.0))
    model = build("mixtral", seed=2)
    hook = moeoffload.hooks.discover(model)
    _, stats = layer_output(model, "fiddler", 2 * hook.layout.nbytes, random_call(hook, 8, 0, 64))
    assert stats["host_misses"] == 0 and stats["h2d_copies"] == stats["misses"] > 0


def test_a_failing_host_computation_fails_its_call_and_the_next_call_runs(monkeypatch):
    model = build("mixtral", seed=4)
    hook = moeoffload.hooks.discover(model)
    call = random_call(hook, 6, seed=2, width=64)
    budget = 2 * hook.layout.nbytes
    reference, _ = layer_output(model, "lru", budget, call, kernels="exact")
    real = HostExperts.compute
    failures = iter([True])

    def compute(self, *args):
        if next(failures, False):
            raise RuntimeError("simulated host fault")
        return real(self, *args)

    monkeypatch.setattr(HostExperts, "compute", compute)
    with moeoffload.offload(model, "cpu-moe", budget, device="cpu") as handle:
        with pytest.raises(HostComputeError, match=r"MoE layer 0: computing experts .* on the host failed "
                                                   r"\(RuntimeError: simulated host fault\)"):
            handle.layers[0](*call)
        assert not any(handle.cache.is_pinned(k) for k in handle.cache.resident())  # the failed call let go
        torch.testing.assert_close(handle.layers[0](*call), reference, rtol=1e-4, atol=1e-4)


def test_switch_between_host_and_copy_policies_and_unload():
    model = build("mixtral", seed=5)
    snapshot = {k: v.clone() for k, v in model.state_dict().items()}
    hook = moeoffload.hooks.discover(model)
    call = random_call(hook, 5, seed=3, width=64)
    with moeoffload.offload(model, "cpu-moe", "25%", device="cpu") as handle:
        first = handle.layers[0](*call)
        handle.switch("lru", "25%")
        assert handle.plan.misses == "copy" and handle.stats().host_misses == 0
        torch.testing.assert_close(handle.layers[0](*call), first, rtol=1e-4, atol=1e-4)
    assert all(torch.equal(v, snapshot[k]) for k, v in model.state_dict().items())


def test_host_policies_are_registered_approximate_and_refuse_device_fetch():
    names = moeoffload.available_policies()
    for name in HOST_POLICIES:
        assert name in names and not moeoffload.get_policy(name).exact
    model = build("mixtral")
    with pytest.raises(ValueError, match="computes misses on the host.*fetch='host'"):
        moeoffload.offload(model, "cpu-moe", "25%", device="cpu", kernels="reference", fetch="device")
    with pytest.raises(ValueError, match="exact=False"):
        moeoffload.Policy("x", "host misses declared exact", misses="host")
    with pytest.raises(ValueError, match="misses='elsewhere' is unknown"):
        moeoffload.Policy("x", "?", misses="elsewhere", exact=False)


def test_host_dtype_follows_the_cpu(monkeypatch):
    from moeoffload import hostexperts

    monkeypatch.setattr(hostexperts, "cpu_flags", lambda: frozenset({"avx2"}))
    assert compute_dtype(torch.bfloat16) == torch.float32 and compute_dtype(torch.float32) == torch.float32
    monkeypatch.setattr(hostexperts, "cpu_flags", lambda: frozenset({"avx512_bf16"}))
    assert compute_dtype(torch.bfloat16) == torch.bfloat16


def test_bf16_store_on_a_cpu_without_native_bf16(monkeypatch, host_cheaper):
    from moeoffload import hostexperts

    monkeypatch.setattr(hostexperts, "cpu_flags", lambda: frozenset())
    model = build("mixtral", dtype=torch.bfloat16, seed=6)
    hook = moeoffload.hooks.discover(model)
    hidden, index, weights = random_call(hook, 7, seed=5, width=64)
    call = (hidden.bfloat16(), index, weights.bfloat16())
    budget = 2 * hook.layout.nbytes
    reference, _ = layer_output(model, "lru", budget, call, kernels="exact")
    got, stats = layer_output(model, "cpu-moe", budget, call)
    assert stats["host_misses"] > 0 and got.dtype == torch.bfloat16
    torch.testing.assert_close(got, reference, rtol=3e-2, atol=3e-2)
