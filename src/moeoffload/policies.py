"""Named policies: small compositions of the engine's parts, registered by name.

A policy is data, not a subclass: which eviction rule, whether the cache keeps experts after use, whether every
expert is resident up front, and whether the policy is exact (only moves weights: output identical to the
unoffloaded model) or approximate (changes what is computed: the suites measure its accuracy drop).
Other packages add policies through the `moeoffload.policies` entry-point group: each entry point names a
`Policy` object (or a callable returning one); they are discovered the first time the registry is read.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from importlib.metadata import entry_points

from .errors import PolicyContractError, UnknownPolicyError
from .eviction import EVICTION_RULES
from .predictors.registry import PREDICTORS, PREFETCHERS

ENTRY_POINT_GROUP = "moeoffload.policies"
MISSES = ("copy", "host", "cost-model", "split")


@dataclass(frozen=True)
class Policy:
    name: str
    description: str
    eviction: str = "lru"
    retain: bool = True  # keep an expert after use: a cache; False: copy every needed expert every time
    preload: bool = False  # every expert resident from the start (needs a budget that holds them all)
    exact: bool = True
    version: str = "1"
    prefetch: str | None = None  # a predictor that copies the next layer's experts early (predictors.PREFETCHERS)
    # a predictor of whole stacks (predictors.PREDICTORS) that needs a training trace or the served inputs' trace;
    # offload() takes it as predictor=..., moebench obtains it with predictors.prepare() before timing
    predictor: str | None = None
    replace_router: bool = False  # the predicted experts and weights ARE the routing (data-aware; approximate)
    predictor_prefetch: bool = True  # False: the predictor only informs eviction (Belady alone)
    # "expertflow": moeoffload.serving groups the requests of a decode step by predicted route (moeoffload.scheduler)
    scheduler: str | None = None
    # "full": the store's own dtype; "int8" / "int4": the precision of the low-precision copies (moeoffload.quantize)
    precision: str = "full"
    # with a low precision: None copies every expert at it; a number makes the policy mixed (HOBBIT): a miss of an
    # expert whose largest gate weight in the call reaches it copies full precision, the others low precision
    full_precision_gate: float | None = None
    # where a miss is computed (moeoffload.plan.MISSES): "copy" into the cache; "host", on the CPU from the store
    # (llama.cpp --cpu-moe); "cost-model", per miss whichever the measured costs say is sooner (Fiddler); "split", a
    # layer's misses divided so that the copy engine and the host finish together (HybriMoE)
    misses: str = "copy"

    def __post_init__(self) -> None:
        if self.eviction not in EVICTION_RULES:
            raise ValueError(
                f"policy {self.name!r}: unknown eviction rule {self.eviction!r}; one of {sorted(EVICTION_RULES)}"
            )
        if self.prefetch is not None and self.prefetch not in PREFETCHERS:
            known = sorted(PREFETCHERS)
            raise ValueError(f"policy {self.name!r}: unknown prefetcher {self.prefetch!r}; one of {known}")
        if self.predictor is not None and self.predictor not in PREDICTORS:
            raise ValueError(f"policy {self.name!r}: unknown predictor {self.predictor!r}; one of {sorted(PREDICTORS)}")
        if self.misses not in MISSES:
            raise ValueError(f"policy {self.name!r}: misses={self.misses!r} is unknown; one of {', '.join(MISSES)}")
        if self.misses != "copy" and self.exact:
            raise ValueError(f"policy {self.name!r} computes misses on the host, whose sums run in another order: it "
                             "needs exact=False")
        self._check_precision()
        if self.replace_router and (self.exact or self.predictor is None):
            raise ValueError(f"policy {self.name!r} replaces the router's choice: it needs a predictor and "
                             "exact=False")

    def _check_precision(self) -> None:
        from .quantize import BITS

        if self.precision == "full":
            if self.full_precision_gate is not None:
                raise ValueError(f"policy {self.name!r}: full_precision_gate needs a low precision (int8 or int4)")
            return
        if self.precision not in BITS:
            raise ValueError(f"policy {self.name!r}: unknown precision {self.precision!r}; one of full, "
                             f"{', '.join(BITS)}")
        if self.exact or self.prefetch or self.predictor or self.preload or not self.retain or self.misses != "copy":
            raise ValueError(f"policy {self.name!r}: a low-precision policy is a retaining cache without prefetch, "
                             "predictor, preload or host misses, and approximate (exact=False)")


BUILTIN = (
    Policy("resident", "every expert on the GPU: the reference the others are measured against", preload=True),
    Policy("on-demand", "no cache: each needed expert is copied to the GPU every time it is used", retain=False),
    Policy("lru", "expert cache, least recently used expert evicted"),
    Policy("lfu", "expert cache, least frequently used expert evicted (counts kept across evictions)", eviction="lfu"),
    Policy("lookahead", "LRU cache; the next layer's router run on this layer's input prefetches its experts",
           prefetch="lookahead"),
    Policy("next-use", "expert cache, the expert whose expected next use is farthest evicted: layers run in a "
           "fixed cycle, so the layer just computed is needed last (Belady's choice when a step uses every expert, "
           "where LRU misses on every request)", eviction="next-use"),
    Policy("lookahead-next-use", "next-use cache; the next layer's router run on this layer's input prefetches "
           "its experts", eviction="next-use", prefetch="lookahead"),
)

# Low-precision copies: fewer bytes per miss, approximate (docs/low-precision.md)
LOW_PRECISION = (
    Policy("lru-int8", "LRU cache of int8 experts (group-wise affine, 64 columns a group): every copy int8",
           precision="int8", exact=False),
    Policy("lru-int4", "LRU cache of int4 experts (group-wise affine, 64 columns a group): every copy int4, as "
           "mixtral-offloading's quantized experts", precision="int4", exact=False),
    Policy("hobbit", "HOBBIT's mixed precision: a miss copies the full-precision expert when its gate weight in the "
           "call is at least 0.5, else its int4 copy; both kinds cached (LRU each), a full copy serves both",
           precision="int4", full_precision_gate=0.5, exact=False),
)

# Predictive policies (issue 4): they need a prepared predictor or trace, so they are kept apart from BUILTIN,
# whose every exact policy runs with no preparation.
PREDICTIVE = (
    Policy("frequency", "frequency prior from a training trace (MoE-Infinity): prefetch each next layer's most "
           "used experts, evict the least used", eviction="prior-frequency", predictor="frequency"),
    Policy("sida", "SiDA-MoE hash network run ahead from the token ids: prefetch predicted experts, evict those "
           "the batch will not need; the router decides (exact)", eviction="belady", predictor="sida"),
    Policy("sida-data-aware", "SiDA-MoE as published: the hash network's experts and weights replace the router "
           "(approximate)", eviction="belady", predictor="sida", replace_router=True, exact=False),
    Policy("expertflow", "ExpertFlow: routing-path predictor run ahead from the token ids prefetches each layer; "
           "the cache corrects itself when a router disagrees; moeoffload.serving's scheduler groups requests by "
           "predicted route (generate() serves the batch it is given)", predictor="expertflow",
           scheduler="expertflow"),
    Policy("oracle", "upper bound: replays the served inputs' recorded routing to prefetch each next layer call; "
           "LRU eviction", predictor="oracle"),
    Policy("belady", "upper bound on hit rate: Belady's eviction (farthest next use) from the served inputs' "
           "recorded routing; no prefetch", eviction="belady", predictor="oracle", predictor_prefetch=False),
    Policy("oracle-belady", "upper bound: oracle prefetch and Belady's eviction, both from the served inputs' "
           "recorded routing", eviction="belady", predictor="oracle"),
)

# Host-assisted policies: a miss may be computed on the host CPU from the store instead of copied; the host's GEMMs
# sum in another order than the device's, so none is exact.
HOST_ASSISTED = (
    Policy("cpu-moe", "llama.cpp --cpu-moe: the GPU holds the experts the budget allows (from the last layer back), "
           "fixed; every other expert is computed on the host CPU", misses="host", exact=False),
    Policy("fiddler", "Fiddler: LRU cache; per miss, copy it or compute it on the host CPU, whichever a cost model "
           "measured at offload time (PCIe bandwidth, host GEMM time by token count) says is sooner",
           misses="cost-model", exact=False),
    Policy("hybrid", "HybriMoE: a layer's misses split between the copy engine and the host CPU so that both finish "
           "together; the misses with the highest recent routing score are the ones copied (admitted); evicted by "
           "use counts with a half-life of 4 steps", eviction="lfu-decay", misses="split", exact=False),
)

_REGISTRY: dict[str, Policy] = {p.name: p for p in BUILTIN + LOW_PRECISION + PREDICTIVE + HOST_ASSISTED}
_PLUGINS_LOADED = False
_BROKEN: dict[str, str] = {}  # entry point name -> why it failed to load (named when that name is asked for)


def register(policy: Policy, replace: bool = False) -> Policy:
    if not isinstance(policy, Policy):
        raise TypeError(f"register() takes a moeoffload.Policy, got {type(policy).__name__}")
    if policy.name in _REGISTRY and not replace and _REGISTRY[policy.name] != policy:
        raise ValueError(f"a policy named {policy.name!r} is already registered; pick another name or replace=True")
    _REGISTRY[policy.name] = policy
    return policy


def _load_plugins() -> None:
    global _PLUGINS_LOADED
    if _PLUGINS_LOADED:
        return
    _PLUGINS_LOADED = True
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        try:
            register(_from_entry_point(ep))
        except Exception as exc:  # a broken plugin must not take the built-in policies down with it
            _BROKEN[ep.name] = str(exc)
            warnings.warn(f"{exc}; the other policies are unaffected", stacklevel=2)


def _from_entry_point(ep) -> Policy:
    """The Policy an entry point names: the object itself, or what calling it returns. A failure names the entry
    point, what went wrong and what the entry point must provide."""
    where = f"policy entry point {ep.name!r} ({ep.value})"
    must = "it must name a moeoffload.Policy or a callable that returns one"
    try:
        obj = ep.load()
    except Exception as exc:
        raise PolicyContractError(f"{where} failed to load: {type(exc).__name__}: {exc}") from exc
    if callable(obj) and not isinstance(obj, Policy):
        try:
            obj = obj()
        except Exception as exc:
            raise PolicyContractError(f"{where} failed to load: its factory raised {type(exc).__name__}: {exc}; "
                                      f"{must}") from exc
    if not isinstance(obj, Policy):
        raise PolicyContractError(f"{where} failed to load: it gave a {type(obj).__name__}, not a Policy; {must}")
    if obj.name in _REGISTRY and _REGISTRY[obj.name] != obj:
        raise PolicyContractError(f"{where} failed to load: a policy named {obj.name!r} is already registered; "
                                  "the plugin must pick another name")
    return obj


def available() -> list[str]:
    _load_plugins()
    return list(_REGISTRY)


def get(name: str | Policy) -> Policy:
    if isinstance(name, Policy):
        return name
    _load_plugins()
    try:
        return _REGISTRY[name]
    except KeyError:
        if name in _BROKEN:
            raise PolicyContractError(f"{_BROKEN[name]}; fix or uninstall the package that provides it") from None
        raise UnknownPolicyError(f"unknown policy {name!r}; available: {', '.join(_REGISTRY)}") from None
