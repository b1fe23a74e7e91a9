"""HostExperts: missed experts computed on the host CPU from the expert store, one layer call's batch at a time.

Computing an expert where its weights already are moves the activations (kilobytes per token) over PCIe instead of
the weights (hundreds of MiB for a Mixtral-8x7B expert). One worker thread runs a layer call's host FFNs, so the
thread that launches the GPU's work goes on launching: the GPU computes the resident experts and the copy engine
copies the misses chosen for it while the host computes its share (`moeoffload.paths.host`).

Threads: `HOST_THREADS` OpenMP threads run each host FFN; None (the default) takes torch's
intra-op count (one per physical core) less one on CUDA, the core the launching thread keeps busy. The worker sets
its own count: OpenMP's thread count is per calling thread, and a fresh thread would otherwise use every core.
Dtype: the store's bf16 is used as it is where the CPU multiplies bf16 natively (AMX or AVX512-BF16; oneDNN
accumulates in fp32), else the expert's matrices are widened to fp32 per call; fp32 stores stay fp32.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import TypeVar

import torch

from .costmodel import ExpertFFN, Measurements
from .errors import MoeOffloadError
from .store import ExpertStore

HOST_THREADS: int | None = None
T = TypeVar("T")


class HostComputeError(MoeOffloadError, RuntimeError):
    """The host's computation of a layer call's missed experts failed; that call fails, the next one runs."""


@dataclass
class HostStats:
    experts: int = 0  # misses computed on the host (each also counted in the handle's misses)
    bytes: int = 0  # expert bytes those computations read from the store
    calls: int = 0  # layer calls that computed at least one expert on the host


@functools.cache
def cpu_flags() -> frozenset[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def native_bf16() -> bool:
    return bool(cpu_flags() & {"amx_bf16", "avx512_bf16"})


def compute_dtype(store_dtype: torch.dtype) -> torch.dtype:
    """The dtype the host multiplies a store of `store_dtype` in (module docstring: why)."""
    if store_dtype == torch.bfloat16 and native_bf16():
        return torch.bfloat16
    if store_dtype == torch.float16 and {"amx_fp16", "avx512_fp16"} & cpu_flags():
        return torch.float16
    return torch.float32 if store_dtype in (torch.bfloat16, torch.float16) else store_dtype


def default_threads(device: torch.device) -> int:
    n = HOST_THREADS if HOST_THREADS is not None else torch.get_num_threads() - (device.type == "cuda")
    return max(1, n)


class HostExperts:
    """The host's worker, its thread count and dtype, what it computed (`stats`) and what it measured."""

    def __init__(self, store: ExpertStore, device: torch.device, threads: int | None = None,
                 dtype: torch.dtype | None = None):
        if threads is not None and threads < 1:
            raise ValueError(f"threads={threads}: the host needs at least one thread; pass None for the default")
        self.store = store
        self.threads = threads if threads is not None else default_threads(device)
        self.dtype = dtype if dtype is not None else compute_dtype(store.layout.dtype)
        self.stats = HostStats()
        self.measurements: Measurements | None = None
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="moeoffload-host",
                                            initializer=torch.set_num_threads, initargs=(self.threads,))

    def run(self, fn: Callable[[], T]) -> T:
        """Run `fn` on the worker (its thread count) and wait for it."""
        return self._executor.submit(fn).result()

    def submit(self, layer: int, experts: list[int], counts: list[int], x: torch.Tensor, gate: torch.Tensor,
               tok: torch.Tensor, tokens: int, ffn: ExpertFFN) -> Future[torch.Tensor]:
        """Start the FFNs of `experts` of `layer` on the worker: x [sum(counts), H] on the host, expert after
        expert, rows weighted by `gate` and summed per token (`tok`) into an fp32 [tokens, H]."""
        self.stats.experts += len(experts)
        self.stats.bytes += len(experts) * self.store.expert_bytes
        self.stats.calls += 1
        return self._executor.submit(self.compute, layer, experts, counts, x, gate, tok, tokens, ffn)

    def compute(self, layer: int, experts: list[int], counts: list[int], x: torch.Tensor, gate: torch.Tensor,
                tok: torch.Tensor, tokens: int, ffn: ExpertFFN) -> torch.Tensor:
        out = torch.zeros(tokens, x.shape[1], dtype=torch.float32)
        x = x.to(self.dtype)
        first = 0
        for expert, n in zip(experts, counts):
            rows = slice(first, first + n)
            y = ffn(x[rows], self.weights(layer, expert))  # [n, H]
            out.index_add_(0, tok[rows], y.float() * gate[rows, None])
            first += n
        return out

    def weights(self, layer: int, expert: int) -> dict[str, torch.Tensor]:
        views = self.store.views((layer, expert))
        if self.dtype == self.store.layout.dtype:
            return views
        return {name: v.to(self.dtype) for name, v in views.items()}

    def reset_stats(self) -> None:
        self.stats = HostStats()

    def close(self) -> None:
        self._executor.shutdown(wait=True)
