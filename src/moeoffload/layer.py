"""OffloadedMoELayer: one MoE layer's expert computation over the cache, in the field's canonical form.

Input is what every router gives: hidden states [T, H], top-k expert ids [T, k] and their gate weights [T, k]
(an id >= num_experts marks "no expert", e.g. a token dropped by Switch's capacity limit). The experts a batch
needs are made resident in waves no larger than the cache, in ascending expert order, so that the sum over
experts is accumulated in the same order as transformers' eager forward: the output is exact, whatever the
budget or the eviction rule. Where the hook can cut its expert form at the projections (`moeoffload.staged`), the
loop runs staged: per expert only its two GEMMs, the rest once per layer, with the same bits.

On CUDA, for expert forms the grouped kernels know (`kernels.FFN_KINDS`), the layer can instead permute the
tokens by expert, run one grouped FFN launch per projection over the cache slots of a wave, and un-permute with
the gate weights (`kernels="triton"`, or "auto": Triton where it can run). That changes the order of the sums:
the output agrees with eager within bf16 rounding, not bit for bit, and on the H100 a near-tie flipped a greedy
token of a tiny bf16 Mixtral (tests/moeoffload/test_kernels.py). So the default is `kernels="torch"`, the exact
loop: an exact policy must give the unoffloaded model's greedy tokens. The grouped path is opt-in, for speed
("grouped-torch" runs it in plain torch, for tests).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import torch

from . import kernels as _kernels
from .cache import ExpertCache
from .staged import ExpertStages, ordered_sum, padded_blocks, row_quantum, token_ranks

ExpertFFN = Callable[[torch.Tensor, dict[str, torch.Tensor]], torch.Tensor]
Prefetcher = Callable[[int, torch.Tensor], None]  # (this layer's index, its MoE input) -> starts copies
KERNEL_MODES = ("auto", "torch", "triton", "grouped-torch")
# Below this many experts in one call the per-expert loop runs, above it the staged loop: the staged loop saves about
# eight launches per expert but adds about twenty per call (benchmarks/exact_loop.py on the H100: 0.72-0.79x of the
# loop's speed with 2 to 6 experts, 1.15-1.26x with 8 of OLMoE's and Qwen3's, 1.9-3.6x with 25 or more).
STAGED_MIN_EXPERTS = 8
# (token, expert) pairs up to which a call runs on the device directory with fetch="device" (its lookup keeps the
# pairs of one call in one Triton program's registers); a larger call (a long prefill) takes the host path
DEVICE_FETCH_MAX_PAIRS = 4096
# fetch="device"'s FFN at decode sizes (pairs up to kernels.routing.FUSED_ROUTE_MAX_PAIRS): "tiles", the Triton
# grouped kernel over a tile table that the routing kernel builds on the device (the routed slots only), or
# "grouped-mm", torch's grouped GEMM with every slot of the pool as a group (192 at a 75% budget of Mixtral-8x7B).
# On the lent H100 (RESULTS.md, fifteenth set) "tiles" took 0.27-0.32 ms for Mixtral's two experts of a batch-1 token
# against 0.36-0.42 (benchmarks/grouped_width.py), and 12.0 against 13.8 ms of kernels in a full-size decode step.
# Larger calls always take "grouped-mm".
DEVICE_FETCH_FFN = "tiles"
DEVICE_FETCH_FFNS = ("grouped-mm", "tiles")
# With the courier's copies in flight after a lookup, "tiles" runs the tiles of slots whose copy has landed before
# the layer waits for its copies, and the rest after (two launches more a layer). False: one FFN after the wait.
DEVICE_FETCH_SPLIT = True


def grouped_spec(ffn, layout) -> _kernels.FFNSpec | None:
    """The grouped kernels' view of a hook's expert form (`hooks.ffn.ExpertFFNSpec`), or None when they cannot
    compute it (unknown kind, biases, transposed or interleaved storage): such layers keep the per-expert loop."""
    name = getattr(ffn, "name", ffn)
    if name not in _kernels.FFN_KINDS:
        return None
    if any(getattr(ffn, flag, None) for flag in ("up_bias", "down_bias", "transposed", "interleaved")):
        return None
    try:
        return _kernels.FFNSpec.from_layout(name, layout, getattr(ffn, "up", None), getattr(ffn, "down", None))
    except ValueError:
        return None


def resolve_kernels(mode: str, spec: _kernels.FFNSpec | None, device: torch.device) -> str:
    """'loop' (exact), 'triton' or 'grouped-torch' for a layer; refuses an explicit mode it cannot honour."""
    if mode not in KERNEL_MODES:
        raise ValueError(f"kernels={mode!r} is unknown; use one of {', '.join(KERNEL_MODES)}")
    if mode == "torch":
        return "loop"
    if mode == "auto":
        ok = spec is not None and device.type == "cuda" and _kernels.triton_importable()
        return "triton" if ok else "loop"
    if spec is None:
        raise ValueError(f"kernels={mode!r}: the grouped kernels do not compute this model's expert form; "
                         f"use kernels='torch' (supported forms: {', '.join(_kernels.FFN_KINDS)})")
    if mode == "triton" and (device.type != "cuda" or not _kernels.triton_importable()):
        raise ValueError("kernels='triton' needs a CUDA device and the triton package; use kernels='auto'")
    return mode


# (layer index, MoE input [T, H], router's ids [T, k], router's weights [T, k]) -> None to keep the router's choice,
# or (ids, weights) to replace it. Traces and oracles only look (None); a data-aware policy replaces (approximate).
RouterTap = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], "tuple[torch.Tensor, torch.Tensor] | None"]


class OffloadedMoELayer:
    def __init__(self, layer_idx: int, num_experts: int, cache: ExpertCache, expert_ffn: ExpertFFN,
                 prefetcher: Prefetcher | None = None, router_tap: RouterTap | None = None, ffn=None,
                 kernels: str = "torch", stages: ExpertStages | None = None):
        self.layer_idx = layer_idx
        self.num_experts = num_experts
        self.cache = cache
        self.expert_ffn = expert_ffn
        self.prefetcher = prefetcher
        self.router_tap = router_tap
        self.spec = grouped_spec(ffn, cache.store.layout)  # None: the grouped kernels cannot compute this form
        self.kernels = resolve_kernels(kernels, self.spec, cache.device)  # "loop", "triton" or "grouped-torch"
        # grouped modes: once every expert of the layer is resident for good, route on the device (`_resident`)
        self.resident_path = self.kernels != "loop"
        # the exact loop with only the projections per expert (`moeoffload.staged`), when the hook can cut its form
        self.stages = stages
        self.sum_dtype: torch.dtype | None = None  # eager sums a token's top-k in this dtype (None: hidden's)
        self.quantum = 1
        self._slot_operands: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self._route_cache: tuple | None = None  # (table, its constants or None): see _device_route
        self._pool_weights: tuple[torch.Tensor, torch.Tensor] | None = None  # every slot's matrices (fetch="device")
        if stages is not None:
            layout = cache.store.layout
            shapes = dict(zip(layout.names, layout.shapes))
            up, down = shapes[stages.up], shapes[stages.down]  # their widths: hidden, the intermediate, twice it
            self.quantum = row_quantum((*up, *down), torch.empty((), dtype=layout.dtype).element_size())
            self._up_width = up[-1] if stages.transposed else up[0]
            self._out_width = down[-1] if stages.transposed else down[0]

    def _prefetch(self, hidden: torch.Tensor) -> None:
        """Start the next layer's copies before this layer computes. A predictor is a guess, so a broken one
        (it raises, or names experts that do not exist) must not break inference: this layer drops it, warns
        once, and fetches on demand from then on; the output is unaffected either way."""
        try:
            self.prefetcher(self.layer_idx, hidden)
        except Exception as exc:
            self._drop_prefetcher(exc, stacklevel=4)

    def _drop_prefetcher(self, exc: Exception, stacklevel: int) -> None:
        warnings.warn(f"moeoffload: prefetcher of MoE layer {self.layer_idx} failed ({type(exc).__name__}: "
                      f"{exc}); this layer now fetches experts on demand", RuntimeWarning, stacklevel=stacklevel)
        self.prefetcher = None

    def _tap(self, hidden: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor):
        """The router tap's routing, or the router's own. A replacement naming experts that do not exist (or of
        the wrong shape) is never used as routing: the tap is dropped with a warning and the router decides."""
        try:
            out = self.router_tap(self.layer_idx, hidden, top_k_index, top_k_weights)
            if out is None:
                return top_k_index, top_k_weights
            ids, weights = out
            if ids.dim() != 2 or ids.shape[0] != hidden.shape[0] or weights.shape != ids.shape:
                raise ValueError(f"replacement routing of shape {tuple(ids.shape)}/{tuple(weights.shape)} for "
                                 f"{hidden.shape[0]} tokens")
            if ids.numel() and bool(((ids < 0) | (ids > self.num_experts)).any()):
                raise ValueError(f"replacement routing names experts outside 0..{self.num_experts - 1}")
            return ids, weights.to(top_k_weights.dtype)
        except Exception as exc:
            warnings.warn(f"moeoffload: router tap of MoE layer {self.layer_idx} failed ({type(exc).__name__}: "
                          f"{exc}); this layer now follows its router", RuntimeWarning, stacklevel=3)
            self.router_tap = None
            return top_k_index, top_k_weights

    def route(self, top_k_index: torch.Tensor) -> tuple[list[int], list[int], torch.Tensor]:
        """Group the (token, k) pairs by expert with one device->host sync per layer.

        Returns the needed experts (ascending), the start of each expert's run in `order`, and `order`: flat
        positions `pos * T + token`, stably sorted by expert, so that within an expert pairs come by top-k
        position, then token: the order of transformers' eager loop (`torch.where` over [k, T]).
        """
        flat = top_k_index.T.reshape(-1)
        invalid = (flat < 0) | (flat >= self.num_experts)
        flat = torch.where(invalid, self.num_experts, flat)
        order = torch.argsort(flat, stable=True)
        counts = torch.bincount(flat, minlength=self.num_experts + 1)[: self.num_experts].tolist()
        needed, starts, offset = [], [], 0
        for expert, count in enumerate(counts):
            if count:
                needed.append(expert)
                starts.append(offset)
            offset += count
        starts.append(offset)
        return needed, starts, order

    def __call__(self, hidden: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> torch.Tensor:
        if self.router_tap is not None:
            top_k_index, top_k_weights = self._tap(hidden, top_k_index, top_k_weights)
        if self.kernels != "loop" and self._fetches_on_device(top_k_index):
            return self._device_fetched(hidden, top_k_index, top_k_weights)  # its lookup counts the layer's start
        self.cache.enter_layer(self.layer_idx)
        if self.kernels != "loop":
            table = self.cache.resident_table(self.layer_idx, self.num_experts) if self.resident_path else None
            if table is not None:
                return self._resident(hidden, top_k_index, top_k_weights, table)
            return self._grouped(hidden, top_k_index, top_k_weights)
        needed, starts, order = self.route(top_k_index)
        staged = len(needed) >= STAGED_MIN_EXPERTS and not (torch.is_grad_enabled() and hidden.requires_grad)
        if self.stages is not None and staged:  # (mm(out=), which it writes with, has no autograd)
            return self._staged(hidden, top_k_index, top_k_weights, needed, starts, order)
        out = torch.zeros_like(hidden, dtype=self.sum_dtype)
        tokens = hidden.shape[0]
        wave = self.cache.n_slots
        for first in range(0, len(needed), wave):
            experts = needed[first : first + wave]
            keys = [(self.layer_idx, e) for e in experts]
            slots = self.cache.acquire(keys)
            try:
                if self.prefetcher is not None and first == 0 and len(needed) <= wave:
                    self._prefetch(hidden)
                for i, slot in enumerate(slots):
                    pairs = order[starts[first + i] : starts[first + i + 1]]
                    tok, pos = pairs % tokens, pairs // tokens
                    y = self.expert_ffn(hidden[tok], self.cache.weights(slot))
                    y = y * top_k_weights[tok, pos, None]
                    out.index_add_(0, tok, y.to(out.dtype))
            finally:
                self.cache.release(keys)
        return out.to(hidden.dtype)

    def _staged(self, hidden: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor,
                needed: list[int], starts: list[int], order: torch.Tensor) -> torch.Tensor:
        """The exact loop with the per-expert work cut to its two projections (`moeoffload.staged`: why exact)."""
        stages, tokens, k = self.stages, hidden.shape[0], top_k_index.shape[1]
        n = starts[-1]
        if n == 0:
            return torch.zeros_like(hidden)
        pairs = order[:n]
        tok, pos = pairs % tokens, pairs // tokens
        counts = [starts[i + 1] - starts[i] for i in range(len(needed))]
        blocks, sizes = padded_blocks(counts, self.quantum)  # every expert's rows start 512-byte aligned, as in eager
        height = blocks[-1]
        rows = None  # the padded row of each pair, when padding moved any
        if height == n:
            x = hidden[tok]
        else:
            plan = torch.tensor([[b - s for b, s in zip(blocks, starts[:-1])], counts]).to(hidden.device)
            rows = torch.arange(n, device=hidden.device) + torch.repeat_interleave(plan[0], plan[1], output_size=n)
            source = torch.zeros(height, dtype=torch.long, device=hidden.device)
            source[rows] = tok
            x = hidden[source]  # padding rows hold token 0: no GEMM reads them
        up = x.new_empty((height, self._up_width), dtype=self.cache.pool.dtype)
        x_blocks, up_blocks = x.split(sizes)[::2], up.split(sizes)[::2]
        y = y_blocks = None
        wave = self.cache.n_slots
        for first in range(0, len(needed), wave):
            experts = needed[first : first + wave]
            last = first + len(experts) - 1
            keys = [(self.layer_idx, e) for e in experts]
            slots = self.cache.acquire(keys)
            try:
                if self.prefetcher is not None and first == 0 and len(needed) <= wave:
                    self._prefetch(hidden)
                operands = [self._operands(slot) for slot in slots]
                for i, (w_up, _) in enumerate(operands):
                    torch.mm(x_blocks[first + i], w_up, out=up_blocks[first + i])
                mid = stages.mid(up[blocks[first] : blocks[last] + counts[last]])  # fresh: aligned like `up`
                if y is None:
                    y = mid.new_empty((height, self._out_width))
                    y_blocks = y.split(sizes)[::2]
                mid_blocks = mid.split(sizes[2 * first : 2 * last + 1])[::2]
                for i, (_, w_down) in enumerate(operands):
                    torch.mm(mid_blocks[i], w_down, out=y_blocks[first + i])
            finally:
                self.cache.release(keys)
        assert y is not None
        y = y if rows is None else y[rows]
        contributions = (y * top_k_weights[tok, pos, None]).to(self.sum_dtype or hidden.dtype)
        ranks = token_ranks(top_k_index).T.reshape(-1)[pairs]
        return ordered_sum(contributions, tok, ranks, tokens, k, hidden).to(hidden.dtype)

    def _operands(self, slot: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The staged loop's right-hand matrices of the expert in `slot` (views of the pool, made once per slot)."""
        found = self._slot_operands.get(slot)
        if found is None:
            found = self._slot_operands[slot] = self.stages.operands(self.cache.weights(slot))
        return found

    def _resident(self, hidden: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor,
                  table: torch.Tensor) -> torch.Tensor:
        """Every expert of this layer sits in the cache for good (`ExpertCache.resident_table`): nothing to fetch,
        so nothing to learn on the host. Route on the device (`kernels.route_on_device`), permute, run the grouped
        FFN over the slots of this layer's experts by device-side offsets (torch's grouped GEMM on CUDA) and
        un-permute, without a device-to-host sync: the host runs ahead of the GPU as in an unoffloaded model,
        instead of waiting at every layer for the router's answer. At decode sizes this path is bound by the host's
        launches, so it launches as few kernels as it can: what does not change between calls is made once per
        table (`_device_route`), and hits are counted later, in batches."""
        route = self._device_route(table)
        if route is None:  # this layer's experts are spread wider than one grouped GEMM can take
            self.resident_path = False
            return self._grouped(hidden, top_k_index, top_k_weights)
        slot_of_id, slot_ends, window, weights = route
        k = top_k_index.shape[1]
        backend = "triton" if self.kernels == "triton" else "torch"
        order, inverse, offs = _kernels.route_on_device(top_k_index, slot_of_id, slot_ends, backend=backend)
        try:
            x = _kernels.permute(hidden, order, backend=backend, divisor=k)
            y = _kernels.grouped_ffn_by_offsets(self.spec, x, window, offs, weights)
        except Exception as exc:  # an unsupported stride or dtype in torch's grouped GEMM: keep the synced path
            warnings.warn(f"moeoffload: the resident path of MoE layer {self.layer_idx} failed ({type(exc).__name__}: "
                          f"{exc}); it routes on the host from now on", RuntimeWarning, stacklevel=3)
            self.resident_path = False
            return self._grouped(hidden, top_k_index, top_k_weights)
        self.cache.count_hits(offs)  # after the fallback point: never counted twice
        return _kernels.unpermute(y, inverse, top_k_weights, hidden.dtype, backend=backend, token_major=True,
                                  limit=offs[-1:])

    def _fetches_on_device(self, top_k_index: torch.Tensor) -> bool:
        """This call runs on the cache's device directory (fetch="device"): no prefetcher or one that guesses on the
        device, no routing to replace, few enough pairs for one lookup program, and every expert it may name fits
        in the pool at once."""
        if self.cache.directory is None:  # the common case first: this runs on every layer call
            return False
        pairs = top_k_index.numel()
        return ((self.prefetcher is None or hasattr(self.prefetcher, "predict_on_device"))
                and self.router_tap is None and pairs <= DEVICE_FETCH_MAX_PAIRS
                and self.cache.serves_on_device(min(self.num_experts, pairs)))

    def _ahead(self, hidden: torch.Tensor):
        """fetch="device"'s prefetch: a callable giving the prefetcher's (next layer, guessed ids on the device), or
        None without a prefetcher. A guess that fails is dropped as in `_prefetch`: a warning, then on demand."""
        prefetcher = self.prefetcher
        if prefetcher is None:
            return None

        def guess():
            try:
                return prefetcher.predict_on_device(self.layer_idx, hidden)
            except Exception as exc:
                self._drop_prefetcher(exc, stacklevel=6)
                return None

        return guess

    def _device_fetched(self, hidden: torch.Tensor, top_k_index: torch.Tensor,
                        top_k_weights: torch.Tensor) -> torch.Tensor:
        """The resident path over the pool (its FFN: `DEVICE_FETCH_FFN`), after the device itself made the routed
        experts resident (`ExpertCache.fetch_on_device`: lookup and victims on the device, fills queued by the
        courier thread on the copy engine, all launched without a sync). The host never learns which experts this
        call needed, so it runs ahead of the GPU while a miss streams in, as it does when every expert is resident.
        A prefetcher that guesses on the device (the lookahead gate) queues the next layer's copies right behind
        this call's, so they run while this layer computes."""
        backend = "triton" if self.kernels == "triton" else "torch"
        pairs, k = top_k_index.numel(), top_k_index.shape[1]
        # "tiles" in plain torch reads the table on the host: fine on a CPU, a blocking call on CUDA (see
        # courier.py, "Blocking calls"), where only the Triton backend takes it
        tiled = (DEVICE_FETCH_FFN == "tiles" and pairs <= _kernels.routing.FUSED_ROUTE_MAX_PAIRS
                 and (backend == "triton" or not hidden.is_cuda))
        # with copies in flight after the lookup, the tiles of slots already resident run first, under the copies,
        # and the compute stream waits only before the tiles of slots still being filled
        landing = self.cache.landing_view() if tiled and DEVICE_FETCH_SPLIT else None
        row = self.cache.fetch_on_device(self.layer_idx, top_k_index, self._ahead(hidden), wait=landing is None)
        directory = self.cache.directory
        assert directory is not None
        if tiled:
            max_rows = pairs // k  # picks the tile size (a router names an expert once per token); a slot with
            # more rows would get more tiles, so the size matters for speed only
            order, inverse, offs, tiles = _kernels.route_tiles_on_device(
                top_k_index, row, directory.slot_ends, _kernels.tile_rows(max_rows), backend=backend,
                landing=None if landing is None else landing[0], flag=None if landing is None else landing[1])
        else:
            order, inverse, offs = _kernels.route_on_device(top_k_index, row, directory.slot_ends, backend=backend)
            tiles = None
        x = _kernels.permute(hidden, order, backend=backend, divisor=k)
        if tiles is not None:
            pool = self.cache.pool
            y = _kernels.grouped_ffn_by_tiles(self.spec, x, pool, tiles[:3], max_rows, backend=backend)
            if landing is not None:
                self.cache.finish_fetch()
                _kernels.grouped_ffn_by_tiles(self.spec, x, pool, tiles[3:], max_rows, backend=backend, out=y)
        else:
            if self._pool_weights is None:
                self._pool_weights = _kernels.slot_weights(self.spec, self.cache.pool)
            y = _kernels.grouped_ffn_by_offsets(self.spec, x, self.cache.pool, offs, self._pool_weights)
        out = _kernels.unpermute(y, inverse, top_k_weights, hidden.dtype, backend=backend, token_major=True,
                                 limit=offs[-1:])
        if self.layer_idx == self.cache.store.num_layers - 1:
            self.cache.settle_device()  # the model's last MoE layer: what follows may block (`Courier.drain`)
        return out

    def _device_route(self, table: torch.Tensor):
        """The resident path's constants for `table`, made again only when the table changes: each expert's slot
        within the window of slots that holds this layer's experts, with the "no expert" sentinel; the slot bounds
        of the binary search; the window of the pool and its weight views. The grouped GEMM runs over that window,
        not the whole pool: torch's grouped GEMM takes at most `GROUPED_MM_MAX_GROUPS` groups (OLMoE's pool alone
        is 1024 slots), and the window is as wide as the layer has experts when the cache filled in key order.
        None when it is wider than that limit: then the layer routes on the host."""
        cached = self._route_cache
        if cached is None or cached[0] is not table:
            slots = table.tolist()  # once per table
            first, width = min(slots), max(slots) + 1 - min(slots)
            if width > _kernels.GROUPED_MM_MAX_GROUPS:
                cached = self._route_cache = (table, None)
            else:
                window = self.cache.pool[first : first + width]
                ends = torch.arange(1, width + 1, dtype=torch.int32, device=table.device)
                cached = self._route_cache = (table, (_kernels.slot_lookup(table - first, width), ends, window,
                                                      _kernels.slot_weights(self.spec, window)))
        return cached[1]

    def _grouped(self, hidden: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> torch.Tensor:
        """Permute once, one grouped FFN per wave over the wave's slots, un-permute once with the gate weights."""
        backend = "triton" if self.kernels == "triton" else "torch"
        tokens = hidden.shape[0]
        needed, starts, order = self.route(top_k_index)
        n_valid = starts[-1]
        x = _kernels.permute(hidden, order[:n_valid] % tokens, backend=backend)
        y = torch.empty_like(x)
        max_rows = max((starts[i + 1] - starts[i] for i in range(len(needed))), default=0)
        wave = self.cache.n_slots
        for first in range(0, len(needed), wave):
            experts = needed[first : first + wave]
            keys = [(self.layer_idx, e) for e in experts]
            slots = self.cache.acquire(keys)
            try:
                if self.prefetcher is not None and first == 0 and len(needed) <= wave:
                    self._prefetch(hidden)
                groups = [(starts[first + i], starts[first + i + 1], slot) for i, slot in enumerate(slots)]
                _kernels.grouped_ffn(self.spec, x, self.cache.pool, groups, y, max_rows=max_rows, backend=backend)
            finally:
                self.cache.release(keys)
        inverse = _kernels.inverse_order(order, n_valid)
        return _kernels.unpermute(y, inverse, top_k_weights, hidden.dtype, backend=backend)
