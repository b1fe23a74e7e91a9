"""Host->device bandwidth of expert loads through the engine, against the pinned peak measured in the same run.

    python benchmarks/bandwidth.py --out results.json

For each expert size, an ExpertCache with one slot per expert and the `on-demand` behaviour copies N distinct
experts; CUDA events around the whole sequence give the effective rate. The peak is a single large pinned copy.
Needs CUDA.
"""

from __future__ import annotations

import argparse
import json
import platform

import torch

from moeoffload.cache import ExpertCache
from moeoffload.eviction import make_rule
from moeoffload.layout import ExpertLayout
from moeoffload.store import ExpertStore

SIZES = {  # name: (matrices, dtype)
    "switch-base expert (bf16, 9.4 MB)": ({"wi": (3072, 768), "wo": (768, 3072)}, torch.bfloat16),
    "switch-base expert (fp32, 18.9 MB)": ({"wi": (3072, 768), "wo": (768, 3072)}, torch.float32),
    "Mixtral-8x7B expert (bf16, 352 MiB)": (
        {"gate_up_proj": (28672, 4096), "down_proj": (4096, 14336)}, torch.bfloat16
    ),
}


def timed(fn, repeats: int) -> list[float]:
    out = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize()
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        out.append(start.elapsed_time(end) / 1e3)
    return out


def pinned_peak(nbytes: int, repeats: int) -> float:
    src = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True).random_()
    dst = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    times = timed(lambda: dst.copy_(src, non_blocking=True), repeats)
    return nbytes / sorted(times)[len(times) // 2]


def engine_rate(matrices: dict, dtype: torch.dtype, n_experts: int, repeats: int) -> tuple[float, int]:
    layout = ExpertLayout(tuple(matrices), tuple(matrices.values()), dtype)
    store = ExpertStore(layout, 1, n_experts, pin_memory=True)
    g = torch.Generator().manual_seed(0)
    for e in range(n_experts):
        store.put((0, e), {k: torch.randn(s, generator=g).to(dtype) for k, s in matrices.items()})
    cache = ExpertCache(store, n_experts, "cuda", make_rule("lru"), retain=False)
    keys = [(0, e) for e in range(n_experts)]

    def load_all():
        cache.acquire(keys)
        cache.release(keys)

    load_all()  # warm-up
    times = timed(load_all, repeats)
    t = sorted(times)[len(times) // 2]
    # every copy landed whole: compare one expert against the store
    slot = cache.acquire([keys[0]])[0]
    cache.release([keys[0]])
    assert torch.equal(cache.pool[slot].cpu(), store.buffer(keys[0])), "a copied expert differs from the store"
    return n_experts * layout.nbytes / t, layout.nbytes


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="bandwidth.json")
    ap.add_argument("--repeats", type=int, default=20)
    args = ap.parse_args()
    peak = pinned_peak(352 * 2**20, args.repeats)
    rows = []
    for name, (matrices, dtype) in SIZES.items():
        n = 8 if "Mixtral" in name else 64
        rate, nbytes = engine_rate(matrices, dtype, n, args.repeats)
        rows.append({"expert": name, "expert_bytes": nbytes, "experts_per_round": n, "engine_GBps": rate / 1e9,
                     "share_of_pinned_peak": rate / peak})
    result = {
        "device": torch.cuda.get_device_name(), "torch": torch.__version__, "python": platform.python_version(),
        "pinned_peak_GBps_352MiB": peak / 1e9, "rows": rows,
        "command": "python benchmarks/bandwidth.py --out results.json",
    }
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    print(f"pinned peak (352 MiB copy): {peak / 1e9:.1f} GB/s on {result['device']}")
    for r in rows:
        print(f"{r['expert']:40s} {r['engine_GBps']:6.1f} GB/s  {100 * r['share_of_pinned_peak']:5.1f}% of peak")


if __name__ == "__main__":
    main()
