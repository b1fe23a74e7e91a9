"""Calibrated synthetic routers (moebench.zoo.calibrate): the suites' quick-tier Mixtral and Switch reproduce the
published consecutive-token repetition within 20% (relative) at each depth they have (Switch: Mixtral's,
borrowed), measured by the same code as
`moebench routing`, and stay ordinary models (every policy, exactness included, applies unchanged)."""

import pytest
import torch

from moebench.routing import routing_statistics
from moebench.zoo import calibrate, load_model

TOLERANCE = 0.20
MIXTRAL_QUICK = {"hidden_size": 256, "intermediate_size": 896, "vocab_size": 8192}  # suites/mixtral


def _target(cal, depth):
    return min(cal.targets, key=lambda t: abs(t.depth - depth))


def _measure(name, overrides, sequences, length, new_tokens):
    model, source = load_model(name, layers=2, overrides=overrides, routing="calibrated")
    assert "routing=calibrated" in str(source)
    ids = torch.randint(2, model.config.vocab_size, (sequences, length), generator=torch.Generator().manual_seed(0))
    return routing_statistics(model, list(ids.split(8)), new_tokens=new_tokens, batch=8, show_progress=False)


def _within(value, target):
    return abs(value - target) <= TOLERANCE * target


@pytest.mark.slow
def test_quick_mixtral_meets_the_mixtral_paper_by_depth():
    stats = _measure("mixtral-8x7b", MIXTRAL_QUICK, sequences=32, length=64, new_tokens=1)
    cal = calibrate.calibration_for("mixtral")
    for layer in stats["layers"]:
        target = _target(cal, layer["depth"])
        assert _within(layer["first_repeat"], target.first_repeat), (layer, target)
        assert _within(layer["topk_overlap"], target.topk_overlap), (layer, target)
        assert layer["usage_entropy"] > 0.98  # near-even load, as the paper's Figure 7
    assert stats["layers"][0]["next_hit"] > stats["layers"][0]["next_marginal"]  # layer 0 foretells layer 1


@pytest.mark.slow
def test_quick_switch_meets_the_borrowed_targets_in_both_stacks():
    """Switch has no published routing figure; it borrows Mixtral's by depth (docs/routing.md). Both stacks are
    measured on the same text, the decoder teacher-forced on it, as published figures are taken on a corpus."""
    stats = _measure("switch-base-8", None, sequences=32, length=64, new_tokens=1)
    target = _target(calibrate.calibration_for("switch_transformers"), 1.0)  # each stack's sparse layer: last block
    encoder, decoder = stats["layers"]
    assert encoder["depth"] == decoder["depth"] == 1.0
    assert _within(encoder["first_repeat"], target.first_repeat), (encoder, target)
    assert _within(decoder["first_repeat"], target.first_repeat), (decoder, target)


def test_calibration_is_refused_where_there_is_none():
    with pytest.raises(ValueError, match="no calibrated routers for 'olmoe'.*routing='uniform'"):
        calibrate.calibration_for("olmoe")
    with pytest.raises(ValueError, match="unknown routing 'bogus'"):
        load_model("mixtral-8x7b", layers=1, routing="bogus")


def test_calibrated_weights_keep_the_model_ordinary():
    tiny = {"hidden_size": 64, "intermediate_size": 96, "vocab_size": 512, "num_attention_heads": 4,
            "num_key_value_heads": 2}
    plain, _ = load_model("mixtral-8x7b", layers=2, overrides=tiny)
    model, source = load_model("mixtral-8x7b", layers=2, overrides=tiny, routing="calibrated")
    assert str(source).startswith("synthetic(seed=0, layers=2/32") and "routing=calibrated" in str(source)
    assert type(model) is type(plain) and set(model.state_dict()) == set(plain.state_dict())
    again, _ = load_model("mixtral-8x7b", layers=2, overrides=tiny, routing="calibrated")
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), again.state_dict().values()))
    half = 32
    assert model.model.embed_tokens.weight[:, half:].abs().max() < plain.model.embed_tokens.weight.abs().max()
    assert model.model.layers[0].self_attn.o_proj.weight[:half].abs().max() == 0  # writers keep to the context half
    ids = torch.randint(2, 512, (2, 6))
    with torch.no_grad():
        assert torch.isfinite(model(ids).logits).all()
