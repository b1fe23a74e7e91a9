"""offload(model, policy, gpu_budget): move a transformers MoE model's experts into the engine, and back.

The dense part of the model (embeddings, attention, routers, norms) goes to the device; every expert goes to
the host ExpertStore, and a cache of `gpu_budget` bytes serves them on the device. The model keeps its
`forward()` and `generate()`; `unload()` (or leaving the `with` block) puts the experts back as parameters.
"""

from __future__ import annotations

import warnings
from dataclasses import asdict, dataclass, field
from typing import Any, cast

import torch
from torch import nn

from . import costmodel, hooks, policies
from .budget import format_bytes, parse_budget
from .cache import ExpertCache, PrecisionCaches
from .costmodel import Measurements
from .errors import BudgetError, MoeOffloadError, NotOffloadedError, UnsupportedModelError
from .eviction import make_rule
from .hostexperts import HostExperts, HostStats
from .layer import OffloadedMoELayer, grouped_spec
from .layout import QuantizedLayout
from .plan import ExecutionPlan, make_plan, precision_slots, quantize_refusal
from .predictors.registry import PREFETCHERS
from .progress import progress
from .quantize import GROUP_SIZE
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
    kernels: str = "exact"  # the plan's kernels: "exact", "triton" or "reference" (moeoffload.plan)
    fetch: str = "host"  # the plan's fetch: "host" (a sync per layer, the copy engine) or "device"
    # a low-precision policy's caches, per precision ("full", "int8", "int4"); the totals above sum them
    precision: str = "full"  # the plan's precision ("full", "int8", "int4", "full+int4")
    expert_bytes_by_precision: dict[str, int] = field(default_factory=dict)
    hits_by_precision: dict[str, int] = field(default_factory=dict)
    misses_by_precision: dict[str, int] = field(default_factory=dict)
    upgrades: int = 0  # full-precision misses of an expert then resident in low precision (HOBBIT)
    scratch_bytes: int = 0  # device bytes beside the slots where quantized experts are dequantized
    miss_rule: str = "copy"  # the plan's misses: "copy", or "host" / "cost-model" / "split" (moeoffload.costmodel)
    host_misses: int = 0  # misses computed on the host CPU (included in `misses`; the rest were copied)
    host_bytes: int = 0  # expert bytes the host read from the store to compute them

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
        self.precisions: PrecisionCaches | None = None  # a low-precision policy's caches (`cache` is the first)
        self.layers: list[OffloadedMoELayer] = []
        self.plan: ExecutionPlan
        self.budget_bytes = 0
        self.runahead = None
        self._encoder_drain: Any = None  # fetch="device": the encoder's forward hook that drains the courier
        self.host: HostExperts | None = None  # the host CPU's worker, under a plan with host misses
        self._measurements: Measurements | None = None  # this machine with this store, measured once

    def stats(self) -> OffloadStats:
        self._require_cache()
        if self.precisions is not None:
            return self._precision_stats(self.precisions)
        c = self.cache
        host = self.host.stats if self.host is not None else HostStats()
        return OffloadStats(
            # exact: the tokens and logits of policy "resident" on the same plan (on kernels "exact", eager's too)
            policy=self.policy.name, exact=self.policy.exact, device=str(self.device),
            hits=c.stats.hits, misses=c.stats.misses + host.experts, evictions=c.stats.evictions,
            h2d_copies=c.transfer.stats.copies, h2d_bytes=c.transfer.stats.bytes,
            expert_bytes=self.store.expert_bytes, n_slots=c.n_slots, cache_bytes=c.pool_bytes,
            budget_bytes=self.budget_bytes, total_expert_bytes=self.store.total_bytes,
            dense_bytes=self.dense_bytes, peak_resident_experts=c.stats.peak_resident,
            prefetches=c.stats.prefetches, prefetch_hits=c.stats.prefetch_hits,
            predictor_bytes=self.predictor_bytes(), kernels=self.plan.kernels, fetch=self.plan.fetch,
            miss_rule=self.plan.misses, host_misses=host.experts, host_bytes=host.bytes,
        )

    def _precision_stats(self, precisions: PrecisionCaches) -> OffloadStats:
        """A low-precision policy's statistics: every count summed over its caches, and split by precision."""
        caches = precisions.caches
        stats = {p: c.stats for p, c in caches.items()}
        total = {name: sum(getattr(st, name) for st in stats.values()) for name in ("hits", "misses", "evictions",
                                                                                    "peak_resident")}
        return OffloadStats(
            policy=self.policy.name, exact=self.policy.exact, device=str(self.device),
            hits=total["hits"], misses=total["misses"], evictions=total["evictions"],
            h2d_copies=sum(c.transfer.stats.copies for c in caches.values()),
            h2d_bytes=sum(c.transfer.stats.bytes for c in caches.values()),
            expert_bytes=self.cache.store.expert_bytes, n_slots=sum(c.n_slots for c in caches.values()),
            cache_bytes=sum(c.pool_bytes for c in caches.values()), budget_bytes=self.budget_bytes,
            total_expert_bytes=self.store.total_bytes, dense_bytes=self.dense_bytes,
            peak_resident_experts=total["peak_resident"], prefetches=0, prefetch_hits=0,
            kernels=self.plan.kernels, fetch=self.plan.fetch, precision=self.plan.precision,
            expert_bytes_by_precision={p: c.store.expert_bytes for p, c in caches.items()},
            hits_by_precision={p: st.hits for p, st in stats.items()},
            misses_by_precision={p: st.misses for p, st in stats.items()},
            upgrades=precisions.upgrades, scratch_bytes=precisions.scratch_bytes,
        )

    def predictor_bytes(self) -> int:
        """Device bytes of the policy's predictor (networks, tables, kept predictions), not counting tensors it
        shares with the model (SiDA reads the model's embeddings). Read when asked: a predictor may move its
        networks to the device at its first call."""
        held = getattr(getattr(self, "runahead", None), "held_bytes", None)  # RunAhead; the oracle holds nothing
        return held() if held is not None else 0

    def reset_stats(self) -> None:
        self._require_cache()
        if self.precisions is not None:
            self.precisions.reset_stats()
        else:
            self.cache.reset_stats()
        if self.host is not None:
            self.host.reset_stats()

    def host_measurements(self) -> Measurements:
        """Pinned H2D bandwidth, host read bandwidth and host expert FFN time by token count on this machine with
        this model's experts (`moeoffload.costmodel.measure`): measured at the first call, kept until unload. What
        the cost-model and split plans decide by, and what `costmodel.combined_floor` reads."""
        if self._measurements is None:
            host = HostExperts(self.store, self.device)  # the threads and dtype a serving worker gets
            try:
                ffn = self.hook.expert_ffn(self.hook.layers[0])
                self._measurements = costmodel.measure(self.store, self.device, ffn, hidden_size(self.hook), host)
            finally:
                host.close()
        return self._measurements

    def switch(self, policy: str | policies.Policy = "lru", gpu_budget: str | int | None = "all", *, predictor=None,
               kernels: str = "auto", fetch: str = "auto") -> OffloadedModel:
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
        require_quantizable(policy, self.hook)
        n_slots, budget_bytes = plan_slots(policy, gpu_budget, self.store, self.device)
        plan = plan_for(self.hook, kernels, fetch, policy, n_slots, self.store, self.device)
        self._release_cache()
        self._serve(policy, n_slots, budget_bytes, predictor, plan)
        return self

    def _serve(self, policy: policies.Policy, n_slots: int, budget_bytes: int, predictor,
               plan: ExecutionPlan) -> None:
        """Build the cache, prefetcher and predictor runtime of `policy` over the store and route every MoE layer to
        them as `plan` says: the one setup that `offload` and `switch` share. On failure, what was built is torn
        down again."""
        hook = self.hook
        try:
            self.precisions = None
            if plan.precision != "full":
                self.precisions = self._precision_caches(policy, budget_bytes)
                cache = next(iter(self.precisions.caches.values()))
            else:
                cache = ExpertCache(self.store, n_slots, self.device, make_rule(policy.eviction),
                                    retain=policy.retain, fetch=plan.fetch)
            self.cache, self.policy, self.plan, self.budget_bytes = cache, policy, plan, budget_bytes
            self.serving = True
            if policy.preload:
                cache.preload(self.store.keys())
            self.host = self._host_experts(plan, cache) if plan.host_misses else None
            prefetcher = make_prefetcher(policy, hook, cache)
            self.runahead = make_runahead(policy, predictor, hook, cache, self.model)
            if self.runahead is not None:
                prefetcher = self.runahead if policy.predictor_prefetch else None
            for i, module in enumerate(hook.layers):
                stages = hook.expert_stages(module) if hook.expert_stages is not None else None
                layer = OffloadedMoELayer(i, hook.num_experts, cache, hook.expert_ffn(module), plan, prefetcher,
                                          router_tap=None if self.runahead is None else self.runahead.tap,
                                          ffn=hook.ffn, stages=stages, host=self.host, precisions=self.precisions,
                                          full_precision_gate=policy.full_precision_gate)
                hook.install(module, layer)
                self.layers.append(layer)
            if plan.fetch == "device":
                # the layers drain the courier after the model's last MoE layer; an encoder-decoder's encoder ends
                # before that, and what runs between (generate's bookkeeping) may block in the driver (courier.py,
                # "Blocking calls"), so its encoder drains too
                config = getattr(self.model, "config", None)
                get_encoder = getattr(self.model, "get_encoder", None)
                if getattr(config, "is_encoder_decoder", False) and callable(get_encoder):
                    encoder: nn.Module = get_encoder()
                    self._encoder_drain = encoder.register_forward_hook(lambda *_: cache.settle_device())
        except BaseException:
            self._release_cache()
            raise
        self.reset_stats()

    def _precision_caches(self, policy: policies.Policy, budget_bytes: int) -> PrecisionCaches:
        """One cache per precision of a low-precision policy, over the store's quantized copies (made on the device
        the first time a policy asks for them, then kept for later switches)."""
        caches = {}
        for precision, slots in precision_slots(policy, budget_bytes, self.store).items():
            store = self.store if precision == "full" else self.store.low_precision(precision, device=self.device)
            caches[precision] = ExpertCache(store, slots, self.device, make_rule(policy.eviction), retain=True)
        return PrecisionCaches(caches)

    def _host_experts(self, plan: ExecutionPlan, cache: ExpertCache) -> HostExperts:
        """The host's worker for a plan with host misses; under "host" (llama.cpp's --cpu-moe) the cache is filled
        once with the last MoE layers' experts, as many as it holds, and never changes (no miss is copied)."""
        host = HostExperts(self.store, self.device)
        if plan.misses in ("cost-model", "split"):
            host.measurements = self.host_measurements()
        if plan.misses == "host":
            cache.preload(list(self.store.keys())[-cache.n_slots:])
        return host

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
        for layer in self.layers:
            layer.close()
        self.layers = []
        if self.host is not None:
            self.host.close()  # its statistics stay readable
        self.cache.free()  # statistics stay readable
        if self.precisions is not None:
            self.precisions.free()  # kept: its statistics stay readable too
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
    if policy.precision != "full":
        return sum(precision_slots(policy, budget_bytes, store).values()), budget_bytes
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


def plan_for(hook: hooks.ModelHook, kernels: str, fetch: str, policy: policies.Policy, n_slots: int,
             store: ExpertStore, device: torch.device) -> ExecutionPlan:
    """The execution plan of this model under `policy` (`moeoffload.plan.make_plan`), refused before anything moves."""
    grouped_form = grouped_spec(hook.ffn, store.layout) is not None
    return make_plan(kernels, fetch, policy=policy, grouped_form=grouped_form, device=device, n_slots=n_slots,
                     store=store)


def offload(model: nn.Module, policy: str | policies.Policy = "lru", gpu_budget: str | int | None = "all", *,
            device: str | torch.device | None = None, show_progress: bool | None = None,
            predictor=None, kernels: str = "auto", fetch: str = "auto", store: ExpertStore | None = None
            ) -> OffloadedModel:
    """Offload `model`'s experts; return the handle. Use as `with offload(model, ...) as handle:` to undo.

    `kernels` and `fetch` make the execution plan (`moeoffload.plan`; `handle.plan` says what was chosen): "auto"
    (the default) runs the fastest plan that serves the model, policy and device: on CUDA the grouped Triton kernels
    and, for LRU and next-use caches, the cache's directory on the device; on a CPU the exact loop. `kernels="exact"`
    is the per-expert loop in eager's order, bit-identical to the unoffloaded model: the verifier. Either way an
    exact policy gives the resident model's tokens and logits on the same plan, bit for bit.
    `predictor`: what a predictive policy (`policy.predictor` set) runs on: a trained RoutingPredictor, or the
    CallTrace of the exact inputs for the oracle policies; `moeoffload.predictors.prepare()` makes it.
    `store`: the experts already in host memory (filled from a checkpoint, or seeded for a benchmark), laid out as
    this model's hook lays them out; the model's own experts are then not read, only dropped (they may be on the
    meta device), so a model larger than its host copy plus its dense part can be served."""
    if getattr(model, "_moeoffload", None) is not None:
        raise MoeOffloadError("this model is already offloaded; call moeoffload.unload(model) first")
    policy = policies.get(policy)
    check_predictor(policy, predictor)
    hook = hooks.discover(model)
    require_routers(policy, hook)  # refuse before any weight moves
    require_quantizable(policy, hook)
    device = resolve_device(device)
    original_device = next(iter(hook.layers[0].parameters())).device
    if original_device.type == "meta":  # experts that came with a store go back to host memory on unload
        original_device = torch.device("cpu")
    given = store is not None
    if store is None:
        store = ExpertStore(hook.layout, len(hook.layers), hook.num_experts, pin_memory=device.type == "cuda")
    else:
        _check_given_store(store, hook)
    n_slots, budget_bytes = plan_slots(policy, gpu_budget, store, device)
    plan = plan_for(hook, kernels, fetch, policy, n_slots, store, device)

    for i, module in enumerate(progress(hook.layers, desc="moeoffload: storing experts", enable=show_progress)):
        if not given:
            for e in range(hook.num_experts):
                store.put((i, e), hook.expert_tensors(module, e))
        hook.strip(module)
        if any(p.is_meta for p in module.parameters()):  # a model built on meta, its experts in the given store
            module.to_empty(device=original_device)
    model.to(device)
    if hook.family == "experts3d":
        hooks.experts3d.select(model, hooks.experts3d.IMPLEMENTATION)
    handle = OffloadedModel(model, hook, store, original_device, device)
    setattr(model, "_moeoffload", handle)  # noqa: B010 (an nn.Module attribute that is not a parameter)
    try:
        handle._serve(policy, n_slots, budget_bytes, predictor, plan)
    except BaseException:
        handle.unload()  # the experts go back: a failed offload leaves the model as it was
        raise
    return handle


def _check_given_store(store: ExpertStore, hook: hooks.ModelHook) -> None:
    """A store passed to `offload` must hold every expert of this model, in this model's layout."""
    shape = (len(hook.layers), hook.num_experts)
    if (store.num_layers, store.num_experts) != shape or store.layout != hook.layout:
        raise MoeOffloadError(f"the given store holds {store.num_layers} x {store.num_experts} experts of layout "
                              f"{store.full_layout.names}, but this model has {shape[0]} x {shape[1]} of layout "
                              f"{hook.layout.names}; build the store from this model's hook "
                              "(moeoffload.hooks.discover)")
    if len(store) != shape[0] * shape[1]:
        raise MoeOffloadError(f"the given store holds {len(store)} of this model's {shape[0] * shape[1]} experts; "
                              "fill every expert (ExpertStore.put or ExpertStore.allocate_layer) before offloading")


def switch(model: nn.Module, policy: str | policies.Policy = "lru", gpu_budget: str | int | None = "all", *,
           predictor=None, kernels: str = "auto", fetch: str = "auto") -> OffloadedModel:
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


def require_quantizable(policy: policies.Policy, hook: hooks.ModelHook) -> None:
    """A low-precision policy takes the expert forms whose matrices quantize group-wise (`plan.quantize_refusal`)."""
    if policy.precision == "full":
        return
    if grouped_spec(hook.ffn, hook.layout) is None:
        raise UnsupportedModelError(quantize_refusal(policy, hook.ffn))
    try:
        QuantizedLayout(hook.layout, 4, GROUP_SIZE)
    except ValueError as exc:
        raise UnsupportedModelError(f"policy {policy.name!r} cannot quantize this model's experts: {exc}; use a "
                                    "full-precision policy such as 'lru'") from None


def make_prefetcher(policy: policies.Policy, hook: hooks.ModelHook, cache: ExpertCache):
    """The policy's prefetcher over `cache`, or None. A prefetch changes when experts move, never what is computed,
    so a prefetcher factory that fails is dropped with a warning naming the policy, and the cache fetches on demand."""
    if policy.prefetch is None:
        return None
    require_routers(policy, hook)
    try:
        return PREFETCHERS[policy.prefetch](cache, hook.router_weight, hook.next_layer, hook.top_k, hook.router_bias)
    except Exception as exc:
        warnings.warn(f"moeoffload: policy {policy.name!r}: prefetcher {policy.prefetch!r} failed to build "
                      f"({type(exc).__name__}: {exc}); the cache fetches on demand", RuntimeWarning, stacklevel=3)
        return None


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

    runtime: OracleReplay | RunAhead
    if isinstance(predictor, CallTrace):
        runtime = OracleReplay(predictor, cache, prefetch=policy.predictor_prefetch)
    else:
        runtime_class = getattr(predictor, "runahead_class", RunAhead)  # a predictor may bring its runtime (ExpertFlow)
        runtime = runtime_class(predictor, cache, hook, model, replace_router=policy.replace_router,
                                prefetch=policy.predictor_prefetch)
    rule: Any = cache.rule  # the rules that bind (Belady, prior-frequency) say so by name
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


def hidden_size(hook: hooks.ModelHook) -> int:
    """The width of an expert's input and output: the down projection's output side."""
    ffn = hook.ffn
    down = ffn.down if ffn is not None else hook.layout.names[1]
    shape = dict(zip(hook.layout.names, hook.layout.shapes))[down]
    return shape[1] if ffn is not None and ffn.transposed else shape[0]


def _device_bytes(model: nn.Module) -> int:
    tensors = list(model.parameters()) + list(model.buffers())
    return sum(t.numel() * t.element_size() for t in tensors)
