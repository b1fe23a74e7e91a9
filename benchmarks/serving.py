"""First-come against ExpertFlow's token scheduling at one expert budget, through moeoffload.serving.

    PYTHONPATH=src python benchmarks/serving.py --model models/kjv-moe                  # the trained model
    PYTHONPATH=src python benchmarks/serving.py --model mixtral-8x7b --layers 4 --device cuda --dtype bfloat16
    PYTHONPATH=src python benchmarks/serving.py --model tiny --requests 8 --prompt-tokens 16 --new-tokens 4

MoE-Gen's offline workload by default (512-token prompts, 256 new tokens; `--requests` of them at t=0). Rows at
one `--budget`: lru served first-come; the expertflow policy served first-come (its prefetch and correction
alone); the expertflow policy with its route grouping. Each row: tokens/s, TTFT and TPOT (p50, p99), distinct
(layer, expert) pairs per decode step, bytes copied to the device per generated token, and the workload's I/O
floor (moebench.throughput: what the slots cannot hold, over the pinned host-to-device bandwidth measured in
this run on CUDA; none on a CPU). ExpertFlow's predictor is trained first on prompts of another seed.
The grouping matters only when more requests are ready than `--max-batch`. JSON and a table go to `--out`.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import torch
from mixtral_e2e import pinned_bandwidth  # benchmarks/mixtral_e2e.py, beside this script

import moeoffload
from moebench.throughput import ThroughputWorkload, run_workload
from moebench.workload import Workload, find_tokenizer
from moebench.zoo import load_model
from moeoffload import predictors as P

ROWS = (("lru", "first-come"), ("expertflow", "first-come"), ("expertflow", "expertflow"))
COLUMNS = ("policy", "scheduler", "tokens_per_s", "ttft_p50_s", "ttft_p99_s", "tpot_p50_s", "tpot_p99_s",
           "experts_per_decode_step", "h2d_bytes_per_token", "io_floor_s", "x_io_floor")


def build(args):
    if args.model == "tiny":
        import sys

        sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
        from tests.moeoffload.models import tiny_mixtral

        return tiny_mixtral(seed=args.seed, layers=4), "synthetic (tests' tiny Mixtral)"
    model, source = load_model(args.model, dtype=args.dtype, layers=args.layers, seed=args.seed)
    return model, f"{source.kind}: {source}"


def train_predictor(model, args):
    """ExpertFlow's path predictor, fitted on the routing of prompts of another seed (untimed)."""
    wl = Workload(batch_size=8, prompt_len=min(args.prompt_tokens, 64), seed=args.seed + 1)
    tokenizer = find_tokenizer(model)
    prompts = [wl.prompts(model.config.vocab_size, round_index=r, tokenizer=tokenizer) for r in range(args.train)]
    return P.prepare("expertflow", model, train_prompts=prompts, new_tokens=8, budget=args.budget,
                     device=args.device, show_progress=False, steps=args.train_steps)


def table(rows: list[dict]) -> str:
    def cell(v):
        return f"{v:.4g}" if isinstance(v, float) else str(v)

    lines = [" | ".join(COLUMNS), " | ".join("---" for _ in COLUMNS)]
    lines += [" | ".join(cell(r.get(c)) for c in COLUMNS) for r in rows]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="models/kjv-moe", help="a zoo name, a checkpoint folder, or 'tiny'")
    ap.add_argument("--layers", type=int, default=None, help="synthetic models: this many layers")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--device", default=None)
    ap.add_argument("--budget", default="50%")
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--prompt-tokens", type=int, default=512)
    ap.add_argument("--new-tokens", type=int, default=256)
    ap.add_argument("--max-batch", type=int, default=16)
    ap.add_argument("--prefill-chunk", type=int, default=512)
    ap.add_argument("--kv-budget", default=None, help="tokens (an int) or bytes of KV ('8GiB'); default none")
    ap.add_argument("--train", type=int, default=6, help="prompt batches of 8 that ExpertFlow's predictor fits on")
    ap.add_argument("--train-steps", type=int, default=300)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    args = ap.parse_args()
    kv = int(args.kv_budget) if args.kv_budget and args.kv_budget.isdigit() else args.kv_budget
    workload = ThroughputWorkload(requests=args.requests, prompt_tokens=args.prompt_tokens,
                                  new_tokens=args.new_tokens, seed=args.seed, max_batch=args.max_batch,
                                  prefill_chunk=args.prefill_chunk, kv_budget=kv)
    model, source = build(args)
    predictor = train_predictor(model, args)
    meta = {"model": args.model, "source": source, "budget": args.budget, "torch": torch.__version__,
            "host": platform.node(), "device": args.device or ("cuda" if torch.cuda.is_available() else "cpu"),
            "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
            "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    rows = []
    for policy, scheduler in ROWS:
        kw = {"predictor": predictor} if policy == "expertflow" else {}
        with moeoffload.offload(model, policy, args.budget, device=args.device, **kw) as handle:
            bandwidth = pinned_bandwidth(handle.store, handle.device)
            bandwidth = None if bandwidth != bandwidth else bandwidth  # nan off CUDA
            rows.append(run_workload(model, workload, scheduler=scheduler, h2d_bandwidth=bandwidth))
        print(table(rows[-1:]).splitlines()[-1], flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "serving.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1, default=str))
    text = f"{source}, budget {args.budget}, {args.requests} requests of {args.prompt_tokens} + {args.new_tokens}\n"
    (out / "serving.txt").write_text(text + table(rows) + "\n")
    print(text + table(rows))


if __name__ == "__main__":
    main()
