"""Train a small Mixtral-architecture MoE language model on the King James Bible, in one GPU command.

    PYTHONPATH=src python scripts/train_small_moe.py --output models/kjv-moe       # GPU: about 7 minutes
    PYTHONPATH=src python scripts/train_small_moe.py --max-steps 3 --max-train-chars 200000 --output /tmp/x  # smoke

Why: the benchmark's accuracy figures and its routing (what an expert cache sees) are only meaningful on a model
that has learned something; no weights can be downloaded here, so the project trains its own. The model is a
transformers `MixtralForCausalLM`, so the engine's hooks apply unchanged.

Steps: (1) train a byte-level BPE tokenizer on the training split; (2) train the model on random windows of the
training tokens (AdamW, warm-up then cosine, bf16 autocast on CUDA, the router's load-balancing loss); (3) measure
held-out loss and routing structure against a seeded random-weight model of the same shape; (4) save the model in
bf16 safetensors with its tokenizer, TRAINING.md and training.json into --output. Unless --max-steps is given,
the step count is fitted to --max-minutes by timing the first steps (recorded; rerun with --max-steps N to repeat).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

from moebench import corpus  # noqa: E402
from moebench.routing import routing_structure  # noqa: E402

SPECIAL_TOKENS = ["<|pad|>", "<|endoftext|>"]  # ids 0 and 1: moebench's synthetic prompts avoid both
MAX_CHECKPOINT_BYTES = 10 * 2**20
CALIBRATION_STEPS = (10, 40)  # time steps [10, 40) to fit the step count to the time budget
RESERVE_S = 45.0  # time kept for evaluation, routing measurement and saving after training


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--output", default="models/kjv-moe", help="checkpoint folder (default models/kjv-moe)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-steps", type=int, default=None, help="training steps (default: fit to --max-minutes)")
    p.add_argument("--max-minutes", type=float, default=7.0, help="wall-time budget of the whole command")
    p.add_argument("--step-cap", type=int, default=6000, help="most steps when fitting to the time budget")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--warmup", type=int, default=100)
    p.add_argument("--vocab-size", type=int, default=4096)
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--intermediate", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--aux-loss-coef", type=float, default=0.02)
    p.add_argument("--eval-every", type=int, default=250)
    p.add_argument("--eval-tokens", type=int, default=65536, help="held-out tokens scored (default: all ~49k)")
    p.add_argument("--routing-tokens", type=int, default=16384, help="held-out tokens for routing structure")
    p.add_argument("--max-train-chars", type=int, default=None, help="cut each split's text (smoke tests)")
    p.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    return p.parse_args(argv)


def train_tokenizer(lines: list[str], vocab_size: int):
    """A byte-level BPE (GPT-2 style: every byte string is encodable) as a transformers fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(lines, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token=SPECIAL_TOKENS[0], eos_token=SPECIAL_TOKENS[1],
                                   bos_token=SPECIAL_TOKENS[1], unk_token=None, model_max_length=4096)


def encode(tokenizer, text: str) -> torch.Tensor:
    lines = text.splitlines(keepends=True)
    ids = tokenizer(lines, add_special_tokens=False)["input_ids"]
    return torch.tensor([t for line in ids for t in line], dtype=torch.long)


def make_config(args, vocab_size: int):
    from transformers import MixtralConfig

    return MixtralConfig(
        vocab_size=vocab_size, hidden_size=args.hidden, intermediate_size=args.intermediate,
        num_hidden_layers=args.layers, num_attention_heads=args.heads, num_key_value_heads=args.heads,
        num_local_experts=args.experts, num_experts_per_tok=args.top_k, router_aux_loss_coef=args.aux_loss_coef,
        max_position_embeddings=4 * args.seq_len, tie_word_embeddings=True, sliding_window=None,
        pad_token_id=0, eos_token_id=1, bos_token_id=1,
    )


def lr_at(step: int, total: int, args) -> float:
    warmup = min(args.warmup, max(1, total // 10))
    if step < warmup:
        return args.lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return args.lr * (0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress))))


@torch.no_grad()
def evaluate(model, windows: torch.Tensor, device, autocast, batch_size: int = 32) -> dict:
    """Mean next-token loss (language-model part only, nats) and accuracy over held-out windows [n, L+1]."""
    model.eval()
    nll, correct, count = 0.0, 0, 0
    for start in range(0, windows.shape[0], batch_size):
        chunk = windows[start:start + batch_size].to(device)
        with autocast():
            logits = model(input_ids=chunk[:, :-1]).logits.float()
        targets = chunk[:, 1:]
        nll += torch.nn.functional.cross_entropy(logits.transpose(1, 2), targets, reduction="sum").item()
        correct += (logits.argmax(-1) == targets).sum().item()
        count += targets.numel()
    model.train()
    loss = nll / count
    return {"loss": loss, "perplexity": math.exp(loss), "next_token_accuracy": correct / count, "tokens": count}


def windows_of(ids: torch.Tensor, length: int, limit: int) -> torch.Tensor:
    n = min(ids.numel() // length, max(1, limit // length))
    return ids[: n * length].view(n, length)


def main(argv=None) -> int:
    from tqdm.auto import tqdm
    from transformers import MixtralForCausalLM

    args = parse_args(argv)
    t_start = time.perf_counter()
    budget_s = args.max_minutes * 60.0
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    cuda = device.type == "cuda"
    out_dir = Path(args.output)
    out_dir.mkdir(parents=True, exist_ok=True)

    def autocast():
        return torch.autocast("cuda", dtype=torch.bfloat16) if cuda else torch.autocast("cpu", enabled=False)

    # 1. data and tokenizer
    train_text = corpus.split_text("train")
    if args.max_train_chars:
        train_text = train_text[: args.max_train_chars]
    heldout_text = corpus.split_text("heldout")
    validation_text = corpus.split_text("validation")
    if args.max_train_chars:  # smoke runs: cut every split
        heldout_text, validation_text = heldout_text[: args.max_train_chars], validation_text[: args.max_train_chars]
    tokenizer = train_tokenizer(train_text.splitlines(keepends=True), args.vocab_size)
    train_ids = encode(tokenizer, train_text)
    heldout_ids = encode(tokenizer, heldout_text)
    validation_ids = encode(tokenizer, validation_text)
    eval_windows = windows_of(heldout_ids, args.seq_len + 1, args.eval_tokens)
    val_windows = windows_of(validation_ids, args.seq_len + 1, args.eval_tokens)
    routing_windows = windows_of(heldout_ids, args.seq_len, args.routing_tokens)
    prep_s = time.perf_counter() - t_start
    print(f"data: {train_ids.numel():,} training tokens, {heldout_ids.numel():,} held-out tokens, "
          f"vocabulary {len(tokenizer)}, prepared in {prep_s:.1f} s", flush=True)

    # 2. model and training
    torch.manual_seed(args.seed)
    config = make_config(args, len(tokenizer))
    model = MixtralForCausalLM(config).to(device)
    n_params = sum(p.numel() for p in model.parameters())
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=args.lr, betas=(0.9, 0.95), fused=cuda)
    gen = torch.Generator().manual_seed(args.seed)
    span = train_ids.numel() - args.seq_len - 1
    if span < 1:
        raise SystemExit(f"training text has {train_ids.numel()} tokens, fewer than --seq-len {args.seq_len} + 1")
    total = args.max_steps or args.step_cap
    curve: list[dict] = []
    stopped_early = False
    best, best_state = None, None  # the weights with the lowest validation loss (overfitting guard)
    model.train()
    bar = tqdm(total=total, desc="train", unit="step", dynamic_ncols=True, mininterval=1.0)
    step = 0
    t_train = time.perf_counter()
    t_cal = None
    while step < total:
        starts = torch.randint(0, span, (args.batch_size,), generator=gen)
        batch = torch.stack([train_ids[s:s + args.seq_len + 1] for s in starts.tolist()]).to(device, non_blocking=True)
        for group in opt.param_groups:
            group["lr"] = lr_at(step, total, args)
        with autocast():
            out = model(input_ids=batch[:, :-1], output_router_logits=True)
        lm_loss = torch.nn.functional.cross_entropy(out.logits.float().transpose(1, 2), batch[:, 1:])
        loss = lm_loss + args.aux_loss_coef * out.aux_loss.float()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step += 1
        bar.update(1)
        if step % 20 == 0 or step == total:
            bar.set_postfix(loss=f"{lm_loss.item():.3f}", aux=f"{out.aux_loss.item():.3f}")
        if args.max_steps is None and step == CALIBRATION_STEPS[0]:
            if cuda:
                torch.cuda.synchronize()
            t_cal = time.perf_counter()
        if args.max_steps is None and step == CALIBRATION_STEPS[1]:
            if cuda:
                torch.cuda.synchronize()
            per_step = (time.perf_counter() - t_cal) / (CALIBRATION_STEPS[1] - CALIBRATION_STEPS[0])
            evals = 1 + args.step_cap // args.eval_every
            left = budget_s - (time.perf_counter() - t_start) - RESERVE_S - evals * 0.5
            total = max(step, min(args.step_cap, step + int(left / per_step)))
            bar.total = total
            bar.refresh()
        if step % args.eval_every == 0 or step == total:
            val = evaluate(model, val_windows, device, autocast)
            curve.append({"step": step, "train_loss": lm_loss.item(), "validation_loss": val["loss"]})
            if best is None or val["loss"] < best["validation_loss"]:
                best = {"step": step, "validation_loss": val["loss"]}
                best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        if time.perf_counter() - t_start > budget_s - RESERVE_S and step < total:
            stopped_early = True
            break
    bar.close()
    train_s = time.perf_counter() - t_train
    if best_state is not None:
        val = evaluate(model, val_windows, device, autocast)
        if val["loss"] > best["validation_loss"]:
            model.load_state_dict(best_state)
        else:
            best = {"step": step, "validation_loss": val["loss"]}
    del best_state
    final = evaluate(model, eval_windows, device, autocast)

    # 3. routing structure: trained vs seeded random weights of the same shape, on held-out text (fp32)
    model.eval()
    model.float()
    trained_routing = routing_structure(model, routing_windows)
    torch.manual_seed(args.seed)
    synthetic = MixtralForCausalLM(config).to(device).eval()
    synthetic_routing = routing_structure(synthetic, routing_windows)
    del synthetic

    sample_prompt = "And God said"
    sample_ids = tokenizer(sample_prompt, return_tensors="pt").input_ids.to(device)
    with torch.no_grad():
        sample = model.generate(sample_ids, attention_mask=torch.ones_like(sample_ids), max_new_tokens=24,
                                do_sample=False, pad_token_id=0)
    sample_text = tokenizer.decode(sample[0], skip_special_tokens=True)

    # 4. save: bf16 safetensors + tokenizer + the record
    model.to(torch.bfloat16).save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    weight_bytes = sum(f.stat().st_size for f in out_dir.glob("*.safetensors"))
    folder_bytes = sum(f.stat().st_size for f in out_dir.iterdir() if f.is_file())
    wall_s = time.perf_counter() - t_start
    device_name = torch.cuda.get_device_name(device) if cuda else platform.processor() or "cpu"
    command = "PYTHONPATH=src python " + " ".join([Path(sys.argv[0]).as_posix() if argv is None else
                                                   "scripts/train_small_moe.py", *(sys.argv[1:] if argv is None
                                                                                    else argv)])
    record = {
        "command": command,
        "reproduce": f"--max-steps {step} --seed {args.seed} (other options as in 'args')",
        "args": vars(args),
        "data": corpus.source_note(),
        "data_file": "data/kjv/kjv.tsv.xz",
        "train_tokens": int(train_ids.numel()),
        "heldout_tokens": int(heldout_ids.numel()),
        "seed": args.seed,
        "steps": step,
        "stopped_early_by_time": stopped_early,
        "checkpoint_step": best["step"] if best else step,
        "checkpoint_validation_loss": best["validation_loss"] if best else None,
        "tokens_seen": step * args.batch_size * args.seq_len,
        "parameters": n_params,
        "checkpoint_weight_bytes": weight_bytes,
        "checkpoint_folder_bytes": folder_bytes,
        "final_heldout": final,
        "curve": curve,
        "routing": {"trained": trained_routing, "synthetic_same_shape_seeded": synthetic_routing},
        "sample": {"prompt": sample_prompt, "greedy": sample_text},
        "wall_s": wall_s,
        "prep_s": prep_s,
        "train_s": train_s,
        "device": device_name,
        "torch": torch.__version__,
        "transformers": __import__("transformers").__version__,
        "python": platform.python_version(),
    }
    (out_dir / "training.json").write_text(json.dumps(record, indent=2) + "\n")
    (out_dir / "TRAINING.md").write_text(training_md(record))
    print(summary(record))
    if weight_bytes > MAX_CHECKPOINT_BYTES:
        print(f"ERROR: checkpoint weights are {weight_bytes / 2**20:.2f} MiB, over the 10 MiB limit; "
              f"use a smaller --hidden/--intermediate/--vocab-size", file=sys.stderr)
        return 1
    return 0


def routing_rows(record: dict) -> list[str]:
    t, s = record["routing"]["trained"], record["routing"]["synthetic_same_shape_seeded"]
    rows = ["| layer | usage entropy, trained | usage entropy, random | top-k reuse, trained | top-k reuse, random |",
            "|---|---|---|---|---|"]
    for i, (a, b) in enumerate(zip(t["layers"], s["layers"])):
        rows.append(f"| {i} | {a['usage_entropy']:.3f} | {b['usage_entropy']:.3f} | {a['topk_reuse']:.3f} | "
                    f"{b['topk_reuse']:.3f} |")
    rows.append(f"| mean | {t['mean_usage_entropy']:.3f} | {s['mean_usage_entropy']:.3f} | "
                f"{t['mean_topk_reuse']:.3f} | {s['mean_topk_reuse']:.3f} |")
    return rows


def training_md(r: dict) -> str:
    f = r["final_heldout"]
    t = r["routing"]["trained"]
    lines = [
        "# kjv-moe: a small Mixtral-architecture MoE trained on the King James Bible", "",
        f"- Command: `{r['command']}`",
        f"- Reproduce the same steps: {r['reproduce']}",
        f"- Data: {r['data']} (`{r['data_file']}`); {r['train_tokens']:,} training tokens, "
        f"{r['heldout_tokens']:,} held-out tokens",
        f"- Model: MixtralForCausalLM, {r['args']['layers']} layers, hidden {r['args']['hidden']}, "
        f"{r['args']['experts']} experts (top-{r['args']['top_k']}), expert intermediate {r['args']['intermediate']}, "
        f"vocabulary {r['args']['vocab_size']} (byte-level BPE trained on the training split), tied embeddings; "
        f"{r['parameters']:,} parameters",
        f"- Seed {r['seed']}; {r['steps']} steps of {r['args']['batch_size']} x {r['args']['seq_len']} tokens "
        f"({r['tokens_seen']:,} tokens); AdamW lr {r['args']['lr']} warm-up + cosine; router aux loss coef "
        f"{r['args']['aux_loss_coef']}" + ("; stopped early by the time budget" if r["stopped_early_by_time"] else ""),
        f"- Saved weights: step {r['checkpoint_step']} (lowest loss on the validation chapters, which are neither "
        f"training nor held-out text)",
        f"- Final held-out loss {f['loss']:.4f} nats/token, perplexity {f['perplexity']:.2f}, next-token accuracy "
        f"{f['next_token_accuracy']:.2%} ({f['tokens']:,} tokens)",
        f"- Checkpoint: bf16 safetensors, {r['checkpoint_weight_bytes'] / 2**20:.2f} MiB of weights, "
        f"{r['checkpoint_folder_bytes'] / 2**20:.2f} MiB with tokenizer and notes",
        f"- Wall time {r['wall_s']:.0f} s (data {r['prep_s']:.0f} s, training {r['train_s']:.0f} s) on {r['device']}; "
        f"torch {r['torch']}, transformers {r['transformers']}, Python {r['python']}",
        f"- Greedy sample: {r['sample']['greedy']!r}", "",
        "## Routing structure on held-out text", "",
        f"{t['tokens']:,} held-out tokens. Usage entropy: 1.0 = every expert used equally. Top-k reuse: share of a "
        f"token's top-{t['top_k']} experts the previous token also used; independent uniform routing gives "
        f"{t['uniform_reuse']:.3f}. 'random' is the same architecture with seeded random initial weights.", "",
        *routing_rows(r), "",
    ]
    return "\n".join(lines)


def summary(r: dict) -> str:
    f = r["final_heldout"]
    t, s = r["routing"]["trained"], r["routing"]["synthetic_same_shape_seeded"]
    return "\n".join([
        f"kjv-moe: {r['steps']} steps (saved: step {r['checkpoint_step']}) in {r['train_s']:.0f} s on "
        f"{r['device']} (whole command {r['wall_s']:.0f} s)",
        f"held-out: loss {f['loss']:.4f}  perplexity {f['perplexity']:.2f}  "
        f"next-token acc {f['next_token_accuracy']:.2%}",
        f"routing (trained vs random): usage entropy {t['mean_usage_entropy']:.3f} vs {s['mean_usage_entropy']:.3f}, "
        f"top-k reuse {t['mean_topk_reuse']:.3f} vs {s['mean_topk_reuse']:.3f} (uniform {t['uniform_reuse']:.3f})",
        f"checkpoint: {r['checkpoint_weight_bytes'] / 2**20:.2f} MiB weights -> {os.path.abspath(r['args']['output'])}",
    ])


if __name__ == "__main__":
    raise SystemExit(main())
