"""Mixtral-8x7B at its published size, experts offloaded: decode steps against the I/O floor and the peers.

    PYTHONPATH=src python benchmarks/mixtral_e2e.py --batches 1 16 --budgets 25% 50%
    python benchmarks/mixtral_e2e.py --tiny --steps 2                          # CPU smoke run of the logic

One model, one process, public API only. The model is built on the meta device; its dense part is seeded in host
memory and its experts straight into the engine's page-locked store (`ExpertStore.allocate_layer`), so no second
copy of the 93 GB of experts exists. Then, for each batch x budget x policy, the engine serves it through
`moeoffload.offload(model, policy, budget, store=store)` / `handle.switch(...)` under each plan of `--plans`
(default: "auto", the engine's default, beside "exact/host", the bit-exact loop with a sync per layer): greedy
decode steps after a prefill, timed with a synchronize around each. Each row has the I/O floor of its case (its
misses x expert bytes / the pinned host->device bandwidth measured in this run) and "x moved" (the step over
every copy's time at that rate, prefetches included).

The peer runs on the same model in the same process, with as many timed steps: the engine gives the experts back
(`unload`: the whole model in host memory), and accelerate's `cpu_offload` serves it, every weight crossing PCIe
at every step as accelerate moves it. JSON and a table go to --out after every row, so a time limit keeps what
finished; the last table sets every case against the peer at its batch.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time

import torch
from transformers import MixtralConfig, MixtralForCausalLM

import moeoffload
from moeoffload.hooks import discover
from moeoffload.store import ExpertStore

MIXTRAL = dict(vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
               num_attention_heads=32, num_key_value_heads=8, num_local_experts=8, num_experts_per_tok=2,
               max_position_embeddings=4096)
TINY = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4,
            num_key_value_heads=2, num_local_experts=8, num_experts_per_tok=2, max_position_embeddings=256)
STD = 0.02
PLANS = {"auto": ("auto", "auto"), "exact/host": ("exact", "host"), "triton/host": ("triton", "host"),
         "reference/host": ("reference", "host"), "reference/device": ("reference", "device")}


class Recorder:
    """Rows as they come: printed, and the JSON and table rewritten after each one."""

    def __init__(self, out_dir: str, meta: dict):
        self.out_dir, self.meta, self.rows = out_dir, meta, []
        os.makedirs(out_dir, exist_ok=True)

    def add(self, row: dict) -> None:
        self.rows.append(row)
        print(json.dumps(row), flush=True)
        with open(os.path.join(self.out_dir, "mixtral_e2e.json"), "w") as f:
            json.dump({**self.meta, "rows": self.rows}, f, indent=2)
        with open(os.path.join(self.out_dir, "mixtral_e2e.txt"), "w") as f:
            f.write(self.table() + "\n")

    def table(self) -> str:
        head = (f"{'case':<40} {'batch':>5} {'tok/s':>8} {'ms/step':>9} {'hit%':>5} {'miss/step':>9} "
                f"{'floor ms':>8} {'x floor':>7} {'x moved':>7} {'x peer':>7}")
        lines = [head]
        for r in self.rows:
            if "error" in r:
                lines.append(f"{r['case']:<40} error: {r['error'][:90]}")
                continue
            peer = self.peer_ms(r["batch"])
            lines.append(f"{r['case']:<40} {r['batch']:>5} {r['tokens_per_s']:8.2f} {r['ms_per_step']:9.1f} "
                         f"{r.get('hit_rate', float('nan')) * 100:5.1f} {r.get('misses_per_step', 0):9.1f} "
                         f"{_num(r.get('io_floor_ms_per_step')):8.1f} {_num(r.get('x_floor')):7.2f} "
                         f"{_num(r.get('x_moved')):7.2f} "
                         f"{peer / r['ms_per_step'] if peer else float('nan'):7.1f}")
        return "\n".join(lines)

    def peer_ms(self, batch: int) -> float | None:
        found = [r["ms_per_step"] for r in self.rows
                 if r.get("peer") and r["batch"] == batch and "error" not in r]
        return found[0] if found else None


def _num(value) -> float:
    return float("nan") if value is None else value


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def build(cfg: MixtralConfig, device: torch.device, seed: int = 0) -> tuple[MixtralForCausalLM, ExpertStore, float]:
    """(model, its experts' store, seconds): the dense part seeded in host memory, experts on the meta device and
    their seeded values written into the store's page-locked slabs, generated on `device` chunk by chunk."""
    t0 = time.perf_counter()
    with torch.device("meta"):
        model = MixtralForCausalLM(cfg).to(torch.bfloat16).eval()
    hook = discover(model)
    experts = set(hook.layers)
    for module in model.modules():  # the dense part only: the experts stay on meta, the store holds them
        if module not in experts:
            module.to_empty(device="cpu", recurse=False)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.device.type != "meta":
                p.fill_(1.0) if p.dim() == 1 else p.normal_(0.0, STD, generator=g)
    model.model.rotary_emb = type(model.model.rotary_emb)(config=model.config)
    store = ExpertStore(hook.layout, len(hook.layers), hook.num_experts, pin_memory=device.type == "cuda")
    chunk = torch.empty(hook.layout.numel, dtype=torch.bfloat16, device=device)
    gen = torch.Generator(device=device).manual_seed(seed + 1)
    for layer in range(len(hook.layers)):
        slab = store.allocate_layer(layer)
        for e in range(hook.num_experts):
            chunk.normal_(0.0, STD, generator=gen)
            slab[e * hook.layout.numel : (e + 1) * hook.layout.numel].copy_(chunk)
    sync(device)
    return model, store, time.perf_counter() - t0


def decode(model, batch: int, steps: int, warm: int, device: torch.device, on_timed_start=None) -> list[float]:
    """Wall seconds of `steps` greedy decode steps after an 8-token seeded prompt and `warm` untimed steps."""
    ids = torch.randint(2, model.config.vocab_size, (batch, 8), generator=torch.Generator().manual_seed(batch))
    times = []
    with torch.no_grad():
        out = model(ids.to(device), use_cache=True)
        past, nxt = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
        for i in range(warm + steps):
            if i == warm and on_timed_start is not None:
                on_timed_start()
            sync(device)
            t = time.perf_counter()
            out = model(nxt, past_key_values=past, use_cache=True)
            past, nxt = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
            sync(device)
            times.append(time.perf_counter() - t)
    return times[warm:]


def pinned_bandwidth(store: ExpertStore, device: torch.device) -> float:
    """Bytes/s of one expert's copy from the page-locked store (median of 7, CUDA events)."""
    if device.type != "cuda":
        return float("nan")
    src = store.buffer((0, 0))
    dst = torch.empty_like(src, device=device)
    times = []
    for _ in range(7):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        dst.copy_(src, non_blocking=True)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return src.numel() * src.element_size() / sorted(times)[len(times) // 2]


def engine_row(handle, model, batch: int, budget: str, args, device: torch.device, bw: float, case: str) -> dict:
    times = decode(model, batch, args.steps, args.warm, device, on_timed_start=handle.reset_stats)
    s, n = handle.stats(), len(times)
    step = sorted(times)[n // 2]
    floor = s.misses / n * s.expert_bytes / bw * 1e3 if bw == bw else None
    moved = s.h2d_bytes / n / bw * 1e3 if bw == bw else None
    return {"case": case, "policy": s.policy, "plan": handle.plan.label, "why": handle.plan.why,
            "budget": budget, "batch": batch, "layers": handle.store.num_layers, "steps": n,
            "ms_per_step": step * 1e3, "step_ms": [round(t * 1e3, 3) for t in times], "tokens_per_s": batch / step,
            "hit_rate": s.hit_rate, "misses_per_step": s.misses / n, "prefetches_per_step": s.prefetches / n,
            "pinned_GBps": bw / 1e9, "io_floor_ms_per_step": floor, "x_floor": step * 1e3 / floor if floor else None,
            "io_moved_ms_per_step": moved, "x_moved": step * 1e3 / moved if moved else None}


def run_engine(args, model, store, device, rec) -> None:
    """Every batch x budget x policy x plan through one handle, switched from case to case."""
    bw = pinned_bandwidth(store, device)
    rec.meta["pinned_GBps"] = bw / 1e9
    handle = None
    for batch in args.batches:
        for budget in args.budgets:
            for policy in args.policies:
                for plan in args.plans:
                    kernels, fetch = PLANS[plan]
                    case = f"{policy}@{budget} [{plan}]"
                    try:
                        if handle is None:
                            handle = moeoffload.offload(model, policy, budget, device=device, store=store,
                                                        kernels=kernels, fetch=fetch)
                        else:
                            handle.switch(policy, budget, kernels=kernels, fetch=fetch)
                        rec.add(engine_row(handle, model, batch, budget, args, device, bw, case))
                    except Exception as exc:
                        rec.add({"case": case, "batch": batch, "error": f"{type(exc).__name__}: {exc}"})
    if handle is not None:
        handle.unload()  # the experts come back into the model, in host memory, layer by layer


def run_peer(args, model, device, rec) -> None:
    """accelerate's cpu_offload on the same model (now whole in host memory), as many timed steps as the engine."""
    try:
        from accelerate import cpu_offload
    except ImportError as exc:
        rec.add({"case": "accelerate cpu_offload", "batch": 0, "peer": True, "error": f"not installed ({exc})"})
        return
    model.set_experts_implementation("eager")  # what a model without the engine runs
    cpu_offload(model, execution_device=device)
    for batch in args.batches:
        try:
            times = decode(model, batch, args.steps, args.warm, device)
            step = sorted(times)[len(times) // 2]
            rec.add({"case": "accelerate cpu_offload", "peer": True, "batch": batch, "steps": len(times),
                     "layers": model.config.num_hidden_layers, "ms_per_step": step * 1e3,
                     "step_ms": [round(t * 1e3, 3) for t in times], "tokens_per_s": batch / step})
        except Exception as exc:
            rec.add({"case": "accelerate cpu_offload", "peer": True, "batch": batch,
                     "error": f"{type(exc).__name__}: {exc}"})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 16])
    ap.add_argument("--budgets", nargs="+", default=["25%", "50%"])
    ap.add_argument("--policies", nargs="+", default=["lru"])
    ap.add_argument("--plans", nargs="+", default=["auto", "exact/host"], choices=list(PLANS),
                    help="kernels/fetch of each case: auto is the engine's default")
    ap.add_argument("--steps", type=int, default=6, help="timed decode steps per case (the peer's too)")
    ap.add_argument("--warm", type=int, default=2, help="untimed decode steps before them")
    ap.add_argument("--no-peer", action="store_true", help="skip accelerate's cpu_offload")
    ap.add_argument("--tiny", action="store_true", help="a tiny config (CPU smoke run of the logic)")
    ap.add_argument("--out", default=os.environ.get("OUT", "bench-out"))
    args = ap.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    import transformers

    meta = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
            "torch": torch.__version__, "transformers": transformers.__version__,
            "python": platform.python_version(), "args": vars(args),
            "command": "PYTHONPATH=src python benchmarks/mixtral_e2e.py " + " ".join(os.sys.argv[1:])}
    rec = Recorder(args.out, meta)
    model, store, seconds = build(MixtralConfig(**(TINY if args.tiny else MIXTRAL)), device)
    rec.meta.update(build_s=seconds, expert_GB=store.total_bytes / 1e9)
    print(f"built in {seconds:.1f} s: {store.total_bytes / 1e9:.1f} GB of experts", flush=True)
    run_engine(args, model, store, device, rec)
    del store
    if not args.no_peer:
        run_peer(args, model, device, rec)
    print(f"\n== {meta['device']} ==\n" + rec.table(), flush=True)


if __name__ == "__main__":
    main()
