"""One MoE layer at published widths, every expert resident: what the exact loop costs, against transformers' own
experts forward, and whether it is still exact.

Variants, on the same hidden states and routing (random top-k, distinct experts per token):
- `eager`: transformers' eager experts forward (the reference of every exactness claim);
- `grouped_mm`: transformers' grouped_mm experts forward (fast, rounds differently);
- `loop`: the engine's per-expert loop before the staged form (about ten ops per expert);
- `staged`: the engine's staged exact loop (`moeoffload.staged`: two GEMMs per expert), forced on whatever the
  number of experts (the engine stages a call from `moeoffload.layer.STAGED_MIN_EXPERTS` experts on).
`loop` and `staged` are first checked bit for bit against `eager` (bf16 and float32 gate weights, several seeds
and token counts); a mismatch is printed and makes the exit status 1. Timings: per variant, the median over
`--repeats` interleaved repeats of the mean of `--iters` calls, each repeat synchronized; microseconds per layer
call. A decode step calls the layer once per MoE layer, so its cost is this times the layer count.

    python benchmarks/exact_loop.py --out results/exact_loop [--models olmoe-1b-7b ...] [--tokens 1 8 32 256]
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from pathlib import Path

import torch

MODELS = ["olmoe-1b-7b", "deepseek-v2-lite", "qwen1.5-moe-a2.7b", "qwen3-30b-a3b", "mixtral-8x7b"]
# one MoE layer of the published widths (DeepSeek's first layer is dense, so it keeps two)
LAYERS = {"deepseek-v2-lite": 2}


def build(name: str, device: str):
    import moeoffload
    from moebench.zoo import build_synthetic
    from moeoffload.hooks import discover

    model, _ = build_synthetic(name, layers=LAYERS.get(name, 1), dtype=torch.bfloat16, overrides={"vocab_size": 1024},
                               show_progress=False)
    model.set_experts_implementation("eager")
    hook = discover(model)
    eager = copy.deepcopy(hook.layers[0]).to(device)  # the unoffloaded experts module, for transformers' forwards
    handle = moeoffload.offload(model, "resident", "all", device=device, show_progress=False)
    return eager, handle.layers[0], hook.num_experts, hook.top_k, handle


def routing(tokens: int, experts: int, top_k: int, hidden: int, seed: int, weight_dtype, device: str):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, hidden, generator=g).to(device, torch.bfloat16)
    index = torch.stack([torch.randperm(experts, generator=g)[:top_k] for _ in range(tokens)]).to(device)
    weights = torch.rand(tokens, top_k, generator=g).to(device, weight_dtype)
    return x, index, weights


def variants(eager_module, layer):
    from transformers.integrations.moe import grouped_mm_experts_forward

    import moeoffload.layer

    eager_forward = type(eager_module).forward.__wrapped__
    stages = layer.host_path.stages

    def loop(x, i, w):
        layer.host_path.stages = None
        try:
            return layer(x, i, w)
        finally:
            layer.host_path.stages = stages

    def staged(x, i, w):  # whatever the number of experts (the engine itself stages only from STAGED_MIN_EXPERTS)
        threshold, moeoffload.layer.STAGED_MIN_EXPERTS = moeoffload.layer.STAGED_MIN_EXPERTS, 1
        try:
            return layer(x, i, w)
        finally:
            moeoffload.layer.STAGED_MIN_EXPERTS = threshold

    return {
        "eager": lambda x, i, w: eager_forward(eager_module, x, i, w),
        "grouped_mm": lambda x, i, w: grouped_mm_experts_forward(eager_module, x, i, w),
        "loop": loop,
        "staged": staged,
    }


def check(fns, experts, top_k, hidden, device, tokens_list) -> list[str]:
    problems = []
    for tokens in sorted(set(tokens_list) | {1, 3, 37}):
        for weight_dtype in (torch.bfloat16, torch.float32):
            for seed in range(3):
                x, i, w = routing(tokens, experts, top_k, hidden, seed, weight_dtype, device)
                want = fns["eager"](x, i, w)
                for name in ("loop", "staged"):
                    got = fns[name](x, i, w)
                    if not torch.equal(got, want):
                        problems.append(f"{name} differs from eager at {tokens} tokens, {weight_dtype}, seed {seed}: "
                                        f"max |diff| {(got.float() - want.float()).abs().max().item():.3g}")
    return problems


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize(device)


def time_calls(fn, args, iters: int, device: str) -> float:
    sync(device)
    t0 = time.perf_counter()
    for _ in range(iters):
        fn(*args)
    sync(device)
    return (time.perf_counter() - t0) / iters * 1e6


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=MODELS)
    p.add_argument("--tokens", nargs="+", type=int, default=[1, 8, 32, 256])
    p.add_argument("--iters", type=int, default=30)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--device", default="cuda", help="cpu only to try the script (its timings say nothing of a GPU)")
    args = p.parse_args()
    device = args.device
    if device.startswith("cuda") and not torch.cuda.is_available():
        sys.exit("exact_loop.py times CUDA kernels; run it on a GPU machine (or try it with --device cpu)")
    import transformers

    args.out.mkdir(parents=True, exist_ok=True)
    meta = {"device": torch.cuda.get_device_name(0) if device.startswith("cuda") else "cpu", "torch": torch.__version__,
            "transformers": transformers.__version__, "python": sys.version.split()[0],
            "command": " ".join(sys.argv), "iters": args.iters, "repeats": args.repeats}
    rows, problems = [], []
    for name in args.models:
        eager, layer, experts, top_k, handle = build(name, device)
        hidden = eager.gate_up_proj.shape[-1]
        fns = variants(eager, layer)
        found = check(fns, experts, top_k, hidden, device, args.tokens)
        problems += [f"{name}: {m}" for m in found]
        for tokens in args.tokens:
            inputs = routing(tokens, experts, top_k, hidden, 100, torch.bfloat16, device)
            for fn in fns.values():
                fn(*inputs)  # warm-up: kernels chosen and loaded
            samples: dict[str, list[float]] = {k: [] for k in fns}
            for _ in range(args.repeats):
                for k, fn in fns.items():
                    samples[k].append(time_calls(fn, inputs, args.iters, device))
            us = {k: statistics.median(v) for k, v in samples.items()}
            rows.append({"model": name, "experts": experts, "top_k": top_k, "tokens": tokens, "us": us,
                         "samples_us": samples, "exact": not found})
            print(f"{name:18} T={tokens:4}  " + "  ".join(f"{k} {v:9.1f}" for k, v in us.items()), flush=True)
        handle.unload()
        del eager, layer, handle
        if device.startswith("cuda"):
            torch.cuda.empty_cache()
    (args.out / "exact_loop.json").write_text(json.dumps({"meta": meta, "rows": rows, "problems": problems}, indent=1))
    print(f"\n{meta['device']}, torch {meta['torch']}, transformers {meta['transformers']}; us per layer call, "
          f"median of {args.repeats} repeats x {args.iters} calls")
    print(f"{'model':18} {'T':>4} {'E/k':>7} {'eager':>9} {'grouped_mm':>10} {'loop':>9} {'staged':>9} "
          f"{'loop/staged':>11} {'eager/staged':>12} exact")
    for r in rows:
        us = r["us"]
        print(f"{r['model']:18} {r['tokens']:4} {str(r['experts']) + '/' + str(r['top_k']):>7} {us['eager']:9.1f} "
              f"{us['grouped_mm']:10.1f} {us['loop']:9.1f} {us['staged']:9.1f} {us['loop'] / us['staged']:11.2f} "
              f"{us['eager'] / us['staged']:12.2f} {'yes' if r['exact'] else 'NO'}")
    for m in problems:
        print("PROBLEM:", m)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
