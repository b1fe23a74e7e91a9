"""The predictor interface: what a routing predictor sees, when it is called, and what it returns.

When: at the start of each forward call of a stack of MoE layers (the decoder of a causal LM; the encoder and
the decoder of an encoder-decoder model), before the stack's first layer computes. The run-ahead runtime
(`runahead.RunAhead`) calls `predict` there, on a side CUDA stream when the model is on a GPU, so the guess for
every layer of the stack is ready before those layers run; the cache prefetches from it one layer ahead.

Sees: `StackInputs`: the token ids of this forward call and whether they continue the previous call's sequences
(a decode step with a KV cache) or start new ones. Nothing the model computes later (hidden states) is visible:
that is what lets a predictor run ahead of the whole stack.

Returns: a `Prediction`: per MoE layer of the stack, the top-k expert ids of every token (and gate weights, for
a policy that uses the prediction as routing). Token order is the engine's: row-major over [batch, sequence].
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import torch


@dataclass
class StackInputs:
    stack: int  # index of the residual stream (0: encoder or the only stack, 1: decoder)
    layers: list[int]  # the engine's MoE layer indices in this stack, in forward order
    input_ids: torch.Tensor  # [B, S] token ids of this forward call
    new_sequence: bool  # False: a decode step that continues the previous call's sequences


@dataclass
class Prediction:
    layers: list[int]
    top_k_ids: torch.Tensor  # [L, B*S, k] predicted expert ids per layer of `layers`
    top_k_weights: torch.Tensor | None = None  # [L, B*S, k] gate weights, when the predictor can give them

    def row(self, layer_idx: int) -> int | None:
        try:
            return self.layers.index(layer_idx)
        except ValueError:
            return None


@runtime_checkable
class RoutingPredictor(Protocol):
    """A trained or recorded guess of the routing. `predict` must not change model state; `reset` forgets any
    per-sequence state (a recurrent predictor's hidden state)."""

    name: str

    def predict(self, inputs: StackInputs) -> Prediction: ...

    def reset(self) -> None: ...


def top_k_from_logits(logits: torch.Tensor, k: int, normalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, weights) of the k largest logits; weights are softmax probabilities, renormalised over the k when
    the model's router does so (Mixtral), raw otherwise (Switch's top-1 probability)."""
    probs = torch.softmax(logits.float(), dim=-1)
    weights, ids = probs.topk(k, dim=-1)
    if normalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return ids, weights


@dataclass
class Stack:
    module: torch.nn.Module  # the module whose forward runs the stack (MixtralModel, SwitchTransformersStack)
    layers: list[int]


def stacks_of(model: torch.nn.Module, layers: list[torch.nn.Module]) -> list[Stack]:
    """The stacks of MoE layers: the module path before the first numbered component, less its last part
    ("model.layers.3..." -> "model", "decoder.block.5..." -> "decoder"), in model order."""
    names = {id(m): n for n, m in model.named_modules()}
    order: dict[str, list[int]] = {}
    for i, module in enumerate(layers):
        parts = names[id(module)].split(".")
        first_digit = next((j for j, p in enumerate(parts) if p.isdigit()), len(parts))
        order.setdefault(".".join(parts[: max(first_digit - 1, 0)]), []).append(i)
    return [Stack(model.get_submodule(path) if path else model, idx) for path, idx in order.items()]


def stack_call(args: tuple, kwargs: dict) -> tuple[torch.Tensor | None, bool]:
    """(input_ids, new_sequence) of a stack's forward call; input_ids None when the caller passed embeddings."""
    ids = kwargs.get("input_ids", args[0] if args and isinstance(args[0], torch.Tensor) else None)
    past = kwargs.get("cache", kwargs.get("past_key_values"))  # transformers renamed it "cache" in 5.2x
    length = past.get_seq_length() if past is not None and hasattr(past, "get_seq_length") else 0
    return ids, int(length) == 0


def inference_only(net: torch.nn.Module) -> torch.nn.Module:
    """`net` in eval mode with its gradients dropped and its parameters frozen: a trained predictor serves, and
    a gradient kept from its last training step would sit on the device beside its weights (ExpertFlow's path net
    kept one as large as its embedding, 37 MiB at Qwen1.5's vocabulary)."""
    net.zero_grad(set_to_none=True)
    net.requires_grad_(False)
    return net.eval()


def device_bytes(obj: Any, device: torch.device, shared_with: torch.nn.Module | None = None) -> int:
    """Bytes of the distinct tensor storages reachable from `obj` (attributes, modules' parameters, gradients and
    buffers, dicts, lists, tuples) that live on `device`, less the storages of `shared_with`'s parameters and
    buffers (the model's own weights, which a predictor may share, as SiDA shares the input embeddings). What a
    predictor holds on the GPU beyond the model and the expert cache: the memory a suite charges to it."""
    seen_objects: set[int] = set()
    storages: dict[int, int] = {}
    exclude = set() if shared_with is None else {
        t.untyped_storage().data_ptr() for t in list(shared_with.parameters()) + list(shared_with.buffers())}

    def visit(x: Any, depth: int) -> None:
        if depth > 6 or id(x) in seen_objects:
            return
        seen_objects.add(id(x))
        if isinstance(x, torch.Tensor):
            if x.device == device:
                storage = x.untyped_storage()
                if storage.data_ptr() not in exclude:
                    storages[storage.data_ptr()] = storage.nbytes()
        elif isinstance(x, torch.nn.Module):
            # a gradient left on a parameter is held on the device as surely as the parameter itself
            grads = [p.grad for p in x.parameters() if p.grad is not None]
            for t in list(x.parameters()) + grads + list(x.buffers()):
                visit(t, depth + 1)
        elif isinstance(x, dict):
            for v in x.values():
                visit(v, depth + 1)
        elif isinstance(x, (list, tuple)):
            for v in x:
                visit(v, depth + 1)
        elif hasattr(x, "__dict__") and not isinstance(x, type):
            for v in vars(x).values():
                visit(v, depth + 1)

    visit(obj, 0)
    return sum(storages.values())
