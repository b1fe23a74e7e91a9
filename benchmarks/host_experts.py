"""Mixtral-8x7B at its published size: copy-only policies against host-assisted ones (missed experts computed on
the host CPU) side by side, each case against the combined floor.

    PYTHONPATH=src python benchmarks/host_experts.py --batches 1 16 --budgets 25% 50%
    PYTHONPATH=src python benchmarks/host_experts.py --tiny --steps 2          # CPU smoke run of the logic

The model and its store come from mixtral_e2e.build (the dense part seeded in host memory, the experts in the
engine's page-locked store); one handle serves every case through `switch`. Before the cases the engine measures
this machine (`handle.host_measurements()`): pinned H2D bandwidth, the host's read bandwidth with the thread count
the host computation uses, and one expert's host FFN time by token count. Each row has two floors from them:
- copy floor: the case's missed bytes over the pinned H2D bandwidth (every miss copied);
- combined floor: the same bytes split between the copy engine and host memory so both end together
  (`moeoffload.costmodel.combined_floor`), the floor no plan that reads each missed byte once can beat.
The summary sets the best host-assisted policy against the best copy-only one per batch and budget, and states the
most any split can gain on this host: (H2D + host read bandwidth) / H2D. The CPU's model, cores and flags are in
the JSON and the table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from mixtral_e2e import MIXTRAL, TINY, build, decode  # noqa: E402
from transformers import MixtralConfig  # noqa: E402

import moeoffload  # noqa: E402
from moeoffload import costmodel, hostexperts  # noqa: E402

CPU_FLAGS = ("avx2", "avx512f", "avx512_bf16", "avx512_fp16", "amx_tile", "amx_bf16", "amx_int8")


def cpu_info() -> dict:
    """The host CPU as lscpu names it, the instruction-set flags that decide the host GEMM, torch's view of it."""
    info = {"capability": torch.backends.cpu.get_cpu_capability(), "torch_threads": torch.get_num_threads(),
            "flags": sorted(set(CPU_FLAGS) & hostexperts.cpu_flags())}
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return info
    fields = dict(line.split(":", 1) for line in out.splitlines() if ":" in line)
    for key in ("Model name", "Socket(s)", "Core(s) per socket", "Thread(s) per core", "CPU(s)", "L3"):
        if key in fields:
            info[key] = fields[key].strip()
    return info


def row(handle, model, batch: int, budget: str, args, device: torch.device, m: costmodel.Measurements) -> dict:
    times = decode(model, batch, args.steps, args.warm, device, on_timed_start=handle.reset_stats)
    s, n = handle.stats(), len(times)
    step = sorted(times)[n // 2]
    missed = s.misses / n * s.expert_bytes
    copy_floor = costmodel.copy_floor(missed, m) * 1e3
    floor = costmodel.combined_floor(missed, m) * 1e3
    return {"policy": s.policy, "host_assisted": s.miss_rule != "copy", "plan": handle.plan.label, "budget": budget,
            "batch": batch, "steps": n, "ms_per_step": step * 1e3, "step_ms": [round(t * 1e3, 3) for t in times],
            "tokens_per_s": batch / step, "hit_rate": s.hit_rate, "misses_per_step": s.misses / n,
            "copied_per_step": s.h2d_copies / n, "host_per_step": s.host_misses / n,
            "copy_floor_ms": copy_floor, "combined_floor_ms": floor,
            "x_combined_floor": step * 1e3 / floor if floor else None}


def table(rows: list[dict], m: costmodel.Measurements | None, cpu: dict) -> str:
    flags = " ".join(cpu["flags"]) or f"none of {', '.join(CPU_FLAGS)}"
    lines = [f"CPU: {cpu.get('Model name', '?')}, {cpu.get('Socket(s)', '?')} socket(s) x "
             f"{cpu.get('Core(s) per socket', '?')} cores, flags {flags}, torch capability {cpu['capability']}"]
    if m is not None:
        ffn = ", ".join(f"{t}: {s * 1e3:.2f}" for t, s in zip(m.gemm_tokens, m.gemm_seconds))
        lines += [f"pinned H2D {m.h2d_bytes_per_s / 1e9:.1f} GB/s (an expert in {m.copy_seconds() * 1e3:.2f} ms); "
                  f"host read {m.host_read_bytes_per_s / 1e9:.1f} GB/s with {m.host_threads} threads; host expert FFN "
                  f"ms by tokens {{{ffn}}} (at 1 token it reads {m.expert_bytes / m.gemm_seconds[0] / 1e9:.1f} GB/s)",
                  f"most any copy/host split can gain over copy-only at the floor: "
                  f"{(m.h2d_bytes_per_s + m.host_read_bytes_per_s) / m.h2d_bytes_per_s:.2f}x"]
    lines.append(f"{'policy':<10} {'budget':>6} {'batch':>5} {'tok/s':>8} {'ms/step':>9} {'miss/step':>9} "
                 f"{'copied':>7} {'host':>6} {'copy fl':>8} {'comb fl':>8} {'x comb':>6}")
    for r in rows:
        if "error" in r:
            lines.append(f"{r['policy']:<10} {r['budget']:>6} {r['batch']:>5} error: {r['error'][:80]}")
            continue
        lines.append(f"{r['policy']:<10} {r['budget']:>6} {r['batch']:>5} {r['tokens_per_s']:8.2f} "
                     f"{r['ms_per_step']:9.1f} {r['misses_per_step']:9.1f} {r['copied_per_step']:7.1f} "
                     f"{r['host_per_step']:6.1f} {r['copy_floor_ms']:8.1f} {r['combined_floor_ms']:8.1f} "
                     f"{r['x_combined_floor'] or float('nan'):6.2f}")
    lines += summary(rows)
    return "\n".join(lines)


def summary(rows: list[dict]) -> list[str]:
    """Per batch and budget: the best host-assisted policy over the best copy-only one."""
    out = []
    ok = [r for r in rows if "error" not in r]
    for batch, budget in dict.fromkeys((r["batch"], r["budget"]) for r in ok):
        case = [r for r in ok if (r["batch"], r["budget"]) == (batch, budget)]
        copy = max((r for r in case if not r["host_assisted"]), key=lambda r: r["tokens_per_s"], default=None)
        host = max((r for r in case if r["host_assisted"]), key=lambda r: r["tokens_per_s"], default=None)
        if copy and host:
            out.append(f"batch {batch} @ {budget}: best host-assisted {host['policy']} {host['tokens_per_s']:.2f} "
                       f"tok/s = {host['tokens_per_s'] / copy['tokens_per_s']:.2f}x best copy-only {copy['policy']} "
                       f"({copy['tokens_per_s']:.2f}); {host['x_combined_floor'] or float('nan'):.2f}x its "
                       "combined floor")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 16])
    ap.add_argument("--budgets", nargs="+", default=["25%", "50%"])
    ap.add_argument("--copy-policies", nargs="+", default=["lru", "next-use"])
    ap.add_argument("--host-policies", nargs="+", default=["cpu-moe", "fiddler", "hybrid"])
    ap.add_argument("--threads", type=int, default=None, help="host threads (default: moeoffload.hostexperts')")
    ap.add_argument("--steps", type=int, default=6, help="timed decode steps per case")
    ap.add_argument("--warm", type=int, default=2, help="untimed decode steps before them")
    ap.add_argument("--tiny", action="store_true", help="a tiny config (CPU smoke run of the logic)")
    ap.add_argument("--out", default=os.environ.get("OUT", "bench-out"))
    args = ap.parse_args()
    hostexperts.HOST_THREADS = args.threads
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cpu = cpu_info()
    meta = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu", "cpu": cpu,
            "torch": torch.__version__, "python": platform.python_version(), "args": vars(args),
            "command": "PYTHONPATH=src python benchmarks/host_experts.py " + " ".join(sys.argv[1:])}
    model, store, seconds = build(MixtralConfig(**(TINY if args.tiny else MIXTRAL)), device)
    print(f"built in {seconds:.1f} s: {store.total_bytes / 1e9:.1f} GB of experts", flush=True)
    os.makedirs(args.out, exist_ok=True)
    rows: list[dict] = []
    handle, m = None, None
    for batch in args.batches:
        for budget in args.budgets:
            for policy in args.copy_policies + args.host_policies:
                try:
                    if handle is None:
                        handle = moeoffload.offload(model, policy, budget, device=device, store=store)
                    else:
                        handle.switch(policy, budget)
                    if m is None:
                        m = handle.host_measurements()
                        meta["measurements"] = m.as_dict()
                    rows.append(row(handle, model, batch, budget, args, device, m))
                except Exception as exc:  # a failing case is a row; the next case runs
                    rows.append({"policy": policy, "budget": budget, "batch": batch,
                                 "error": f"{type(exc).__name__}: {exc}"})
                print(json.dumps(rows[-1]), flush=True)
                with open(os.path.join(args.out, "host_experts.json"), "w") as f:
                    json.dump({**meta, "rows": rows}, f, indent=2)
    text = table(rows, m, cpu)
    with open(os.path.join(args.out, "host_experts.txt"), "w") as f:
        f.write(text + "\n")
    print(f"\n== {meta['device']} ==\n{text}", flush=True)
    if handle is not None:
        handle.unload()


if __name__ == "__main__":
    main()
