"""ExecutionPlan: how an offloaded model's MoE layers run, decided once by `offload()` and `switch()`.

Three choices make the plan, and every other part reads them from here (the layers, the cache, `stats()`, moebench):
- kernels: "exact", the per-expert loop in transformers eager's order (bit-identical to the unoffloaded model: the
  verifier); "triton", grouped Triton kernels over the cache's slots (CUDA); "reference", the same grouped
  algorithm in plain torch (any device: the kernels' reference, and the CPU tests' stand-in for "triton").
- fetch: "host", a layer learns which experts it needs with one device->host sync and the cache copies the misses;
  "device", the cache's directory lives on the GPU and the layer's kernels find and queue their misses with no
  sync (`moeoffload.directory`, `moeoffload.courier`).
- misses: where a missed expert is computed, taken from the policy (`Policy.misses`): "copy" into the cache; or
  "host", "cost-model", "split", on the host CPU for some or all misses (`moeoffload.paths.host`), which needs
  fetch="host" (the host must know the misses to take its share).

A third, `precision`, follows from the policy: "full" copies the store's experts; "int8" or "int4" copies their
quantized copies into slots of the quantized size and dequantizes each on arrival into one full-precision scratch
expert before the plan's kernels run (`moeoffload.paths.low_precision`); "full+int4" is HOBBIT's mix.

"auto" asks for the fastest plan that can serve the model, policy and device: the grouped Triton kernels and the
device directory on CUDA where the expert form and the policy allow, the exact loop on a CPU (the grouped kernels'
plain-torch form is no faster there). Exactness does not depend on the plan: an exact policy gives the tokens and
logits of policy "resident" served by the same plan, bit for bit (`moeoffload.paths`: why).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from . import kernels as _kernels
from .errors import BudgetError
from .policies import Policy
from .store import ExpertStore

KERNELS = ("auto", "exact", "triton", "reference")
FETCHES = ("auto", "host", "device")


@dataclass(frozen=True)
class ExecutionPlan:
    """The resolved choice for every MoE layer of one offloaded model (never "auto")."""

    device: str
    kernels: str  # "exact" | "triton" | "reference"
    fetch: str  # "host" | "device"
    why: str  # what "auto" chose and why, or "as asked"
    precision: str = "full"  # "full" | "int8" | "int4" | "full+int4" (a mixed policy)
    # a quantized slot's FFN: "fused" (the dequantizing Triton GEMM reads the slot), "arrival" (dequantized into a
    # full-precision scratch expert, then the plan's kernels), "none" (full precision only)
    dequant: str = "none"
    misses: str = "copy"  # "copy" | "host" | "cost-model" | "split" (policies.MISSES)

    @property
    def grouped(self) -> bool:
        return self.kernels != "exact"

    @property
    def backend(self) -> str:
        """The kernels module's backend for the grouped paths."""
        return "triton" if self.kernels == "triton" else "torch"

    @property
    def eager_exact(self) -> bool:
        """Bit-identical to transformers' eager forward (not only to the resident model on the same kernels)."""
        return self.kernels == "exact"

    @property
    def precisions(self) -> tuple[str, ...]:
        """The precisions copied, most precise first."""
        return tuple(self.precision.split("+"))

    @property
    def host_misses(self) -> bool:
        """Some misses may be computed on the host CPU (`moeoffload.hostexperts`)."""
        return self.misses != "copy"

    @property
    def label(self) -> str:
        label = self.kernels if self.fetch == "host" else f"{self.kernels}+device-fetch"
        if self.precision != "full":
            label = f"{label}+{self.precision}-{self.dequant}"
        return label if self.misses == "copy" else f"{label}+{self.misses}-misses"


def make_plan(kernels: str, fetch: str, *, policy: Policy, grouped_form: bool, device: torch.device, n_slots: int,
              store: ExpertStore) -> ExecutionPlan:
    """Resolve `kernels` and `fetch` for a model whose expert form the grouped kernels can (`grouped_form`) or
    cannot compute. An explicit choice that cannot be honoured is refused here, before any weight moves."""
    if kernels not in KERNELS:
        raise ValueError(f"kernels={kernels!r} is unknown; use one of {', '.join(KERNELS)}")
    if fetch not in FETCHES:
        raise ValueError(f"fetch={fetch!r} is unknown; use one of {', '.join(FETCHES)}")
    chosen, why = _choose_kernels(kernels, grouped_form, device)
    precision = policy_precision(policy)
    if precision != "full":
        if fetch == "device":
            raise ValueError(f"policy {policy.name!r} copies low-precision experts, which fetch='device' does not "
                             "serve; use fetch='host' or 'auto'")
        return ExecutionPlan(device=str(device), kernels=chosen, fetch="host", why=why, precision=precision,
                             dequant=_dequant(policy, chosen, store))
    refusal = device_fetch_refusal(policy, chosen, n_slots, store, device)
    if fetch == "device" and refusal is not None and not _holds_every_expert(n_slots, store):
        raise ValueError(refusal)
    where = "device" if fetch != "host" and refusal is None else "host"
    if fetch == "auto" and refusal is not None and chosen != "exact":
        why = f"{why}; fetch on the host: {refusal.split(':')[0]}"
    return ExecutionPlan(device=str(device), kernels=chosen, fetch=where, why=why, misses=policy.misses)


def policy_precision(policy: Policy) -> str:
    """The plan's precision for `policy`: "full", its low precision, or "full+<low>" when mixed."""
    if policy.precision == "full" or policy.full_precision_gate is None:
        return policy.precision
    return f"full+{policy.precision}"


FUSED_DEQUANT = True  # False: dequantize on arrival under the Triton kernels too (benchmarks' A/B)


def _dequant(policy: Policy, kernels: str, store: ExpertStore) -> str:
    """Fused where the dequantizing Triton GEMM runs (the triton kernels) and takes every matrix's group size."""
    from .kernels.dequant_linear import MIN_FUSED_GROUP
    from .layout import QuantizedLayout
    from .quantize import BITS, GROUP_SIZE

    if kernels != "triton" or not FUSED_DEQUANT:
        return "arrival"
    groups = QuantizedLayout(store.full_layout, BITS[policy.precision], GROUP_SIZE).groups
    return "fused" if min(groups.values()) >= MIN_FUSED_GROUP else "arrival"


def precision_slots(policy: Policy, budget_bytes: int, store: ExpertStore) -> dict[str, int]:
    """Slots of each precision's cache for a low-precision `policy` under `budget_bytes`, most precise first. The
    budget holds the slots and one full-precision scratch expert (where a quantized expert is dequantized); a mixed
    policy gives half of the rest to full-precision slots. Raises BudgetError when a precision gets no slot."""
    from .layout import QuantizedLayout
    from .quantize import BITS, GROUP_SIZE

    total = store.num_layers * store.num_experts
    low = policy.precision
    low_bytes = QuantizedLayout(store.full_layout, BITS[low], GROUP_SIZE).nbytes
    rest = budget_bytes - store.expert_bytes
    slots: dict[str, int] = {}
    if policy.full_precision_gate is not None:
        slots["full"] = min(max(rest, 0) // 2 // store.expert_bytes, total)
        rest -= slots["full"] * store.expert_bytes
    slots[low] = min(max(rest, 0) // low_bytes, total)
    empty = [p for p, n in slots.items() if n < 1]
    if empty:
        need = store.expert_bytes + sum(store.expert_bytes if p == "full" else low_bytes for p in slots)
        raise BudgetError(f"GPU budget of {budget_bytes} bytes leaves no {' or '.join(empty)} slot for policy "
                          f"{policy.name!r} (one full-precision scratch expert comes first); use at least {need} bytes")
    return slots


def _choose_kernels(kernels: str, grouped_form: bool, device: torch.device) -> tuple[str, str]:
    triton_runs = device.type == "cuda" and _kernels.triton_importable()
    if kernels == "auto":
        if not grouped_form:
            return "exact", "the grouped kernels do not compute this expert form"
        if not triton_runs:
            return "exact", f"no Triton on {device.type}: the exact loop is the fast path there"
        return "triton", "the grouped Triton kernels serve this expert form on CUDA"
    if kernels != "exact" and not grouped_form:
        raise ValueError(f"kernels={kernels!r}: the grouped kernels do not compute this model's expert form; use "
                         f"kernels='exact' or 'auto' (forms they compute: {', '.join(_kernels.FFN_KINDS)})")
    if kernels == "triton" and not triton_runs:
        raise ValueError("kernels='triton' needs a CUDA device and the triton package; use kernels='auto' (or "
                         "'reference', the same algorithm in plain torch)")
    return kernels, "as asked"


def _holds_every_expert(n_slots: int, store: ExpertStore) -> bool:
    return n_slots >= store.num_layers * store.num_experts


def device_fetch_refusal(policy: Policy, kernels: str, n_slots: int, store: ExpertStore,
                         device: torch.device) -> str | None:
    """Why fetch="device" cannot serve this combination, or None when it can. The one place that decides it."""
    if _holds_every_expert(n_slots, store):
        return "every expert is resident: nothing to fetch (the layers route on the device without a directory)"
    if kernels == "exact":
        return ("fetch='device' runs on the grouped kernels, and this plan has the exact loop, which learns on the "
                "host which experts it needs; pass kernels='triton' on CUDA or 'reference' on a CPU")
    if device.type == "cuda" and kernels == "reference":
        return ("the plain-torch kernels read their tile table on the host, which would block the compute stream's "
                "waits on CUDA: use kernels='triton' with fetch='device'")
    if policy.misses != "copy":
        return (f"policy {policy.name!r} computes misses on the host, which must learn the misses first: the device "
                "directory hides them; use fetch='host' (or 'auto')")
    if not device_fetch_serves(policy):
        return (f"policy {policy.name!r} is not served by the device directory: it serves an LRU or next-use cache "
                "without a predictor, prefetching only by the lookahead gate; use fetch='host', or a policy such as "
                "'lru', 'next-use' or 'lookahead-next-use'")
    if n_slots > _kernels.GROUPED_MM_MAX_GROUPS:
        return (f"the device directory holds at most {_kernels.GROUPED_MM_MAX_GROUPS} slots and this budget gives "
                f"{n_slots}: use fetch='host' or a smaller budget")
    if device.type == "cuda" and not store.pinned:
        return "the device directory streams from page-locked host memory and this store is not pinned"
    return None


def device_fetch_serves(policy: Policy | str) -> bool:
    """True when `policy` can run with fetch="device": an LRU or next-use cache without a predictor, and a
    prefetcher, if any, that guesses on the device (`predict_on_device`: the lookahead gate)."""
    from . import policies
    from .directory import EVICTIONS
    from .predictors.registry import PREFETCHERS

    policy = policies.get(policy)
    on_device = policy.prefetch is None or hasattr(PREFETCHERS[policy.prefetch], "predict_on_device")
    return on_device and policy.misses == "copy" and not (policy.predictor or policy.eviction not in EVICTIONS
                                                          or not policy.retain)


def quantize_refusal(policy: Policy, ffn) -> str:
    """Why `policy`'s low-precision copies cannot serve a model of expert form `ffn` (the grouped kernels' forms
    only: unbiased matrices stored [out, in], gate and up as two halves)."""
    name = getattr(ffn, "name", str(ffn))
    flags = [flag for flag in ("up_bias", "down_bias", "transposed", "interleaved") if getattr(ffn, flag, None)]
    form = f"{name!r}" + (f" ({', '.join(flags)})" if flags else "")
    return (f"policy {policy.name!r} quantizes expert matrices [out, in] group-wise along their input columns, and "
            f"this model's expert form {form} is not one it takes (forms it takes: unbiased "
            f"{', '.join(_kernels.FFN_KINDS)} stored [out, in], gate and up as two halves); use a full-precision "
            "policy such as 'lru'")
