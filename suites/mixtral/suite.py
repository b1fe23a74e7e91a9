"""Mixtral suite: Mixtral-8x7B (8 experts, top-2, every layer MoE) under every registered policy.

quick tier (CPU): 2 layers, widths / 16, vocabulary 8192, fp32; published expert count and top-k.
full tier (GPU): the published model, bf16, 87 GiB of weights: more than an 80 GB GPU holds. It is built in host
memory and its experts reach the GPU only through the expert cache; the resident reference cannot run, so it is
skipped with the reason and the full tier's exactness is unchecked (the quick tier checks it). One budget and a
batch-1 workload keep the full tier inside one device call (every case copies 87 GiB into pinned memory).
Beside it, in both tiers, the trained models/kjv-moe (Mixtral's architecture, 4 layers, 7.5 MiB): the one model
whose routing and next-token choices come from training, where approximate policies' accuracy is judged.
"""

from moebench.suite import Suite
from moebench.workload import Workload
from moebench.zoo import trained_model, zoo_model

SUITE = Suite(
    name="mixtral",
    models=[zoo_model("mixtral-8x7b", quick_overrides={"hidden_size": 256, "intermediate_size": 896,
                                                        "vocab_size": 8192}),
            trained_model()],
    budgets=["25%", "50%"],
    full_budgets=["50%"],
    workload=Workload(batch_size=2, prompt_len=16, new_tokens=8, seed=0),
    full_workload=Workload(batch_size=1, prompt_len=16, new_tokens=8, seed=0),
    accuracy_limit=0.01,  # next-token accuracy drop an approximate policy may have (the papers: about 1%)
)
