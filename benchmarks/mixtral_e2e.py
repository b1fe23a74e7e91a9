"""Mixtral-8x7B at its published size, experts offloaded: decode tokens/s against the I/O floor and peers.

    PYTHONPATH=src python benchmarks/mixtral_e2e.py --part full --batches 1     # ~93 GB model, batch 1
    PYTHONPATH=src python benchmarks/mixtral_e2e.py --part full --batches 16    # batch 16
    PYTHONPATH=src python benchmarks/mixtral_e2e.py --part peer                  # 4 layers: accelerate, resident
    PYTHONPATH=src python benchmarks/mixtral_e2e.py --part peer --part full      # both, and the one table against
                                                                                 # the peers of this same run
    python benchmarks/mixtral_e2e.py --tiny --part full --part peer             # CPU smoke run of the logic
    PYTHONPATH=src python benchmarks/mixtral_e2e.py --against-peers FULL.json PEER.json  # that table, from two runs

`--profile` adds one profiled step per case (its trace, and the gpu_* fields of `benchmarks/gpu_timeline.py`:
the step's GPU span split into copies, kernels, both at once and idle).
`full`: seeded bf16 weights built without a second copy: non-expert weights generated on the GPU; expert
weights generated on the GPU in chunks and copied into per-layer host slabs that are page-locked with
cudaHostRegister (torch's pinned allocator rounds each block up to a power of two: 336 MiB experts would take
512 MiB each, 128 GiB in all) and used as the engine's ExpertStore buffers. Then for each budget (25/50/75% of
the experts) x policy (on-demand, lru, lookahead): decode steps after a prefill, with the I/O floor of the
case = misses x expert bytes / pinned bandwidth (measured in this run) per step, and beside it "x moved": the step
over the time of every copy at that rate, prefetches included (a prefetching policy also moves its wrong guesses;
for the others it is "x floor"). The policies named by
`--device-fetch` (default: lru) run a second time beside themselves with the cache's directory on the GPU
(`fetch="device"`, moeoffload.directory; its fills on the copy engine through moeoffload.courier where the driver
has stream memory operations, else by the SMs' loads: the row's "mover"), rows marked `/device-fetch`.
`peer`: a 4-layer model of the same width that fits: accelerate's cpu_offload, the engine at 25/50%, the engine
with every expert resident (kernels triton and torch), and transformers' own forward (eager, grouped_mm).
`cost`: the same 4-layer model, interleaved repeats of transformers' forward, the engine's resident path and `lru`
holding every expert (filled before timing): the engine's own cost and the resident path against transformers.
JSON and a table go to $OUT after every case, so a timeout keeps what finished.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import os
import platform
import sys
import time

import gpu_timeline  # benchmarks/gpu_timeline.py, beside this script
import torch
from transformers import MixtralConfig, MixtralForCausalLM

from moeoffload import courier as courier_module
from moeoffload import hooks, policies
from moeoffload import layer as layer_module
from moeoffload.cache import ExpertCache
from moeoffload.eviction import make_rule
from moeoffload.layer import OffloadedMoELayer
from moeoffload.offload import make_prefetcher, plan_fetch, plan_slots
from moeoffload.store import ExpertStore

MIXTRAL = dict(vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
               num_attention_heads=32, num_key_value_heads=8, num_local_experts=8, num_experts_per_tok=2,
               max_position_embeddings=4096)
TINY = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4,
            num_key_value_heads=2, num_local_experts=8, num_experts_per_tok=2, max_position_embeddings=256)
STD = 0.02


class Recorder:
    def __init__(self, out_dir: str, meta: dict):
        self.out_dir, self.meta, self.rows = out_dir, meta, []
        os.makedirs(out_dir, exist_ok=True)

    def add(self, row: dict) -> None:
        self.rows.append(row)
        print(json.dumps(row), flush=True)
        self.save()

    def save(self) -> None:
        """Write the JSON and the table now (after every row, and after a summary added to `meta`)."""
        with open(os.path.join(self.out_dir, f"mixtral_e2e_{self.meta['tag']}.json"), "w") as f:
            json.dump({**self.meta, "rows": self.rows}, f, indent=2)
        with open(os.path.join(self.out_dir, f"mixtral_e2e_{self.meta['tag']}.txt"), "w") as f:
            f.write(self.table() + "\n")

    def table(self) -> str:
        head = (f"{'case':<44} {'layers':>6} {'batch':>5} {'tok/s':>8} {'ms/step':>9} {'ms/layer':>8} "
                f"{'hit%':>5} {'miss/step':>9} {'floor ms':>8} {'x floor':>7} {'mean x':>6} {'pf/step':>7} "
                f"{'x moved':>7} {'host ms':>7}")
        profiled = any("gpu_span_ms" in r for r in self.rows)
        if profiled:  # the profiled step's GPU span and its parts (benchmarks/gpu_timeline.py)
            head += f" {'span':>6} {'copy':>6} {'kern':>6} {'both':>6} {'idle':>6}"
        lines = [head]
        for r in self.rows:
            if "error" in r:
                lines.append(f"{r['case']:<44} error: {r['error'][:80]}")
                continue
            floor = r.get("io_floor_ms_per_step")
            lines.append(f"{r['case']:<44} {r['layers']:>6} {r['batch']:>5} {r['tokens_per_s']:8.2f} "
                         f"{r['ms_per_step']:9.1f} {r['ms_per_step'] / r['layers']:8.2f} "
                         f"{r.get('hit_rate', float('nan')) * 100:5.1f} {r.get('misses_per_step', 0):9.1f} "
                         f"{floor if floor is not None else float('nan'):8.1f} "
                         f"{r['ms_per_step'] / floor if floor else float('nan'):7.2f} "
                         f"{r.get('mean_x_floor') or float('nan'):6.2f} "
                         f"{r.get('prefetches_per_step', 0):7.1f} {r.get('x_moved') or float('nan'):7.2f} "
                         f"{r.get('host_ms_per_step', float('nan')):7.1f}")
            if profiled:
                lines[-1] += "".join(f" {r.get(f'gpu_{k}_ms', float('nan')):6.1f}"
                                     for k in ("span", "copy", "kernel", "overlap", "idle"))
        return "\n".join(lines)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def init_dense(model, device, seed):
    """Seeded values for every non-expert tensor, generated where it lives; rotary buffers rebuilt."""
    g = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.numel() == 0:
                continue
            if p.dim() == 1:
                p.fill_(1.0)
            else:
                p.normal_(0.0, STD, generator=g)
    rotary = model.model.rotary_emb
    model.model.rotary_emb = type(rotary)(config=model.config).to(device)


def build_offloaded_skeleton(cfg, device, seed=0):
    """(model, hook, store, build seconds by phase): experts straight into registered host slabs."""
    t0 = time.perf_counter()
    with torch.device("meta"):
        model = MixtralForCausalLM(cfg).to(torch.bfloat16).eval()
    hook = hooks.discover(model)
    layout, n_layers, n_experts = hook.layout, len(hook.layers), hook.num_experts
    store = ExpertStore(layout, n_layers, n_experts, pin_memory=False)
    timing = {"alloc_s": 0.0, "register_s": 0.0, "fill_s": 0.0}
    g = torch.Generator(device=device).manual_seed(seed + 1)
    chunk = torch.empty(layout.numel, dtype=torch.bfloat16, device=device)
    for layer in range(n_layers):
        t = time.perf_counter()
        slab = torch.empty(n_experts * layout.numel, dtype=torch.bfloat16)
        timing["alloc_s"] += time.perf_counter() - t
        if device.type == "cuda":
            t = time.perf_counter()
            err = torch.cuda.cudart().cudaHostRegister(slab.data_ptr(), slab.numel() * slab.element_size(), 0)
            if int(err) != 0:
                raise RuntimeError(f"cudaHostRegister failed ({err}) for layer {layer}: not enough lockable memory?")
            timing["register_s"] += time.perf_counter() - t
        t = time.perf_counter()
        for e in range(n_experts):
            chunk.normal_(0.0, STD, generator=g)
            view = slab[e * layout.numel : (e + 1) * layout.numel]
            view.copy_(chunk)
            store._buffers[(layer, e)] = view
        sync(device)
        timing["fill_s"] += time.perf_counter() - t
    store.pinned = device.type == "cuda"
    for module in hook.layers:
        hook.strip(module)
    t = time.perf_counter()
    model.to_empty(device=device)
    init_dense(model, device, seed)
    sync(device)
    timing["dense_s"] = time.perf_counter() - t
    timing["total_s"] = time.perf_counter() - t0
    return model, hook, store, timing


def engine(model, hook, store, policy_name, budget, device, kernels="auto", fetch="host"):
    policy = policies.get(policy_name)
    n_slots, budget_bytes = plan_slots(policy, budget, store, device)
    fetch = plan_fetch(fetch, policy, kernels, n_slots, store)
    cache = ExpertCache(store, n_slots, device, make_rule(policy.eviction), retain=policy.retain, fetch=fetch)
    if policy.preload:
        cache.preload(store.keys())
    prefetcher = make_prefetcher(policy, hook, cache)
    layers = []
    for i, module in enumerate(hook.layers):
        layer = OffloadedMoELayer(i, hook.num_experts, cache, hook.expert_ffn(module), prefetcher,
                                  ffn=getattr(hook, "ffn", None), kernels=kernels)
        hook.install(module, layer)
        layers.append(layer)
    if fetch == "device" and layers[0].kernels == "loop":
        raise ValueError(f"fetch='device' needs the grouped kernels; kernels={kernels!r} gives the loop on {device} "
                         "(pass --kernels grouped-torch on a CPU)")
    hooks.experts3d.select(model, hooks.experts3d.IMPLEMENTATION)
    return cache, layers


def prefill(model, batch, device, seed):
    """(past, next token) after a seeded prompt of 8 tokens per sequence (under the caller's no_grad)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, model.config.vocab_size, (batch, 8), generator=g).to(device)
    out = model(ids, use_cache=True)
    return out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)


def decode(model, batch, steps, warm, device, seed, on_timed_start=None, host_times=None) -> list[float]:
    """Per-step wall times of `steps` greedy decode steps after `warm` untimed ones; `host_times` (a list) also gets
    each timed step's host time, from its start until the host has launched the step (before the sync)."""
    times, launched = [], []
    with torch.no_grad():
        past, nxt = prefill(model, batch, device, seed)
        for i in range(warm + steps):
            if i == warm and on_timed_start is not None:
                on_timed_start()
            sync(device)
            t = time.perf_counter()
            out = model(nxt, past_key_values=past, use_cache=True)
            past, nxt = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
            launched.append(time.perf_counter() - t)
            sync(device)
            times.append(time.perf_counter() - t)
    if host_times is not None:
        host_times.extend(launched[warm:])
    return times[warm:]


def profiled_step(model, batch, device, seed, trace_path) -> dict:
    """One more decode step after a prefill and one untimed step, under the profiler: where its GPU time went
    (`gpu_timeline.summarize`: copies, kernels, both, idle). On a CPU: nothing."""
    if device.type != "cuda":
        return {}
    with torch.no_grad():
        past, nxt = prefill(model, batch, device, seed)
        out = model(nxt, past_key_values=past, use_cache=True)
        past, nxt = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
        sync(device)
        summary = gpu_timeline.profile_step(lambda: model(nxt, past_key_values=past, use_cache=True), trace_path)
    return {f"gpu_{k}": v for k, v in summary.items()}


def pinned_bandwidth(store, device) -> float:
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


GIL_AB_INTERVAL_S = 1e-4  # --gil-ab's lowered switch interval when the courier ships Python's own


def gil_suffix(switch_interval) -> str:
    if switch_interval == "courier":
        return ""
    return "/python-gil" if switch_interval is None else f"/switch-{switch_interval * 1e3:g}ms"


def run_engine_case(rec, model, hook, store, policy, budget, batch, args, device, bw, kernels="auto", tag="",
                    fetch="host", switch_interval="courier", device_ffn=None, split=None):
    """One row. `switch_interval`: "courier" leaves the courier's GIL hand-over as shipped (courier.SWITCH_INTERVAL_S);
    else the courier's setting for this case (the A/B of --gil-ab: None is Python's own interval). `device_ffn`:
    fetch="device"'s FFN (layer.DEVICE_FETCH_FFN) for this case, None as shipped (the A/B of --ffn-ab). `split`:
    layer.DEVICE_FETCH_SPLIT for this case, None as shipped (the A/B of --split-ab)."""
    case = f"{tag}{policy}@{budget}" + ("" if kernels == "auto" else f"/{kernels}") + \
        ("" if fetch == "host" else f"/{fetch}-fetch") + gil_suffix(switch_interval) + \
        ("" if device_ffn is None else f"/{device_ffn}") + \
        ("" if split is None else ("/split" if split else "/no-split"))
    cache = layers = None
    knobs = ([(courier_module, "SWITCH_INTERVAL_S", switch_interval)] if switch_interval != "courier" else []) + \
        ([(layer_module, "DEVICE_FETCH_FFN", device_ffn)] if device_ffn is not None else []) + \
        ([(layer_module, "DEVICE_FETCH_SPLIT", split)] if split is not None else [])
    shipped = [(module, name, getattr(module, name)) for module, name, _ in knobs]
    try:
        for module, name, value in knobs:  # this case's A/B settings; the shipped ones come back in `finally`
            setattr(module, name, value)
        cache, layers = engine(model, hook, store, policy, budget, device, kernels, fetch)
        host_times: list[float] = []
        times = decode(model, batch, args.steps, args.warm, device, seed=batch, on_timed_start=cache.reset_stats,
                       host_times=host_times)
        s, n = dataclasses.replace(cache.stats), len(times)  # a copy: the profiled step below adds to the stats
        courier_row = {"switch_interval_s": sys.getswitchinterval()} if fetch == "device" else {}
        courier = cache.courier
        if courier is not None and courier.carried_calls:
            courier_row.update(courier_issue_ms_mean=courier.issue_s / courier.carried_calls * 1e3,
                               courier_issue_ms_max=courier.issue_max_s * 1e3, courier_calls=courier.carried_calls)
        step = sorted(times)[n // 2]
        misses = s.misses / n
        floor = misses * store.expert_bytes / bw * 1e3 if bw == bw else None
        h2d_gb = cache.transfer.stats.bytes / n / 1e9
        moved = cache.transfer.stats.bytes / n / bw * 1e3 if bw == bw else None  # misses and prefetches
        profiled = {}  # after the counters above were read: the profiled step adds to them
        if args.profile and tag != "burn-in/":
            name = case.replace("@", "_").replace("/", "_").replace("%", "pct")
            profiled = profiled_step(model, batch, device, seed=batch,
                                     trace_path=os.path.join(args.out, f"trace_{name}_b{batch}.json.gz"))
        rec.add({"case": case, "policy": policy, "budget": budget, "layers": store.num_layers, "batch": batch,
                 "kernels": layers[0].kernels, "fetch": fetch, "mover": cache.mover if fetch == "device" else None,
                 "device_ffn": layer_module.DEVICE_FETCH_FFN if fetch == "device" else None,
                 "steps": n, "ms_per_step": step * 1e3, "step_ms": [round(t * 1e3, 3) for t in times],
                 "mean_ms": sum(times) / n * 1e3, "host_ms_per_step": sorted(host_times)[n // 2] * 1e3,
                 "tokens_per_s": batch / step, "hit_rate": s.hit_rate, "misses_per_step": misses,
                 "prefetches_per_step": s.prefetches / n, "h2d_GB_per_step": h2d_gb,
                 "pinned_GBps": bw / 1e9, "io_floor_ms_per_step": floor,
                 # every copy's time at the pinned rate (a prefetching policy also moves what it guessed wrong)
                 "io_moved_ms_per_step": moved, "x_moved": step * 1e3 / moved if moved else None,
                 # the floor counts the mean misses of a step: the mean step over it is the ratio of totals, beside
                 # the table's median step over it
                 "mean_x_floor": sum(times) / n * 1e3 / floor if floor else None, "n_slots": cache.n_slots,
                 **courier_row,
                 **profiled})
    except Exception as exc:
        rec.add({"case": case, "error": f"{type(exc).__name__}: {exc}"})
    finally:
        for module, name, value in shipped:
            setattr(module, name, value)
        for module in hook.layers:  # the modules hold the layers, the layers the pool: drop it before the next case
            module.__dict__.pop("_moeoffload_layer", None)
        if cache is not None:
            cache.free()  # also stops a fetch="device" courier thread, which holds the pool
        cache = layers = None
        if device.type == "cuda":
            torch.cuda.empty_cache()


def part_full(args, device, rec):
    cfg = MixtralConfig(**(TINY if args.tiny else MIXTRAL))
    model, hook, store, timing = build_offloaded_skeleton(cfg, device)
    rec.meta["build"] = {**timing, "expert_GB": store.total_bytes / 1e9}
    print("build:", json.dumps(rec.meta["build"]), flush=True)
    bw = pinned_bandwidth(store, device)
    rec.meta["pinned_GBps"] = bw / 1e9
    if args.burn_in:  # the first case after the build ran slow on an H100 (benchmarks/RESULTS.md)
        policy = args.policies[0]
        fetch = "device" if policy in args.device_fetch and args.no_host else "host"
        run_engine_case(rec, model, hook, store, policy, args.budgets[0], args.batches[0], args, device, bw,
                        args.kernels, tag="burn-in/", fetch=fetch)
    for batch in args.batches:
        for budget in args.budgets:
            for policy in args.policies:
                if not (args.no_host and policy in args.device_fetch):
                    run_engine_case(rec, model, hook, store, policy, budget, batch, args, device, bw, args.kernels)
                if policy in args.device_fetch:  # the same policy with the cache directory on the device, beside it
                    run_engine_case(rec, model, hook, store, policy, budget, batch, args, device, bw, args.kernels,
                                    fetch="device")
                    if args.gil_ab:  # the other setting of the courier's switch interval
                        other = GIL_AB_INTERVAL_S if courier_module.SWITCH_INTERVAL_S is None else None
                        run_engine_case(rec, model, hook, store, policy, budget, batch, args, device, bw,
                                        args.kernels, fetch="device", switch_interval=other)
                    for ffn in args.ffn_ab:
                        run_engine_case(rec, model, hook, store, policy, budget, batch, args, device, bw,
                                        args.kernels, fetch="device", device_ffn=ffn)
                    if args.split_ab:  # the other setting of layer.DEVICE_FETCH_SPLIT
                        run_engine_case(rec, model, hook, store, policy, budget, batch, args, device, bw,
                                        args.kernels, fetch="device", split=not layer_module.DEVICE_FETCH_SPLIT)


def build_peer_model(args, device):
    """The --peer-layers model of Mixtral's width, every weight seeded on `device` (it fits): peers and cost."""
    cfg = MixtralConfig(**{**(TINY if args.tiny else MIXTRAL), "num_hidden_layers": args.peer_layers})
    with torch.device("meta"):
        model = MixtralForCausalLM(cfg).to(torch.bfloat16).eval()
    model.to_empty(device=device)
    init_dense(model, device, seed=0)
    g = torch.Generator(device=device).manual_seed(1)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.mlp.experts.gate_up_proj.normal_(0.0, STD, generator=g)
            layer.mlp.experts.down_proj.normal_(0.0, STD, generator=g)
    return cfg, model


def part_peer(args, device, rec):
    """A model that fits: peers and the all-resident comparisons at the same layer count."""
    cfg, model = build_peer_model(args, device)
    import moeoffload

    bw = float("nan")
    for batch in args.batches:
        for impl in ("eager", "grouped_mm"):  # transformers' own forward, every weight on the GPU
            try:
                hooks.experts3d.select(model, impl)
                times = decode(model, batch, args.steps, args.warm, device, seed=batch)
                step = sorted(times)[len(times) // 2]
                rec.add({"case": f"transformers {impl} (all on GPU)", "layers": cfg.num_hidden_layers,
                         "batch": batch, "ms_per_step": step * 1e3, "tokens_per_s": batch / step})
            except Exception as exc:
                rec.add({"case": f"transformers {impl}", "error": f"{type(exc).__name__}: {exc}"})
    model.cpu()
    if args.burn_in:  # as in part_full: the first engine case of a call ran slow (benchmarks/RESULTS.md)
        with moeoffload.offload(model, "resident", "all", device=device, kernels="auto") as handle:
            run_engine_case_handle(rec, handle, model, args.batches[0], args, device, bw, "resident", "all", "auto",
                                   tag="burn-in/")
    for batch in args.batches:
        cases = [("resident", "all", "auto"), ("resident", "all", "torch"), ("lru", "all", "auto")]
        cases += [(p, b, "auto") for b in ("25%", "50%") for p in args.policies]
        for policy, budget, kernels in cases:
            handle = moeoffload.offload(model, policy, budget, device=device, kernels=kernels)
            try:
                if bw != bw:
                    bw = pinned_bandwidth(handle.store, device)
                run_engine_case_handle(rec, handle, model, batch, args, device, bw, policy, budget, kernels)
            finally:
                handle.unload()
    if args.tiny or device.type != "cuda":
        return
    try:
        from accelerate import cpu_offload
        from accelerate.hooks import remove_hook_from_submodules

        hooks.experts3d.select(model, "eager")
        cpu_offload(model, execution_device=device)
        for batch in args.batches:
            times = decode(model, batch, max(2, args.steps // 3), 1, device, seed=batch)
            step = sorted(times)[len(times) // 2]
            rec.add({"case": "accelerate cpu_offload", "layers": cfg.num_hidden_layers, "batch": batch,
                     "ms_per_step": step * 1e3, "tokens_per_s": batch / step})
        remove_hook_from_submodules(model)
    except Exception as exc:
        rec.add({"case": "accelerate cpu_offload", "error": f"{type(exc).__name__}: {exc}"})


def part_cost(args, device, rec):
    """The engine's own cost on a model that fits, by interleaved repeats (the machine drifts, so variants
    measured minutes apart are not comparable): per repeat, transformers' own forward (eager, grouped_mm), then the
    engine with every expert resident (policy `resident`) and `lru` with a budget of every expert, its cache filled
    before timing (otherwise the first visits of cold experts are misses, which is I/O, not engine cost), in
    alternating order. The engine's cost is judged per repeat, lru@all against the resident run next to it, and the
    row keeps the median of those paired ratios with their spread: a median over separate medians would compare
    runs minutes apart. Each variant: --steps timed decode steps per batch."""
    cfg, model = build_peer_model(args, device)
    import moeoffload

    times: dict[tuple[str, int], list[float]] = {}

    def timed(name, batch):
        t = decode(model, batch, args.steps, args.warm, device, seed=batch)
        times.setdefault((name, batch), []).append(sorted(t)[len(t) // 2])

    def engine_runs(policy, kernels):
        handle = moeoffload.offload(model, policy, "all", device=device, kernels=kernels)
        try:
            handle.cache.preload(handle.store.keys())
            for batch in args.batches:
                timed(f"engine {policy}@all" + ("" if kernels == "auto" else "/torch"), batch)
            if handle.cache.stats.misses:  # filled before timing: any miss would be I/O counted as engine cost
                print(f"WARNING: {policy}@all had {handle.cache.stats.misses} misses", flush=True)
        finally:
            handle.unload()

    if args.burn_in:  # one engine run before the repeats, not kept (the first engine case of a call ran slow)
        engine_runs("resident", "auto")
        times.clear()
    for repeat in range(args.repeats):
        for impl in ("eager", "grouped_mm"):
            hooks.experts3d.select(model, impl)
            for batch in args.batches:
                timed(f"transformers {impl}", batch)
        for kernels in ("auto", "torch"):
            pair = ("resident", "lru") if repeat % 2 == 0 else ("lru", "resident")  # drift cancels over pairs
            for policy in pair:
                engine_runs(policy, kernels)
    for (name, batch), meds in times.items():
        step = sorted(meds)[len(meds) // 2]
        rec.add({"case": name, "layers": cfg.num_hidden_layers, "batch": batch, "ms_per_step": step * 1e3,
                 "tokens_per_s": batch / step, "repeats_ms": [m * 1e3 for m in meds]})
    for batch in args.batches:
        def meds(name, batch=batch):
            return times.get((name, batch), [])

        def median(values):
            return sorted(values)[len(values) // 2] if values else float("nan")

        best_hf = min(median(meds("transformers eager")), median(meds("transformers grouped_mm")))
        for kernels in ("", "/torch"):
            res, lru = meds(f"engine resident@all{kernels}"), meds(f"engine lru@all{kernels}")
            ratios = sorted(b / a for a, b in zip(res, lru))  # per repeat: lru@all over the resident run beside it
            hf_ratios = sorted(min(e, g) / r for e, g, r in zip(meds("transformers eager"),
                                                                 meds("transformers grouped_mm"), res))
            cost = median(ratios) - 1
            rec.meta.setdefault("cost", []).append(
                {"batch": batch, "kernels": kernels.strip("/") or "auto", "resident_ms": median(res) * 1e3,
                 "lru_all_ms": median(lru) * 1e3, "engine_cost": cost,
                 "engine_cost_per_repeat": [r - 1 for r in ratios],
                 "resident_vs_best_transformers": median(hf_ratios), "resident_vs_best_per_repeat": hf_ratios})
            print(f"b{batch}{kernels}: engine cost (lru@all / resident, paired per repeat) median {cost:+.1%}, "
                  f"range {ratios[0] - 1:+.1%}..{ratios[-1] - 1:+.1%} over {len(ratios)} repeats; resident "
                  f"{median(hf_ratios):.2f}x the best transformers forward (range {hf_ratios[0]:.2f}.."
                  f"{hf_ratios[-1]:.2f}; {best_hf * 1e3:.2f} ms)", flush=True)
    rec.save()  # the summaries above live in meta, which no row write has saved yet


def run_engine_case_handle(rec, handle, model, batch, args, device, bw, policy, budget, kernels, tag=""):
    cache = handle.cache
    times = decode(model, batch, args.steps, args.warm, device, seed=batch, on_timed_start=cache.reset_stats)
    n = len(times)
    step = sorted(times)[n // 2]
    misses = cache.stats.misses / n
    rec.add({"case": f"{tag}engine {policy}@{budget}" + ("" if kernels == "auto" else f"/{kernels}"), "policy": policy,
             "budget": budget, "layers": handle.store.num_layers, "batch": batch, "kernels": handle.layers[0].kernels,
             "ms_per_step": step * 1e3, "tokens_per_s": batch / step, "hit_rate": cache.stats.hit_rate,
             "misses_per_step": misses,
             "io_floor_ms_per_step": misses * handle.store.expert_bytes / bw * 1e3 if bw == bw else None})


def read_rows(path: str) -> list[dict]:
    with open(path) as f:
        return json.load(f)["rows"]


def measured(rows: list[dict]) -> list[dict]:
    """The rows of measured cases: without the burn-in row."""
    return [r for r in rows if not r.get("case", "").startswith("burn-in/")]


def against_peers(full_rows: list[dict], peer_rows: list[dict]) -> str:
    """Each full-size case per layer against accelerate's cpu_offload (per layer, on the peer model) and against
    its floors: the I/O floor (its misses x expert bytes / pinned bandwidth), "moved" (every copy at that rate,
    prefetches included: the bound of a prefetching policy whose copies outlast the compute they could hide under)
    and a compute floor (the engine with every expert resident, per layer on the peer model, times the full layer
    count: what the step costs with no copy at all). No policy can beat max(io, compute); only a perfect overlap of
    the two reaches it."""
    def per_layer(case: str, batch: int) -> float | None:
        for r in peer_rows:
            if r.get("case") == case and r.get("batch") == batch and "error" not in r:
                return r["ms_per_step"] / r["layers"]
        return None

    head = (f"{'case':<36} {'batch':>5} {'ms/layer':>8} {'accel ms/layer':>14} {'x accel':>7} {'io ms':>8} "
            f"{'moved ms':>8} {'compute ms':>10} {'x io':>6} {'x moved':>7} {'x max(io,compute)':>17}")
    lines = [head]
    for r in full_rows:
        if "error" in r:
            continue
        ms_layer = r["ms_per_step"] / r["layers"]
        accel = per_layer("accelerate cpu_offload", r["batch"])
        resident = per_layer("engine resident@all", r["batch"])
        io = r.get("io_floor_ms_per_step") or 0.0
        moved = r.get("io_moved_ms_per_step") or io  # older files lack it: nothing but misses moved
        compute = resident * r["layers"] if resident is not None else float("nan")
        bound = max(io, compute)
        lines.append(f"{r['case']:<36} {r['batch']:>5} {ms_layer:8.2f} "
                     f"{accel if accel is not None else float('nan'):14.2f} "
                     f"{accel / ms_layer if accel is not None else float('nan'):7.1f} {io:8.1f} {moved:8.1f} "
                     f"{compute:10.1f} {r['ms_per_step'] / io if io else float('nan'):6.2f} "
                     f"{r['ms_per_step'] / moved if moved else float('nan'):7.2f} {r['ms_per_step'] / bound:17.2f}")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--part", action="append", choices=["full", "peer", "cost"],
                    help="repeatable, run in the order given; default: peer then full")
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 16])
    ap.add_argument("--budgets", nargs="+", default=["25%", "50%", "75%"])
    ap.add_argument("--policies", nargs="+",
                    default=["on-demand", "lru", "next-use", "lookahead", "lookahead-next-use"])
    ap.add_argument("--device-fetch", nargs="*", default=["lru"],
                    help="policies also run with fetch='device' (the cache directory on the GPU), beside fetch='host'")
    ap.add_argument("--gil-ab", action="store_true",
                    help="device-fetch cases also run with the courier's other GIL switch interval: 0.1 ms when "
                         "courier.SWITCH_INTERVAL_S is None (as shipped), else Python's own")
    ap.add_argument("--ffn-ab", nargs="*", default=[], choices=layer_module.DEVICE_FETCH_FFNS,
                    help="device-fetch cases also run with each of these FFNs (layer.DEVICE_FETCH_FFN), rows /<ffn>")
    ap.add_argument("--burn-in", action=argparse.BooleanOptionalAction, default=True,
                    help="run one case before the measured ones (on by default): full and peer add it as a row marked "
                         "burn-in/, cost drops it")
    ap.add_argument("--no-host", action="store_true",
                    help="the policies of --device-fetch run with fetch='device' only (no fetch='host' row)")
    ap.add_argument("--split-ab", action="store_true",
                    help="device-fetch cases also run with the other layer.DEVICE_FETCH_SPLIT (resident slots' "
                         "tiles before the wait for copies, or one FFN after it)")
    ap.add_argument("--profile", action="store_true",
                    help="after each case's timed steps, one more under torch.profiler: its trace, and where the "
                         "step's GPU time went (gpu_* fields: benchmarks/gpu_timeline.py)")
    ap.add_argument("--kernels", default="auto", help="the engine's kernels in the full part (layer.KERNEL_MODES)")
    ap.add_argument("--steps", type=int, default=8, help="timed decode steps per case")
    ap.add_argument("--warm", type=int, default=2, help="untimed decode steps before them")
    ap.add_argument("--peer-layers", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=3, help="interleaved repeats of the cost part")
    ap.add_argument("--tiny", action="store_true", help="a tiny config (CPU smoke run of the logic)")
    ap.add_argument("--out", default=os.environ.get("OUT", "bench-out"))
    ap.add_argument("--against-peers", nargs=2, metavar=("FULL_JSON", "PEER_JSON"),
                    help="measure nothing: print the against-peers table of a full and a peer JSON written earlier "
                         "(two invocations of one device call)")
    args = ap.parse_args()
    if args.against_peers:
        full, peer = (read_rows(path) for path in args.against_peers)
        print(against_peers(measured(full), peer))
        return
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    import transformers

    recs = {}
    for part in args.part or ["peer", "full"]:
        gc.collect()
        tag = f"{part}_b{'-'.join(map(str, args.batches))}" + ("_tiny" if args.tiny else "")
        meta = {"tag": tag, "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
                "torch": torch.__version__, "transformers": transformers.__version__,
                "python": platform.python_version(), "args": vars(args),
                "command": "PYTHONPATH=src python benchmarks/mixtral_e2e.py " + " ".join(os.sys.argv[1:])}
        rec = recs[part] = Recorder(args.out, meta)
        {"full": part_full, "peer": part_peer, "cost": part_cost}[part](args, device, rec)
        print(f"\n== {part} ({meta['device']}) ==\n" + rec.table(), flush=True)
    if "full" in recs and "peer" in recs:
        text = against_peers(measured(recs["full"].rows), recs["peer"].rows)
        with open(os.path.join(args.out, "mixtral_e2e_against_peers.txt"), "w") as f:
            f.write(text + "\n")
        print("\n== full size against the peers measured in this same command ==\n" + text, flush=True)


if __name__ == "__main__":
    main()
