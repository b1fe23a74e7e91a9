"""Page-locked host bytes and copy rate of the ExpertStore's registered layer slabs, against torch's pinned tensors.

    PYTHONPATH=src python3 benchmarks/store_pinning.py --out $OUT/store

torch's pinned allocator rounds every block up to a power of two; the store registers one exact slab per layer
with cudaHostRegister instead. For one layer of Mixtral-8x7B-size experts (8 x 3 x 4096 x 14336 bf16) and one of
DeepSeek-V2-Lite-size experts (64 x 3 x 2048 x 1408 bf16) this reports: the pinned bytes of the old way (one
`torch.empty(pin_memory=True)` per expert; torch's host_memory_stats where it has them, and the power-of-two
rounding computed) and of the store; the seconds to fill a layer each way (the store's split into allocation,
cudaHostRegister and packing); and the host->device rate of copying every expert once (non_blocking, side stream,
CUDA events, median of repeats) from the store, from torch-pinned tensors, and from pageable memory. Needs CUDA.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch

from moeoffload.layout import ExpertLayout
from moeoffload.store import CudaHostRegister, ExpertStore

CASES = {  # name: (hidden, intermediate, experts in the layer)
    "mixtral-8x7b": (4096, 14336, 8),
    "deepseek-v2-lite": (2048, 1408, 64),
}
GIB = 1 << 30


def layout_of(hidden: int, inter: int) -> ExpertLayout:
    return ExpertLayout(names=("w1", "w3", "w2"), shapes=((inter, hidden), (inter, hidden), (hidden, inter)),
                        dtype=torch.bfloat16)


class TimedRegister(CudaHostRegister):
    """cudaHostRegister with the seconds it took (it faults in and locks every page of the slab)."""

    def __init__(self):
        self.seconds = 0.0

    def register(self, ptr: int, nbytes: int) -> int:
        t = time.perf_counter()
        code = super().register(ptr, nbytes)
        self.seconds += time.perf_counter() - t
        return code


def host_stats() -> dict[str, int]:
    fn = getattr(torch.cuda.memory, "host_memory_stats", None)
    if fn is None:
        return {}
    try:
        return {k: int(v) for k, v in fn().items() if isinstance(v, int | float)}
    except RuntimeError:
        return {}


def next_pow2(n: int) -> int:
    return 1 << (n - 1).bit_length()


def copy_rate(sources: list[torch.Tensor], dst: torch.Tensor, repeats: int) -> dict:
    """GB/s of copying each source into `dst` once, on a side stream, median over `repeats` rounds."""
    stream = torch.cuda.Stream()
    nbytes = sum(s.numel() * s.element_size() for s in sources)
    times = []
    for i in range(repeats + 1):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize()
        with torch.cuda.stream(stream):
            start.record(stream)
            for src in sources:
                dst.copy_(src, non_blocking=True)
            end.record(stream)
        torch.cuda.synchronize()
        if i:  # the first round warms up
            times.append(start.elapsed_time(end) / 1e3)
    med = statistics.median(times)
    return {"bytes": nbytes, "seconds": times, "median_s": med, "gb_per_s": nbytes / med / 1e9}


def run_case(name: str, hidden: int, inter: int, n_experts: int, repeats: int) -> dict:
    layout = layout_of(hidden, inter)
    g = torch.Generator().manual_seed(0)
    source = {k: torch.randn(s, generator=g).to(layout.dtype) for k, s in zip(layout.names, layout.shapes)}
    expert_bytes = layout.nbytes

    register = TimedRegister()
    store = ExpertStore(layout, 1, n_experts, pin_memory=True, host_register=register)
    t = time.perf_counter()
    for e in range(n_experts):
        store.put((0, e), source)
    store_fill_s = time.perf_counter() - t
    store_bufs = [store.buffer((0, e)) for e in range(n_experts)]
    assert all(b.is_pinned() for b in store_bufs), "a registered slab's view does not report is_pinned()"

    before = host_stats()
    t = time.perf_counter()
    old = [torch.empty(layout.numel, dtype=layout.dtype, pin_memory=True) for _ in range(n_experts)]
    for buf in old:
        layout.pack(source, buf)
    old_fill_s = time.perf_counter() - t
    after = host_stats()
    delta = {k: after[k] - before.get(k, 0) for k in after if "bytes" in k and after[k] != before.get(k, 0)}
    measured = delta.get("reserved_bytes.current", delta.get("allocated_bytes.current"))

    pageable = torch.empty(layout.numel, dtype=layout.dtype)
    layout.pack(source, pageable)
    dst = torch.empty(layout.numel, dtype=layout.dtype, device="cuda")
    rates = {
        "store slab views": copy_rate(store_bufs, dst, repeats),
        "torch pinned tensors": copy_rate(old, dst, repeats),
        "pageable tensor": copy_rate([pageable] * n_experts, dst, max(2, repeats // 3)),
    }
    dst_check = store_bufs[-1].to("cuda", non_blocking=True)
    torch.cuda.synchronize()
    assert torch.equal(dst_check.cpu(), old[-1]), "a copy from the store differs from the packed expert"

    result = {
        "case": name, "experts": n_experts, "expert_bytes": expert_bytes, "layer_bytes": n_experts * expert_bytes,
        "old_pinned_bytes_computed": n_experts * next_pow2(expert_bytes),
        "old_pinned_bytes_measured": measured, "old_host_stats_delta": delta,
        "store_pinned_bytes": store.pinned_bytes,
        "store_fill_s": store_fill_s, "store_register_s": register.seconds, "old_fill_s": old_fill_s,
        "copy": rates,
    }
    store.clear()
    assert store.pinned_bytes == 0
    del old, store_bufs, store
    torch.cuda.synchronize()
    if hasattr(torch._C, "_host_emptyCache"):
        torch._C._host_emptyCache()  # give the old way's pinned blocks back before the next case
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=os.environ.get("OUT", "results") + "/store", help="folder for the JSON")
    ap.add_argument("--repeats", type=int, default=9)
    ap.add_argument("--cases", nargs="*", default=list(CASES), choices=list(CASES))
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("store_pinning needs CUDA; run it on the device machine")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = [run_case(name, *CASES[name], args.repeats) for name in args.cases]
    meta = {"torch": torch.__version__, "cuda": torch.version.cuda, "gpu": torch.cuda.get_device_name(),
            "python": platform.python_version(), "repeats": args.repeats}
    (out / "store_pinning.json").write_text(json.dumps({"meta": meta, "results": results}, indent=1))

    print(f"\nwrote {out / 'store_pinning.json'}")
    head = (f"{'case':18} {'layer GiB':>9} {'old pin GiB (stats/2^k)':>24} {'store pin GiB':>13} "
            f"{'old fill s':>10} {'store fill s (reg)':>18} {'store GB/s':>10} {'pinned GB/s':>11} {'pageable':>8}")
    print(head)
    for r in results:
        m = r["old_pinned_bytes_measured"]
        old = f"{'-' if m is None else f'{m / GIB:.2f}'}/{r['old_pinned_bytes_computed'] / GIB:.2f}"
        c = r["copy"]
        print(f"{r['case']:18} {r['layer_bytes'] / GIB:9.2f} {old:>24} {r['store_pinned_bytes'] / GIB:13.2f} "
              f"{r['old_fill_s']:10.2f} {r['store_fill_s']:11.2f} ({r['store_register_s']:.2f}) "
              f"{c['store slab views']['gb_per_s']:10.1f} {c['torch pinned tensors']['gb_per_s']:11.1f} "
              f"{c['pageable tensor']['gb_per_s']:8.1f}")


if __name__ == "__main__":
    main()
