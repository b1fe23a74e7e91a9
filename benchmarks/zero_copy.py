"""Can the GPU's own loads stream experts out of page-locked host memory as fast as the copy engine does?

A layer that must not wait for the host (no device->host sync to learn which experts it needs) has to fetch a
missing expert itself: its kernels read the registered host slab through PCIe ("zero-copy") and write the expert
into a cache slot. That only pays if those loads reach the link's rate. This measures, on the same buffers and
in the same run: the copy engine (`copy_`, non_blocking, the engine's TransferEngine), a Triton kernel that copies
host -> device with its loads, over several grid sizes and block widths, and torch's own device copy kernel with
a host-mapped source.

    PYTHONPATH=src python benchmarks/zero_copy.py --out $OUT/zero_copy
"""

from __future__ import annotations

import argparse
import json
import os

import torch

from moeoffload.kernels.hostmap import device_view, host_pointer_usable

MIB = 1 << 20


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mib", type=int, default=336, help="bytes per copy (a Mixtral-8x7B expert: 336 MiB)")
    ap.add_argument("--reps", type=int, default=9)
    ap.add_argument("--out", default=os.environ.get("OUT", "bench-out"))
    args = ap.parse_args()
    import triton

    from moeoffload.kernels import triton_kernels as tk

    os.makedirs(args.out, exist_ok=True)
    dev = torch.device("cuda")
    n = args.mib * MIB // 2
    host = torch.empty(n, dtype=torch.bfloat16)
    host.normal_()
    code = torch.cuda.cudart().cudaHostRegister(host.data_ptr(), n * 2, 0)
    assert int(code) == 0, code
    usable = host_pointer_usable(dev)
    mapped = device_view(host, dev)
    dst = torch.empty(n, dtype=torch.bfloat16, device=dev)
    sms = torch.cuda.get_device_properties(dev).multi_processor_count
    results = {"device": torch.cuda.get_device_name(), "bytes": n * 2, "sms": sms,
               "host_pointer_usable": usable, "torch": torch.__version__, "triton": triton.__version__, "rows": []}

    def timed(fn) -> float:
        fn()
        torch.cuda.synchronize()
        ms = []
        for _ in range(args.reps):
            dst.fill_(float("nan"))
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            b.synchronize()
            ms.append(a.elapsed_time(b))
        assert torch.equal(dst.view(torch.int16), host.view(torch.int16).to(dev)), "copy is wrong"
        return sorted(ms)[len(ms) // 2]

    def row(name, ms):
        gbps = n * 2 / ms / 1e6
        results["rows"].append({"variant": name, "ms": ms, "GBps": gbps})
        print(f"{name:<44} {ms:8.3f} ms {gbps:7.2f} GB/s", flush=True)

    row("copy engine: dst.copy_(host, non_blocking)", timed(lambda: dst.copy_(host, non_blocking=True)))
    row("torch copy kernel, host-mapped source", timed(lambda: dst.copy_(mapped)))
    for block in (2048, 8192):
        for per_sm in (1, 2, 4, 8):
            for warps in (4, 8):
                grid = sms * per_sm

                def run(grid=grid, block=block, warps=warps):
                    tk.stream_copy[(grid,)](mapped, dst, n, BLOCK=block, num_warps=warps)

                row(f"triton loads: grid {grid}, block {block}, warps {warps}", timed(run))
    fill_e = torch.zeros(1, dtype=torch.int32, device=dev)
    fill_s = torch.zeros(1, dtype=torch.int32, device=dev)
    fill_n = torch.ones(1, dtype=torch.int32, device=dev)
    pool = dst.view(1, n)
    for block in (4096, 8192, 16384):
        for per_sm in (2, 4, 8):
            for warps in (4, 8):
                def fill(block=block, per_sm=per_sm, warps=warps):
                    tk.fill_slots[(sms * per_sm,)](mapped, pool, fill_e, fill_s, fill_n, numel=n, MAX_FILLS=1,
                                                    PROGRAMS=sms * per_sm, BLOCK=block, num_warps=warps)

                row(f"fill_slots: {per_sm}/SM, block {block}, warps {warps}", timed(fill))
    best = max(results["rows"][2:], key=lambda r: r["GBps"])
    dma = results["rows"][0]["GBps"]
    print(f"\nbest kernel {best['variant']}: {best['GBps']:.2f} GB/s = {best['GBps'] / dma:.1%} of the copy engine "
          f"({dma:.2f} GB/s)", flush=True)
    with open(os.path.join(args.out, "zero_copy.json"), "w") as f:
        json.dump(results, f, indent=2)
    torch.cuda.cudart().cudaHostUnregister(host.data_ptr())


if __name__ == "__main__":
    main()
