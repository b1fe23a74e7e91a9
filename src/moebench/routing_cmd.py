"""`moebench routing MODEL`: the routing figures of one model (moebench.routing), as a table and a plot.

MODEL is a registry name (synthetic weights; `--layers` and `--set` reduce it as the suites' quick tier does,
`--routing` picks calibrated or uniform routers), `kjv-moe` (the project's trained model) or a checkpoint folder.
Text: the held-out corpus (moebench.corpus) through the model's tokenizer when it has one, else seeded random
token ids, the prompts the suites give a model without a tokenizer. An encoder-decoder's decoder is measured on
the tokens it generates.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

COLUMNS = (("usage_entropy", "load entropy"), ("max_mean", "max/mean load"), ("first_repeat", "first repeat"),
           ("topk_overlap", "top-k overlap"), ("topk_reuse", "top-k reuse"), ("next_hit", "next-layer hit"),
           ("next_marginal", "marginal hit"), ("working_set", "working set"))


def add_parser(sub) -> None:
    r = sub.add_parser("routing", help="routing statistics of a model: expert load, reuse, cross-layer, working set")
    r.add_argument("model", help="registry name (synthetic), kjv-moe, or a checkpoint folder")
    r.add_argument("--routing", choices=("calibrated", "uniform"), default="calibrated",
                   help="synthetic models: calibrated routers (default) or plain seeded uniform weights")
    r.add_argument("--layers", type=int, help="synthetic models: build this many layers")
    r.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="synthetic models: a config override (repeatable), e.g. hidden_size=256")
    r.add_argument("--seed", type=int, default=0, help="weights seed of a synthetic model (default 0)")
    r.add_argument("--sequences", type=int, default=32, help="sequences measured (default 32)")
    r.add_argument("--length", type=int, default=64, help="tokens per sequence (default 64)")
    r.add_argument("--batch", type=int, default=8, help="decode batch of the working-set column (default 8)")
    r.add_argument("--decoder-reads", choices=("prompt", "generated"), default="prompt",
                   help="an encoder-decoder's decoder: teacher-forced on the same text as the encoder (default; how "
                        "published figures are measured), or on --length tokens it generates greedily")
    r.add_argument("--plot", metavar="PNG", help="also plot the figures by layer (needs matplotlib: extra 'report')")
    r.add_argument("--json", metavar="PATH", help="also write the figures as JSON ('-' for stdout)")
    r.set_defaults(func=run)


def _overrides(pairs: list[str]) -> dict:
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ValueError(f"--set {pair!r}: expected KEY=VALUE, e.g. hidden_size=256")
        out[key] = json.loads(value) if value[:1] in "-0123456789[{tn" else value
    return out


def load(args: argparse.Namespace):
    from .zoo import CheckpointError, load_model, registry

    if registry.contains(args.model):
        return load_model(args.model, source="synthetic", layers=args.layers, overrides=_overrides(args.set) or None,
                          seed=args.seed, routing=args.routing)
    if args.layers is not None or args.set:
        raise ValueError("--layers/--set reduce synthetic (registry) models only")
    try:
        if args.model == "kjv-moe":
            return load_model("", source="trained")
        return load_model(args.model, source="checkpoint")
    except CheckpointError as exc:  # the CLI reports ValueErrors as one line
        raise ValueError(str(exc)) from None


def prompts(model, sequences: int, length: int, batch: int) -> tuple[list, str]:
    """Batches of [batch, length] ids and what they are."""
    import torch

    from .workload import find_tokenizer, heldout_ids

    tokenizer = find_tokenizer(model)
    if tokenizer is not None:
        text = heldout_ids(tokenizer)
        starts = torch.linspace(0, len(text) - length - 1, sequences).long()
        ids = torch.stack([text[s:s + length] for s in starts.tolist()])
        what = "held-out corpus text"
    else:
        gen = torch.Generator().manual_seed(0)
        ids = torch.randint(2, model.config.vocab_size, (sequences, length), generator=gen)
        what = "seeded random token ids"
    return list(ids.split(batch)), what


def table(stats: dict) -> str:
    from tabulate import tabulate

    def cell(v):
        return "-" if v is None else f"{v:.3f}" if isinstance(v, float) else str(v)

    rows = [[x["layer"], x["stack"], f"{x['depth']:.2f}"] + [cell(x[k]) for k, _ in COLUMNS] for x in stats["layers"]]
    rows.append(["uniform", "", ""] + [cell(stats["uniform"].get(k)) for k, _ in COLUMNS])
    heads = ["layer", "stack", "depth"] + [h for _, h in COLUMNS]
    heads[-1] = f"working set (B={stats['batch']})"
    return tabulate(rows, headers=heads, disable_numparse=True)


def plot(stats: dict, path: str, title: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ValueError("--plot needs matplotlib: pip install -e '.[report]'") from None
    layers = [x["layer"] for x in stats["layers"]]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    for ax, keys in zip(axes, (("first_repeat", "topk_overlap", "topk_reuse"), ("next_hit", "next_marginal"),
                               ("usage_entropy",))):
        for key in keys:
            ys = [x[key] for x in stats["layers"]]
            ax.plot(layers, [float("nan") if y is None else y for y in ys], marker="o", label=dict(COLUMNS)[key])
            if key in stats["uniform"]:
                ax.axhline(stats["uniform"][key], ls="--", lw=0.8, color=ax.lines[-1].get_color())
        ax.set_xlabel("MoE layer")
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.legend(fontsize=8)
    fig.suptitle(title + " (dashed: independent uniform routing)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run(args: argparse.Namespace) -> int:
    from .routing import routing_statistics

    model, source = load(args)
    batches, what = prompts(model, args.sequences, args.length, args.batch)
    generated = args.decoder_reads == "generated" and bool(getattr(model.config, "is_encoder_decoder", False))
    stats = routing_statistics(model, batches, new_tokens=args.length if generated else 1, batch=args.batch,
                               decoder_reads=args.decoder_reads)
    stats.update(model=args.model, weights=str(source), text=what)
    print(f"{source}: {stats['num_experts']} experts, top-{stats['top_k']}, {stats['tokens']} tokens per layer "
          f"of {what}")
    print(table(stats))
    if args.plot:
        plot(stats, args.plot, str(source))
        print(f"wrote {args.plot}")
    if args.json == "-":
        print(json.dumps(stats, indent=1))
    elif args.json:
        Path(args.json).write_text(json.dumps(stats, indent=1) + "\n")
        print(f"wrote {args.json}")
    return 0
