"""Qwen-MoE suite: Qwen1.5-MoE-A2.7B (60 experts top-4 + a shared expert) and Qwen3-30B-A3B (128 experts top-8).

quick tier (CPU): 2 layers, hidden 256, vocabulary 8192, fp32; published expert counts and top-k.
full tier (GPU): published sizes, bf16: 26.7 GiB and 56.9 GiB, both fit an 80 GB GPU with their resident reference.
"""

from moebench.suite import Suite
from moebench.workload import Workload
from moebench.zoo import zoo_model

SUITE = Suite(
    name="qwen_moe",
    models=[
        zoo_model("qwen1.5-moe-a2.7b", quick_overrides={"hidden_size": 256, "intermediate_size": 704,
                                                         "moe_intermediate_size": 176,
                                                         "shared_expert_intermediate_size": 704,
                                                         "vocab_size": 8192}),
        zoo_model("qwen3-30b-a3b", quick_overrides={"hidden_size": 256, "intermediate_size": 768,
                                                     "moe_intermediate_size": 96, "head_dim": 32,
                                                     "vocab_size": 8192}),
    ],
    budgets=["25%", "50%"],
    workload=Workload(batch_size=2, prompt_len=16, new_tokens=8, seed=0),
    full_workload=Workload(batch_size=4, prompt_len=32, new_tokens=16, seed=0),
    accuracy_limit=0.01,  # next-token accuracy drop an approximate policy may have (the papers: about 1%)
)
