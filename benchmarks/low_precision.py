"""Low-precision expert copies on Mixtral-8x7B at its published size: lru against lru-int4, hobbit and lru-int8.

    PYTHONPATH=src python benchmarks/low_precision.py                      # batch 1, 25% budget, every policy
    PYTHONPATH=src python benchmarks/low_precision.py --tiny --steps 2     # CPU smoke run of the logic

The model and its page-locked store come from mixtral_e2e's `build()` (experts seeded straight into the store).
One handle serves every policy in turn (`offload`, then `switch`), each under the engine's default plan, at the
same budget in bytes: greedy decode steps after a prefill, timed with a synchronize around each. Per row:
- tokens/s, and x lru (the first policy's tokens/s: bf16 lru unless --policies says otherwise);
- the row's own I/O floor: the bytes its copies actually moved per step (quantized bytes for a quantized miss) at
  the pinned host->device rate measured in this run, and x floor (the step over it);
- the bytes of one expert's copy in each precision and the misses each precision served per step;
- each low-precision policy once per --dequant way (on the GPU: "fused", the dequantizing Triton GEMM reading the
  quantized slot, and "arrival", dequantized into a bf16 scratch expert before the grouped kernels), side by side;
- KL(resident || policy) and top-1 agreement over one seeded 64-token sequence, against the logits of `lru`
  (an exact policy: the resident model's logits on the same plan, bit for bit; a full-size Mixtral does not fit
  one 80 GB GPU resident, so the exact policy stands in for it).
The quantized copies live in host memory beside the bf16 store (int4: a quarter of it, int8: about half); before
making a precision's copies the script checks MemAvailable and drops the copies no later policy needs, so lru-int8
runs last and is skipped with a row saying why when the host cannot hold it beside the bf16 experts.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys

import torch
from transformers import MixtralConfig

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from mixtral_e2e import MIXTRAL, TINY, build, decode, pinned_bandwidth  # noqa: E402

import moeoffload  # noqa: E402
from moeoffload import plan as _plan  # noqa: E402
from moeoffload.layout import QuantizedLayout  # noqa: E402
from moeoffload.quantize import BITS, GROUP_SIZE  # noqa: E402

POLICIES = ["lru", "lru-int4", "hobbit", "lru-int8"]
QUALITY_TOKENS = 64


def host_available() -> int | None:
    """MemAvailable of /proc/meminfo in bytes, or None where there is none."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def make_room(store, policy: str, later: list[str]) -> str | None:
    """Drop the low-precision copies that neither `policy` nor a later one uses; return why `policy`'s copies do
    not fit host memory, or None when they do (or are made already)."""
    needed = {moeoffload.get_policy(p).precision for p in [policy, *later]}
    for precision in store.low_precisions:
        if precision not in needed:
            store.drop_low_precision(precision)
    precision = moeoffload.get_policy(policy).precision
    if precision == "full" or precision in store.low_precisions:
        return None
    nbytes = QuantizedLayout(store.layout, BITS[precision], GROUP_SIZE).nbytes * store.num_layers * store.num_experts
    free = host_available()
    if free is not None and nbytes > free - (4 << 30):  # keep 4 GiB for the process and the page cache
        return f"its {precision} copies need {nbytes / 2**30:.1f} GiB of host memory, {free / 2**30:.1f} GiB free"
    return None


def log_probs(model, device: torch.device) -> torch.Tensor:
    """Log-softmax over one seeded sequence of QUALITY_TOKENS tokens [T, V], float32 on the host."""
    ids = torch.randint(2, model.config.vocab_size, (1, QUALITY_TOKENS), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        return model(ids.to(device)).logits[0].float().log_softmax(-1).cpu()


def quality(logp: torch.Tensor, ref: torch.Tensor | None) -> dict:
    if ref is None:
        return {}
    kl = (ref.exp() * (ref - logp)).sum(-1).mean().item()
    agree = (ref.argmax(-1) == logp.argmax(-1)).float().mean().item()
    return {"kl_vs_resident": kl, "top1_agreement": agree}


def row(handle, model, args, device: torch.device, bw: float) -> dict:
    times = decode(model, args.batch, args.steps, args.warm, device, on_timed_start=handle.reset_stats)
    s, n = handle.stats(), len(times)
    step = sorted(times)[n // 2]
    floor = s.h2d_bytes / n / bw * 1e3 if bw == bw else None
    return {"policy": s.policy, "plan": handle.plan.label, "dequant": handle.plan.dequant, "budget": args.budget,
            "batch": args.batch, "steps": n,
            "ms_per_step": step * 1e3, "step_ms": [round(t * 1e3, 3) for t in times],
            "tokens_per_s": args.batch / step, "hit_rate": s.hit_rate, "misses_per_step": s.misses / n,
            "expert_bytes_by_precision": s.expert_bytes_by_precision or {"full": s.expert_bytes},
            "misses_by_precision_per_step": {p: m / n for p, m in s.misses_by_precision.items()},
            "upgrades_per_step": s.upgrades / n, "n_slots": s.n_slots, "cache_bytes": s.cache_bytes,
            "scratch_bytes": s.scratch_bytes, "h2d_bytes_per_step": s.h2d_bytes / n,
            "io_floor_ms_per_step": floor, "x_floor": step * 1e3 / floor if floor else None}


def table(rows: list[dict]) -> str:
    base = next((r["tokens_per_s"] for r in rows if "tokens_per_s" in r), None)
    lines = [f"{'policy':<10} {'plan':<32} {'tok/s':>7} {'x lru':>6} {'hit':>6} {'floor ms':>8} {'x floor':>7} "
             f"{'KL':>9} {'top1':>6}  MiB/expert, misses/step by precision"]
    for r in rows:
        if "error" in r:
            lines.append(f"{r['policy']:<10} {r['error']}")
            continue
        sizes = " / ".join(f"{p} {b / 2**20:.4g}" for p, b in r["expert_bytes_by_precision"].items())
        misses = " / ".join(f"{p} {m:.1f}" for p, m in r["misses_by_precision_per_step"].items()) or \
            f"full {r['misses_per_step']:.1f}"
        lines.append(f"{r['policy']:<10} {r['plan']:<32} {r['tokens_per_s']:7.2f} {r['tokens_per_s'] / base:6.2f} "
                     f"{r['hit_rate']:6.1%} {_num(r['io_floor_ms_per_step']):8.1f} {_num(r['x_floor']):7.2f} "
                     f"{_num(r.get('kl_vs_resident')):9.2e} {_num(r.get('top1_agreement')):6.1%}  {sizes}; {misses}")
    return "\n".join(lines)


def _num(value) -> float:
    return float("nan") if value is None else value


def cases(policies: list[str], dequants: list[str]) -> list[tuple[int, str, str]]:
    """(index of the policy, policy, dequant way): a full-precision policy once, the others once per way."""
    return [(i, p, d) for i, p in enumerate(policies)
            for d in (dequants if moeoffload.get_policy(p).precision != "full" else dequants[:1])]


def run(args, model, store, device: torch.device, out: dict) -> None:
    bw = pinned_bandwidth(store, device)
    out["pinned_GBps"] = bw / 1e9
    handle, ref = None, None
    for i, policy, dequant in cases(args.policies, args.dequant):
        try:
            why = make_room(store, policy, args.policies[i + 1 :])
            if why is not None:
                raise MemoryError(f"skipped: {why}")
            _plan.FUSED_DEQUANT = dequant == "fused"  # the plan falls back to arrival where fused cannot run
            if handle is None:
                handle = moeoffload.offload(model, policy, args.budget, device=device, store=store)
            else:
                handle.switch(policy, args.budget)
            result = row(handle, model, args, device, bw)
            logp = log_probs(model, device)
            if policy == "lru":
                ref = logp
            result.update(quality(logp, ref))
        except Exception as exc:
            result = {"policy": policy, "error": f"{type(exc).__name__}: {exc}"}
        finally:
            _plan.FUSED_DEQUANT = True
        out["rows"].append(result)
        print(json.dumps(result), flush=True)
        with open(os.path.join(args.out, "low_precision.json"), "w") as f:
            json.dump(out, f, indent=2)
        with open(os.path.join(args.out, "low_precision.txt"), "w") as f:
            f.write(table(out["rows"]) + "\n")
    if handle is not None:
        handle.unload()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--policies", nargs="+", default=POLICIES, help="lru first: the others are set against it")
    ap.add_argument("--budget", default="25%")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--steps", type=int, default=8, help="timed decode steps per policy")
    ap.add_argument("--warm", type=int, default=4, help="untimed decode steps before them (the cache fills)")
    ap.add_argument("--dequant", nargs="+", default=["fused", "arrival"], choices=["fused", "arrival"],
                    help="how a quantized slot's FFN runs (fused needs the Triton kernels: elsewhere both are arrival)")
    ap.add_argument("--tiny", action="store_true", help="a tiny config (CPU smoke run of the logic)")
    ap.add_argument("--out", default=os.environ.get("OUT", "bench-out"))
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    out = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu", "torch": torch.__version__,
           "python": platform.python_version(), "args": vars(args), "rows": [],
           "command": "PYTHONPATH=src python benchmarks/low_precision.py " + " ".join(sys.argv[1:])}
    model, store, seconds = build(MixtralConfig(**(TINY if args.tiny else MIXTRAL)), device)
    out.update(build_s=seconds, expert_GB=store.total_bytes / 1e9)
    print(f"built in {seconds:.1f} s: {store.total_bytes / 1e9:.1f} GB of experts", flush=True)
    run(args, model, store, device, out)
    print(f"\n== {out['device']} ==\n" + table(out["rows"]), flush=True)


if __name__ == "__main__":
    main()
