"""Calibrated synthetic routers: seeded weights reshaped so that routing has published structure.

Seeded uniform weights route without language structure, and not even like independent uniform routing: the
attention output dominates the residual stream, so consecutive tokens share most of their router input and repeat
experts far more often at the first layer than a trained model does (docs/routing.md). A calibrated model stays an
ordinary transformers model whose routers read the hidden state; only weights change:

- the residual stream is split into a token half T (the first hidden_size/2 coordinates) and a context half C;
  the embedding writes T (and C scaled by `embed_context`), and every writer into the residual stream (attention
  output, dense and expert down projections) writes C only (its T rows scaled by `leak`, 0 by default), so T holds
  the token itself at every depth;
- the final norms scale T by `head_token`: an LM head tied to the embedding (Switch) would otherwise mostly see the
  current token and greedy decoding would repeat it;
- each router reads T and C with weights cos(phi) and sin(phi) (its columns scaled), phi set per layer by depth
  (an encoder stack may have its own angles): phi = 0 routes by the token alone (repeats like independent routing),
  a larger phi by the slowly changing context (consecutive tokens repeat experts more often);
- successive routers share a part of their rows (`shared`), so one layer's choice predicts the next layer's.

Top-k selection depends only on the direction of the router's input, so phi alone sets the repetition rate. The
angles were fitted with moebench.routing on the suites' quick-tier models against `TARGETS`
(tests/moebench/test_calibrate.py checks the tolerance). Deeper models use the same angles by depth and overshoot
the targets in their deep layers (5 layers: +55% at the last; docs/routing.md).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

ROUTING = ("calibrated", "uniform")


@dataclass(frozen=True)
class LayerTarget:
    """A published routing figure of one depth group (depth 0 = a stack's first layer, 1 = its last)."""

    depth: float
    first_repeat: float
    topk_overlap: float | None
    source: str


MIXTRAL_TABLE5 = "Mixtral of Experts (arXiv 2401.04088) Table 5, mean of its 8 Pile subsets"
# Mixtral-8x7B, layers 0 / 15 / 31 of 32: first-choice repetition and first-or-second-choice overlap.
MIXTRAL_TARGETS = (LayerTarget(0.0, 0.1409, 0.4804, MIXTRAL_TABLE5 + ", layer 0"),
                   LayerTarget(15 / 31, 0.2640, 0.6369, MIXTRAL_TABLE5 + ", layer 15"),
                   LayerTarget(1.0, 0.2268, 0.5091, MIXTRAL_TABLE5 + ", layer 31"))


@dataclass(frozen=True)
class Calibration:
    """How one family's routers are reshaped: `angles` are (depth, phi) points, linear in between."""

    angles: tuple[tuple[float, float], ...]
    encoder_angles: tuple[tuple[float, float], ...] | None = None  # an encoder stack's, where they differ
    leak: float = 0.0
    embed_context: float = 0.25
    head_token: float = 0.1
    shared: float = 0.5
    version: int = 1  # raised whenever a change moves the routing: records of another version are not comparable
    dense_context: float = 1.0  # an encoder dense (non-expert) FFN's writes into the context half scaled by this
    targets: tuple[LayerTarget, ...] = MIXTRAL_TARGETS
    note: str = ""

    def angle(self, depth: float, encoder: bool = False) -> float:
        pts = sorted(self.encoder_angles if encoder and self.encoder_angles else self.angles)
        for (d0, a0), (d1, a1) in zip(pts, pts[1:]):
            if d0 <= depth <= d1:
                return a0 + (a1 - a0) * (depth - d0) / (d1 - d0) if d1 > d0 else a1
        return pts[0][1] if depth < pts[0][0] else pts[-1][1]


CALIBRATIONS: dict[str, Calibration] = {
    "mixtral": Calibration(angles=((0.0, 0.065), (15 / 31, 0.1), (1.0, 0.065))),
    # No published Switch routing figure was found (docs/routing.md): Switch takes Mixtral's by depth. Its LM head
    # is tied to the embedding, so the embedding writes both halves (else greedy decoding repeats its input). The
    # encoder's sparse layer repeats no more than 0.18-0.19 at any angle unless the dense block before it writes more
    # context (its output varies slowly along the sequence): scaled by 3, 0.20-0.21; the decoder, which then
    # cross-attends to a smoother encoder, needs a smaller angle.
    "switch_transformers": Calibration(angles=((0.0, 0.0), (1.0, 0.015)), encoder_angles=((0.0, 0.0), (1.0, 1.5)),
                                       embed_context=0.5, dense_context=3.0, version=2,
                                       note="targets borrowed from Mixtral: "
                                       "none published for Switch"),
}

_WRITERS = ("o_proj.weight", ".o.weight", "wo.weight", "down_proj")  # write into the residual stream
_DENSE_FFN_WRITERS = ("mlp.wo.weight",)  # Switch's dense blocks (its experts' are mlp.experts.expert_i.wo.weight)
_EMBEDDINGS = ("embed_tokens.weight", "shared.weight")
_FINAL_NORMS = ("final_layer_norm.weight", "model.norm.weight")  # before the LM head (or the cross-attention)


def routing_label(model_type: str) -> str:
    """What a calibrated model's weights record as its routing: "calibrated", or "calibrated-v<N>" from version 2."""
    version = calibration_for(model_type).version
    return "calibrated" if version == 1 else f"calibrated-v{version}"


def supports(model_type: str) -> bool:
    return model_type in CALIBRATIONS


def calibration_for(model_type: str) -> Calibration:
    if model_type not in CALIBRATIONS:
        raise ValueError(f"no calibrated routers for {model_type!r} models (calibrated: "
                         f"{', '.join(sorted(CALIBRATIONS))}); use routing='uniform'")
    return CALIBRATIONS[model_type]


@torch.no_grad()
def calibrate(model: nn.Module, seed: int = 0) -> None:
    """Reshape a seeded model's weights in place (see the module docstring)."""
    config: Any = model.config  # a transformers PretrainedConfig: its fields depend on the family
    cal = calibration_for(config.model_type)
    hidden = config.d_model if hasattr(config, "d_model") else config.hidden_size
    token = torch.zeros(hidden, dtype=torch.bool)
    token[: hidden // 2] = True
    for name, p in model.named_parameters():
        if name.endswith(_EMBEDDINGS):
            p[:, ~token] *= cal.embed_context
        elif name.endswith(_FINAL_NORMS):
            p[token] *= cal.head_token
        elif name.endswith(_WRITERS):
            if p.dim() == 3:  # 3-D experts: [E, hidden, intermediate]
                p[:, token] *= cal.leak
            else:
                p[token] *= cal.leak
            if name.endswith(_DENSE_FFN_WRITERS) and name.startswith("encoder."):
                p[~token] *= cal.dense_context
    _reshape_routers(model, cal, token, seed)


def _routers(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """Router weight matrices [num_experts, hidden] in model order."""
    return [(n, p) for n, p in model.named_parameters()
            if n.endswith(("mlp.gate.weight", "router.classifier.weight"))]


def _reshape_routers(model: nn.Module, cal: Calibration, token: torch.Tensor, seed: int) -> None:
    from ..routing import block_depth

    routers = _routers(model)
    if not routers:
        raise ValueError(f"{type(model).__name__}: no router weights found to calibrate")
    gen = torch.Generator().manual_seed(seed * 7919 + 17)
    shape = routers[0][1].shape
    common = (torch.rand(shape, generator=gen, dtype=torch.float32) * 2 - 1) * math.sqrt(3.0 / shape[-1])
    for name, w in routers:
        phi = cal.angle(block_depth(model, name), encoder=name.startswith("encoder."))
        mixed = math.sqrt(cal.shared) * common.to(w.dtype) + math.sqrt(1 - cal.shared) * w
        mixed[:, token] *= math.cos(phi)
        mixed[:, ~token] *= math.sin(phi)
        w.copy_(mixed)
