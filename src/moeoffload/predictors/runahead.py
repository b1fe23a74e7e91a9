"""RunAhead: runs a RoutingPredictor at the start of each stack's forward and feeds the cache from it.

- At a stack's start (a forward pre-hook on the stack module) the predictor guesses every layer of the stack,
  on a side CUDA stream when the model is on a GPU; the first layer's experts are prefetched at once.
- Each MoE layer, as it starts, prefetches the next layer's predicted experts (the layer's prefetcher seam).
- Its eviction view, `next_use(key)`, says how many layers ahead the prediction needs an expert (inf: the batch
  does not need it), so a `belady` eviction rule bound to it evicts what the batch will not use (SiDA).
- `replace_router=True` (data-aware, approximate) makes the predicted ids and weights the routing, through the
  layer's router tap; the router's choice is ignored. Otherwise the router decides and mispredictions are
  fetched on demand: exact.
A predictor that raises is dropped with a warning; the model then runs as with no predictor.
"""

from __future__ import annotations

import math
import warnings

import torch

from ..cache import ExpertCache
from .base import Prediction, RoutingPredictor, StackInputs, stack_call, stacks_of

_SIDE_STREAMS: dict[torch.device, torch.cuda.Stream] = {}


def side_stream(device: torch.device) -> torch.cuda.Stream:
    """The one stream predictors run on, per device. One, not one per offloaded model: cuBLAS keeps a workspace
    (tens of MiB on a Hopper GPU) for every stream it has run a GEMM on, so a new stream per handle would leave a
    workspace behind each time a model is offloaded (seen on the H100: about 35 MB per case)."""
    if device not in _SIDE_STREAMS:
        _SIDE_STREAMS[device] = torch.cuda.Stream(device)
    return _SIDE_STREAMS[device]


class RunAhead:
    def __init__(self, predictor: RoutingPredictor, cache: ExpertCache, hook, model, replace_router: bool = False,
                 prefetch: bool = True):
        self.predictor = predictor
        self.model = model
        self.prefetch = prefetch
        self.cache = cache
        self.num_experts = hook.num_experts
        self.replace_router = replace_router
        self.stacks = stacks_of(model, hook.layers)
        self.stack_of = {layer: s for s, st in enumerate(self.stacks) for layer in st.layers}
        self.position = {layer: i for st in self.stacks for i, layer in enumerate(st.layers)}
        self.prediction: dict[int, Prediction] = {}  # stack -> its latest prediction
        self._needed: dict[int, list[list[int]]] = {}  # stack -> experts per layer (host lists, made lazily)
        self._events: dict[int, torch.cuda.Event] = {}
        self._current: tuple[int, int] | None = None  # (stack, position of the running layer)
        self._stream = side_stream(cache.device) if cache.device.type == "cuda" else None
        predictor.reset()
        self._handles = [st.module.register_forward_pre_hook(self._hook(s), with_kwargs=True)
                         for s, st in enumerate(self.stacks)]
        self.failed = False

    def detach(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    # -- at a stack's start --------------------------------------------------------------------------------------
    def _hook(self, s: int):
        def hook(module, args, kwargs):
            self.prediction.pop(s, None)
            self._needed.pop(s, None)
            if self.failed:
                return
            ids, new = stack_call(args, kwargs)
            if ids is None:
                return
            inputs = StackInputs(s, self.stacks[s].layers, ids, new)
            try:
                with torch.no_grad():
                    if self._stream is not None:
                        self._stream.wait_stream(torch.cuda.current_stream(self.cache.device))
                        with torch.cuda.stream(self._stream):
                            pred = self.predictor.predict(inputs)
                        event = torch.cuda.Event()
                        event.record(self._stream)
                        self._events[s] = event
                    else:
                        pred = self.predictor.predict(inputs)
            except Exception as exc:
                self._fail(exc)
                return
            self.prediction[s] = pred
            if self.prefetch:
                self._prefetch_layer(self.stacks[s].layers[0])
        return hook

    def footprint(self, input_ids: torch.Tensor) -> int:
        """Device bytes the predictor needs at this batch shape: its peak over one prediction of every stack for
        new sequences `input_ids` [B, S], run where it runs (its side stream: that includes the stream's cuBLAS
        workspace), plus what it already held. Untimed; the predictor's state is reset afterwards. 0 on a CPU."""
        if self._stream is None or self.failed:
            return 0
        dev = self.cache.device
        torch.cuda.synchronize(dev)
        held = self.held_bytes()
        base = torch.cuda.memory_allocated(dev)
        torch.cuda.reset_peak_memory_stats(dev)
        try:
            with torch.no_grad(), torch.cuda.stream(self._stream):
                for s, st in enumerate(self.stacks):
                    self.predictor.predict(StackInputs(s, st.layers, input_ids, True))
            torch.cuda.synchronize(dev)
        except Exception as exc:
            self._fail(exc)
            return 0
        finally:
            self.predictor.reset()
        return held + max(0, torch.cuda.max_memory_allocated(dev) - base)

    def held_bytes(self) -> int:
        """Device bytes the predictor and its kept predictions hold, less what they share with the model. Read
        when asked: a predictor may move its networks to the device at its first call. 0 on a CPU."""
        if self.cache.device.type != "cuda":
            return 0
        from .base import device_bytes

        return device_bytes([self.predictor, self.prediction], self.cache.device, shared_with=self.model)

    def _fail(self, exc: Exception) -> None:
        warnings.warn(f"moeoffload: predictor {getattr(self.predictor, 'name', '?')} failed ({type(exc).__name__}: "
                      f"{exc}); the model now runs without it (router decides, experts fetched on demand)",
                      RuntimeWarning, stacklevel=4)
        self.failed = True
        self.prediction.clear()
        self._needed.clear()

    def _wait(self, s: int) -> None:
        event = self._events.pop(s, None)
        if event is not None:
            torch.cuda.current_stream(self.cache.device).wait_event(event)

    def needed(self, s: int) -> list[list[int]] | None:
        """Predicted experts of each layer of stack s (in stack order), one host sync per stack call."""
        if s not in self._needed:
            pred = self.prediction.get(s)
            if pred is None:
                return None
            self._wait(s)
            ids = pred.top_k_ids.reshape(len(pred.layers), -1).long()
            if bool(((ids < 0) | (ids > self.num_experts)).any()):  # num_experts itself means "no expert"
                self._fail(ValueError(f"predicted expert ids outside 0..{self.num_experts - 1}"))
                return None
            mask = torch.zeros(len(pred.layers), self.num_experts + 1, dtype=torch.bool, device=ids.device)
            mask.scatter_(1, ids, True)
            rows = mask[:, : self.num_experts].cpu().tolist()
            by_layer = {layer: [e for e, on in enumerate(r) if on] for layer, r in zip(pred.layers, rows)}
            self._needed[s] = [by_layer.get(layer, []) for layer in self.stacks[s].layers]
        return self._needed[s]

    def _prefetch_layer(self, layer_idx: int) -> None:
        s = self.stack_of[layer_idx]
        needed = self.needed(s)
        if needed:
            self.cache.prefetch([(layer_idx, e) for e in needed[self.position[layer_idx]]])

    # -- the layer's seams ---------------------------------------------------------------------------------------
    def __call__(self, layer_idx: int, hidden: torch.Tensor) -> None:
        """Prefetcher seam: the layer after `layer_idx` in its stack."""
        s = self.stack_of[layer_idx]
        layers = self.stacks[s].layers
        pos = self.position[layer_idx]
        if pos + 1 < len(layers) and not self.failed:
            self._prefetch_layer(layers[pos + 1])

    def tap(self, layer_idx: int, hidden: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor):
        """Router-tap seam: track the running layer; in data-aware mode return the predicted routing."""
        s = self.stack_of[layer_idx]
        self._current = (s, self.position[layer_idx])
        if not self.replace_router or self.failed:
            return None
        pred = self.prediction.get(s)
        if pred is None:
            return None  # nothing predicted for this stack: the router decides
        row = pred.row(layer_idx)
        if row is None or pred.top_k_weights is None or pred.top_k_ids.shape[1] != hidden.shape[0]:
            return None  # nothing predicted for these tokens: the router decides
        self._wait(s)
        return pred.top_k_ids[row].to(ids.device), pred.top_k_weights[row].to(weights.device)

    # -- the eviction view ---------------------------------------------------------------------------------------
    def next_use(self, key: tuple[int, int]) -> float:
        """Layers until the prediction of the running stack call needs `key` (0: the running layer); inf: never."""
        if self._current is None:
            return math.inf
        s, pos = self._current
        layer, expert = key
        if self.stack_of.get(layer) != s or self.position[layer] < pos:
            return math.inf
        needed = self._needed.get(s)
        if needed is None:
            return math.inf
        p = self.position[layer]
        return float(p - pos) if expert in needed[p] else math.inf

