"""The staged exact loop (moeoffload.staged): its block layout keeps every expert's rows aligned, its per-token sum is
`index_add_`'s, and a layer computes with it exactly what the per-expert loop computes. test_families.py checks the
whole models against eager with it; test_staged_gpu.py does so on CUDA at published widths."""

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import moeoffload
import moeoffload.paths.exact
from moeoffload.staged import ALIGN_BYTES, ordered_sum, padded_blocks, row_quantum, token_ranks

from . import models as M


@given(widths=st.lists(st.integers(1, 5000), min_size=1, max_size=4), element=st.sampled_from([1, 2, 4]))
def test_row_quantum_aligns_every_buffer(widths, element):
    q = row_quantum(tuple(widths), element)
    assert all(q * w * element % ALIGN_BYTES == 0 for w in widths)
    assert all(not all(r * w * element % ALIGN_BYTES == 0 for w in widths) for r in range(1, q))  # the fewest rows


@given(counts=st.lists(st.integers(1, 50), min_size=1, max_size=20), quantum=st.integers(1, 8))
def test_padded_blocks_are_aligned_disjoint_and_split_back(counts, quantum):
    starts, sizes = padded_blocks(counts, quantum)
    assert all(s % quantum == 0 for s in starts[:-1])
    assert all(starts[i] + counts[i] <= starts[i + 1] < starts[i] + counts[i] + quantum for i in range(len(counts)))
    assert sum(sizes) == starts[-1] == starts[-2] + counts[-1]
    buffer = torch.arange(starts[-1])
    blocks = buffer.split(sizes)[::2]
    assert [b.tolist() for b in blocks] == [list(range(s, s + c)) for s, c in zip(starts, counts)]


def _pairs(index, experts):
    """route()'s grouping: the (token, position) pairs sorted by expert, stably; ids >= experts dropped."""
    tokens = index.shape[0]
    flat = index.T.reshape(-1)
    pairs = torch.argsort(torch.where(flat < experts, flat, experts), stable=True)[: int((flat < experts).sum())]
    return pairs, pairs % tokens, pairs // tokens


@settings(max_examples=60, deadline=None)
@given(tokens=st.integers(1, 12), k=st.integers(1, 4), extra=st.integers(0, 4), seed=st.integers(0, 2**16),
       dtype=st.sampled_from([torch.float32, torch.bfloat16]), like=st.sampled_from([torch.float32, torch.bfloat16]))
def test_ordered_sum_is_index_add_one_expert_at_a_time(tokens, k, extra, seed, dtype, like):
    """Top-k routing (distinct experts per token; an id past the last expert means "none"): the sum equals eager's
    bit for bit: zeros in the contributions' dtype (eager's accumulator's, float32 for Inkling2 whatever the hidden
    states' `like`), then one index_add_ per expert in ascending order."""
    experts = k + extra
    g = torch.Generator().manual_seed(seed)
    index = torch.stack([torch.randperm(experts + 1, generator=g)[:k] for _ in range(tokens)])
    values = (torch.randn(k, tokens, 8, generator=g) * 100).to(dtype)  # values[pos, token]: that pair's contribution
    want = torch.zeros(tokens, 8, dtype=dtype)
    for e in range(experts):
        pos, tok = torch.where(index.T == e)
        want.index_add_(0, tok, values[pos, tok])
    pairs, tok, pos = _pairs(index, experts)
    ranks = token_ranks(index).T.reshape(-1)[pairs]
    assert torch.equal(ordered_sum(values[pos, tok], tok, ranks, tokens, k, want.to(like)), want)


def test_ordered_sum_counts_a_repeated_expert_twice():
    """A replaced routing (an approximate policy's router tap) may name an expert twice for one token. Eager's single
    index_add_ then adds the same token twice in one call, in an order no one fixes (atomics on CUDA, a wider
    accumulator on this CPU), so only the value is checked, not the bits."""
    index = torch.tensor([[1, 1, 0], [2, 0, 2]])
    values = torch.randn(3, 2, 8, generator=torch.Generator().manual_seed(0))
    pairs, tok, pos = _pairs(index, 3)
    ranks = token_ranks(index).T.reshape(-1)[pairs]
    got = ordered_sum(values[pos, tok], tok, ranks, 2, 3, values[0])
    torch.testing.assert_close(got, values.sum(0))


def test_staged_layer_equals_the_per_expert_loop_under_replaced_routing(monkeypatch):
    """A router tap may repeat an expert within a token (an approximate policy's replacement): both copies count,
    as in the loop (float32 here: the value, not the order of a repeated expert's two adds, is what is checked)."""
    monkeypatch.setattr(moeoffload.paths.exact, "STAGED_MIN_EXPERTS", 1)
    model = M.tiny_mixtral(seed=3, experts=8, top_k=2)
    with moeoffload.offload(model, "lru", "50%", device="cpu") as handle:
        layer = handle.layers[0]
        assert layer.host_path.stages is not None
        g = torch.Generator().manual_seed(0)
        hidden = torch.randn(9, 64, generator=g)
        index = torch.randint(0, 8, (9, 2), generator=g)
        index[0] = torch.tensor([5, 5])
        index[1, 1] = 8  # no expert
        weights = torch.rand(9, 2, generator=g)
        staged = layer(hidden, index, weights)
        stages, layer.host_path.stages = layer.host_path.stages, None
        try:
            loop = layer(hidden, index, weights)
        finally:
            layer.host_path.stages = stages
    torch.testing.assert_close(staged, loop)


def test_a_forward_that_needs_gradients_takes_the_per_expert_loop():
    """`mm(out=)` has no autograd: with gradients on, the layer falls back to the loop instead of raising."""
    model = M.tiny_olmoe(seed=2)
    with moeoffload.offload(model, "resident", "all", device="cpu"):
        ids = torch.randint(3, 96, (1, 5))
        model.get_input_embeddings().weight.requires_grad_(True)
        loss = model(ids).logits.sum()
        loss.backward()
        assert model.get_input_embeddings().weight.grad is not None


def test_a_call_with_few_experts_takes_the_per_expert_loop(monkeypatch):
    """Below STAGED_MIN_EXPERTS experts the staged loop's fixed launches cost more than it saves (exact_loop.py)."""
    model = M.tiny_mixtral(seed=4, experts=8, top_k=2)
    with moeoffload.offload(model, "resident", "all", device="cpu") as handle:
        layer = handle.layers[0]
        calls = []
        monkeypatch.setattr(layer.host_path, "_staged", lambda *a: calls.append(len(a[3])) or torch.zeros_like(a[0]))
        layer(torch.randn(1, 64), torch.tensor([[1, 6]]), torch.rand(1, 2))  # 2 experts: the loop
        layer(torch.randn(30, 64), torch.arange(60).remainder(8).view(30, 2), torch.rand(30, 2))  # all 8: staged
    assert calls == [8]
