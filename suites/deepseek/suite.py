"""DeepSeek suite: DeepSeek-V2-Lite (MLA attention; first layer dense, then 64 experts top-6 + 2 shared experts).

quick tier (CPU): 3 layers (one dense, two MoE), hidden 256, narrower MLA ranks, vocabulary 8192, fp32; published
expert count and top-k. full tier (GPU): the published model, bf16, 29.3 GiB.
"""

from moebench.suite import Suite
from moebench.workload import Workload
from moebench.zoo import zoo_model

SUITE = Suite(
    name="deepseek",
    models=[zoo_model("deepseek-v2-lite", quick_layers=3,
                      quick_overrides={"hidden_size": 256, "intermediate_size": 1368, "moe_intermediate_size": 176,
                                       "kv_lora_rank": 64, "qk_nope_head_dim": 16, "qk_rope_head_dim": 16,
                                       "v_head_dim": 16, "vocab_size": 8192})],
    budgets=["25%", "50%"],
    workload=Workload(batch_size=2, prompt_len=16, new_tokens=8, seed=0),
    full_workload=Workload(batch_size=8, prompt_len=32, new_tokens=32, seed=0),
    accuracy_limit=0.01,  # next-token accuracy drop an approximate policy may have (the papers: about 1%)
)
