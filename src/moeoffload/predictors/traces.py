"""Routing traces: what the model's routers chose, recorded from the engine, saved and loaded.

Two kinds, for two uses:
- `RoutingTrace` (per token): for each forward call of a stack, the token ids and, per MoE layer, the router's
  logits, top-k ids and weights (and optionally the layer's input hidden states). Predictors train on it and are
  scored on a held-out one. Collected by teacher-forced full-sequence passes over prompt + generated tokens.
- `CallTrace` (per layer call): the experts each MoE layer call needed, in call order, for one exact sequence
  of generate() calls. The oracle prefetcher and Belady's eviction replay it; it is only valid for those inputs.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..errors import MoeOffloadError
from ..progress import progress
from .base import stack_call, stacks_of

SCHEMA_VERSION = 1


@dataclass
class RoutingTrace:
    info: dict  # family, num_experts, top_k, num_layers, layer_stack (stack of each layer), normalize
    chunks: list[dict] = field(default_factory=list)
    # chunk: {"stack": s, "tokens": LongTensor [B, S], "layers": {layer: {"logits" [B*S, E] fp16, "ids" [B*S, k],
    #         "weights" [B*S, k], optional "hidden" [B*S, H] fp16}}}

    @property
    def num_layers(self) -> int:
        return self.info["num_layers"]

    @property
    def num_experts(self) -> int:
        return self.info["num_experts"]

    @property
    def top_k(self) -> int:
        return self.info["top_k"]

    def tokens(self) -> int:
        return sum(c["tokens"].numel() for c in self.chunks if c["stack"] == 0)

    def split(self, held_out: float = 0.2) -> tuple[RoutingTrace, RoutingTrace]:
        """(train, held-out) by whole chunks (batches), so no sequence is in both."""
        n_held = max(1, round(len(self.chunks) * held_out)) if len(self.chunks) > 1 else 0
        cut = len(self.chunks) - n_held
        return RoutingTrace(self.info, self.chunks[:cut]), RoutingTrace(self.info, self.chunks[cut:])

    def save(self, path: str | Path) -> None:
        torch.save({"schema": SCHEMA_VERSION, "kind": "routing-trace", "info": self.info, "chunks": self.chunks},
                   Path(path))

    @staticmethod
    def load(path: str | Path) -> RoutingTrace:
        data = torch.load(Path(path), map_location="cpu", weights_only=True)
        if not isinstance(data, dict) or data.get("kind") != "routing-trace":
            raise ValueError(f"{path} is not a moeoffload routing trace; record one with collect_trace()")
        if data.get("schema") != SCHEMA_VERSION:
            raise ValueError(f"{path}: routing trace schema {data.get('schema')}, this moeoffload reads "
                             f"{SCHEMA_VERSION}; record it again")
        return RoutingTrace(data["info"], data["chunks"])


PAST_END = ("warn", "lru")


@dataclass
class CallTrace:
    calls: list[tuple[int, tuple[int, ...]]] = field(default_factory=list)  # (layer, experts needed), call order
    # What the oracle does with calls served after the last recorded one. "warn": they were not recorded, so the
    # served inputs are not the recorded ones. "lru": the recording deliberately covers only the calls whose
    # statistics count (e.g. moebench's timed rounds, not its untimed accuracy pass after them); the oracle then
    # steps aside quietly and the rest is served as LRU without prefetch. A call of another layer than recorded
    # warns either way.
    past_end: str = "warn"

    def __post_init__(self) -> None:
        if self.past_end not in PAST_END:
            raise ValueError(f"CallTrace past_end must be one of {PAST_END}, got {self.past_end!r}")

    def save(self, path: str | Path) -> None:
        torch.save({"schema": SCHEMA_VERSION, "kind": "call-trace", "calls": self.calls, "past_end": self.past_end},
                   Path(path))

    @staticmethod
    def load(path: str | Path) -> CallTrace:
        data = torch.load(Path(path), map_location="cpu", weights_only=True)
        if not isinstance(data, dict) or data.get("kind") != "call-trace" or data.get("schema") != SCHEMA_VERSION:
            raise ValueError(f"{path} is not a moeoffload call trace of schema {SCHEMA_VERSION}; record it again")
        return CallTrace([(int(layer), tuple(experts)) for layer, experts in data["calls"]],
                         past_end=data.get("past_end", "warn"))


class _Recorder:
    """Router tap + stack pre-hooks on an offloaded model: records, never changes routing."""

    def __init__(self, handle, with_hidden: bool):
        self.handle = handle
        self.with_hidden = with_hidden
        self.stacks = stacks_of(handle.model, handle.hook.layers)
        self.stack_of = {layer: s for s, st in enumerate(self.stacks) for layer in st.layers}
        self.chunks: list[dict] = []
        self.calls: list[tuple[int, tuple[int, ...]]] = []
        self.current: dict[int, dict] = {}
        self.router_weight = handle.hook.router_weight
        self._handles = []

    def __enter__(self):
        for s, st in enumerate(self.stacks):
            self._handles.append(st.module.register_forward_pre_hook(self._stack_hook(s), with_kwargs=True))
        for layer in self.handle.layers:
            layer.router_tap = self.tap
        return self

    def __exit__(self, *exc):
        for h in self._handles:
            h.remove()
        for layer in self.handle.layers:
            layer.router_tap = None

    def _stack_hook(self, s: int):
        def hook(module, args, kwargs):
            ids, _ = stack_call(args, kwargs)
            chunk = {"stack": s, "tokens": None if ids is None else ids.detach().cpu(), "layers": {}}
            self.current[s] = chunk
            self.chunks.append(chunk)
        return hook

    def tap(self, layer_idx, hidden, ids, weights):
        num_experts = self.handle.hook.num_experts
        needed = torch.unique(ids[(ids >= 0) & (ids < num_experts)]).tolist()
        self.calls.append((layer_idx, tuple(needed)))
        chunk = self.current.get(self.stack_of[layer_idx])
        if chunk is not None:
            rec = {"ids": ids.detach().cpu(), "weights": weights.detach().float().cpu()}
            if self.router_weight is not None:
                w = self.router_weight(layer_idx)
                rec["logits"] = torch.nn.functional.linear(hidden.to(w.dtype), w).detach().half().cpu()
            if self.with_hidden:
                rec["hidden"] = hidden.detach().half().cpu()
            chunk["layers"][layer_idx] = rec
        return None


def _info(handle, stacks) -> dict:
    hook = handle.hook
    return {"family": hook.family, "num_experts": hook.num_experts, "top_k": hook.top_k,
            "num_layers": len(hook.layers), "layer_stack": [next(s for s, st in enumerate(stacks) if i in st.layers)
                                                            for i in range(len(hook.layers))],
            "vocab_size": int(getattr(handle.model.config, "vocab_size", 0)), "normalize": False}


@contextlib.contextmanager
def recording_handle(model, budget, device):
    """The handle routing is recorded on: the model's own when it is offloaded under an exact policy without a
    predictor (refused otherwise: a predictor's taps would replace the recorder's), else a temporary LRU offload at
    `budget`, restored afterwards."""
    from ..offload import offload

    handle = getattr(model, "_moeoffload", None)
    if handle is not None:
        if handle.runahead is not None or not handle.policy.exact:  # its taps would be replaced, or routing changed
            raise MoeOffloadError(f"routing is recorded on an exact policy without a predictor, but this model is "
                                  f"offloaded with {handle.policy.name!r}; call handle.switch('lru', gpu_budget) first")
        yield handle
        return
    with offload(model, "lru", budget, device=device, show_progress=False) as handle:
        yield handle


def collect_trace(model, prompts: list[torch.Tensor], new_tokens: int = 8, *, with_hidden: bool = False,
                  budget: str | int = "all", device=None, show_progress: bool | None = None) -> RoutingTrace:
    """Greedy-generate `new_tokens` per prompt batch, then record the routing of one teacher-forced pass over
    prompt + generated tokens (the same routing generation saw, one forward per stack instead of one per token).
    Works on a plain model (offloaded here with 'lru' at `budget`, then restored) or an offloaded one."""
    with recording_handle(model, budget, device) as handle:
        dev = handle.device
        recorder = _Recorder(handle, with_hidden)
        for ids in progress(prompts, desc="moeoffload: recording routing", enable=show_progress):
            ids = ids.to(dev)
            with torch.no_grad():
                out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                                     min_new_tokens=new_tokens, do_sample=False, num_beams=1)
                with recorder:
                    if model.config.is_encoder_decoder:
                        model(input_ids=ids, attention_mask=torch.ones_like(ids), decoder_input_ids=out[:, :-1])
                    else:
                        model(input_ids=out[:, :-1])
        info = _info(handle, recorder.stacks)
    chunks = [c for c in recorder.chunks if c["tokens"] is not None and c["layers"]]
    if handle.hook.top_k > 1 and chunks:
        w = next(iter(chunks[0]["layers"].values()))["weights"]
        info["normalize"] = bool(torch.allclose(w.sum(-1), torch.ones(w.shape[0]), atol=1e-3))
    return RoutingTrace(info, chunks)


def record_calls(handle, run, past_end: str = "warn") -> CallTrace:
    """Run `run()` (e.g. the generate() calls of a benchmark round) on an offloaded model and return which
    experts every MoE layer call needed, in order. `past_end`: see CallTrace."""
    recorder = _Recorder(handle, with_hidden=False)
    recorder.router_weight = None  # only the call sequence is kept
    with recorder:
        run()
    return CallTrace(recorder.calls, past_end=past_end)
