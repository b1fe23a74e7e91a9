"""ExpertFFNSpec: what one expert of a family computes, written down as data.

The per-expert loop runs each family's own formula (the hook's `expert_ffn`), which is exact by construction. A
grouped kernel instead needs to know the formula in advance: `kind` names it, the other fields say where the
matrices sit in an expert's buffer (layout names) and how they are applied. A kernel that does not know a kind
falls back to the hook's `expert_ffn`.

Kinds:
- "gated": `down(act(g) * u)` with `g, u = up(x).chunk(2)` (Mixtral, Qwen-MoE, OLMoE, DeepSeek; SwiGLU for silu).
- "gpt-oss-clamped": GPT-OSS's SwiGLU: `g, u = up(x)[..., ::2], up(x)[..., 1::2]`, `g <= limit`,
  `-limit <= u <= limit`, `down((u + 1) * g * sigmoid(alpha * g))`, both projections with a bias.
- "dense": `down(act(up(x)))`, no gate (Switch Transformers' DenseActDense).
- "custom-gate": a gate function the engine does not know; only `expert_ffn` computes it.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ExpertFFNSpec:
    kind: str
    act: str | None  # transformers' activation name (ACT2FN key): "silu", "gelu", "relu" ...; None when in the kind
    up: str  # layout name of the first projection (gate and up together when gated)
    down: str
    up_bias: str | None = None
    down_bias: str | None = None
    transposed: bool = False  # stored [in, out] and applied as `x @ W + b`; else [out, in], `F.linear(x, W)`
    interleaved: bool = False  # gate and up alternate by column instead of being two halves
    alpha: float | None = None  # gpt-oss-clamped only
    limit: float | None = None  # gpt-oss-clamped only
    cast_before_down: bool = False  # the intermediate is cast to the down matrix's dtype (Switch)

    @property
    def name(self) -> str:
        """One string for dispatch tables: "gated-silu", "dense-relu", "gpt-oss-clamped", "custom-gate"."""
        return f"{self.kind}-{self.act}" if self.kind in ("gated", "dense") else self.kind

    @property
    def tensor_names(self) -> tuple[str, ...]:
        """The layout names this formula reads: weights first, then biases."""
        return tuple(n for n in (self.up, self.down, self.up_bias, self.down_bias) if n is not None)
