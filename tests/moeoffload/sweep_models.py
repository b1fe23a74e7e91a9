"""Every experts class of the installed transformers, found by how it registers, and tiny bf16 models around it.

transformers 5 marks a family's 3-D experts module with `integrations.moe.use_experts_implementation`, whose
forward dispatches through the ExpertsInterface: the seam the engine plugs into. `experts_classes()` finds every such
class, so a family added by a new transformers release joins the sweep without an edit here. Two models per class:

- `family_model`: the family's own model (its causal LM, else its text model) from its config with every size knob
  made tiny; None where the generic knobs do not give a valid config (the message says why);
- `harness_model`: the experts module alone, between an embedding, a top-k softmax router whose gate weights reach
  the experts in float32 or in the model's dtype, and an LM head: the same experts forward under a router the
  family may not have, built for every class.
"""

from __future__ import annotations

import importlib
import inspect
import pathlib
from functools import cache

import torch
from torch import nn

MARK = "@use_experts_implementation"
# the size knobs of transformers' MoE configs, set where a config has them
SIZES = dict(vocab_size=96, hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_experts=8, num_local_experts=8,
             n_routed_experts=8, num_experts_per_tok=2, moe_topk=2, top_k=2, max_position_embeddings=128,
             bos_token_id=1, eos_token_id=2, pad_token_id=0, first_k_dense_replace=0, n_shared_experts=1,
             shared_expert_intermediate_size=32, kv_lora_rank=16, qk_rope_head_dim=8,
             qk_nope_head_dim=8, v_head_dim=16, n_group=1, topk_group=1, decoder_sparse_step=1, mlp_only_layers=[],
             tie_word_embeddings=False, expert_ffn_hidden_size=32, moe_hidden_size=64)
VOCAB = SIZES["vocab_size"]


def dispatches_through_interface(cls: type) -> bool:
    """`use_experts_implementation` replaced this class's forward by one that looks the implementation up."""
    forward = cls.__dict__.get("forward")
    code = getattr(forward, "__code__", None)
    return getattr(forward, "__wrapped__", None) is not None and "experts_interface" in getattr(code, "co_freevars", ())


@cache
def experts_classes() -> dict[str, type]:
    """"family.ClassName" -> class, for every experts class of the installed transformers."""
    import transformers.models

    root = pathlib.Path(transformers.models.__path__[0])
    found = {}
    for path in sorted(root.glob("*/modeling_*.py")):
        if MARK not in path.read_text(encoding="utf-8"):
            continue
        module = importlib.import_module(f"transformers.models.{path.parent.name}.{path.stem}")
        for name, cls in vars(module).items():
            if inspect.isclass(cls) and cls.__module__ == module.__name__ and dispatches_through_interface(cls):
                found[f"{path.parent.name}.{name}"] = cls
    return found


def _has(config, name: str) -> bool:
    try:
        return hasattr(config, name)
    except Exception:  # a per-layer attribute read globally raises its own error
        return True


def _knobs(config) -> dict:
    """The size knobs `config` has; head_dim stays derived where the family derives it (DeepSeek's MLA)."""
    derived = {"head_dim"} if _has(config, "qk_rope_head_dim") else set()
    return {k: v for k, v in SIZES.items() if k not in derived and _has(config, k)}


def _tiny_config(config_cls):
    default = config_cls()
    kw = _knobs(default)
    text = getattr(default, "text_config", None)
    if text is not None and _has(text, "hidden_size"):
        kw["text_config"] = _knobs(text)
    return config_cls(**kw)


def _candidates(module) -> list[type]:
    from transformers import PreTrainedModel

    models = [c for c in vars(module).values()
              if inspect.isclass(c) and issubclass(c, PreTrainedModel) and c.__module__ == module.__name__]

    def rank(c):
        name = c.__name__
        return (not name.endswith("ForCausalLM"), not (name.endswith("Model") and "Text" in name),
                not name.endswith("Model"), name)

    return sorted(models, key=rank)


def _cast_keeping_fp32(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """`model.to(dtype)` except what the family keeps in float32 (`_keep_in_fp32_modules[_strict]`), as loading a
    checkpoint in `dtype` does: Inkling2's router, for one, runs in float32 and hands float32 gate weights on."""
    keep = [*(getattr(model, "_keep_in_fp32_modules", None) or ()),
            *(getattr(model, "_keep_in_fp32_modules_strict", None) or ())]
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        if tensor.is_floating_point() and not any(k in name for k in keep):
            tensor.data = tensor.data.to(dtype)
    return model


def family_model(key: str, dtype=torch.bfloat16, seed: int = 0) -> tuple[nn.Module | None, str]:
    """The family's own tiny model holding `key`'s experts, or (None, why not)."""
    cls = experts_classes()[key]
    module = importlib.import_module(cls.__module__)
    why = []
    for model_cls in _candidates(module):
        config_cls = getattr(model_cls, "config_class", None)
        if config_cls is None:
            continue
        try:
            config = _tiny_config(config_cls)
            with torch.device("meta"):  # sizes first: a sub-model the knobs miss may be full size
                shape = model_cls(config)
        except Exception as exc:  # a config the generic knobs cannot make valid
            why.append(f"{model_cls.__name__}: {type(exc).__name__}: {str(exc).splitlines()[0][:120]}")
            continue
        if not any(isinstance(m, cls) for m in shape.modules()):
            why.append(f"{model_cls.__name__} holds no {cls.__name__}")
            continue
        if sum(p.numel() for p in shape.parameters()) > 20_000_000:
            why.append(f"{model_cls.__name__} is not tiny with the generic knobs")
            continue
        torch.manual_seed(seed)
        model = model_cls(config).eval()
        _seed_experts(model, cls, seed)
        return _cast_keeping_fp32(model, dtype), ""
    return None, "; ".join(why[:2]) or "no model class"


def _seed_experts(model: nn.Module, cls: type, seed: int) -> None:
    """Seeded expert weights large enough that the top-k sum rounds differently in bf16 and in float32."""
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, cls):
                for p in m.parameters(recurse=False):
                    p.copy_(torch.randn(p.shape, generator=g) * (0.3 if p.dim() == 3 else 0.1))


def _experts_config(cls: type):
    """A config the experts class builds from: its family's configuration classes with tiny sizes forced in."""
    module = importlib.import_module(cls.__module__.replace(".modeling_", ".configuration_"))
    from transformers import PretrainedConfig

    for config_cls in [c for c in vars(module).values() if inspect.isclass(c) and issubclass(c, PretrainedConfig)
                       and c.__module__ == module.__name__]:
        try:
            config = config_cls()
            for k, v in {**SIZES, "hidden_act": getattr(config, "hidden_act", "silu")}.items():
                object.__setattr__(config, k, v)
            object.__setattr__(config, "_experts_implementation", "eager")
            experts = make_experts(cls, config, 0)
            if any(p.numel() > 1_000_000 for p in experts.parameters()):
                continue
            hidden = torch.zeros(3, SIZES["hidden_size"])
            experts(hidden, torch.zeros(3, SIZES["num_experts_per_tok"], dtype=torch.long), hidden[:, :2])
        except Exception:  # sizes read from knobs this config does not have
            continue
        return config, experts
    raise RuntimeError(f"no configuration class of {module.__name__} builds a tiny {cls.__name__}")


def make_experts(cls: type, config, layer_idx: int) -> nn.Module:
    """`cls(config)`, or `cls(config, layer_idx)` for the families whose experts read a per-layer setting."""
    if "layer_idx" in inspect.signature(cls.__init__).parameters:
        return cls(config, layer_idx=layer_idx)
    return cls(config)


class Harness(nn.Module):
    """embedding -> L x (softmax top-k router -> experts, residual) -> LM head, around one experts class."""

    def __init__(self, cls: type, dtype: torch.dtype, gate_dtype: torch.dtype, layers: int = 2, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.config, first = _experts_config(cls)
        self.top_k, self.gate_dtype = SIZES["num_experts_per_tok"], gate_dtype
        hidden = SIZES["hidden_size"]
        self.embed = nn.Embedding(VOCAB, hidden)
        self.routers = nn.ModuleList(nn.Linear(hidden, first.num_experts, bias=False) for _ in range(layers))
        self.experts = nn.ModuleList([first] + [make_experts(cls, self.config, i) for i in range(1, layers)])
        self.head = nn.Linear(hidden, VOCAB, bias=False)
        _seed_experts(self, cls, seed)
        self.to(dtype)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.embed(ids).flatten(0, 1)
        for router, experts in zip(self.routers, self.experts):
            probs = router(h).float().softmax(-1)
            weights, index = probs.topk(self.top_k, dim=-1)
            weights = (weights / weights.sum(-1, keepdim=True)).to(self.gate_dtype)
            h = h + experts(h, index, weights)
        return self.head(h).view(*ids.shape, VOCAB)


def logits_of(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """Logits over the first VOCAB ids: the LM head's, or the last hidden state against the embedding matrix."""
    if isinstance(model, Harness):
        return model(ids)
    out = model(input_ids=ids, use_cache=False)
    logits = getattr(out, "logits", None)
    if logits is None:
        logits = out.last_hidden_state @ model.get_input_embeddings().weight.T
    return logits[..., :VOCAB]


def greedy(model: nn.Module, ids: torch.Tensor, new_tokens: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy tokens, each from a full forward over the sequence so far, and the logits of the whole last one."""
    with torch.no_grad():
        for _ in range(new_tokens):
            ids = torch.cat([ids, logits_of(model, ids)[:, -1].argmax(-1, keepdim=True)], dim=1)
        return ids, logits_of(model, ids)
