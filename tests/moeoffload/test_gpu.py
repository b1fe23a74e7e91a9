"""The same exactness on a CUDA device, where copies run on a side stream and a race would show as tokens or
logits that change from run to run."""

import pytest
import torch

import moeoffload
from moeoffload.policies import BUILTIN

from .models import tiny_mixtral, tiny_switch

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("kernels", ["auto", "exact"])
@pytest.mark.parametrize("build", [tiny_mixtral, tiny_switch], ids=["mixtral", "switch"])
def test_cuda_policies_match_resident_over_many_runs(build, kernels):
    """Every exact policy gives the tokens and logits of resident on the same plan, bit for bit, run after run: on
    the default plan (the grouped Triton kernels, the device directory where the policy allows) and on the exact
    loop."""
    model = build(seed=11, dtype=torch.bfloat16)
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(2, 96, (b, 11), generator=g).cuda() for b in (1, 4, 16)]

    def run():
        with torch.no_grad():
            tokens = [model.generate(p, attention_mask=torch.ones_like(p), max_new_tokens=12, do_sample=False)
                      for p in prompts]
            if model.config.is_encoder_decoder:
                return tokens, model(input_ids=prompts[1], decoder_input_ids=tokens[1][:, :6]).logits
            return tokens, model(tokens[1]).logits

    with moeoffload.offload(model, "resident", "all", device="cuda", kernels=kernels) as h:
        assert h.store.pinned and h.plan.kernels == ("triton" if kernels == "auto" else "exact")
        reference, ref_logits = run()
    for policy in [p.name for p in BUILTIN if p.exact and not p.preload]:
        for budget in ["25%", "50%"]:
            with moeoffload.offload(model, policy, budget, device="cuda", kernels=kernels) as h:
                label = h.plan.label
                for _ in range(5):
                    tokens, logits = run()
                    for got, want in zip(tokens, reference):
                        assert torch.equal(got, want), f"{policy} at {budget} on {label}: tokens differ from resident"
                    assert torch.equal(logits, ref_logits), f"{policy} at {budget} on {label}: logits differ"
                s = h.stats()
                assert s.cache_bytes <= s.budget_bytes and s.misses > 0
