"""The same exactness on a CUDA device, where copies run on a side stream and a race would show as tokens or
logits that change from run to run."""

import pytest
import torch

import moeoffload
from moeoffload.policies import BUILTIN

from .models import tiny_mixtral, tiny_switch

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("build", [tiny_mixtral, tiny_switch], ids=["mixtral", "switch"])
def test_cuda_policies_match_resident_over_many_runs(build):
    model = build(seed=11, dtype=torch.bfloat16)
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(2, 96, (b, 11), generator=g).cuda() for b in (1, 4, 16)]

    def run():
        with torch.no_grad():
            return [model.generate(p, attention_mask=torch.ones_like(p), max_new_tokens=12, do_sample=False)
                    for p in prompts]

    with moeoffload.offload(model, "resident", "all", device="cuda") as h:
        assert h.store.pinned
        reference = run()
    for policy in [p.name for p in BUILTIN if p.exact and not p.preload]:
        for budget in ["25%", "50%"]:
            with moeoffload.offload(model, policy, budget, device="cuda") as h:
                for _ in range(5):
                    for got, want in zip(run(), reference):
                        assert torch.equal(got, want), f"{policy} at {budget} differs from resident on CUDA"
                s = h.stats()
                assert s.cache_bytes <= s.budget_bytes and s.misses > 0
