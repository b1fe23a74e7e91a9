"""moeoffload: serve Mixture-of-Experts models whose experts do not fit the GPU.

    handle = moeoffload.offload(model, policy="lru", gpu_budget="2GiB")
    model.generate(...)            # unchanged API; experts stream through a GPU cache of 2 GiB
    handle.stats().hit_rate
    handle.switch("next-use", "1GiB")  # another policy and budget over the same host copies of the experts
    handle.unload()                # or: with moeoffload.offload(...) as handle: ...
"""

from .budget import format_bytes, parse_budget
from .errors import (
    BudgetError,
    MoeOffloadError,
    NotOffloadedError,
    PolicyContractError,
    UnknownPolicyError,
    UnsupportedModelError,
)
from .offload import OffloadedModel, OffloadStats, offload, switch, unload
from .policies import Policy
from .policies import available as available_policies
from .policies import get as get_policy
from .policies import register as register_policy

__version__ = "0.1.0"

__all__ = [
    "BudgetError", "MoeOffloadError", "NotOffloadedError", "OffloadStats", "OffloadedModel", "Policy",
    "PolicyContractError", "UnknownPolicyError", "UnsupportedModelError", "available_policies", "format_bytes",
    "get_policy", "offload", "parse_budget", "register_policy", "switch", "unload",
]
