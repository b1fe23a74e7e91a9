"""Recording routing from a running engine: the router taps and stack hooks that fill a `RoutingTrace` (per token,
for training predictors) or a `CallTrace` (per layer call, for the oracle). It runs the model offloaded, so it
sits above the engine: the engine reads traces (`traces.py`), never this module."""

from __future__ import annotations

import contextlib

import torch
from torch.utils.hooks import RemovableHandle

from ..errors import MoeOffloadError
from ..progress import progress
from .base import stack_call, stacks_of
from .traces import CallTrace, RoutingTrace


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
        self._handles: list[RemovableHandle] = []

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
    from ..offload import offload  # here: this package's __init__ runs while moeoffload.offload loads

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
                  budget: str | int = "all", device=None, show_progress: bool | None = None,
                  decoder_reads: str = "generated") -> RoutingTrace:
    """Greedy-generate `new_tokens` per prompt batch, then record the routing of one teacher-forced pass over
    prompt + generated tokens (the same routing generation saw, one forward per stack instead of one per token).
    Works on a plain model (offloaded here with 'lru' at `budget`, then restored) or an offloaded one.
    `decoder_reads="prompt"`: an encoder-decoder's decoder is teacher-forced on the prompt itself (shifted right)
    instead of what it generates, so that both stacks are measured on the same text (how published routing
    statistics are taken: on a corpus); nothing is generated."""
    if decoder_reads not in ("generated", "prompt"):
        raise ValueError(f"decoder_reads={decoder_reads!r}: use 'generated' or 'prompt'")
    with recording_handle(model, budget, device) as handle:
        dev = handle.device
        recorder = _Recorder(handle, with_hidden)
        for ids in progress(prompts, desc="moeoffload: recording routing", enable=show_progress):
            ids = ids.to(dev)
            with torch.no_grad():
                if model.config.is_encoder_decoder and decoder_reads == "prompt":
                    start = torch.full_like(ids[:, :1], model.config.decoder_start_token_id)
                    with recorder:
                        model(input_ids=ids, attention_mask=torch.ones_like(ids),
                              decoder_input_ids=torch.cat([start, ids[:, :-1]], 1))
                    continue
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
