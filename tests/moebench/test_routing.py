"""Routing statistics (moebench.routing) and the `moebench routing` command."""

import json
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from moebench import routing, routing_cmd
from moebench.cli import main

TINY = ["hidden_size=64", "intermediate_size=96", "vocab_size=512", "num_attention_heads=4",
        "num_key_value_heads=2"]


def _random_topk(n, seq, e, k, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.rand(n, seq, e, generator=gen).topk(k, dim=-1).indices


def test_independent_uniform_routing_matches_the_uniform_figures():
    e, k, b = 8, 2, 4
    top = _random_topk(400, 50, e, k)
    uniform = routing.uniform_figures(e, k, b)
    assert routing.first_repeat(top) == pytest.approx(uniform["first_repeat"], abs=0.01)
    assert routing.topk_overlap(top, e) == pytest.approx(uniform["topk_overlap"], abs=0.01)
    assert routing.topk_reuse(top, e) == pytest.approx(uniform["topk_reuse"], abs=0.01)
    assert routing.working_set(top, e, b) == pytest.approx(uniform["working_set"], abs=0.05)
    assert routing.usage_entropy(top, e) > 0.999 and routing.max_mean_load(top, e) < 1.05
    cond, marg = routing.next_layer_hit(top, _random_topk(400, 50, e, k, seed=1), e)
    assert cond == pytest.approx(k / e, abs=0.02) and marg == pytest.approx(k / e, abs=0.02)
    assert uniform["topk_overlap"] == pytest.approx(1 - 6 / 8 * 5 / 7)  # the Mixtral paper's 46%


@settings(max_examples=30, deadline=None)
@given(e=st.integers(2, 16), k=st.integers(1, 4), n=st.integers(1, 6), seq=st.integers(2, 12), seed=st.integers(0, 99))
def test_figures_stay_in_their_ranges(e, k, n, seq, seed):
    k = min(k, e)
    top = _random_topk(n, seq, e, k, seed)
    for value in (routing.first_repeat(top), routing.topk_overlap(top, e), routing.topk_reuse(top, e)):
        assert 0.0 <= value <= 1.0
    assert routing.topk_reuse(top, e) <= routing.topk_overlap(top, e) + 1e-12  # overlap counts any shared expert
    assert k <= routing.working_set(top, e, 1) <= k and k <= routing.working_set(top, e, n) <= min(e, n * k)
    assert 0.0 <= routing.usage_entropy(top, e) <= 1.0 + 1e-9 and routing.max_mean_load(top, e) <= e
    cond, marg = routing.next_layer_hit(top, top, e)
    assert 0.0 <= marg <= 1.0 and 0.0 <= cond <= 1.0


def test_a_layer_that_copies_the_previous_one_is_predicted_exactly():
    here = _random_topk(20, 30, 8, 1)
    there = (here + 3) % 8  # a fixed permutation of the first choice
    cond, marg = routing.next_layer_hit(here, there, 8)
    assert cond == 1.0 and marg < 0.3
    assert routing.first_repeat(torch.zeros(2, 5, 1, dtype=torch.long)) == 1.0


def test_bad_shapes_are_refused():
    with pytest.raises(ValueError, match="seq >= 2"):
        routing.first_repeat(torch.zeros(3, 1, 2, dtype=torch.long))
    with pytest.raises(ValueError, match="at least 4 sequences"):
        routing.working_set(torch.zeros(3, 5, 2, dtype=torch.long), 8, 4)


def test_routing_statistics_of_a_model():
    from moebench.zoo import load_model

    model, _ = load_model("mixtral-8x7b", layers=2, overrides={k: int(v) for k, v in (s.split("=") for s in TINY)})
    ids = torch.randint(2, 512, (4, 16), generator=torch.Generator().manual_seed(0))
    stats = routing.routing_statistics(model, list(ids.split(2)), batch=2, show_progress=False)
    assert stats["num_experts"] == 8 and stats["top_k"] == 2 and stats["tokens"] == 64
    first, last = stats["layers"]
    assert first["next_hit"] is not None and last["next_hit"] is None
    assert (first["depth"], last["depth"]) == (0.0, 1.0)
    legacy = routing.routing_structure(model, ids, batch_size=2)
    assert legacy["layers"][0]["topk_reuse"] == first["topk_reuse"]


def test_routing_command(tmp_path, capsys):
    out = tmp_path / "r.json"
    args = ["routing", "mixtral-8x7b", "--layers", "2", "--sequences", "4", "--length", "12", "--batch", "2",
            "--json", str(out)] + [a for s in TINY for a in ("--set", s)]
    assert main(args) == 0
    text = capsys.readouterr().out
    assert "routing=calibrated" in text and "first repeat" in text and "uniform" in text
    data = json.loads(out.read_text())
    routing_cmd.plot(data, str(tmp_path / "r.png"), "tiny")
    assert (tmp_path / "r.png").stat().st_size > 0
    assert len(data["layers"]) == 2 and data["text"] == "seeded random token ids"
    assert math.isclose(data["uniform"]["first_repeat"], 1 / 8)


def test_routing_command_errors(tmp_path, capsys):
    assert main(["routing", str(tmp_path / "nowhere")]) == 2
    assert "no checkpoint folder" in capsys.readouterr().err
    assert main(["routing", "mixtral-8x7b", "--set", "hidden_size"]) == 2
    assert "expected KEY=VALUE" in capsys.readouterr().err
