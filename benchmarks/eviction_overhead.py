"""Host-side cost of the expert cache's bookkeeping per eviction, by eviction rule, on a CPU (no copies that matter).

    PYTHONPATH=src:. python benchmarks/eviction_overhead.py

OLMoE's shape by default (16 MoE layers x 64 experts, a 25% cache of 256 slots, batch 8 x top-8 random routing):
every decode step misses hundreds of times, so microseconds per eviction add up to milliseconds per step.
`belady` is bound to the oracle of the same steps (oracle-belady's future). Qwen3-30B-A3B at 25%, batch 4:
`--layers 48 --experts 128 --slots 1536 --batch 4`.
"""

from __future__ import annotations

import argparse
import random
import time

from tests.moeoffload.test_cache_properties import filled_store

from moeoffload.cache import ExpertCache
from moeoffload.eviction import make_rule


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=16)
    ap.add_argument("--experts", type=int, default=64)
    ap.add_argument("--slots", type=int, default=256)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--top-k", type=int, default=8)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--rules", nargs="+", default=["lru", "lfu", "prior-frequency", "next-use", "belady"])
    args = ap.parse_args()
    rng = random.Random(0)
    store = filled_store(args.layers, args.experts)
    steps = [[sorted({e for _ in range(args.batch) for e in rng.sample(range(args.experts), args.top_k)})
              for _ in range(args.layers)] for _ in range(args.steps)]
    print(f"{'rule':<16} {'ms/step':>8} {'misses/step':>11} {'us/eviction':>11}")
    for rule in args.rules:
        cache = ExpertCache(store, args.slots, "cpu", make_rule(rule))
        if rule == "prior-frequency":  # a prior as a trained one gives it: counts per expert, here seeded at random
            import torch

            from moeoffload.predictors import FrequencyPrior

            counts = torch.randint(0, 1000, (args.layers, args.experts), generator=torch.Generator().manual_seed(0))
            cache.rule.bind(FrequencyPrior(counts, args.top_k))
        oracle = None
        if rule == "belady":  # the exact future of these very steps, as oracle-belady has it (an upper bound)
            from moeoffload.predictors.oracle import OracleReplay
            from moeoffload.predictors.traces import CallTrace

            calls = [(layer, tuple(experts)) for step in steps for layer, experts in enumerate(step)]
            oracle = OracleReplay(CallTrace(calls), cache, prefetch=False)
            cache.rule.bind(oracle)
        t0 = time.perf_counter()
        for step in steps:
            for layer, experts in enumerate(step):
                keys = [(layer, e) for e in experts]
                if oracle is not None:
                    oracle.tap(layer, None, None, None)
                cache.enter_layer(layer)
                cache.acquire(keys)
                cache.release(keys)
        dt = time.perf_counter() - t0
        print(f"{rule:<16} {dt / len(steps) * 1e3:8.1f} {cache.stats.misses / len(steps):11.0f} "
              f"{dt / max(cache.stats.evictions, 1) * 1e6:11.1f}")


if __name__ == "__main__":
    main()
