"""One MoE layer's experts at decode sizes, where the host's launches, not the GPU, bound a step: transformers'
experts module (grouped_mm, eager) against the engine's resident experts (one Triton launch routes the pairs, or
the six-kernel torch route), and the pieces of that path. The whole decode step is `mixtral_e2e.py --part cost`.

One layer of Mixtral's width (hidden 4096, 8 experts, top 2) with a narrower intermediate (`--intermediate`: the
host cost does not depend on it). Each variant is called `--calls` times back to back without a sync: `host us` is
the time to enqueue one call (what a decode step pays per layer while the GPU keeps up), `wall us` the time until
the GPU finished them. The variants take turns within each of `--repeats` samples (a machine may drift between
two speeds, so variants measured minutes apart are not comparable); the median is kept.

    PYTHONPATH=src python benchmarks/launch_cost.py --out $OUT/launch_cost                    # on the GPU
    PYTHONPATH=src python benchmarks/launch_cost.py --device cpu --kernels grouped-torch --hidden 64 --calls 3
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import time
from contextlib import nullcontext
from unittest import mock

import torch
from transformers import MixtralConfig, MixtralForCausalLM

import moeoffload
from moeoffload import hooks, kernels
from moeoffload.kernels import routing


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_calls(fn, device: torch.device, calls: int) -> tuple[float, float]:
    """(host us, wall us) per call over `calls` back-to-back calls."""
    sync(device)
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    t1 = time.perf_counter()
    sync(device)
    t2 = time.perf_counter()
    return (t1 - t0) / calls * 1e6, (t2 - t0) / calls * 1e6


def torch_route():
    """Within it, the resident path routes with torch's kernels instead of the fused Triton launch."""
    return mock.patch.object(routing, "FUSED_ROUTE_MAX_PAIRS", 0)


def interleaved(variants: dict, device: torch.device, calls: int, repeats: int) -> dict[str, tuple[float, float]]:
    """Median (host us, wall us) of each variant, the variants taking turns within every repeat."""
    samples: dict[str, list[tuple[float, float]]] = {name: [] for name in variants}
    with torch.no_grad():
        for fn, ctx in variants.values():  # warm-up: compile, allocate
            with ctx():
                for _ in range(3):
                    fn()
        for _ in range(repeats):
            for name, (fn, ctx) in variants.items():
                with ctx():
                    samples[name].append(timed_calls(fn, device, calls))
    return {name: (statistics.median(h for h, _ in s), statistics.median(w for _, w in s))
            for name, s in samples.items()}


def layer_variants(hf, our_experts, handle, batch: int, args, device) -> dict:
    """name -> (call, context it runs in) for one batch size."""
    layer = handle.layers[0]
    backend = "triton" if layer.kernels == "triton" else "torch"
    hf_experts = hf.model.layers[0].mlp.experts
    g = torch.Generator().manual_seed(batch)
    hidden = torch.randn(batch, args.hidden, generator=g).to(device, torch.bfloat16)
    weights, ids = torch.topk(torch.randn(batch, 8, generator=g).softmax(-1), 2, dim=-1)
    a = (hidden, ids.to(device), weights.to(device, torch.bfloat16))
    with torch.no_grad():
        our_experts(*a)  # builds the resident table
    table = handle.cache.resident_table(0, handle.store.num_experts)
    slot_of_id, slot_ends, window, _ = layer._device_route(table)
    route = (slot_of_id, slot_ends)
    order, inverse, offs = kernels.route_on_device(a[1], *route, backend=backend)
    x = kernels.permute(hidden, order, divisor=2, backend=backend)
    y = kernels.grouped_ffn_by_offsets(layer.spec, x, window, offs)

    def hf_call(impl):
        def call():
            hooks.experts3d.select(hf, impl)  # a config attribute: the model's dispatch, as in a forward
            return hf_experts(*a)
        return call

    return {
        "transformers grouped_mm experts": (hf_call("grouped_mm"), nullcontext),
        "transformers eager experts": (hf_call("eager"), nullcontext),
        f"engine resident experts ({layer.kernels})": (lambda: our_experts(*a), nullcontext),
        f"engine resident experts ({layer.kernels}, torch route)": (lambda: our_experts(*a), torch_route),
        "  route (fused)": (lambda: kernels.route_on_device(a[1], *route, backend=backend), nullcontext),
        "  route (torch)": (lambda: kernels.route_on_device(a[1], *route, backend="torch"), nullcontext),
        "  permute": (lambda: kernels.permute(hidden, order, divisor=2, backend=backend), nullcontext),
        "  grouped FFN by offsets": (
            lambda: kernels.grouped_ffn_by_offsets(layer.spec, x, window, offs), nullcontext),
        "  unpermute": (lambda: kernels.unpermute(y, inverse, a[2], torch.bfloat16, backend=backend,
                                                  token_major=True, limit=offs[-1:]), nullcontext),
    }


def measure_layer(args, device, rows: list[dict]) -> None:
    cfg = MixtralConfig(vocab_size=128, hidden_size=args.hidden, intermediate_size=args.intermediate,
                        num_hidden_layers=1, num_attention_heads=32 if args.hidden >= 1024 else 4,
                        num_key_value_heads=8 if args.hidden >= 1024 else 2, num_local_experts=8,
                        num_experts_per_tok=2)
    torch.manual_seed(0)
    hf = MixtralForCausalLM(cfg).to(device=device, dtype=torch.bfloat16).eval()
    ours = copy.deepcopy(hf)
    with moeoffload.offload(ours, "resident", "all", device=device, kernels=args.kernels) as handle:
        our_experts = ours.model.layers[0].mlp.experts
        for batch in args.batches:
            variants = layer_variants(hf, our_experts, handle, batch, args, device)
            for name, (host, wall) in interleaved(variants, device, args.calls, args.repeats).items():
                rows.append({"part": "layer", "variant": name, "batch": batch, "host_us": host, "wall_us": wall})
                print(f"layer b{batch:<3} {name:<48} host {host:8.1f} us  wall {wall:8.1f} us", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--kernels", default="auto", help="the engine's kernels= (grouped-torch: resident path on a CPU)")
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 16])
    ap.add_argument("--hidden", type=int, default=4096)
    ap.add_argument("--intermediate", type=int, default=1024)
    ap.add_argument("--calls", type=int, default=40, help="back-to-back calls per sample")
    ap.add_argument("--repeats", type=int, default=15, help="interleaved samples per variant")
    ap.add_argument("--out", default=os.environ.get("OUT", "bench-out"))
    args = ap.parse_args()
    device = torch.device(args.device)
    os.makedirs(args.out, exist_ok=True)
    rows: list[dict] = []
    measure_layer(args, device, rows)
    meta = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
            "torch": torch.__version__, "python": platform.python_version(), "args": vars(args)}
    with open(os.path.join(args.out, "launch_cost.json"), "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=1)
    print(f"\n== launch cost ({meta['device']}, torch {meta['torch']}) ==")
    for r in rows:
        print(f"layer b{r['batch']:<3} {r['variant']:<48} host {r['host_us']:8.1f} us  wall {r['wall_us']:8.1f} us")


if __name__ == "__main__":
    main()
