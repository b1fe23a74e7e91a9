"""Switch Transformers suite: the switch-base models under every registered policy.

quick tier (CPU): switch-base-8 and -64, 2 encoder + 2 decoder layers (one MoE layer per stack), published widths
and expert counts, fp32. full tier (GPU): switch-base-8 ... -256 at published size (12 + 12 layers), bf16; the
largest, switch-base-256, is 27.3 GiB, so each fits an 80 GB GPU with its resident reference.
Weights are synthetic and seeded (moebench.zoo).
"""

from moebench.suite import Suite
from moebench.workload import Workload
from moebench.zoo import zoo_model

SUITE = Suite(
    name="switch",
    models=[zoo_model("switch-base-8"), zoo_model("switch-base-64")]
    + [zoo_model(f"switch-base-{n}", tiers=("full",)) for n in (16, 32, 128, 256)],
    budgets=["25%", "50%"],
    policies=None,  # every registered policy; resident (budget 'all') is the reference of each model
    workload=Workload(batch_size=2, prompt_len=16, new_tokens=8, seed=0),
    full_workload=Workload(batch_size=8, prompt_len=32, new_tokens=32, seed=0),
    accuracy_limit=0.01,  # next-token accuracy drop an approximate policy may have (the papers: about 1%)
)
