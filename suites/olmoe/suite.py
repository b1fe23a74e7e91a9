"""OLMoE suite: OLMoE-1B-7B (64 experts, top-8, every layer MoE) under every registered policy.

quick tier (CPU): 2 layers, hidden 256, vocabulary 8192, fp32; published expert count and top-k.
full tier (GPU): the published model, bf16, 12.9 GiB.
"""

from moebench.suite import Suite
from moebench.workload import Workload
from moebench.zoo import zoo_model

SUITE = Suite(
    name="olmoe",
    models=[zoo_model("olmoe-1b-7b", quick_overrides={"hidden_size": 256, "intermediate_size": 128,
                                                       "vocab_size": 8192})],
    budgets=["25%", "50%"],
    workload=Workload(batch_size=2, prompt_len=16, new_tokens=8, seed=0),
    full_workload=Workload(batch_size=8, prompt_len=32, new_tokens=32, seed=0),
    accuracy_limit=0.01,  # next-token accuracy drop an approximate policy may have (the papers: about 1%)
)
