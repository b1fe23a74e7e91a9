"""y = x @ W'^T with W' a group-wise quantized matrix (`moeoffload.quantize`), dequantized inside the GEMM.

Dequantizing an expert on arrival writes its full-precision weights once and the GEMM reads them again: at a few
rows per expert that costs more than the quantized copy saved, and it recurs on every hit, since a slot keeps the
quantized form. This kernel reads the codes, scales and zero points straight from the slot and dequantizes each
tile in registers: the expert's quantized bytes are the only weight bytes read. `dequant_linear_reference` is the
plain-torch form (dequantize, then matmul); the two agree to the GEMM's rounding, not bit for bit.
"""

from __future__ import annotations

import torch

from ..quantize import dequantize

BLOCK_M = 16
BLOCK_N = 64
MIN_FUSED_GROUP = 32  # the int4 kernel's dot runs over half a group: at least 16 columns


def dequant_linear_reference(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int,
                             group: int) -> torch.Tensor:
    return x @ dequantize(q, scale, zero, bits, group, dtype=x.dtype).T


def dequant_linear(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int,
                   group: int) -> torch.Tensor:
    """x [M, K] (float) times the quantized [N, K] matrix (codes q, scale and zero [N, K / group]) -> [M, N]."""
    from .triton_kernels_dequant import dequant_linear_kernel

    if group < MIN_FUSED_GROUP:
        raise ValueError(f"the fused dequantizing kernel takes groups of at least {MIN_FUSED_GROUP} columns, got "
                         f"{group}; dequantize on arrival instead")
    x = x.contiguous()
    m, k = x.shape
    n = scale.shape[0]
    y = torch.empty((m, n), dtype=x.dtype, device=x.device)
    grid = (triton_cdiv(n, BLOCK_N), triton_cdiv(m, BLOCK_M))
    dequant_linear_kernel[grid](x, q, scale, zero, y, m, n, K=k, BITS=bits, GROUP=group, BLOCK_M=BLOCK_M,
                                BLOCK_N=BLOCK_N)
    return y


def triton_cdiv(a: int, b: int) -> int:
    return -(-a // b)


def quantized_ffn(kind: str, intermediate: int, x: torch.Tensor, up: tuple[torch.Tensor, ...],
                  down: tuple[torch.Tensor, ...], bits: int, groups: tuple[int, int], fused: bool) -> torch.Tensor:
    """One expert's FFN over rows x from its quantized matrices `up` and `down`, each (codes, scale, zero):
    "gated-silu" down(silu(x @ gate^T) * (x @ up^T)) with gate and up stacked, or "dense-relu" down(relu(x @ wi^T)).
    `fused`: the dequantizing kernel; else the plain-torch reference."""
    linear = dequant_linear if fused else dequant_linear_reference
    h = linear(x, up[0], up[1], up[2], bits, groups[0])
    if kind == "gated-silu":
        h = torch.nn.functional.silu(h[:, :intermediate]) * h[:, intermediate:]
    else:
        h = torch.relu(h)
    return linear(h, down[0], down[1], down[2], bits, groups[1])
