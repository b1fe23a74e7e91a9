"""How one MoE layer computes its experts over the cache: one small class per execution path.

Every path takes what every router gives, hidden states [T, H], top-k expert ids [T, k] and gate weights [T, k]
(an id >= num_experts marks "no expert", e.g. a token Switch's capacity limit dropped), and returns [T, H].

- `ExactLoop` (kernels="exact"): the per-expert loop in transformers eager's order, bit-identical to the
  unoffloaded model; the verifier.
- `GroupedOnHost`: the grouped kernels after one device->host sync that says which experts the call needs.
- `ResidentOnDevice`: every expert of the layer is resident for good: route on the device, no sync.
- `FetchedOnDevice` (fetch="device"): the cache's directory on the device finds and fills the misses, no sync.
- `DequantizingLoop` (a low-precision policy): quantized copies dequantized on arrival, then the plan's kernels.
- `HostAssisted` (a policy with host misses): the host path above for the resident experts and the misses it
  copies, while the host CPU computes the other misses from the store (not bit-identical: `paths.host`).

The three grouped paths compute the same rows with the same kernel (`expert_rows`): a tile of rows of one expert,
its size fixed by the call's token count alone. So a row's sums do not depend on which path served the call, on
which slot holds the expert, or on how many experts shared a launch, and an exact policy gives the resident
model's bits on the same kernels at every budget.
"""

from .exact import ExactLoop
from .grouped import GroupedOnHost
from .host import HostAssisted
from .low_precision import DequantizingLoop
from .on_device import FetchedOnDevice, ResidentOnDevice

__all__ = ["DequantizingLoop", "ExactLoop", "FetchedOnDevice", "GroupedOnHost", "HostAssisted", "ResidentOnDevice"]
