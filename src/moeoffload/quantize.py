"""Group-wise affine weight quantization (int8, int4): fewer bytes per expert copied host->device.

The scheme is torchao's `choose_qparams_affine` / `quantize_affine` / `dequantize_affine` with MappingType.ASYMMETRIC,
block size (1, G) and an integer zero point, computed in float32 (docs/low-precision.md: why torchao's scheme and
why our own code): per group of G input columns of a matrix [out, in],

    scale = max((max(w, 0) - min(w, 0)) / (2^bits - 1), eps)     zero = clamp(-round(min(w, 0) / scale), 0, 2^bits - 1)
    q = clamp(round(w * (1 / scale)) + zero, 0, 2^bits - 1)      w' = (q - zero) * scale

q is one byte per weight for int8 and two weights per byte for int4 (column 2j in the low nibble, 2j+1 in the high
one); scale is float32 and zero uint8, one each per group. The round trip is bit-identical to torchao's reference
(tests/moeoffload/test_quantize.py checks it where torchao is installed).
"""

from __future__ import annotations

import math

import torch

BITS = {"int8": 8, "int4": 4}  # the low precisions; "full" is the store's own dtype
GROUP_SIZE = 64
MIN_GROUP = 16
EPS = torch.finfo(torch.float32).smallest_normal  # torchao's default eps for a float32 input


def group_for(name: str, shape: tuple[int, ...], group: int = GROUP_SIZE) -> int:
    """The group size of a matrix of `shape`: `group` input columns, or the largest power of two below it that
    divides the column count (a small test model's 96 columns: 32); raise ValueError when that is below
    MIN_GROUP or the tensor is not a matrix."""
    if len(shape) != 2:
        raise ValueError(f"expert tensor {name!r} has shape {shape}: group-wise quantization takes matrices [out, in] "
                         "(biases and 3-D tensors are not quantized)")
    fitting = math.gcd(group, shape[1])
    if fitting < MIN_GROUP:
        raise ValueError(f"expert matrix {name!r} has {shape[1]} input columns, not a multiple of {MIN_GROUP}: "
                         "group-wise quantization needs groups of at least that many columns")
    return fitting


def quantize(w: torch.Tensor, bits: int, group: int = GROUP_SIZE) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(q uint8 [R, C * bits / 8], scale float32 [R, C / G], zero uint8 [R, C / G]) of a matrix w [R, C]."""
    if group_for("w", tuple(w.shape), group) != group:
        raise ValueError(f"a matrix of {w.shape[1]} columns cannot be quantized in groups of {group}")
    rows, cols = w.shape
    qmax = (1 << bits) - 1
    x = w.float().view(rows, cols // group, group)
    low = torch.clamp(x.amin(-1), max=0.0)
    high = torch.clamp(x.amax(-1), min=0.0)
    scale = torch.clamp((high - low) / float(qmax), min=EPS)
    zero = torch.clamp(0 - torch.round(low / scale), 0, qmax)
    q = torch.clamp(torch.round(x * (1.0 / scale)[..., None]) + zero[..., None], 0, qmax)
    q = q.to(torch.uint8).view(rows, cols)
    if bits == 4:
        q = q[:, 0::2] | (q[:, 1::2] << 4)
    return q.contiguous(), scale, zero.to(torch.uint8)


def unpack(q: torch.Tensor, bits: int) -> torch.Tensor:
    """The integer codes [R, C] (uint8) of packed codes q."""
    if bits == 8:
        return q
    return torch.stack((q & 15, q >> 4), dim=-1).view(q.shape[0], -1)


def dequantize(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int, group: int = GROUP_SIZE,
               out: torch.Tensor | None = None, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """w' [R, C] = (q - zero) * scale in float32, cast to `dtype` (or written into `out`)."""
    codes = unpack(q, bits)
    rows, cols = codes.shape
    w = (codes.view(rows, cols // group, group).float() - zero.float()[..., None]) * scale[..., None]
    w = w.view(rows, cols)
    if out is None:
        return w.to(dtype)
    return out.copy_(w)
