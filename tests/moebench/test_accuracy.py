"""Accuracy metrics (moebench.accuracy), the JSONL task scorer, the small-MoE trainer's smoke mode, and a
Session whose policy perturbs the outputs showing a positive accuracy drop and KL."""

import json
import math
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from tests.moeoffload.models import tiny_mixtral

from moebench import accuracy
from moebench.measure import CaseFailed, Session
from moebench.suite import Case, ModelSpec, Suite
from moebench.workload import TaskItem, Workload, find_tokenizer, load_task

REPO = Path(__file__).resolve().parents[2]


@settings(max_examples=25, deadline=None)
@given(st.integers(1, 4), st.integers(2, 50), st.integers(0, 2**31 - 1))
def test_kl_of_identical_logits_is_zero_and_never_negative(rows, vocab, seed):
    gen = torch.Generator().manual_seed(seed)
    a = torch.randn(rows, 3, vocab, generator=gen) * 5
    b = torch.randn(rows, 3, vocab, generator=gen) * 5
    assert accuracy.mean_kl(a, a) == pytest.approx(0.0, abs=1e-6)
    assert accuracy.mean_kl(a, a + 7.0) == pytest.approx(0.0, abs=1e-5)  # a shift does not change softmax
    assert accuracy.mean_kl(a, b) >= 0.0


def test_kl_of_two_known_distributions():
    p, q = torch.tensor([0.5, 0.5]), torch.tensor([0.25, 0.75])
    expected = 0.5 * math.log(0.5 / 0.25) + 0.5 * math.log(0.5 / 0.75)
    assert accuracy.mean_kl(p.log()[None], q.log()[None]) == pytest.approx(expected, rel=1e-6)


def test_perplexity_of_known_distributions():
    vocab = 10
    assert accuracy.perplexity(torch.zeros(4, vocab), torch.arange(4)) == pytest.approx(vocab)  # uniform
    probs = torch.tensor([0.5, 0.25, 0.25])
    logits = probs.log().expand(6, 3)
    targets = torch.tensor([0, 0, 1, 2, 0, 1])  # nll: ln2 x3, ln4 x3 -> mean 1.5 ln 2
    assert accuracy.perplexity(logits, targets) == pytest.approx(2 ** 1.5)
    assert accuracy.next_token_accuracy(logits, targets) == pytest.approx(0.5)


def test_token_agreement():
    a = torch.tensor([[1, 2, 3, 4]])
    assert accuracy.token_agreement(a, a) == 1.0
    assert accuracy.token_agreement(a, torch.tensor([[1, 2, 0, 0]])) == 0.5
    with pytest.raises(ValueError, match="shapes differ"):
        accuracy.token_agreement(a, a[:, :2])


@pytest.fixture(scope="module")
def trained_tiny(tmp_path_factory):
    """The trainer's smoke mode (CPU, a few seconds of training): a checkpoint folder with model and tokenizer."""
    sys.path.insert(0, str(REPO / "scripts"))
    try:
        import train_small_moe
    finally:
        sys.path.remove(str(REPO / "scripts"))
    out = tmp_path_factory.mktemp("kjv-moe")
    rc = train_small_moe.main(["--max-steps", "3", "--max-train-chars", "60000", "--vocab-size", "300",
                               "--batch-size", "2", "--seq-len", "32", "--eval-every", "2", "--eval-tokens", "256",
                               "--routing-tokens", "256", "--hidden", "32", "--intermediate", "32", "--layers", "2",
                               "--output", str(out), "--device", "cpu"])
    assert rc == 0
    return out


def test_trainer_smoke_mode_writes_a_loadable_checkpoint_with_its_record(trained_tiny):
    from transformers import AutoModelForCausalLM

    record = json.loads((trained_tiny / "training.json").read_text())
    assert record["steps"] == 3 and record["seed"] == 0
    assert math.isfinite(record["final_heldout"]["loss"]) and record["final_heldout"]["perplexity"] > 1
    for kind in ("trained", "synthetic_same_shape_seeded"):
        routing = record["routing"][kind]
        assert len(routing["layers"]) == 2
        assert 0 < routing["mean_usage_entropy"] <= 1 and 0 <= routing["mean_topk_reuse"] <= 1
    assert record["checkpoint_weight_bytes"] <= 10 * 2**20
    assert "Final held-out loss" in (trained_tiny / "TRAINING.md").read_text()
    model = AutoModelForCausalLM.from_pretrained(trained_tiny, local_files_only=True)
    assert next(model.parameters()).dtype == torch.bfloat16  # saved in bf16
    tokenizer = find_tokenizer(model)
    assert tokenizer is not None and len(tokenizer) == model.config.vocab_size


def _load_lm(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, local_files_only=True, dtype=torch.float32).eval()


def test_task_scorer_picks_the_choice_of_highest_log_likelihood(trained_tiny, tmp_path):
    model = _load_lm(trained_tiny)
    tokenizer = find_tokenizer(model)
    item = TaskItem("And God said", (" Let there be light", " unto Moses", " the"), 0)
    scores = accuracy.choice_scores(model, tokenizer, item, "cpu")
    # the same figure by hand: one forward over prompt + choice, summing the choice tokens' log-probabilities
    p = tokenizer(item.prompt, add_special_tokens=False)["input_ids"]
    c = tokenizer(item.choices[1], add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        lp = torch.log_softmax(model(torch.tensor([p + c])).logits[0].float(), -1)
    by_hand = sum(lp[len(p) - 1 + i, t].item() for i, t in enumerate(c))
    assert scores[1] == pytest.approx(by_hand, abs=1e-4)
    best = max(range(3), key=scores.__getitem__)
    worst = min(range(3), key=scores.__getitem__)
    task = tmp_path / "task.jsonl"
    task.write_text("\n".join(json.dumps({"prompt": item.prompt, "choices": list(item.choices), "answer": a})
                              for a in (best, worst)) + "\n")
    assert accuracy.task_accuracy(model, tokenizer, load_task(task), "cpu") == 0.5


def test_task_needs_a_tokenizer():
    with pytest.raises(ValueError, match="needs a model with a tokenizer"):
        accuracy.task_accuracy(tiny_mixtral(), None, [TaskItem("a", ("b", "c"), 0)], "cpu")


def _perturbing_offload(monkeypatch, scale: float):
    """Wrap moeoffload.offload and OffloadedModel.switch (a Session switches the policy of a kept handle): a
    non-resident policy gets noise added to its logits (what an approximate policy, e.g. one that skips or quantizes
    experts, does to the output)."""
    import moeoffload

    real_offload, real_switch, real_unload = moeoffload.offload, moeoffload.OffloadedModel.switch, \
        moeoffload.OffloadedModel.unload
    hooks = {}  # id(handle) -> the noise hook of its current policy

    def perturb(handle, policy):
        old = hooks.pop(id(handle), None)
        if old is not None:
            old.remove()
        if policy != "resident":
            gen = torch.Generator().manual_seed(1)

            def noise(module, inputs, output):
                return output + scale * torch.randn(output.shape, generator=gen).to(output)

            hooks[id(handle)] = handle.model.lm_head.register_forward_hook(noise)
        return handle

    def offload(model, policy, *args, **kwargs):
        return perturb(real_offload(model, policy, *args, **kwargs), policy)

    def switch(self, policy, *args, **kwargs):
        return perturb(real_switch(self, policy, *args, **kwargs), policy)

    def unload(self):
        perturb(self, "resident")
        return real_unload(self)

    monkeypatch.setattr(moeoffload, "offload", offload)
    monkeypatch.setattr(moeoffload.OffloadedModel, "switch", switch)
    monkeypatch.setattr(moeoffload.OffloadedModel, "unload", unload)


def test_a_policy_that_perturbs_outputs_shows_a_positive_drop(trained_tiny, monkeypatch):
    import moeoffload
    from moeoffload import policies

    monkeypatch.setitem(policies._REGISTRY, "noisy", moeoffload.Policy("noisy", "test: perturbed", exact=False))
    _perturbing_offload(monkeypatch, scale=20.0)
    suite = Suite(name="acc", models=[ModelSpec("kjv-tiny", lambda tier, dtype, device: (_load_lm(trained_tiny),
                                                                                        "trained (smoke)"))],
                  budgets=["50%"], workload=Workload(batch_size=2, prompt_len=6, new_tokens=4, eval_sequences=4,
                                                     eval_len=64),
                  policies=["noisy"], accuracy_limit=0.0)
    session = Session(suite, rounds=1)
    ref = session.run(Case("kjv-tiny", "resident", "all"))
    assert ref["prompts"] == "held-out corpus text" and ref["eval_text"].startswith("held-out corpus text")
    assert ref["accuracy_drop"] == 0.0 and ref["kl_divergence"] == 0.0 and ref["token_agreement"] == 1.0
    with pytest.raises(CaseFailed, match="accuracy drop") as failed:
        session.run(Case("kjv-tiny", "noisy", "50%"))
    record = failed.value.record
    assert record["kl_divergence"] > 0.1
    assert record["perplexity"] > record["reference_perplexity"]
    assert record["accuracy_drop"] > 0
    assert record["accuracy_drop"] == pytest.approx(record["reference_next_token_accuracy"]
                                                    - record["next_token_accuracy"])


def test_synthetic_model_is_scored_on_the_reference_continuation():
    suite = Suite(name="syn", models=[ModelSpec("mx", lambda tier, dtype, device: (tiny_mixtral(), "seeded"))],
                  budgets=["50%"], workload=Workload(batch_size=2, prompt_len=5, new_tokens=3), policies=["lru"])
    session = Session(suite, rounds=1)
    ref = session.run(Case("mx", "resident", "all"))
    lru = session.run(Case("mx", "lru", "50%"))
    assert ref["prompts"] == "seeded random token ids"
    assert "reference greedy continuations" in ref["eval_text"]
    assert ref["next_token_accuracy"] == pytest.approx(1.0)  # greedy continuations are the reference's argmax
    assert lru["token_agreement"] == 1.0 and lru["kl_divergence"] == pytest.approx(0.0, abs=1e-6)
    assert math.isfinite(lru["ttft_ms"]) and lru["decode_tokens_per_s"] > 0
