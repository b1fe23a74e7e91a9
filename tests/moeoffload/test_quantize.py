"""Group-wise affine quantization: round trips, the packed layout, and torchao's reference where it is installed."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from moeoffload.layout import ExpertLayout, QuantizedLayout
from moeoffload.quantize import BITS, dequantize, group_for, quantize, unpack

shapes = st.tuples(st.integers(1, 12), st.sampled_from([16, 32, 64, 128, 192]))


def _matrix(rows: int, cols: int, seed: int, dtype=torch.bfloat16) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g) * 0.02
    w[0, : cols // 2] = 0.0  # an all-zero group
    if rows > 1:
        w[1] = w[1].abs()  # groups with no negative value
    return w.to(dtype)


@settings(max_examples=60, deadline=None)
@given(shape=shapes, bits=st.sampled_from(sorted(BITS.values())), seed=st.integers(0, 2**16))
def test_round_trip_error_is_at_most_one_step_per_group(shape, bits, seed):
    rows, cols = shape
    group = group_for("w", shape)
    w = _matrix(rows, cols, seed)
    q, scale, zero = quantize(w, bits, group)
    assert q.dtype == torch.uint8 and q.shape == (rows, cols * bits // 8)
    assert scale.shape == zero.shape == (rows, cols // group)
    codes = unpack(q, bits)
    assert int(codes.max()) <= (1 << bits) - 1
    back = dequantize(q, scale, zero, bits, group, dtype=torch.float32)
    step = scale.repeat_interleave(group, dim=1)  # half a step of rounding, half of the zero point's rounding
    assert bool(((back - w.float()).abs() <= step * (1 + 1e-5)).all())
    assert bool((back[0, : cols // 2] == 0).all())  # zero is exact (the zero point is an integer)


def test_int4_packs_two_codes_per_byte_low_nibble_first():
    w = torch.arange(32, dtype=torch.float32).view(1, 32) - 8.0
    q, scale, zero = quantize(w, 4, 16)
    codes = unpack(q, 4)
    assert torch.equal(q[0, 0] & 15, codes[0, 0]) and torch.equal(q[0, 0] >> 4, codes[0, 1])


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_round_trip_matches_torchao_reference(bits, seed):
    """Bit-identical codes, scales, zero points and dequantized weights to torchao's affine primitives."""
    qp = pytest.importorskip("torchao.quantization.quant_primitives",
                             reason="torchao is not installed (pip install torchao): its reference is optional")
    w = _matrix(24, 256, seed)
    qmax = (1 << bits) - 1
    scale, zero = qp.choose_qparams_affine(w.float(), qp.MappingType.ASYMMETRIC, (1, 64), torch.uint8, 0, qmax,
                                           scale_dtype=torch.float32, zero_point_dtype=torch.int32)
    codes = qp.quantize_affine(w.float(), (1, 64), scale, zero, torch.uint8, 0, qmax)
    ref = qp.dequantize_affine(codes, (1, 64), scale, zero, torch.uint8, 0, qmax, output_dtype=torch.float32)
    q, s, z = quantize(w, bits, 64)
    assert torch.equal(s, scale) and torch.equal(z.int(), zero) and torch.equal(unpack(q, bits), codes)
    assert torch.equal(dequantize(q, s, z, bits, 64), ref.to(torch.bfloat16))


LAYOUT = ExpertLayout(("gate_up_proj", "down_proj"), ((2 * 96, 64), (64, 96)), torch.bfloat16)


@pytest.mark.parametrize("bits", [8, 4])
def test_quantized_layout_packs_one_buffer_that_dequantizes_like_each_matrix(bits):
    qlayout = QuantizedLayout(LAYOUT, bits, 64)
    assert qlayout.groups == {"gate_up_proj": 64, "down_proj": 32}  # 96 columns: the largest fitting power of two
    tensors = {name: _matrix(*shape, seed=i) for i, (name, shape) in enumerate(zip(LAYOUT.names, LAYOUT.shapes))}
    flat = torch.zeros(qlayout.numel, dtype=torch.uint8)
    qlayout.pack(tensors, flat)
    spans = sorted((off, off + torch.Size(shape).numel() * torch.empty((), dtype=dt).element_size())
                   for _, off, shape, dt in qlayout.sections)
    assert all(a[1] <= b[0] for a, b in zip(spans, spans[1:])) and spans[-1][1] <= qlayout.nbytes
    out = torch.empty(LAYOUT.numel, dtype=torch.bfloat16)
    qlayout.dequantize(qlayout.views(flat), LAYOUT.views(out))
    for name, w in tensors.items():
        group = qlayout.groups[name]
        assert torch.equal(LAYOUT.views(out)[name], dequantize(*quantize(w, bits, group), bits, group))
    assert qlayout.nbytes < LAYOUT.nbytes / (2.5 if bits == 4 else 1.5)


@pytest.mark.parametrize("shape, message", [((64,), "not quantized"), ((4, 8, 16), "not quantized"),
                                            ((4, 40), "multiple of 16")])
def test_a_tensor_the_quantizer_cannot_take_is_named(shape, message):
    layout = ExpertLayout(("w", "odd"), ((4, 64), shape), torch.float32)
    with pytest.raises(ValueError, match=f"'odd'.*{message}"):
        QuantizedLayout(layout, 4, 64)
