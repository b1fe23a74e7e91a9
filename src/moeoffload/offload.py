"""offload(model, policy, gpu_budget): move a transformers MoE model's experts into the engine, and back.

The dense part of the model (embeddings, attention, routers, norms) goes to the device; every expert goes to
the host ExpertStore, and a cache of `gpu_budget` bytes serves them on the device. The model keeps its
`forward()` and `generate()`; `unload()` (or leaving the `with` block) puts the experts back as parameters.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import cast

import torch
from torch import nn

from . import hooks, policies
from .budget import format_bytes, parse_budget
from .cache import ExpertCache
from .errors import BudgetError, MoeOffloadError, NotOffloadedError, UnsupportedModelError
from .eviction import make_rule
from .layer import OffloadedMoELayer
from .predictors.registry import PREFETCHERS
from .progress import progress
from .store import ExpertStore


@dataclass
class OffloadStats:
    """What the engine did since the last reset. Bytes are exact counts, not estimates."""

    policy: str
    exact: bool
    device: str
    hits: int
    misses: int
    evictions: int
    h2d_copies: int
    h2d_bytes: int
    expert_bytes: int  # one expert
    n_slots: int
    cache_bytes: int  # the device pool: n_slots * expert_bytes, never above budget_bytes
    budget_bytes: int
    total_expert_bytes: int
    dense_bytes: int  # parameters and buffers left on the device (non-expert part of the model)
    peak_resident_experts: int
    prefetches: int  # copies issued ahead of a request (included in h2d_copies and h2d_bytes)
    prefetch_hits: int  # requests that a prefetched expert served
    predictor_bytes: int = 0  # what the predictor holds on the device beyond the model's weights (its networks)
    kernels: str = "loop"  # the MoE layers' kernels: "loop" (bit-exact), "triton" or "grouped-torch" (layer.py)
    fetch: str = "host"  # who fetches a missing expert: "host" (a sync per layer, the copy engine) or "device"

    @property
    def hit_rate(self) -> float:
        n = self.hits + self.misses
        return self.hits / n if n else float("nan")

    def as_dict(self) -> dict:
        return {**asdict(self), "hit_rate": self.hit_rate}


class OffloadedModel:
    """Handle of an offloaded model: its statistics, another policy over the same host store (`switch`), and the
    way back (`unload`, or a `with` block)."""

    def __init__(self, model: nn.Module, hook: hooks.ModelHook, store: ExpertStore, original_device: torch.device,
                 device: torch.device):
        self.model = model
        self.hook = hook
        self.store = store
        self.original_device = original_device
        self.device = device
        self.dense_bytes = _device_bytes(model)  # fixed while offloaded; after unload the model holds experts again
        self.active = True
        self.serving = False  # a cache, its prefetcher and the engine's layers are installed (`_serve`)
        self.policy: policies.Policy
        self.cache: ExpertCache
        self.layers: list[OffloadedMoELayer] = []
        self.budget_bytes = 0
        self.runahead = None
        self._encoder_drain = None  # fetch="device": the encoder's forward hook that drains the courier (`_serve`)

    def stats(self) -> OffloadStats:
        self._require_cache()
        c = self.cache
        kernels = "+".join(sorted({layer.kernels for layer in self.layers})) or "loop"
        return OffloadStats(
            # an exact policy is exact on the bit-exact loop only: the grouped kernels sum in another order
            policy=self.policy.name, exact=self.policy.exact and kernels == "loop", device=str(self.device),
            hits=c.stats.hits, misses=c.stats.misses, evictions=c.stats.evictions,
            h2d_copies=c.transfer.stats.copies, h2d_bytes=c.transfer.stats.bytes,
            expert_bytes=self.store.expert_bytes, n_slots=c.n_slots, cache_bytes=c.pool_bytes,
            budget_bytes=self.budget_bytes, total_expert_bytes=self.store.total_bytes,
            dense_bytes=self.dense_bytes, peak_resident_experts=c.stats.peak_resident,
            prefetches=c.stats.prefetches, prefetch_hits=c.stats.prefetch_hits,
            predictor_bytes=self.predictor_bytes(), kernels=kernels,
            fetch="device" if c.directory is not None else "host",
        )

    def predictor_bytes(self) -> int:
        """Device bytes of the policy's predictor (networks, tables, kept predictions), not counting tensors it
        shares with the model (SiDA reads the model's embeddings). Read when asked: a predictor may move its
        networks to the device at its first call."""
        held = getattr(getattr(self, "runahead", None), "held_bytes", None)  # RunAhead; the oracle holds nothing
        return held() if held is not None else 0

    def reset_stats(self) -> None:
        self._require_cache()
        self.cache.reset_stats()

    def switch(self, policy: str | policies.Policy = "lru", gpu_budget: str | int | None = "all", *, predictor=None,
               kernels: str = "torch", fetch: str = "host") -> OffloadedModel:
        """Serve the same offloaded model with another policy and budget; returns this handle.

        The host store stays as it is (no expert crosses the host again: at published size that copy, not the new
        cache, is what costs a minute); the old cache's device pool, its prefetcher, its predictor runtime and the
        engine's layers go first, then a new cache is built for `policy` and statistics start from zero. A budget
        the policy cannot use is refused before anything changes (the old policy keeps serving); if building the new
        cache fails (out of memory), the handle serves nothing until the next `switch`, and `unload()` still restores
        every expert. `predictor`, `kernels` and `fetch`: as for `offload`."""
        if not self.active:
            raise NotOffloadedError("this model was unloaded, so there is nothing to switch; offload it again with "
                                    "moeoffload.offload(model, policy, gpu_budget)")
        policy = policies.get(policy)
        check_predictor(policy, predictor)
        require_routers(policy, self.hook)
        n_slots, budget_bytes = plan_slots(policy, gpu_budget, self.store, self.device)
        fetch = plan_fetch(fetch, policy, kernels, n_slots, self.store)
        self._release_cache()
        self._serve(policy, n_slots, budget_bytes, predictor, kernels, fetch)
        return self

    def _serve(self, policy: policies.Policy, n_slots: int, budget_bytes: int, predictor, kernels: str,
               fetch: str = "host") -> None:
        """Build the cache, prefetcher and predictor runtime of `policy` over the store and route every MoE layer to
        them: the one setup that `offload` and `switch` share. On failure, what was built is torn down again."""
        hook = self.hook
        try:
            cache = ExpertCache(self.store, n_slots, self.device, make_rule(policy.eviction), retain=policy.retain,
                                fetch=fetch)
            self.cache, self.policy, self.budget_bytes, self.serving = cache, policy, budget_bytes, True
            if policy.preload:
                cache.preload(self.store.keys())
            prefetcher = make_prefetcher(policy, hook, cache)
            self.runahead = make_runahead(policy, predictor, hook, cache, self.model)
            if self.runahead is not None:
                prefetcher = self.runahead if policy.predictor_prefetch else None
            for i, module in enumerate(hook.layers):
                stages = hook.expert_stages(module) if hook.expert_stages is not None else None
                layer = OffloadedMoELayer(i, hook.num_experts, cache, hook.expert_ffn(module), prefetcher,
                                          router_tap=None if self.runahead is None else self.runahead.tap,
                                          ffn=getattr(hook, "ffn", None), kernels=kernels, stages=stages)
                hook.install(module, layer)
                self.layers.append(layer)
            if fetch == "device" and any(layer.kernels == "loop" for layer in self.layers):
                raise ValueError(f"fetch='device' runs on the grouped kernels, but kernels={kernels!r} gives the exact "
                                 f"loop on {self.device} for this model: pass kernels='grouped-torch' on a CPU, or "
                                 "use fetch='host'")
            if fetch == "device":
                # the layers drain the courier after the model's last MoE layer; an encoder-decoder's encoder ends
                # before that, and what runs between (generate's bookkeeping) may block in the driver (courier.py,
                # "Blocking calls"), so its encoder drains too
                config = getattr(self.model, "config", None)
                if getattr(config, "is_encoder_decoder", False) and hasattr(self.model, "get_encoder"):
                    encoder = self.model.get_encoder()
                    self._encoder_drain = encoder.register_forward_hook(lambda *_: cache.settle_device())
        except BaseException:
            self._release_cache()
            raise
        cache.reset_stats()

    def _release_cache(self) -> None:
        """Tear down what `_serve` built (predictor runtime, engine layers, device pool); the store stays. The MoE
        layers are left routed to a stand-in that names the fix, so that no forward reads a freed pool."""
        if not self.serving:
            return
        if self.runahead is not None:
            self.runahead.detach()
            self.runahead = None
        if self._encoder_drain is not None:
            self._encoder_drain.remove()
            self._encoder_drain = None
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)  # copies and kernels still in flight read the pool
        for module in self.hook.layers:
            self.hook.install(module, cast(OffloadedMoELayer, _NO_CACHE))
        self.layers = []
        self.cache.free()  # statistics stay readable
        self.serving = False
        if self.device.type == "cuda":
            # hand the pool's blocks back to the device: torch's allocator would keep them reserved in pieces, and a
            # larger pool next (a switch to every expert of a model that barely fits) would find no room
            torch.cuda.empty_cache()

    def _require_cache(self) -> None:
        if self.active and not self.serving:
            raise MoeOffloadError(NO_CACHE_MESSAGE)

    def unload(self) -> nn.Module:
        """Put every expert back into the model as parameters on the model's original device."""
        if not self.active:
            raise NotOffloadedError("this model was already unloaded")
        self._release_cache()  # the device pool goes first: restoring reads the host store only
        for i, module in enumerate(self.hook.layers):
            tensors = [
                {k: v.to(self.original_device, copy=True) for k, v in self.store.views((i, e)).items()}
                for e in range(self.hook.num_experts)
            ]
            self.hook.restore(module, tensors)
            del tensors
            self.store.drop_layer(i)
        if "previous_implementation" in self.hook.extra:
            hooks.experts3d.select(self.model, self.hook.extra["previous_implementation"])
        self.model.to(self.original_device)
        self.store.clear()  # the pinned host copies go now, not when the handle is collected
        self.active = False
        del self.model._moeoffload
        return self.model

    def __enter__(self) -> OffloadedModel:
        return self

    def __exit__(self, *exc) -> None:
        if self.active:
            self.unload()

    def __repr__(self) -> str:
        if not self.serving:
            return f"OffloadedModel(no expert cache, device={self.device}, active={self.active})"
        return (f"OffloadedModel(policy={self.policy.name!r}, device={self.device}, slots={self.cache.n_slots}/"
                f"{self.store.num_layers * self.store.num_experts}, budget={format_bytes(self.budget_bytes)})")


def resolve_device(device: str | torch.device | None) -> torch.device:
    if device is None:
        return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise MoeOffloadError(f"device {device} asked for, but CUDA is not available here; pass device='cpu' or None")
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return device


def plan_slots(
    policy: policies.Policy, budget: str | int | None, store: ExpertStore, device: torch.device
) -> tuple[int, int]:
    """(n_slots, budget_bytes) for `policy` under `budget`; raises BudgetError before any weight moves."""
    total_experts = store.num_layers * store.num_experts
    if budget is None:
        budget = "all"
    budget_bytes = parse_budget(budget, store.total_bytes)
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        if budget_bytes > total:
            raise BudgetError(f"GPU budget {format_bytes(budget_bytes)} is above the device's memory "
                              f"({format_bytes(total)}); lower gpu_budget")
    n_slots = min(budget_bytes // store.expert_bytes, total_experts)
    if policy.preload and n_slots < total_experts:
        raise BudgetError(f"policy {policy.name!r} keeps all {total_experts} experts on the device "
                          f"({format_bytes(store.total_bytes)}) but gpu_budget is {format_bytes(budget_bytes)}; "
                          "use gpu_budget='all' or an offloading policy such as 'lru'")
    if n_slots < store.num_layers:
        raise BudgetError(f"GPU budget {format_bytes(budget_bytes)} holds {n_slots} experts of "
                          f"{format_bytes(store.expert_bytes)}, fewer than one per MoE layer ({store.num_layers}); "
                          f"use at least {format_bytes(store.num_layers * store.expert_bytes)}")
    return int(n_slots), budget_bytes


def device_fetch_serves(policy: str | policies.Policy) -> bool:
    """True when `policy` can run with fetch="device": an LRU or next-use cache without a predictor, and a
    prefetcher, if any, that guesses on the device (`predict_on_device`: the lookahead gate)."""
    from .predictors.registry import PREFETCHERS

    policy = policies.get(policy)
    on_device = policy.prefetch is None or hasattr(PREFETCHERS[policy.prefetch], "predict_on_device")
    from .directory import EVICTIONS

    return on_device and not (policy.predictor or policy.eviction not in EVICTIONS or not policy.retain)


def plan_fetch(fetch: str, policy: policies.Policy, kernels: str, n_slots: int, store: ExpertStore) -> str:
    """Who fetches a missing expert: "host" (the layer learns its experts with one sync and the copy engine copies
    them) or "device" (the layer's kernels find and stream them: no sync; `moeoffload.directory`). Refuses a
    combination "device" cannot serve, before anything moves; a budget that holds every expert needs no fetching,
    and takes the resident path either way."""
    if fetch not in ("host", "device"):
        raise ValueError(f"fetch={fetch!r} is unknown; use 'host' or 'device'")
    if fetch == "host" or n_slots >= store.num_layers * store.num_experts:
        return "host"
    if kernels == "torch":
        raise ValueError("fetch='device' runs on the grouped kernels (the exact loop must learn on the host which "
                         "experts it needs): pass kernels='auto'")
    if not device_fetch_serves(policy):
        raise ValueError(f"fetch='device' serves an LRU or next-use cache, without a predictor, and prefetching "
                         f"only by the lookahead gate; policy {policy.name!r} needs the host: use fetch='host', or a "
                         "policy such as 'lru', 'next-use' or 'lookahead-next-use'")
    return "device"


def offload(model: nn.Module, policy: str | policies.Policy = "lru", gpu_budget: str | int | None = "all", *,
            device: str | torch.device | None = None, show_progress: bool | None = None,
            predictor=None, kernels: str = "torch", fetch: str = "host") -> OffloadedModel:
    """Offload `model`'s experts; return the handle. Use as `with offload(model, ...) as handle:` to undo.

    `predictor`: what a predictive policy (`policy.predictor` set) runs on: a trained RoutingPredictor, or the
    CallTrace of the exact inputs for the oracle policies; `moeoffload.predictors.prepare()` makes it.
    `kernels`: "torch" (default: the per-expert loop, bit-exact against eager), "auto" (grouped Triton kernels on
    CUDA for expert forms they know, else the loop; faster, equal to eager only within bf16 rounding), "triton"
    (refuse if unsupported), see layer.py.
    `fetch`: "host" (default: a layer learns which experts it needs with one device->host sync, and the copy engine
    brings the missing ones) or "device" (experimental: the grouped kernels look the experts up in a directory on
    the device and a host thread queues the missing ones on the copy engine while the GPU waits on a flag: no sync,
    so the host runs ahead while they arrive; LRU policies, `lookahead`'s prefetch included, `moeoffload.directory`,
    `moeoffload.courier`)."""
    if getattr(model, "_moeoffload", None) is not None:
        raise MoeOffloadError("this model is already offloaded; call moeoffload.unload(model) first")
    policy = policies.get(policy)
    check_predictor(policy, predictor)
    hook = hooks.discover(model)
    require_routers(policy, hook)  # refuse before any weight moves
    device = resolve_device(device)
    original_device = next(iter(hook.layers[0].parameters())).device
    store = ExpertStore(hook.layout, len(hook.layers), hook.num_experts, pin_memory=device.type == "cuda")
    n_slots, budget_bytes = plan_slots(policy, gpu_budget, store, device)
    fetch = plan_fetch(fetch, policy, kernels, n_slots, store)

    for i, module in enumerate(progress(hook.layers, desc="moeoffload: storing experts", enable=show_progress)):
        for e in range(hook.num_experts):
            store.put((i, e), hook.expert_tensors(module, e))
        hook.strip(module)
    model.to(device)
    if hook.family == "experts3d":
        hooks.experts3d.select(model, hooks.experts3d.IMPLEMENTATION)
    handle = OffloadedModel(model, hook, store, original_device, device)
    model._moeoffload = handle
    try:
        handle._serve(policy, n_slots, budget_bytes, predictor, kernels, fetch)
    except BaseException:
        handle.unload()  # the experts go back: a failed offload leaves the model as it was
        raise
    return handle


def switch(model: nn.Module, policy: str | policies.Policy = "lru", gpu_budget: str | int | None = "all", *,
           predictor=None, kernels: str = "torch", fetch: str = "host") -> OffloadedModel:
    """Serve an offloaded model with another policy and budget without moving its experts through the host again
    (`OffloadedModel.switch`)."""
    handle = getattr(model, "_moeoffload", None)
    if handle is None:
        raise NotOffloadedError("this model is not offloaded, so there is no policy to switch; use "
                                "moeoffload.offload(model, policy, gpu_budget)")
    return handle.switch(policy, gpu_budget, predictor=predictor, kernels=kernels, fetch=fetch)


NO_CACHE_MESSAGE = ("this offloaded model has no expert cache (a switch failed while building it); call "
                    "handle.switch(policy, gpu_budget) again, or handle.unload()")


class _NoCacheLayer:
    """Where the MoE layers route while a handle has no cache (between caches, or after a failed switch)."""

    def __call__(self, *args, **kwargs):
        raise MoeOffloadError(NO_CACHE_MESSAGE)


_NO_CACHE = _NoCacheLayer()


def require_routers(policy: policies.Policy, hook: hooks.ModelHook) -> None:
    if policy.prefetch is not None and hook.router_weight is None:
        raise UnsupportedModelError(f"policy {policy.name!r} runs routers early, but moeoffload cannot find the "
                                    f"routers of this {hook.family} model; use a policy without prefetch, e.g. 'lru'")


def make_prefetcher(policy: policies.Policy, hook: hooks.ModelHook, cache: ExpertCache):
    if policy.prefetch is None:
        return None
    require_routers(policy, hook)
    return PREFETCHERS[policy.prefetch](cache, hook.router_weight, hook.next_layer, hook.top_k, hook.router_bias)


def check_predictor(policy: policies.Policy, predictor) -> None:
    from .predictors.registry import PREDICTORS
    from .predictors.traces import CallTrace

    if policy.predictor is None:
        if predictor is not None:
            raise MoeOffloadError(f"policy {policy.name!r} uses no predictor; drop predictor= or pick a predictive "
                                  "policy such as 'sida'")
        return
    exact_trace = PREDICTORS[policy.predictor].needs == "exact-trace"
    if predictor is None:
        what = "the recorded routing of the served inputs" if exact_trace else "a trained predictor"
        raise MoeOffloadError(f"policy {policy.name!r} needs {what}: pass "
                              f"predictor=moeoffload.predictors.prepare({policy.name!r}, model, ...)")
    if exact_trace != isinstance(predictor, CallTrace):
        raise MoeOffloadError(f"policy {policy.name!r} needs {'a CallTrace' if exact_trace else 'a RoutingPredictor'}"
                              f", got {type(predictor).__name__}; make it with moeoffload.predictors.prepare()")


def make_runahead(policy: policies.Policy, predictor, hook: hooks.ModelHook, cache: ExpertCache, model: nn.Module):
    """The runtime that feeds the cache from a predictor (RunAhead) or a recorded trace (OracleReplay), bound to
    the eviction rule when the rule ranks by the future or by a prior."""
    if policy.predictor is None:
        return None
    from .predictors.oracle import OracleReplay
    from .predictors.runahead import RunAhead
    from .predictors.traces import CallTrace

    if isinstance(predictor, CallTrace):
        runtime = OracleReplay(predictor, cache, prefetch=policy.predictor_prefetch)
    else:
        runtime_class = getattr(predictor, "runahead_class", RunAhead)  # a predictor may bring its runtime (ExpertFlow)
        runtime = runtime_class(predictor, cache, hook, model, replace_router=policy.replace_router,
                                prefetch=policy.predictor_prefetch)
    rule = cache.rule
    if getattr(rule, "name", None) == "belady":
        rule.bind(runtime)
    elif getattr(rule, "name", None) == "prior-frequency":
        if not hasattr(predictor, "frequency"):
            raise MoeOffloadError(f"policy {policy.name!r} evicts by a frequency prior, but its predictor "
                                  f"{type(predictor).__name__} has none")
        rule.bind(predictor)
    return runtime


def unload(model: nn.Module) -> nn.Module:
    handle = getattr(model, "_moeoffload", None)
    if handle is None:
        raise NotOffloadedError("this model is not offloaded; nothing to unload")
    return handle.unload()


def _device_bytes(model: nn.Module) -> int:
    tensors = list(model.parameters()) + list(model.buffers())
    return sum(t.numel() * t.element_size() for t in tensors)
