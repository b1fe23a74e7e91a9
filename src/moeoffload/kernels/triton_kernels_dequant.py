"""The dequantizing GEMM's Triton kernel (`kernels.dequant_linear`); import only where `triton` imports."""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def dequant_linear_kernel(x_ptr, q_ptr, s_ptr, z_ptr, y_ptr, M, N, K: tl.constexpr, BITS: tl.constexpr,
                          GROUP: tl.constexpr,
                          BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """y[m, n] = sum_k x[m, k] * (code[n, k] - zero[n, k / G]) * scale[n, k / G], one group per K step.
    int4: codes of columns 2j and 2j+1 share byte j (low nibble first), so x's even and odd columns meet the low
    and high nibbles in two dots of half a group each. K is a compile-time constant (a model has two values of it),
    as in `grouped_linear`: the loop unrolls, and Triton's CPU interpreter takes it with numpy 2."""
    groups: tl.constexpr = K // GROUP
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok = rm[:, None] < M
    n_ok = rn < N
    rn64 = rn.to(tl.int64)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for g in range(0, groups):
        scale = tl.load(s_ptr + rn64 * groups + g, mask=n_ok, other=0.0)[:, None]
        zero = tl.load(z_ptr + rn64 * groups + g, mask=n_ok, other=0).to(tl.float32)[:, None]
        if BITS == 8:
            rk = g * GROUP + tl.arange(0, GROUP)
            x = tl.load(x_ptr + rm[:, None] * K + rk[None, :], mask=m_ok, other=0.0)
            code = tl.load(q_ptr + rn64[:, None] * K + rk[None, :], mask=n_ok[:, None], other=0)
            w = ((code.to(tl.float32) - zero) * scale).to(x.dtype)
            acc += tl.dot(x, tl.trans(w))
        else:
            rj = tl.arange(0, GROUP // 2)
            even = g * GROUP + 2 * rj
            x_even = tl.load(x_ptr + rm[:, None] * K + even[None, :], mask=m_ok, other=0.0)
            x_odd = tl.load(x_ptr + rm[:, None] * K + even[None, :] + 1, mask=m_ok, other=0.0)
            byte = tl.load(q_ptr + rn64[:, None] * (K // 2) + (g * GROUP // 2 + rj)[None, :], mask=n_ok[:, None],
                           other=0)
            w_even = (((byte & 15).to(tl.float32) - zero) * scale).to(x_even.dtype)
            w_odd = (((byte >> 4).to(tl.float32) - zero) * scale).to(x_odd.dtype)
            acc += tl.dot(x_even, tl.trans(w_even))
            acc += tl.dot(x_odd, tl.trans(w_odd))
    tl.store(y_ptr + rm[:, None] * N + rn[None, :], acc.to(y_ptr.dtype.element_ty), mask=m_ok & n_ok[None, :])
