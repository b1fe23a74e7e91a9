"""The dequantizing GEMM (`kernels.dequant_linear`) against its plain-torch reference: Triton's CPU interpreter
here, the GPU on a CUDA machine; and the fused path of a low-precision policy against dequantize-on-arrival."""

import os
import subprocess
import sys

import pytest
import torch

from moeoffload import kernels
from moeoffload.kernels.dequant_linear import quantized_ffn
from moeoffload.quantize import quantize

CASES = [(1, 96, 64, 64), (3, 70, 192, 64), (17, 64, 96, 32)]  # rows, out, in, group


def check_ffn(device: str, dtype: torch.dtype, bits: int, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    hidden, inter = 64, 96
    up = quantize(torch.randn(2 * inter, hidden, generator=g) * 0.1, bits, 64)
    down = quantize(torch.randn(hidden, inter, generator=g) * 0.1, bits, 32)
    up, down = (tuple(t.to(device) for t in m) for m in (up, down))
    for rows in (1, 5, 19):
        x = torch.randn(rows, hidden, generator=g).to(device, dtype)
        for kind in ("gated-silu", "dense-relu"):
            w_up = up if kind == "gated-silu" else (up[0][:inter], up[1][:inter], up[2][:inter])
            args = (kind, inter, x, w_up, down, bits, (64, 32))
            got, want = quantized_ffn(*args, fused=True), quantized_ffn(*args, fused=False)
            tol = 1e-5 if dtype == torch.float32 else 2e-2
            torch.testing.assert_close(got, want, rtol=tol, atol=tol)


def interpreter_checks() -> None:
    """Run by the subprocess below, with TRITON_INTERPRET=1 (float32 and float16: no bfloat16 there)."""
    for bits in (8, 4):
        for i, dtype in enumerate((torch.float32, torch.float16)):
            check_ffn("cpu", dtype, bits, seed=bits * 10 + i)
    print("interpreter ok")


def test_reference_is_dequantize_then_matmul():
    w = torch.randn(8, 64)
    q, s, z = quantize(w, 4, 64)
    x = torch.randn(2, 64)
    from moeoffload.kernels.dequant_linear import dequant_linear_reference
    from moeoffload.quantize import dequantize

    assert torch.equal(dequant_linear_reference(x, q, s, z, 4, 64), x @ dequantize(q, s, z, 4, 64, dtype=x.dtype).T)


@pytest.mark.skipif(not kernels.triton_importable(), reason="triton is not installed (pip install triton): the "
                    "dequantizing kernel cannot be run through its CPU interpreter")
def test_dequantizing_kernel_under_the_interpreter():
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    code = "import tests.moeoffload.test_dequant_linear as t; t.interpreter_checks()"
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    proc = subprocess.run([sys.executable, "-c", code], env=env, cwd=root, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0 and "interpreter ok" in proc.stdout, proc.stdout[-2000:] + proc.stderr[-4000:]


@pytest.mark.gpu
@pytest.mark.parametrize("bits", [8, 4])
def test_dequantizing_kernel_on_the_gpu(bits):
    check_ffn("cuda", torch.bfloat16, bits, seed=bits)


@pytest.mark.gpu
@pytest.mark.parametrize("policy", ["lru-int4", "lru-int8", "hobbit"])
def test_fused_path_agrees_with_dequantize_on_arrival(policy, monkeypatch):
    import moeoffload
    from moeoffload import plan

    from .models import tiny_mixtral

    model = tiny_mixtral(dtype=torch.bfloat16, layers=3)
    ids = torch.randint(2, 96, (2, 7), generator=torch.Generator().manual_seed(3)).cuda()
    with moeoffload.offload(model, policy, "40%", device="cuda", kernels="triton") as handle:
        assert handle.plan.dequant == "fused"
        with torch.no_grad():
            fused = model(ids).logits.float()
        monkeypatch.setattr(plan, "FUSED_DEQUANT", False)
        handle.switch(policy, "40%", kernels="triton")
        assert handle.plan.dequant == "arrival"
        with torch.no_grad():
            arrival = model(ids).logits.float()
    torch.testing.assert_close(fused, arrival, rtol=5e-2, atol=5e-2)
