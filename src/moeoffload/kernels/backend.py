"""Which implementation a kernel call runs: Triton where it is importable and the tensors are on CUDA (or under
Triton's CPU interpreter), plain torch otherwise. Its own module so that the kernel modules and the package that
re-exports them both import it, and neither imports the other."""

from __future__ import annotations

import functools
import os

import torch

FFN_KINDS = ("gated-silu", "dense-relu")  # the expert forms the grouped FFN computes


@functools.cache
def triton_importable() -> bool:
    try:
        import triton  # noqa: F401
    except Exception:
        return False
    return True


def interpreting() -> bool:
    """True when Triton runs kernels on the CPU through its interpreter (TRITON_INTERPRET=1, tests only)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def use_triton(tensor: torch.Tensor, backend: str) -> bool:
    if backend == "torch":
        return False
    if backend not in ("auto", "triton"):
        raise ValueError(f"kernel backend {backend!r} is unknown; use 'auto', 'triton' or 'torch'")
    runnable = triton_importable() and (tensor.is_cuda or interpreting())
    if backend == "triton" and not runnable:
        raise RuntimeError("backend='triton' needs triton and a CUDA tensor (or TRITON_INTERPRET=1 on a CPU); "
                           "install triton or use backend='auto'")
    return runnable and (tensor.is_cuda or backend == "triton")
