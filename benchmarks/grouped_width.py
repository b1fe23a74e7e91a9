"""What did fetch="device"'s grouped GEMM over the whole pool cost, against a launch over the routed slots only?

fetch="device" never tells the host which slots a layer's experts sit in. Its first FFN ("grouped-mm", since removed)
ran torch's grouped GEMM over every slot of the pool, empty groups included: at a 75% budget
of Mixtral-8x7B that is 192 groups for the 2 (batch 1) to 16 that have rows. This times
`kernels.grouped_ffn_by_offsets` at Mixtral's expert size over pools of several widths with the same routed rows,
beside the host path's Triton kernel over host-made groups (`kernels.grouped_ffn`), the "tiles" FFN
(`kernels.grouped_ffn_by_tiles`, the same kernel over a tile table the routing kernel builds on the device) and the
HBM floor (the active experts' bytes over a device-to-device copy's rate measured in the same run). On an H100 80GB
HBM3 the width cost torch's GEMM little, and "tiles" was the fastest at every width (benchmarks/RESULTS.md,
results/h100-2026-12-07), so it became the FFN of every grouped path (`moeoffload.paths`).

    PYTHONPATH=src python benchmarks/grouped_width.py --out $OUT/grouped_width
"""

from __future__ import annotations

import argparse
import functools
import json
import os

import bandwidth  # benchmarks/bandwidth.py, beside this script: its event timer
import torch

from moeoffload import kernels
from moeoffload.layout import ExpertLayout

H, I, K = 4096, 14336, 2  # Mixtral-8x7B


def timed(reps: int, fn, *fn_args, **fn_kwargs) -> float:
    """Median ms of `reps` event-timed runs of fn(*fn_args, **fn_kwargs) (`bandwidth.timed`), after one warm-up."""
    run = functools.partial(fn, *fn_args, **fn_kwargs)
    run()
    return sorted(bandwidth.timed(run, reps))[reps // 2] * 1e3


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--widths", type=int, nargs="+", default=[8, 32, 64, 128, 192])
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 16])
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--out", default=os.environ.get("OUT", "bench-out"))
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    torch.manual_seed(0)
    layout = ExpertLayout(("w13", "w2"), ((2 * I, H), (H, I)), torch.bfloat16)
    spec = kernels.FFNSpec.from_layout("gated-silu", layout)
    pool = torch.empty((max(args.widths), layout.numel), dtype=torch.bfloat16, device="cuda")
    pool.normal_(std=0.02)  # 352 MB a slot; weights only need to be finite
    src = torch.empty(2**28, dtype=torch.bfloat16, device="cuda")
    dst = torch.empty_like(src)
    copy_ms = timed(args.reps, dst.copy_, src)
    hbm = 2 * src.numel() * 2 / (copy_ms / 1e3)  # read + write, bytes/s
    del src, dst
    rows, lines = [], []
    header = (f"{'batch':>5} {'width':>5} {'active':>6} {'by-offsets ms':>13} {'triton groups ms':>16} "
              f"{'tiles ms':>9} {'HBM floor ms':>12} {'rel diff':>8}")
    for batch in args.batches:
        pairs = batch * K
        # the routed slots: `active` distinct slots inside the smallest width, so every width sees the same rows
        active = min(pairs, min(args.widths))
        slots = torch.randperm(min(args.widths))[:active].sort().values
        counts = torch.full((active,), pairs // active, dtype=torch.int64)
        counts[: pairs % active] += 1
        x = torch.randn(pairs, H, dtype=torch.bfloat16, device="cuda")
        groups, start = [], 0
        for s, c in zip(slots.tolist(), counts.tolist()):
            groups.append((start, start + c, s))
            start += c
        floor_ms = active * layout.numel * 2 / hbm * 1e3
        y = torch.empty_like(x)
        # the rows as routed pairs: pair r names the r-th row's expert (ids = a slot's index in `slot_list`)
        slot_list = slots.tolist()
        ids = torch.repeat_interleave(torch.arange(active), counts).view(-1, 1).cuda()
        triton_ms = timed(args.reps, kernels.grouped_ffn, spec, x, pool, groups, y, backend="triton")
        for width in args.widths:
            window = pool[:width]
            per_slot = torch.zeros(width, dtype=torch.int32)
            per_slot[slots] = counts.to(torch.int32)
            offs = per_slot.cumsum(0).to(torch.int32).cuda()
            weights = kernels.slot_weights(spec, window)
            ms = timed(args.reps, kernels.grouped_ffn_by_offsets, spec, x, window, offs, weights)
            got = kernels.grouped_ffn_by_offsets(spec, x, window, offs, weights)  # the same rows as the groups'
            rel = float((got.float() - y.float()).abs().max() / y.float().abs().max())
            # the grouped paths' FFN: the routing kernel's tile table (built once here, as
            # by-offsets' offsets are), then the Triton FFN over the routed slots only
            slot_of_id = kernels.slot_lookup(torch.tensor(slot_list, dtype=torch.int32, device="cuda"), width)
            ends = torch.arange(1, width + 1, dtype=torch.int32, device="cuda")
            max_rows = int(counts.max())
            order, _, _, tiles = kernels.route_tiles_on_device(ids, slot_of_id, ends, kernels.tile_rows(max_rows))
            assert order.tolist() == list(range(pairs)), "the benchmark's rows are already in slot order"
            tiles_ms = timed(args.reps, kernels.grouped_ffn_by_tiles, spec, x, window, tiles, max_rows)
            got = kernels.grouped_ffn_by_tiles(spec, x, window, tiles, max_rows)
            rel = max(rel, float((got.float() - y.float()).abs().max() / y.float().abs().max()))
            rows.append(dict(batch=batch, width=width, active=active, by_offsets_ms=ms, triton_groups_ms=triton_ms,
                             tiles_ms=tiles_ms, hbm_floor_ms=floor_ms, rel_diff=rel))
            lines.append(f"{batch:>5} {width:>5} {active:>6} {ms:>13.3f} {triton_ms:>16.3f} {tiles_ms:>9.3f} "
                         f"{floor_ms:>12.3f} {rel:>8.1e}")
    result = dict(device=torch.cuda.get_device_name(), torch=torch.__version__, hbm_copy_gbs=hbm / 1e9,
                  reps=args.reps, rows=rows)
    with open(os.path.join(args.out, "grouped_width.json"), "w") as f:
        json.dump(result, f, indent=1)
    text = "\n".join([f"{result['device']}, torch {torch.__version__}, device copy {hbm / 1e9:.0f} GB/s",
                      header, *lines])
    with open(os.path.join(args.out, "grouped_width.txt"), "w") as f:
        f.write(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
