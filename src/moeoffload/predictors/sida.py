"""SiDA-MoE's hash function (Du et al., MLSys 2024, arXiv 2310.18859): an offline-trained network that maps the
token embeddings of a sequence to the experts every MoE layer will pick, before the model runs.

Architecture (per stack of MoE layers), after the paper's description: the model's own (frozen) token
embeddings -> a linear projection -> an LSTM, which carries the sequence context that the routers see through
attention -> a causal sparse attention over the LSTM states (sparsemax weights: each token attends to few
earlier tokens) -> one linear head per MoE layer giving that layer's expert logits. Training is the paper's
truncated knowledge distillation: the hash net matches the router's distribution restricted to its top-T
logits (the long tail of the router's logits is noise that would waste the small network's capacity).
`truncate` (T) defaults to max(2k, E/8); the paper tunes it per model. The seed copy of the paper in this
repository holds only the abstract: architecture sizes here are ours, not the paper's.

Prediction is incremental: a decode step (one new token per sequence) continues the LSTM and attention state
of the previous call, so generation costs one recurrent step per token.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..progress import progress
from .base import Prediction, StackInputs, inference_only, top_k_from_logits
from .traces import SCHEMA_VERSION, RoutingTrace


def sparsemax(scores: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Euclidean projection onto the simplex (Martins & Astudillo, 2016): like softmax, but exact zeros."""
    z = scores.transpose(dim, -1)
    z_sorted, _ = z.sort(dim=-1, descending=True)
    k = torch.arange(1, z.shape[-1] + 1, device=z.device, dtype=z.dtype)
    cumsum = z_sorted.cumsum(-1)
    support = (1 + k * z_sorted) > cumsum
    k_max = support.sum(-1, keepdim=True).clamp(min=1)
    tau = (cumsum.gather(-1, k_max - 1) - 1) / k_max.to(z.dtype)
    return (z - tau).clamp(min=0).transpose(dim, -1)


class HashNetwork(nn.Module):
    def __init__(self, embed_dim: int, num_layers: int, num_experts: int, dim: int = 128):
        super().__init__()
        self.num_layers, self.num_experts = num_layers, num_experts
        self.proj = nn.Linear(embed_dim, dim)
        self.lstm = nn.LSTM(dim, dim, batch_first=True)
        self.query = nn.Linear(dim, dim)
        self.key = nn.Linear(dim, dim)
        self.heads = nn.Linear(2 * dim, num_layers * num_experts)

    def forward(self, embeds: torch.Tensor, state=None):
        """embeds [B, S, D] -> logits [B, S, L, E], new state (lstm (h, c), past LSTM outputs [B, P+S, d])."""
        x = self.proj(embeds)
        lstm_state, past = (None, None) if state is None else state
        h, lstm_state = self.lstm(x, lstm_state)
        keys = h if past is None else torch.cat([past, h], dim=1)
        scores = self.query(h) @ self.key(keys).transpose(1, 2) / h.shape[-1] ** 0.5  # [B, S, P+S]
        offset = keys.shape[1] - h.shape[1]
        causal = torch.arange(keys.shape[1], device=h.device)[None, :] > (
            torch.arange(h.shape[1], device=h.device)[:, None] + offset)
        scores = scores.masked_fill(causal, -1e4)
        context = sparsemax(scores, dim=-1) @ keys
        logits = self.heads(torch.cat([h, context], dim=-1))
        return logits.view(*h.shape[:2], self.num_layers, self.num_experts), (lstm_state, keys)


def truncated_kd_loss(student: torch.Tensor, teacher: torch.Tensor, truncate: int) -> torch.Tensor:
    """Cross-entropy of the student's softmax (over all experts) against the teacher's softmax over its top-T
    logits (zero elsewhere): the student learns the ranking of the experts that matter and to keep the rest
    below them, not the teacher's tail."""
    top = teacher.float().topk(truncate, dim=-1)
    target = torch.zeros_like(student, dtype=torch.float32).scatter_(-1, top.indices, torch.softmax(top.values, -1))
    return -(target * F.log_softmax(student.float(), dim=-1)).sum(-1).mean()


class SidaPredictor:
    """One hash network per stack; `predict` follows the RoutingPredictor interface (predictors.base)."""

    name = "sida"

    def __init__(self, embedding: torch.Tensor, info: dict, nets: dict[int, HashNetwork], truncate: int):
        self.embedding = embedding  # the model's input embeddings [V, D], frozen and not saved
        self.info = info
        self.nets = nets
        self.truncate = truncate
        self._state: dict[int, tuple] = {}

    @staticmethod
    def create(model, trace: RoutingTrace, dim: int = 128, truncate: int | None = None,
               seed: int = 0) -> SidaPredictor:
        """Untrained networks for `trace`'s stacks, initialised from `seed` (not the global random state, which
        whatever ran before would otherwise decide, and left as it was)."""
        embedding = model.get_input_embeddings().weight
        layer_stack = trace.info["layer_stack"]
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            nets = {s: HashNetwork(embedding.shape[1], layer_stack.count(s), trace.num_experts, dim)
                    for s in sorted(set(layer_stack))}
        e, k = trace.num_experts, trace.top_k
        return SidaPredictor(embedding, dict(trace.info), nets, truncate or min(e, max(2 * k, e // 8)))

    def layers_of(self, s: int) -> list[int]:
        return [i for i, st in enumerate(self.info["layer_stack"]) if st == s]

    def to(self, device) -> SidaPredictor:
        for net in self.nets.values():
            net.to(device)
        return self

    def _embed(self, ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(ids.to(self.embedding.device), self.embedding).float()

    def train(self, trace: RoutingTrace, epochs: int = 20, lr: float = 3e-3, show_progress: bool | None = None,
              log: list | None = None) -> SidaPredictor:
        """Fit every stack's network on `trace` with the truncated KD loss; one optimizer step per chunk."""
        device = self.embedding.device
        self.to(device)
        params = [p.requires_grad_() for net in self.nets.values() for p in net.parameters()]
        opt = torch.optim.Adam(params, lr=lr)
        chunks = [c for c in trace.chunks if c["stack"] in self.nets and all(
            "logits" in c["layers"].get(i, {}) for i in self.layers_of(c["stack"]))]
        if not chunks:
            raise ValueError("the trace has no router logits to distil; record it with collect_trace() on a model "
                             "whose routers moeoffload can read")
        bar = progress(range(epochs * len(chunks)), desc="moeoffload: training SiDA hash network",
                       enable=show_progress)
        it = iter(bar)
        for net in self.nets.values():
            net.train()
        for _epoch in range(epochs):
            for c in chunks:
                next(it, None)
                s = c["stack"]
                logits, _ = self.nets[s](self._embed(c["tokens"]))
                logits = logits.reshape(-1, logits.shape[2], logits.shape[3])
                loss = sum(truncated_kd_loss(logits[:, j], c["layers"][i]["logits"].to(device), self.truncate)
                           for j, i in enumerate(self.layers_of(s))) / logits.shape[1]
                opt.zero_grad()
                loss.backward()
                opt.step()
                if log is not None:
                    log.append(loss.item())
                if hasattr(bar, "set_postfix") and show_progress is not False:
                    bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
        if hasattr(bar, "close"):
            bar.close()
        for net in self.nets.values():
            inference_only(net)
        return self

    # -- RoutingPredictor ----------------------------------------------------------------------------------------
    def reset(self) -> None:
        self._state.clear()

    def predict(self, inputs: StackInputs) -> Prediction:
        s = inputs.stack
        net = self.nets[s]
        if net.heads.weight.device != self.embedding.device:  # the model moved (offload puts it on the GPU)
            self.to(self.embedding.device)
        ids = inputs.input_ids
        state = None if inputs.new_sequence else self._state.get(s)
        if state is not None and state[1].shape[0] != ids.shape[0]:
            state = None
        with torch.no_grad():
            logits, self._state[s] = net(self._embed(ids), state)
        logits = logits.reshape(-1, net.num_layers, net.num_experts).transpose(0, 1)  # [L, B*S, E]
        top, weights = top_k_from_logits(logits, self.info["top_k"], self.info.get("normalize", False))
        return Prediction(self.layers_of(s), top, weights)

    # -- persistence ---------------------------------------------------------------------------------------------
    def save(self, path: str | Path) -> None:
        torch.save({"schema": SCHEMA_VERSION, "kind": "sida", "info": self.info, "truncate": self.truncate,
                    "dims": {s: net.lstm.hidden_size for s, net in self.nets.items()},
                    "embedding_shape": list(self.embedding.shape),
                    "nets": {s: {k: v.cpu() for k, v in net.state_dict().items()} for s, net in self.nets.items()}},
                   Path(path))

    @staticmethod
    def load(path: str | Path, model) -> SidaPredictor:
        """Load a saved hash network for `model` (its input embeddings are the network's frozen input)."""
        data = torch.load(Path(path), map_location="cpu", weights_only=True)
        if data.get("kind") != "sida" or data.get("schema") != SCHEMA_VERSION:
            raise ValueError(f"{path} is not a moeoffload SiDA predictor of schema {SCHEMA_VERSION}; train it again")
        embedding = model.get_input_embeddings().weight
        if list(embedding.shape) != data["embedding_shape"]:
            raise ValueError(f"{path} was trained for embeddings {data['embedding_shape']}, this model has "
                             f"{list(embedding.shape)}; train a predictor for this model")
        info = data["info"]
        nets = {}
        for s, state in data["nets"].items():
            net = HashNetwork(embedding.shape[1], info["layer_stack"].count(s), info["num_experts"], data["dims"][s])
            net.load_state_dict(state)
            nets[s] = net.eval()
        return SidaPredictor(embedding, info, nets, data["truncate"]).to(embedding.device)
