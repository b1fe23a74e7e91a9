"""Switch Transformers suite: switch-base-8 and switch-base-64 under every registered policy.

quick tier (CPU): 2 encoder + 2 decoder layers (one MoE layer per stack), published widths and expert counts;
full tier (GPU): the published 12 + 12 layers. Weights are synthetic and seeded (see moebench.zoo).
"""

from functools import partial

from moebench.suite import ModelSpec, Suite
from moebench.workload import Workload
from moebench.zoo import build_switch

QUICK_LAYERS = 2


def _build(name, tier, dtype, device):
    return build_switch(name, num_layers=QUICK_LAYERS if tier == "quick" else None, seed=0, dtype=dtype,
                        device=device)


SUITE = Suite(
    name="switch",
    models=[
        ModelSpec("switch-base-8", partial(_build, "switch-base-8"), "google/switch-base-8 architecture"),
        ModelSpec("switch-base-64", partial(_build, "switch-base-64"), "google/switch-base-64 architecture"),
    ],
    budgets=["25%", "50%"],
    policies=None,  # every registered policy; resident (budget 'all') is the reference of each model
    workload=Workload(batch_size=2, prompt_len=16, new_tokens=8, seed=0),
    full_workload=Workload(batch_size=8, prompt_len=32, new_tokens=32, seed=0),
    accuracy_limit=0.0,
)
