"""Grouped-kernel check and timing on the GPU: ours against transformers' own experts forward, same shapes.

    PYTHONPATH=src python benchmarks/kernel_bench.py            # writes $OUT/kernels.json and $OUT/kernels.txt

Mixtral-8x7B experts (hidden 4096, intermediate 14336, 8 experts, top-2, bf16), tokens 1, 16, 256, 4096.
For each: a check against float64 (relative error, outputs poisoned with NaN first), then the median time
(triton.testing.do_bench, warm-up and repeats) of: permute, grouped FFN, unpermute, the whole layer path
(sort + permute + FFN + unpermute), and transformers' MixtralExperts with each experts implementation the
installed version has (eager, grouped_mm, batched_mm). The weight bytes the active experts must read over the
time give the achieved HBM bandwidth, against a device-to-device copy peak measured in the same run. Last, an
overlap check: an expert copy on the engine's transfer stream while a matmul runs on the compute stream.
"""

from __future__ import annotations

import argparse
import json
import os
import platform

import torch
import triton
import triton.testing

from moeoffload import kernels
from moeoffload.layout import ExpertLayout
from moeoffload.transfer import TransferEngine

H, I, E, K = 4096, 14336, 8, 2


def bench(fn, rep_ms: int = 200) -> float:
    return triton.testing.do_bench(fn, warmup=50, rep=rep_ms, return_mode="median") / 1e3  # seconds


def device_copy_peak() -> float:
    src = torch.randn(2**28, device="cuda", dtype=torch.bfloat16)  # 512 MiB
    dst = torch.empty_like(src)
    t = bench(lambda: dst.copy_(src))
    return 2 * src.numel() * src.element_size() / t  # read + write


def ours(spec, hidden, pool, idx, w, slot_of):
    order, counts = kernels.sort_by_expert(idx, E)
    n_valid = sum(counts)
    x = kernels.permute(hidden, order[:n_valid] % hidden.shape[0])
    y = torch.empty_like(x)
    groups, start = [], 0
    for e, c in enumerate(counts):
        groups.append((start, start + c, slot_of[e]))
        start += c
    kernels.grouped_ffn(spec, x, pool, groups, y)
    return kernels.unpermute(y, kernels.inverse_order(order, n_valid), w, hidden.dtype), (order, counts, x, y, groups)


def reference64(hidden, idx, w, gate_up, down):
    out = torch.zeros(hidden.shape, dtype=torch.float64, device=hidden.device)
    for e in range(E):
        tok, pos = torch.nonzero(idx == e, as_tuple=True)
        if tok.numel() == 0:
            continue
        h = hidden[tok].double() @ gate_up[e].double().T
        h = torch.nn.functional.silu(h[:, :I]) * h[:, I:]
        out.index_add_(0, tok, (h @ down[e].double().T) * w[tok, pos, None].double())
    return out


def transformers_experts(gate_up, down):
    from transformers import MixtralConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralExperts

    cfg = MixtralConfig(hidden_size=H, intermediate_size=I, num_local_experts=E, num_experts_per_tok=K)
    with torch.device("meta"):
        module = MixtralExperts(cfg)
    module.gate_up_proj = torch.nn.Parameter(gate_up, requires_grad=False)
    module.down_proj = torch.nn.Parameter(down, requires_grad=False)
    module.config = cfg
    return module, cfg


def overlap_check(expert_bytes: int) -> dict:
    transfer = TransferEngine(torch.device("cuda"))
    src = torch.empty(expert_bytes // 2, dtype=torch.bfloat16, pin_memory=True).normal_()
    dst = torch.empty(src.shape, dtype=src.dtype, device="cuda")
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)

    def compute():
        for _ in range(6):
            a @ a

    def copy():
        done = transfer.copy(src, dst)
        torch.cuda.current_stream().wait_event(done)

    def both():
        done = transfer.copy(src, dst)
        compute()
        torch.cuda.current_stream().wait_event(done)

    t_compute, t_copy, t_both = bench(compute), bench(copy), bench(both)
    return {"compute_s": t_compute, "copy_s": t_copy, "both_s": t_both,
            "overlap_share": (t_compute + t_copy - t_both) / min(t_compute, t_copy)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, nargs="*", default=[1, 16, 256, 4096])
    ap.add_argument("--out", default=os.environ.get("OUT", "bench-out"))
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    import transformers

    torch.manual_seed(0)
    dtype = torch.bfloat16
    layout = ExpertLayout(("gate_up_proj", "down_proj"), ((2 * I, H), (H, I)), dtype)
    n_slots = E + 2
    pool = (torch.randn(n_slots, layout.numel, device="cuda") / H**0.5).to(dtype)
    slot_of = torch.randperm(n_slots)[:E].tolist()
    views = [layout.views(pool[slot_of[e]]) for e in range(E)]
    gate_up = torch.stack([v["gate_up_proj"] for v in views])
    down = torch.stack([v["down_proj"] for v in views])
    spec = kernels.FFNSpec.from_layout("gated-silu", layout)
    module, cfg = transformers_experts(gate_up, down)
    from transformers.integrations.moe import ExpertsInterface

    impls = ["eager"] + [n for n in ("grouped_mm", "batched_mm") if n in ExpertsInterface._global_mapping]
    peak = device_copy_peak()
    rows = []
    for tokens in args.tokens:
        hidden = torch.randn(tokens, H, device="cuda").to(dtype)
        logits = torch.randn(tokens, E, device="cuda")
        top = logits.softmax(-1).topk(K, dim=-1)
        idx, w = top.indices, (top.values / top.values.sum(-1, keepdim=True)).to(dtype)
        out, (order, counts, x, y, groups) = ours(spec, hidden, pool, idx, w, slot_of)
        ref = reference64(hidden, idx, w, gate_up, down)
        row = {"tokens": tokens, "active_experts": sum(1 for c in counts if c)}
        row["ours_rel_err"] = ((out.double() - ref).norm() / ref.norm()).item()
        for impl in impls:
            cfg._experts_implementation = impl
            try:
                got = module(hidden, idx, w)
                row[f"{impl}_rel_err"] = ((got.double() - ref).norm() / ref.norm()).item()
                row[f"{impl}_s"] = bench(lambda: module(hidden, idx, w))  # noqa: B023
            except Exception as exc:
                row[f"{impl}_error"] = f"{type(exc).__name__}: {exc}"[:300]
        inverse = kernels.inverse_order(order, sum(counts))
        n_valid = sum(counts)
        row["permute_s"] = bench(lambda: kernels.permute(hidden, order[:n_valid] % tokens))  # noqa: B023
        row["grouped_ffn_s"] = bench(lambda: kernels.grouped_ffn(spec, x, pool, groups, y))  # noqa: B023
        row["unpermute_s"] = bench(lambda: kernels.unpermute(y, inverse, w, dtype))  # noqa: B023
        row["ours_s"] = bench(lambda: ours(spec, hidden, pool, idx, w, slot_of))  # noqa: B023
        weight_bytes = row["active_experts"] * layout.nbytes
        row["ffn_weight_GBps"] = weight_bytes / row["grouped_ffn_s"] / 1e9
        row["ffn_share_of_copy_peak"] = weight_bytes / row["grouped_ffn_s"] / peak
        row["ffn_tflops"] = 2 * 3 * H * I * tokens * K / row["grouped_ffn_s"] / 1e12
        rows.append(row)
        print(json.dumps(row), flush=True)
    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
              "transformers": transformers.__version__, "python": platform.python_version(),
              "device_copy_peak_GBps": peak / 1e9, "overlap": overlap_check(layout.nbytes), "rows": rows,
              "command": "PYTHONPATH=src python benchmarks/kernel_bench.py"}
    with open(os.path.join(args.out, "kernels.json"), "w") as f:
        json.dump(result, f, indent=2)
    lines = [f"{result['device']}  device copy peak {peak / 1e9:.0f} GB/s (read+write)  overlap: "
             + ", ".join(f"{k} {v * 1e3:.2f} ms" if k.endswith("_s") else f"{k} {v:.2f}"
                         for k, v in result["overlap"].items()),
             f"{'T':>5} {'experts':>7} {'ours ms':>8} {'perm':>6} {'ffn':>7} {'unperm':>6} {'ffn GB/s':>8} "
             f"{'%peak':>5} {'TFLOPS':>6} {'err':>8} " + " ".join(f"{i + ' ms':>14}" for i in impls)]
    for r in rows:
        lines.append(f"{r['tokens']:>5} {r['active_experts']:>7} {r['ours_s'] * 1e3:8.3f} {r['permute_s'] * 1e3:6.3f} "
                     f"{r['grouped_ffn_s'] * 1e3:7.3f} {r['unpermute_s'] * 1e3:6.3f} {r['ffn_weight_GBps']:8.0f} "
                     f"{100 * r['ffn_share_of_copy_peak']:5.0f} {r['ffn_tflops']:6.1f} {r['ours_rel_err']:8.1e} "
                     + " ".join(f"{r.get(i + '_s', float('nan')) * 1e3:14.3f}" for i in impls))
    table = "\n".join(lines)
    with open(os.path.join(args.out, "kernels.txt"), "w") as f:
        f.write(table + "\n")
    print(table)


if __name__ == "__main__":
    main()
