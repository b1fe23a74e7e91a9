"""Host-assisted policies on CUDA: the host computes some misses while the GPU computes the rest (the overlap the
CPU tests cannot show), on the default plan and the exact loop; the layer's output agrees with the copy-only exact
loop within bf16 rounding, and each policy sends misses where its rule says."""

import pytest
import torch

import moeoffload
from moeoffload import costmodel
from moeoffload.hooks import discover
from moeoffload.offload import hidden_size

from .test_families import FAMILIES, build
from .test_host_experts import HOST_POLICIES, measurements, random_call

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("kernels", ["auto", "exact"])
@pytest.mark.parametrize("family", list(FAMILIES))
def test_host_misses_on_cuda_agree_with_the_exact_loop(family, kernels, monkeypatch):
    monkeypatch.setattr(costmodel, "measure", lambda store, *a, **k: measurements(store.expert_bytes, 10.0, 1.0))
    model = build(family, torch.bfloat16, seed=11)
    hook = discover(model)
    width = hidden_size(hook)
    hidden, index, weights = random_call(hook, 16, seed=3, width=width)
    call = (hidden.bfloat16().cuda(), index.cuda(), weights.bfloat16().cuda())
    budget = max(2, len(hook.layers)) * hook.layout.nbytes
    with moeoffload.offload(model, "lru", budget, device="cuda", kernels="exact") as handle:
        reference = handle.layers[0](*call).float()
    for policy in HOST_POLICIES:
        with moeoffload.offload(model, policy, budget, device="cuda", kernels=kernels) as handle:
            for _ in range(2):  # the second call meets a warm cache and a busy copy engine
                got = handle.layers[0](*call).float()
                torch.testing.assert_close(got, reference, rtol=5e-2, atol=5e-2, msg=f"{family} {policy}")
            assert handle.stats().host_misses > 0, f"{family} {policy}: nothing computed on the host"
