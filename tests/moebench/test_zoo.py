"""The model zoo: registry figures, the three weight sources of load_model, their errors, the suites' tiers."""

import json
import shutil
from pathlib import Path

import pytest
import torch

from moebench.suite import load_suite
from moebench.zoo import CheckpointError, UnknownModelError, load_model, registry, resolve_checkpoint
from moeoffload.errors import UnsupportedModelError

pytest_plugins = ["pytester"]

ROOT = Path(__file__).resolve().parents[2]
TINY = {"hidden_size": 64, "intermediate_size": 96, "vocab_size": 512, "num_attention_heads": 4,
        "num_key_value_heads": 2}


def test_registry_holds_every_published_model_with_its_source():
    expected = {f"switch-base-{n}" for n in (8, 16, 32, 64, 128, 256)} | {
        "mixtral-8x7b", "qwen1.5-moe-a2.7b", "qwen3-30b-a3b", "olmoe-1b-7b", "deepseek-v2-lite", "gpt-oss-20b"}
    assert set(registry.names()) == expected
    for name in expected:
        entry = registry.get(name)
        assert entry.hub_id in entry.source and "config.json" in entry.source


def test_mixtral_figures():
    e = registry.get("mistralai/Mixtral-8x7B-v0.1")  # hub ids resolve too
    s = e.sizes
    assert abs(s.total_params - 46.7e9) < 0.05e9
    assert abs(s.active_params - 12.9e9) < 0.05e9
    assert (s.moe_layers, s.experts_per_layer, s.top_k) == (32, 8, 2)
    assert e.expert_bytes("bfloat16") == 3 * 4096 * 14336 * 2
    assert e.bytes("float32") == 2 * e.bytes("bfloat16")
    assert not e.fits(80 * 10**9, "bfloat16") and e.fits(200 * 10**9, "bfloat16")


@pytest.mark.parametrize("name, total_b, layers, experts, top_k", [
    ("switch-base-8", 0.62, 12, 8, 1), ("switch-base-256", 14.66, 12, 256, 1), ("qwen1.5-moe-a2.7b", 14.3, 24, 60, 4),
    ("qwen3-30b-a3b", 30.5, 48, 128, 8), ("olmoe-1b-7b", 6.9, 16, 64, 8), ("deepseek-v2-lite", 15.7, 26, 64, 6),
    ("gpt-oss-20b", 20.9, 24, 32, 4)])
def test_published_sizes(name, total_b, layers, experts, top_k):
    s = registry.get(name).sizes
    assert abs(s.total_params / 1e9 - total_b) < 0.06
    assert (s.moe_layers, s.experts_per_layer, s.top_k) == (layers, experts, top_k)
    assert registry.get(name).fits(80 * 10**9, "bfloat16")


def test_unknown_name_lists_the_known_ones():
    with pytest.raises(UnknownModelError, match="unknown model 'mixtral-9x9b'; known: switch-base-8.*mixtral-8x7b"):
        load_model("mixtral-9x9b", source="synthetic")


def test_synthetic_is_seeded_reduced_and_labelled():
    a, src = load_model("mixtral-8x7b", layers=2, overrides=TINY, dtype="bfloat16")
    b, _ = load_model("mixtral-8x7b", layers=2, overrides=TINY, dtype="bfloat16")
    c, _ = load_model("mixtral-8x7b", layers=2, overrides=TINY, dtype="bfloat16", seed=1)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not torch.equal(sa["model.layers.0.mlp.experts.down_proj"], sc["model.layers.0.mlp.experts.down_proj"])
    assert {p.dtype for p in a.parameters()} == {torch.bfloat16} and not any(p.is_meta for p in a.parameters())
    assert str(src).startswith("synthetic(seed=0, layers=2/32, reduced=")
    assert str(src).endswith("bfloat16):mixtral-8x7b")
    assert a.config.num_hidden_layers == 2 and a.config.num_local_experts == 8
    fresh = type(a.model.rotary_emb)(a.config)  # buffers computed as transformers computes them, not left zero
    assert torch.equal(a.model.rotary_emb.inv_freq, fresh.inv_freq)


@pytest.mark.parametrize("threads,window", [(1, 1), (2, 1 << 40)])
def test_synthetic_weights_do_not_depend_on_threads_or_the_draw_window(threads, window, monkeypatch):
    """Blocks of many parameters are drawn at once; the weights must not depend on how many threads draw them or
    how far ahead they are drawn, and tied weights must stay one tensor."""
    from moebench.zoo import loader

    def build():
        model, _ = load_model("switch-base-8", layers=2, dtype="bfloat16", overrides={"d_model": 64, "d_ff": 128,
                                                                                        "d_kv": 16, "num_heads": 4})
        return model

    reference = build().state_dict()
    monkeypatch.setattr(loader, "_DRAW_WINDOW_BYTES", window)
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        model = build()
    finally:
        torch.set_num_threads(old)
    assert all(torch.equal(reference[k], v) for k, v in model.state_dict().items())
    assert model.encoder.embed_tokens.weight is model.shared.weight


def test_synthetic_routing_is_spread_over_experts():
    model, _ = load_model("mixtral-8x7b", layers=2, overrides=TINY)
    ids = torch.randint(2, 512, (4, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        router_logits = model(ids, output_router_logits=True).router_logits
    for logits in router_logits:
        chosen = logits.topk(2, dim=-1).indices.flatten()
        share = torch.bincount(chosen, minlength=8).float() / chosen.numel()
        assert (share > 0).all() and share.max() < 0.4  # every expert used, none takes most tokens
        assert logits.std() > 0.1


def test_too_shallow_a_reduction_is_refused():
    with pytest.raises(UnsupportedModelError, match="no routed-experts"):
        load_model("deepseek-v2-lite", layers=1)  # layer 0 is dense: no MoE layer left


def _save_tiny(path: Path):
    model, _ = load_model("mixtral-8x7b", layers=2, overrides=TINY)
    model.save_pretrained(path)
    return model


def test_checkpoint_folder_round_trip(tmp_path):
    model = _save_tiny(tmp_path / "ckpt")
    loaded, src = load_model(tmp_path / "ckpt")
    assert str(src) == f"checkpoint:{tmp_path / 'ckpt'}"
    ref, got = model.state_dict(), loaded.state_dict()
    assert all(torch.equal(ref[k], got[k]) for k in ref)


def test_offline_hf_cache_layout(tmp_path, monkeypatch):
    snap = tmp_path / "hub" / "models--acme--tiny-moe" / "snapshots" / "0123abc"
    _save_tiny(snap)
    (tmp_path / "hub" / "models--acme--tiny-moe" / "refs").mkdir()
    (tmp_path / "hub" / "models--acme--tiny-moe" / "refs" / "main").write_text("0123abc")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    assert resolve_checkpoint("acme/tiny-moe") == snap
    model, src = load_model("acme/tiny-moe", source="checkpoint")
    assert str(src).startswith("checkpoint:") and str(src).endswith("0123abc")
    with pytest.raises(CheckpointError, match="'acme/other' is not in the offline Hugging Face cache"):
        load_model("acme/other", source="checkpoint")


def test_checkpoint_errors(tmp_path):
    with pytest.raises(CheckpointError, match="no checkpoint folder"):
        load_model(tmp_path / "missing" / "deeper", source="checkpoint")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="has no config.json"):
        load_model(tmp_path / "empty")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="cannot read the config"):
        load_model(tmp_path / "bad")
    shutil.copytree(tmp_path / "bad", tmp_path / "noweights")
    (tmp_path / "noweights" / "config.json").write_text(json.dumps(registry.get("mixtral-8x7b").config))
    with pytest.raises(CheckpointError, match="cannot load checkpoint"):
        load_model(tmp_path / "noweights")
    with pytest.raises(ValueError, match="synthetic models only"):
        load_model(tmp_path / "noweights", layers=2)


def test_trained_source(tmp_path):
    with pytest.raises(CheckpointError, match="train it first with `python scripts/train_small_moe.py`"):
        load_model(tmp_path / "kjv-moe", source="trained")
    _save_tiny(tmp_path / "kjv-moe")
    _, src = load_model(tmp_path / "kjv-moe", source="trained")
    assert str(src) == f"trained:{tmp_path / 'kjv-moe'}"


def test_suites_tiers():
    switch = load_suite(ROOT / "suites" / "switch" / "suite.py")
    assert {c.model for c in switch.cases(["lru"], tier="quick")} == {"switch-base-8", "switch-base-64"}
    assert len({c.model for c in switch.cases(["lru"], tier="full")}) == 6
    mixtral = load_suite(ROOT / "suites" / "mixtral" / "suite.py")
    full = mixtral.cases(["lru"], tier="full")  # the published model and the trained kjv-moe
    assert [(c.model, c.budget) for c in full] == [("mixtral-8x7b", "all"), ("mixtral-8x7b", "50%"),
                                                   ("kjv-moe", "all"), ("kjv-moe", "50%")]
    for name in ("qwen_moe", "olmoe", "deepseek"):
        assert load_suite(ROOT / "suites" / name / "suite.py").cases(["lru"], tier="quick")


def test_reference_that_does_not_fit_is_skipped_and_the_rest_runs_unchecked(monkeypatch):
    from moebench import measure
    from moebench.suite import Case

    suite = load_suite(ROOT / "suites" / "mixtral" / "suite.py")
    session = measure.Session(suite, rounds=1)
    real = measure.Session._measure

    def fake(self, case, ref, **kwargs):
        if case.is_reference:
            raise measure.CaseSkipped(f"{case.name}: GPU budget is above the device's memory")
        return real(self, case, ref, **kwargs)

    monkeypatch.setattr(measure.Session, "_measure", fake)
    with pytest.raises(measure.CaseSkipped, match="above the device's memory"):
        session.run(Case("mixtral-8x7b", "resident", "all"))
    record = session.run(Case("mixtral-8x7b", "lru", "50%"))
    assert record["passed"] and record["token_agreement"] is None
    assert record["exactness"].startswith("unchecked: no resident reference")
    assert record["weights"].startswith("synthetic(seed=0, layers=2/32")


def test_mixtral_suite_quick_tier_passes(pytester, tmp_path):
    result = pytester.runpytest_subprocess(
        "--moebench", str(ROOT / "suites" / "mixtral"), "--moebench-tier", "quick", "--moebench-policy", "lru",
        "--moebench-rounds", "1", "--moebench-history", str(tmp_path / "hist"), "-p", "no:cacheprovider")
    result.assert_outcomes(passed=6)  # the synthetic model and the trained kjv-moe
    result.stdout.fnmatch_lines(["*moebench: 6 cases*", "mixtral-8x7b*lru*25%*pass", "kjv-moe*lru*25%*pass"])


def test_zoo_cli(capsys):
    from moebench.cli import main

    assert main(["zoo", "--gpu-gb", "80"]) == 0
    out = capsys.readouterr().out
    assert "mixtral-8x7b" in out and "336.0" in out and "mistralai/Mixtral-8x7B-v0.1" in out
