"""The KV cache of the serving loop: a budget in tokens, one buffer per request, a batched cache per step.

Each admitted request reserves its longest KV (prompt plus new tokens) up front, so a running request never
waits for KV and nothing is preempted: admission is the only place the budget is checked. A request whose
reservation exceeds the whole budget can never run and fails at once with the number it needs.

Each request keeps its keys and values in its own buffers ([1, heads, capacity, dim] per layer). A decode step
gathers the group's buffers into one transformers DynamicCache, left-padded to the longest; the attention mask
hides the padding, and the step's new column is written back to each buffer. The gather copies the group's KV
once per step (as much memory traffic as attention reads): the price of a group that may change every step
without a paged attention kernel.
"""

from __future__ import annotations

import torch
from transformers import DynamicCache

from ..budget import format_bytes, parse_budget
from ..errors import BudgetError


def kv_bytes_per_token(config, dtype: torch.dtype) -> int:
    """Bytes of keys and values one token adds over all layers, from a decoder's config (MLA included), with the
    cache in `dtype` (the model's)."""
    cfg = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
    layers = cfg.num_hidden_layers
    size = torch.empty(0, dtype=dtype).element_size()
    if getattr(cfg, "kv_lora_rank", None) is not None:  # DeepSeek's MLA, as transformers caches it: per head
        per_layer = cfg.num_attention_heads * (cfg.qk_nope_head_dim + cfg.qk_rope_head_dim + cfg.v_head_dim)
    else:
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        kv_heads = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
        per_layer = 2 * kv_heads * head_dim
    return layers * per_layer * size


def kv_budget_tokens(budget: int | str | None, config, dtype: torch.dtype = torch.float32) -> int | None:
    """The KV budget in tokens: an int is tokens, a size string ("2GiB") is bytes of KV; None: no limit."""
    if budget is None:
        return None
    if isinstance(budget, bool) or not isinstance(budget, (int, str)):
        raise BudgetError(f"kv_budget {budget!r}: pass tokens (an int) or bytes of KV with a unit, e.g. '2GiB'")
    if isinstance(budget, int):
        if budget < 1:
            raise BudgetError(f"kv_budget {budget} tokens: pass a positive number of tokens, or None for no limit")
        return budget
    if budget.strip().endswith("%") or budget.strip().lower() == "all":
        raise BudgetError(f"kv_budget {budget!r}: a KV budget has no total to take a share of; pass tokens or "
                          "bytes with a unit, e.g. '2GiB'")
    per_token = kv_bytes_per_token(config, dtype)
    tokens = parse_budget(budget) // per_token
    if tokens < 1:
        raise BudgetError(f"kv_budget {budget!r} holds no token: one token's KV is {format_bytes(per_token)}")
    return tokens


class KVBudget:
    """Tokens of KV reserved by running requests, against a limit (None: unlimited)."""

    def __init__(self, tokens: int | None):
        self.limit = tokens
        self.used = 0

    def never_fits(self, need: int) -> str | None:
        if self.limit is not None and need > self.limit:
            return (f"needs {need} KV tokens (prompt + max_new_tokens - 1) but the KV budget is {self.limit} "
                    "tokens; raise kv_budget or shorten the request")
        return None

    def fits(self, need: int) -> bool:
        return self.limit is None or self.used + need <= self.limit

    def reserve(self, need: int) -> None:
        self.used += need

    def release(self, need: int) -> None:
        self.used -= need


class SequenceKV:
    """One request's keys and values: per layer a tuple of buffers [1, heads, capacity, dim], `length` filled."""

    def __init__(self, capacity: int):
        self.capacity = capacity
        self.length = 0
        self.layers: list[tuple[torch.Tensor, ...]] = []

    def cache(self) -> DynamicCache:
        """A DynamicCache over this request's filled KV alone (prefill chunks run one request at a time)."""
        if not self.length:
            return DynamicCache()
        return DynamicCache(ddp_cache_data=[tuple(t[:, :, : self.length] for t in bufs) for bufs in self.layers])

    def write(self, cache: DynamicCache, row: int, start: int, count: int) -> None:
        """Append `count` new positions of batch row `row` of `cache`, read at columns [start, start + count)."""
        new = [_layer_tensors(layer) for layer in cache.layers]
        if not self.layers:
            self.layers = [tuple(t.new_zeros(1, t.shape[1], self.capacity, t.shape[3]) for t in ts) for ts in new]
        if self.length + count > self.capacity:
            raise RuntimeError(f"KV of {self.length + count} tokens in a buffer of {self.capacity}")
        for bufs, ts in zip(self.layers, new):
            for buf, t in zip(bufs, ts):
                buf[:, :, self.length : self.length + count] = t[row : row + 1, :, start : start + count]
        self.length += count


def batched_cache(group: list[SequenceKV]) -> tuple[DynamicCache, list[int]]:
    """One DynamicCache for a decode group, each row right-aligned (left padding); returns it and each row's pad.
    Every row of every layer is copied by one `_foreach_copy_`: a group of 64 on a 32-layer model is 4096 copies."""
    longest = max(kv.length for kv in group)
    pads = [longest - kv.length for kv in group]
    layers, dsts, srcs = [], [], []
    for i in range(len(group[0].layers)):
        tensors = []
        for j, proto in enumerate(group[0].layers[i]):
            out = proto.new_zeros(len(group), proto.shape[1], longest, proto.shape[3])
            for row, (kv, pad) in enumerate(zip(group, pads)):
                dsts.append(out[row, :, pad:])
                srcs.append(kv.layers[i][j][0, :, : kv.length])
            tensors.append(out)
        layers.append(tuple(tensors))
    torch._foreach_copy_(dsts, srcs)
    return DynamicCache(ddp_cache_data=layers), pads


def append_column(group: list[SequenceKV], cache: DynamicCache, column: int) -> None:
    """After a decode step: column `column` of each row of `cache` appended to that row's request (one copy op)."""
    dsts, srcs = [], []
    for layer, tensors in enumerate(_layer_tensors(layer) for layer in cache.layers):
        for j, t in enumerate(tensors):
            for row, kv in enumerate(group):
                dsts.append(kv.layers[layer][j][0, :, kv.length])
                srcs.append(t[row, :, column])
    torch._foreach_copy_(dsts, srcs)
    for kv in group:
        kv.length += 1


def _layer_tensors(layer) -> tuple[torch.Tensor, torch.Tensor]:
    return layer.keys, layer.values
