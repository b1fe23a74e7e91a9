"""Workloads: held-out prompts, the Poisson arrival generator and its single-server queue, prefill/decode
phases, JSONL task files."""

import json
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from tests.moeoffload.models import tiny_mixtral

from moebench.workload import (
    Arrivals,
    Workload,
    find_tokenizer,
    heldout_ids,
    load_task,
    phase_metrics,
    queue_latencies,
    serve_arrivals,
)


@pytest.fixture(scope="module")
def tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(["In the beginning God created the heaven and the earth."] * 4,
                            trainers.BpeTrainer(vocab_size=280, special_tokens=["<|pad|>", "<|endoftext|>"],
                                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                                show_progress=False))
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<|pad|>", eos_token="<|endoftext|>")


@settings(max_examples=30, deadline=None)
@given(st.floats(0.1, 1000.0), st.integers(1, 50), st.integers(0, 2**31 - 1))
def test_arrivals_are_seeded_and_increasing(rate, n, seed):
    times = Arrivals(rate, n, seed).times()
    assert len(times) == n and times == Arrivals(rate, n, seed).times()
    assert all(b > a for a, b in zip(times, times[1:])) and times[0] > 0


def test_arrival_gaps_have_the_poisson_mean():
    times = Arrivals(rate_per_s=20.0, requests=20000, seed=3).times()
    assert times[-1] / len(times) == pytest.approx(1 / 20.0, rel=0.03)


def test_arrivals_reject_bad_rates():
    with pytest.raises(ValueError, match="rate_per_s must be > 0"):
        Arrivals(0.0)
    with pytest.raises(ValueError, match="requests must be a positive int"):
        Arrivals(1.0, requests=0)


@settings(max_examples=50, deadline=None)
@given(st.lists(st.tuples(st.floats(0.0, 2.0), st.floats(0.001, 1.0)), min_size=1, max_size=30))
def test_queue_serves_first_come_first_served(pairs):
    gaps, service = zip(*pairs)
    arrivals = [sum(gaps[:i + 1]) for i in range(len(gaps))]
    latency, waited = queue_latencies(arrivals, list(service))
    finish = [a + lat for a, lat in zip(arrivals, latency)]
    for i, s in enumerate(service):
        assert latency[i] == pytest.approx(waited[i] + s)
        assert waited[i] >= -1e-12
        if i:
            assert finish[i] >= finish[i - 1] + s - 1e-9  # one at a time, in order
    assert waited[0] == 0.0


def test_queue_without_overlap_has_no_waiting():
    latency, waited = queue_latencies([1.0, 3.0, 5.0], [0.5, 0.5, 0.5])
    assert waited == [0.0, 0.0, 0.0] and latency == [0.5, 0.5, 0.5]
    latency, waited = queue_latencies([0.0, 0.1], [1.0, 1.0])  # the second waits for the first
    assert waited[1] == pytest.approx(0.9) and latency[1] == pytest.approx(1.9)


def test_phase_metrics_split_prefill_from_decode():
    m = phase_metrics([[0.2, 0.01, 0.01, 0.01], [0.4, 0.02, 0.02, 0.02]], batch_size=2, prompt_len=10)
    assert m["ttft_ms"] == pytest.approx(300.0)
    assert m["prefill_tokens_per_s"] == pytest.approx(2 * 10 * 2 / 0.6)
    assert m["decode_tokens_per_s"] == pytest.approx(2 * 6 / 0.09)
    assert math.isnan(phase_metrics([[0.1]], 1, 4)["decode_tokens_per_s"])  # one new token: no decode step


def test_prompts_come_from_heldout_text_with_a_tokenizer(tokenizer):
    wl = Workload(batch_size=3, prompt_len=8, seed=1)
    a = wl.prompts(len(tokenizer), tokenizer=tokenizer)
    assert a.shape == (3, 8) and torch.equal(a, wl.prompts(len(tokenizer), tokenizer=tokenizer))
    ids = heldout_ids(tokenizer)
    for row in a:  # every prompt is a window of the tokenized held-out text
        starts = (ids[:-8] == row[0]).nonzero().flatten()
        assert any(torch.equal(ids[s:s + 8], row) for s in starts.tolist())
    assert not torch.equal(a, wl.prompts(len(tokenizer), round_index=1, tokenizer=tokenizer))
    synthetic = Workload(batch_size=3, prompt_len=8, seed=1, text="synthetic")
    assert not synthetic.uses_text(tokenizer)
    assert synthetic.prompts(len(tokenizer), tokenizer=tokenizer).shape == (3, 8)


def test_models_without_a_saved_tokenizer_have_none():
    assert find_tokenizer(tiny_mixtral()) is None


def test_serve_arrivals_reports_latency_percentiles():
    wl = Workload(prompt_len=4, new_tokens=3, arrivals=Arrivals(rate_per_s=1000.0, requests=3, seed=0))
    out = serve_arrivals(tiny_mixtral(), wl, "cpu")
    assert out["requests"] == 3
    assert 0 < out["ttft_p50_ms"] <= out["latency_p50_ms"] <= out["latency_p90_ms"] <= out["latency_p99_ms"]
    assert out["mean_queue_ms"] > 0  # 1000 requests/s on a CPU: they queue


def test_load_task_reads_and_validates(tmp_path):
    good = tmp_path / "t.jsonl"
    good.write_text(json.dumps({"prompt": "p", "choices": [" a", " b"], "answer": 1}) + "\n\n")
    items = load_task(good)
    assert len(items) == 1 and items[0].answer == 1 and items[0].choices == (" a", " b")
    bad = tmp_path / "bad.jsonl"
    for line, message in [("{", "not JSON"), ('{"prompt": "p", "choices": ["a"], "answer": 0}', "at least 2"),
                          ('{"prompt": "p", "choices": ["a", "b"], "answer": 2}', "index of the right choice"),
                          ('{"choices": ["a", "b"], "answer": 0}', "'prompt'")]:
        bad.write_text(line + "\n")
        with pytest.raises(ValueError, match=message):
            load_task(bad)
    with pytest.raises(ValueError, match="is not a file"):
        Workload(task=str(tmp_path / "missing.jsonl"))
    with pytest.raises(ValueError, match="text must be one of"):
        Workload(text="wiki")
