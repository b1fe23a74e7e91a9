"""ExpertFlow (He et al., 2024): a routing-path predictor run before computation, and a cache corrected at runtime.

- `RoutingPathNet`: a lightweight transformer over the token ids that predicts, in one forward pass, the experts of
  every MoE layer of a stack for every token (its routing path). It sees only token ids, so it runs before the
  stack's first layer computes (on a side stream, through `RunAhead`); causal attention over a window of recent
  tokens makes a decode step's guess the same as in training on whole sequences.
- `ExpertFlowPredictor`: the trained net plus the layer-to-layer transition statistics of the routing trace,
  behind the `RoutingPredictor` interface; trains on a `RoutingTrace`, saves and loads.
- `ExpertFlowRunAhead`: predictive prefetch (every layer's experts are known before the stack starts; the first
  layer's are copied at once, each layer copies the next one's while it computes) with real-time correction: when
  layer L's router disagrees with the predicted path, the cache demotes the wrongly prefetched experts (their
  slots go first to the missing ones, which the layer fetches on demand), and the tokens whose path went wrong
  get layer L+1 re-predicted from where they really went (the predictor's scores combined with the trace's
  P(expert at L+1 | expert at L)) before L+1's prefetch starts. The router still decides: exact.
"""

from __future__ import annotations

import math
import random
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import ClassVar, cast

import torch
import torch.nn.functional as F
from torch import nn

from ..progress import progress
from .base import Prediction, StackInputs, inference_only
from .runahead import RunAhead
from .traces import RoutingTrace

SCHEMA_VERSION = 1
MAX_RECORDED_BATCHES = 4096


@dataclass(frozen=True)
class PathNetConfig:
    vocab_size: int
    num_layers: int  # every MoE layer of the model; a stack reads its own rows
    num_experts: int
    top_k: int
    num_stacks: int = 1
    d_model: int = 64
    heads: int = 4
    depth: int = 2
    window: int = 64  # tokens of context a prediction sees (the current one and the ones before it)


class RoutingPathNet(nn.Module):
    """Token ids [B, S] of one stack -> expert logits [B, S, num_layers, num_experts] (causal)."""

    def __init__(self, cfg: PathNetConfig):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.position = nn.Embedding(cfg.window, cfg.d_model)
        self.stack = nn.Embedding(cfg.num_stacks, cfg.d_model)
        block = nn.TransformerEncoderLayer(cfg.d_model, cfg.heads, 4 * cfg.d_model, dropout=0.0, batch_first=True,
                                           norm_first=True)
        self.encoder = nn.TransformerEncoder(block, cfg.depth, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(cfg.d_model)
        self.head = nn.Linear(cfg.d_model, cfg.num_layers * cfg.num_experts)

    def forward(self, ids: torch.Tensor, stack: int = 0) -> torch.Tensor:
        b, s = ids.shape
        if s > self.cfg.window:
            raise ValueError(f"{s} tokens given to a path predictor with a window of {self.cfg.window}")
        pos = torch.arange(s, device=ids.device)
        x = self.embed(ids.clamp(0, self.cfg.vocab_size - 1)) + self.position(pos) + self.stack.weight[stack]
        mask = torch.triu(torch.full((s, s), float("-inf"), device=ids.device), diagonal=1)
        x = self.norm(self.encoder(x, mask=mask, is_causal=True))
        return self.head(x).view(b, s, self.cfg.num_layers, self.cfg.num_experts)


def _targets(chunk: dict, layers: list[int], num_experts: int) -> torch.Tensor:
    """Multi-hot [B, S, len(layers), E] of the router's top-k per token (dropped tokens: no expert)."""
    b, s = chunk["tokens"].shape
    out = torch.zeros(b * s, len(layers), num_experts + 1)
    for j, layer in enumerate(layers):
        ids = chunk["layers"][layer]["ids"].long()
        ids = torch.where((ids >= 0) & (ids < num_experts), ids, num_experts)
        out[:, j].scatter_(1, ids, 1.0)
    return out[..., :num_experts].view(b, s, len(layers), num_experts)


def transitions(trace: RoutingTrace) -> dict[int, torch.Tensor]:
    """For each MoE layer with a predecessor in its stack: log P(expert at the layer | expert at the one before),
    [E, E] (row: before), counted over every token of the trace with add-one smoothing."""
    E = trace.num_experts
    counts: dict[int, torch.Tensor] = {}
    for chunk in trace.chunks:
        layers = sorted(chunk["layers"])
        for before, after in zip(layers, layers[1:]):
            a, b = chunk["layers"][before]["ids"].long(), chunk["layers"][after]["ids"].long()
            ok = ((a >= 0) & (a < E)).unsqueeze(2) & ((b >= 0) & (b < E)).unsqueeze(1)
            flat = (a.clamp(0, E - 1).unsqueeze(2) * E + b.clamp(0, E - 1).unsqueeze(1))[ok]
            c = counts.setdefault(after, torch.ones(E * E))
            c += torch.bincount(flat, minlength=E * E).float()
    return {layer: (c.view(E, E) / c.view(E, E).sum(1, keepdim=True)).log() for layer, c in counts.items()}


class ExpertFlowPredictor:
    """ExpertFlow's routing-path predictor behind the `RoutingPredictor` interface.

    `predict` keeps, per stack, the last `window` token ids of the running sequences, so a decode step of one token
    is predicted with its context. `correct` re-predicts one layer for tokens whose path the router contradicted.
    """

    name = "expertflow"
    runahead_class: ClassVar[type]  # ExpertFlowRunAhead, set below it

    def __init__(self, net: RoutingPathNet, transition: dict[int, torch.Tensor] | None = None,
                 info: dict | None = None):
        self.net = net.eval()
        self.cfg = net.cfg
        self.transition = transition or {}
        self.info = info or {}
        self._context: dict[int, torch.Tensor] = {}
        self._log_probs: dict[int, tuple[list[int], torch.Tensor]] = {}  # stack -> (layers, [L, T, E])
        self.last_call: dict[int, tuple[int, bool]] = {}  # stack -> (batch rows, new_sequence) of its latest call

    # -- RoutingPredictor --------------------------------------------------------------------------------------
    def reset(self) -> None:
        self._context.clear()
        self._log_probs.clear()

    def predict(self, inputs: StackInputs) -> Prediction:
        ids = inputs.input_ids
        dev = next(self.net.parameters()).device
        ids = ids.to(dev)
        self.last_call[inputs.stack] = (ids.shape[0], inputs.new_sequence)
        before = self._context.get(inputs.stack)
        if inputs.new_sequence or before is None or before.shape[0] != ids.shape[0]:
            context = ids
        else:
            context = torch.cat([before, ids], dim=1)
        context = context[:, -self.cfg.window :]
        self._context[inputs.stack] = context
        new = min(ids.shape[1], context.shape[1])
        with torch.no_grad():
            logits = self.net(context, inputs.stack)[:, -new:, inputs.layers]  # [B, new, L, E]
        if new < ids.shape[1]:  # a prompt longer than the window: its early tokens see a shorter context
            head = self._chunked(ids[:, : ids.shape[1] - new], inputs.stack, inputs.layers)
            logits = torch.cat([head, logits], dim=1)
        log_probs = F.logsigmoid(logits.float()).permute(2, 0, 1, 3).reshape(len(inputs.layers), -1,
                                                                           self.cfg.num_experts)
        self._log_probs[inputs.stack] = (list(inputs.layers), log_probs)
        top = log_probs.topk(min(self.cfg.top_k, self.cfg.num_experts), dim=-1).indices
        return Prediction(list(inputs.layers), top)

    def set_context(self, contexts: list[tuple[int, ...]] | list[list[int]]) -> None:
        """The tokens that came before each row of the next call (every stack): a serving loop whose batches
        change from step to step says whose context the next decode step continues. Rows are cut to the shortest
        context (at most `window - 1` tokens), so that they stack; an empty context forgets the kept one."""
        keep = min([len(c) for c in contexts] + [self.cfg.window - 1])
        if keep <= 0:
            self._context.clear()
            return
        dev = next(self.net.parameters()).device
        ids = torch.tensor([list(c)[-keep:] for c in contexts], device=dev)
        for stack in range(self.cfg.num_stacks):
            self._context[stack] = ids

    def _chunked(self, ids: torch.Tensor, stack: int, layers: list[int]) -> torch.Tensor:
        w = self.cfg.window
        with torch.no_grad():
            return torch.cat([self.net(ids[:, i : i + w], stack)[:, :, layers] for i in range(0, ids.shape[1], w)],
                             dim=1)

    # -- real-time correction ---------------------------------------------------------------------------------
    def correct(self, stack: int, layer_idx: int, routed: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor | None:
        """Top-k for `layer_idx` [T, k], re-predicted for the tokens in `tokens` (bool [T]) from the experts the
        router really chose at the layer before (`routed` [T, k]); other tokens keep their prediction. None when
        nothing is known about this layer."""
        layers, log_probs = self._log_probs.get(stack, (None, None))
        if layers is None or log_probs is None or layer_idx not in layers or layer_idx not in self.transition:
            return None
        scores = log_probs[layers.index(layer_idx)]
        if scores.shape[0] != routed.shape[0]:
            return None
        E = self.cfg.num_experts
        trans = self.transition[layer_idx].to(scores.device)
        valid = (routed >= 0) & (routed < E)
        prior = trans[routed.clamp(0, E - 1)] * valid.unsqueeze(-1)  # [T, k, E]
        prior = prior.sum(1) / valid.sum(1, keepdim=True).clamp(min=1)
        corrected = torch.where(tokens.unsqueeze(-1), scores + prior, scores)
        return corrected.topk(min(self.cfg.top_k, E), dim=-1).indices

    # -- training, saving --------------------------------------------------------------------------------------
    @classmethod
    def train(cls, trace: RoutingTrace, steps: int = 300, batch_size: int = 16, lr: float = 3e-3, seed: int = 0,
              device: str | torch.device | None = None, show_progress: bool | None = None,
              **net_options) -> ExpertFlowPredictor:
        """Fit the path net to the router's choices in `trace` (multi-label BCE per token and layer)."""
        if not trace.chunks:
            raise ValueError("the routing trace is empty; record one with collect_trace() on some prompts")
        info = trace.info
        num_stacks = max(info.get("layer_stack", [0])) + 1
        vocab = int(info.get("vocab_size") or 0) or 1 + max(int(c["tokens"].max()) for c in trace.chunks)
        cfg = PathNetConfig(vocab, trace.num_layers, trace.num_experts, trace.top_k, num_stacks, **net_options)
        torch.manual_seed(seed)
        rng = random.Random(seed)
        device = torch.device(device or "cpu")
        net = RoutingPathNet(cfg).to(device).train()
        examples = [(c["stack"], sorted(c["layers"]), c["tokens"], _targets(c, sorted(c["layers"]), cfg.num_experts))
                    for c in trace.chunks]
        opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=0.01)
        for _ in progress(range(steps), desc="moeoffload: training ExpertFlow path predictor", enable=show_progress):
            stack, layers, tokens, target = examples[rng.randrange(len(examples))]
            rows = torch.tensor(rng.sample(range(tokens.shape[0]), min(batch_size, tokens.shape[0])))
            start = rng.randrange(max(1, tokens.shape[1] - cfg.window + 1))
            x = tokens[rows, start : start + cfg.window].to(device)
            y = target[rows, start : start + cfg.window].to(device)
            logits = net(x, stack)[:, :, layers]
            loss = F.binary_cross_entropy_with_logits(logits, y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        return cls(cast(RoutingPathNet, inference_only(net)), transitions(trace), dict(info))

    def to(self, device: str | torch.device) -> ExpertFlowPredictor:
        self.net.to(device)
        self.reset()
        return self

    def save(self, path: str | Path) -> None:
        torch.save({"schema": SCHEMA_VERSION, "kind": "expertflow-predictor", "config": asdict(self.cfg),
                    "state": self.net.state_dict(), "transition": self.transition, "info": self.info}, Path(path))

    @classmethod
    def load(cls, path: str | Path, device: str | torch.device = "cpu") -> ExpertFlowPredictor:
        data = torch.load(Path(path), map_location="cpu", weights_only=True)
        if not isinstance(data, dict) or data.get("kind") != "expertflow-predictor":
            raise ValueError(f"{path} is not an ExpertFlow predictor; train one with ExpertFlowPredictor.train()")
        if data.get("schema") != SCHEMA_VERSION:
            raise ValueError(f"{path}: ExpertFlow predictor schema {data.get('schema')}, this moeoffload reads "
                             f"{SCHEMA_VERSION}; train it again")
        net = RoutingPathNet(PathNetConfig(**data["config"]))
        net.load_state_dict(data["state"])
        return cls(net, data["transition"], data["info"]).to(device)

    def routes(self, input_ids: torch.Tensor, stack: int = 0) -> torch.Tensor:
        """Predicted routing path of each sequence: bool [B, num_layers, E], the experts any of its tokens is
        predicted to use at each layer of `stack` (what the token scheduler groups by). Stateless."""
        layers = [i for i, s in enumerate(self.info.get("layer_stack", [0] * self.cfg.num_layers)) if s == stack]
        dev = next(self.net.parameters()).device
        ids = input_ids.to(dev)
        logits = self._chunked(ids, stack, layers)  # [B, S, L, E]
        top = logits.topk(min(self.cfg.top_k, self.cfg.num_experts), dim=-1).indices
        out = torch.zeros(ids.shape[0], self.cfg.num_layers, self.cfg.num_experts, dtype=torch.bool, device=dev)
        hot = torch.zeros(*top.shape[:-1], self.cfg.num_experts, dtype=torch.bool, device=dev).scatter_(-1, top, True)
        out[:, layers] = hot.any(dim=1)
        return out.cpu()

    def next_routes(self, contexts: list[tuple[int, ...]] | list[list[int]], stack: int = 0) -> torch.Tensor:
        """Predicted experts of each context's last token: bool [n, num_layers, E] (the layers of `stack` set).
        What the serving loop's scheduler groups a decode step by: the next forward feeds only that token.
        Contexts of equal length (after the window cut) run as one batch. Stateless."""
        layers = [i for i, s in enumerate(self.info.get("layer_stack", [0] * self.cfg.num_layers)) if s == stack]
        dev = next(self.net.parameters()).device
        E, w = self.cfg.num_experts, self.cfg.window
        out = torch.zeros(len(contexts), self.cfg.num_layers, E, dtype=torch.bool)
        by_length: dict[int, list[int]] = {}
        for i, ctx in enumerate(contexts):
            if not len(ctx):
                raise ValueError(f"context {i} is empty: a route is predicted for a sequence's last token")
            by_length.setdefault(min(len(ctx), w), []).append(i)
        for length, rows in by_length.items():
            ids = torch.tensor([list(contexts[i])[-length:] for i in rows], device=dev)
            with torch.no_grad():
                logits = self.net(ids, stack)[:, -1, layers]  # [rows, L, E]
            top = logits.topk(min(self.cfg.top_k, E), dim=-1).indices.cpu()
            hot = torch.zeros(len(rows), len(layers), E, dtype=torch.bool).scatter_(-1, top, True)
            out[torch.tensor(rows).unsqueeze(1), torch.tensor(layers).unsqueeze(0)] = hot
        return out


@dataclass
class CorrectionStats:
    layer_calls: int = 0  # layer calls that had a prediction to check
    corrections: int = 0  # of those, calls where the router's experts differed from the predicted ones
    corrected_tokens: int = 0  # tokens whose next layer was re-predicted from their real route
    demoted: int = 0  # wrongly prefetched experts whose slots were handed back first
    predicted: int = 0  # (layer, expert) pairs predicted, summed over checked calls
    true_positive: int = 0  # of those, pairs the router then used
    routed: int = 0  # (layer, expert) pairs the router used in checked calls

    @property
    def precision(self) -> float:
        return self.true_positive / self.predicted if self.predicted else math.nan

    @property
    def recall(self) -> float:
        return self.true_positive / self.routed if self.routed else math.nan

    def as_dict(self) -> dict:
        return {**asdict(self), "precision": self.precision, "recall": self.recall}


class ExpertFlowRunAhead(RunAhead):
    """RunAhead with ExpertFlow's real-time correction at every layer (see the module docstring)."""

    def __init__(self, predictor: ExpertFlowPredictor, cache, hook, model, replace_router: bool = False,
                 prefetch: bool = True):
        if replace_router:
            raise ValueError("ExpertFlow corrects its cache from the router's choice; it never replaces the router")
        predictor.to(cache.device)  # the path net runs beside the model, on its side stream
        super().__init__(predictor, cache, hook, model, replace_router=False, prefetch=prefetch)
        self.paths = predictor  # the predictor as ExpertFlow's own type: its last calls and its correction
        self.correction = CorrectionStats()
        self.num_layers = len(hook.layers)
        # per served batch (a new sequence batch of the first stack), bool [B, layers, E]: the experts each
        # sequence's router really chose, over the whole generation; the token scheduler is scored on these
        self.batch_routes: list[torch.Tensor] = []

    def tap(self, layer_idx: int, hidden: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor):
        super().tap(layer_idx, hidden, ids, weights)
        if not self.failed:
            self._record(layer_idx, ids)
            self._check(layer_idx, ids)
        return None

    def served_routes(self, batches: int) -> torch.Tensor:
        """The real routes of the last `batches` served batches, one row per sequence: bool [n, layers, E]."""
        if batches > len(self.batch_routes):
            raise ValueError(f"{batches} batches asked for, {len(self.batch_routes)} served and recorded")
        recent = self.batch_routes[len(self.batch_routes) - batches :]
        return torch.cat([r[..., : self.num_experts] for r in recent]).cpu() if recent else torch.zeros(0)

    def _record(self, layer_idx: int, routed: torch.Tensor) -> None:
        s, pos = self.stack_of[layer_idx], self.position[layer_idx]
        rows, new = self.paths.last_call.get(s, (0, False))
        if s == 0 and pos == 0 and new and rows:
            self.batch_routes.append(torch.zeros(rows, self.num_layers, self.num_experts + 1, dtype=torch.bool,
                                                 device=routed.device))
            del self.batch_routes[:-MAX_RECORDED_BATCHES]
        if not self.batch_routes or self.batch_routes[-1].shape[0] != rows or routed.shape[0] % rows:
            return
        E = self.num_experts
        seq = torch.arange(routed.shape[0], device=routed.device) // (routed.shape[0] // rows)
        ids = torch.where((routed >= 0) & (routed < E), routed, E).long()
        self.batch_routes[-1][seq.unsqueeze(1).expand_as(ids), layer_idx, ids] = True

    def _check(self, layer_idx: int, routed: torch.Tensor) -> None:
        s = self.stack_of[layer_idx]
        pos = self.position[layer_idx]
        pred = self.prediction.get(s)
        needed = self.needed(s)
        if pred is None or needed is None:
            return
        row = pred.row(layer_idx)
        if row is None or pred.top_k_ids.shape[1] != routed.shape[0]:
            return
        E = self.num_experts
        predicted = set(needed[pos])
        used = set(torch.unique(routed[(routed >= 0) & (routed < E)]).tolist())
        c = self.correction
        c.layer_calls += 1
        c.predicted += len(predicted)
        c.routed += len(used)
        c.true_positive += len(predicted & used)
        if predicted == used:
            return
        c.corrections += 1
        c.demoted += self.cache.demote([(layer_idx, e) for e in sorted(predicted - used)])
        layers = self.stacks[s].layers
        if pos + 1 >= len(layers):
            return
        nxt = layers[pos + 1]
        guess = pred.top_k_ids[row].to(routed.device)
        wrong = _per_token_mismatch(guess, routed, E)
        fixed = self.paths.correct(s, nxt, routed, wrong)
        if fixed is None:
            return
        c.corrected_tokens += int(wrong.sum())
        nrow = pred.row(nxt)
        pred.top_k_ids[nrow] = fixed.to(pred.top_k_ids.device, pred.top_k_ids.dtype)
        needed[pos + 1] = sorted(set(torch.unique(fixed).tolist()))


ExpertFlowPredictor.runahead_class = ExpertFlowRunAhead  # offload() runs this predictor under its own runtime


def _per_token_mismatch(guess: torch.Tensor, routed: torch.Tensor, num_experts: int) -> torch.Tensor:
    """bool [T]: the token's predicted expert set differs from the router's (dropped tokens count as no expert)."""
    def hot(ids: torch.Tensor) -> torch.Tensor:
        ids = torch.where((ids >= 0) & (ids < num_experts), ids, num_experts).long()
        return torch.zeros(ids.shape[0], num_experts + 1, dtype=torch.bool, device=ids.device).scatter_(1, ids, True)

    return (hot(guess)[:, :num_experts] != hot(routed)[:, :num_experts]).any(dim=1)


__all__ = ["CorrectionStats", "ExpertFlowPredictor", "ExpertFlowRunAhead", "PathNetConfig", "RoutingPathNet",
           "transitions"]
