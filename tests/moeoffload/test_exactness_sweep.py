"""The exact loop against every experts class of the installed transformers, in bf16 on the CPU.

An exact policy must give the unoffloaded eager model's greedy tokens and logits bit for bit, for every family the
hook accepts, and refuse the rest by name. The classes come from the installed transformers (`sweep_models`), so a
new family or a new transformers release is swept without an edit here. Each class runs twice: inside its family's own
tiny model where the generic size knobs give one that runs, and inside a harness whose router hands float32 gate
weights to the bf16 experts (Inkling2's router does; its float32 sum went unmatched before `hooks.verify`).

Budgets: one expert per MoE layer (the per-expert loop, every call), half the experts, "all" (the staged loop,
every call), and the on-demand policy.
"""

from __future__ import annotations

import pytest
import torch

import moeoffload
import moeoffload.paths.exact
from moeoffload.errors import UnsupportedModelError
from moeoffload.hooks import discover

from . import sweep_models as S

# families the engine refuses, and why: each refusal is asserted, so one that starts to serve shows up here
REFUSED = {
    "ergo.ErgoExpertProjections": "eager forward fails on 2 experts per token",  # one route per row, weights unused
    "muse_spark.MuseSparkExperts": "has_post_expert_norm",
    "openai_privacy_filter.OpenAIPrivacyFilterExperts": "computes what the exact loop does not",  # all in float32
}
# family models whose token mixer runs a slow torch fallback on the CPU (Mamba, linear attention: seconds a forward):
# one new token, the loop's and the staged loop's runs only
SLOW = {"granitemoehybrid.GraniteMoeHybridExperts", "kimi_linear.KimiLinearExperts"}
# (policy, budget, STAGED_MIN_EXPERTS): None is one expert per MoE layer; 10**9 forces the per-expert loop on every
# call, 1 the staged loop
RUNS = [("lru", None, 10**9), ("lru", "50%", 8), ("lru", "all", 1), ("on-demand", None, 8)]
KEYS = sorted(S.experts_classes())


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny GEMMs: a second thread only adds synchronisation (and waits behind a busy machine's other work)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _marks(key: str, tier: str):
    return [pytest.mark.slow] if tier == "family" and key in SLOW else []


def _check_exact(key: str, model, monkeypatch, runs=RUNS, new_tokens: int = 3) -> None:
    ids = torch.randint(3, S.VOCAB, (2, 5), generator=torch.Generator().manual_seed(7))
    if key in REFUSED:
        with pytest.raises(UnsupportedModelError, match=REFUSED[key]):
            moeoffload.offload(model, "lru", "all", device="cpu")
        assert not hasattr(model, "_moeoffload") or model._moeoffload is None
        return
    ref_tokens, ref_logits = S.greedy(model, ids, new_tokens)
    hook = discover(model)
    smallest = len(hook.layers) * hook.layout.nbytes
    for policy, budget, staged_from in runs:
        monkeypatch.setattr(moeoffload.paths.exact, "STAGED_MIN_EXPERTS", staged_from)
        with moeoffload.offload(model, policy, budget or smallest, device="cpu"):
            tokens, logits = S.greedy(model, ids, new_tokens)
        where = f"{key} {policy} at {budget or 'one expert per layer'}"
        assert torch.equal(tokens, ref_tokens), f"{where}: greedy tokens differ"
        assert torch.equal(logits, ref_logits), \
            f"{where}: logits differ by {(logits.float() - ref_logits.float()).abs().max()}"


@pytest.mark.parametrize("key", [pytest.param(k, marks=_marks(k, "family")) for k in KEYS])
def test_family_model_offloaded_equals_eager(key, monkeypatch):
    model, why = S.family_model(key)
    if model is None:
        pytest.skip(f"the generic tiny config builds no model ({why}); the harness test covers the class")
    if hasattr(model, "set_experts_implementation"):
        model.set_experts_implementation("eager")
    try:
        S.greedy(model, torch.randint(3, S.VOCAB, (1, 3)), new_tokens=0)
    except Exception as exc:  # the family's own layers reject the generic knobs (rope sections, head sizes ...)
        pytest.skip(f"the generic tiny config does not run ({type(exc).__name__}: {str(exc)[:100]}); "
                    "the harness test covers the class")
    if key in SLOW:
        _check_exact(key, model, monkeypatch, runs=[RUNS[0], RUNS[2]], new_tokens=1)
    else:
        _check_exact(key, model, monkeypatch)


@pytest.mark.parametrize("key", KEYS)
def test_harness_with_float32_gate_weights_equals_eager(key, monkeypatch):
    try:
        model = S.Harness(S.experts_classes()[key], torch.bfloat16, gate_dtype=torch.float32)
    except RuntimeError as exc:
        pytest.skip(str(exc))
    _check_exact(key, model, monkeypatch)


def test_sweep_finds_the_known_families():
    """The discovery itself: the families the rest of the tests name are among the classes swept."""
    for key in ("mixtral.MixtralExperts", "qwen3_moe.Qwen3MoeExperts", "olmoe.OlmoeExperts",
                "deepseek_v2.DeepseekV2Experts", "gpt_oss.GptOssExperts"):
        assert key in KEYS, f"{key} not found among {len(KEYS)} experts classes"


def test_every_class_is_swept_by_at_least_one_model():
    """A class neither tier can build would drop out of the sweep unseen."""
    missing = []
    for key in KEYS:
        if S.family_model(key)[0] is not None:
            continue
        try:
            S.Harness(S.experts_classes()[key], torch.bfloat16, gate_dtype=torch.float32)
        except RuntimeError as exc:
            missing.append(f"{key}: {exc}")
    assert not missing, "\n".join(missing)
