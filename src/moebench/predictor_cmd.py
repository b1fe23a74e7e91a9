"""`moebench predictor train|eval`: record routing, train a predictor, score it per layer on held-out traces.

The model comes from a suite file (`--suite suites/switch --model switch-base-8 --tier quick`): the same weights
the benchmark measures. Training prompts use another seed than the suite's measured prompts.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import replace
from pathlib import Path

KINDS = ("sida", "frequency")


def build_model(suite_path: str, model_name: str, tier: str, device: str):
    import torch

    from .measure import resolve_device
    from .suite import load_suite

    path = Path(suite_path)
    suite = load_suite(path / "suite.py" if path.is_dir() else path)
    dtype = getattr(torch, suite.dtypes[tier])
    model, source = suite.model(model_name).build(tier, dtype, "cpu")
    return suite, model, source, resolve_device(device)


def train_and_evaluate(model, prompts, new_tokens: int, kinds=KINDS, held_out: float = 0.25, epochs: int = 20,
                       device=None, out: Path | None = None, show_progress: bool | None = None) -> dict:
    """Record a trace on `prompts`, split it, fit each kind on the train part, score every kind (and random
    guessing) per layer on the held-out part. Saves trace and predictors under `out` when given."""
    from moeoffload import predictors as P

    trace = P.collect_trace(model, prompts, new_tokens, device=device, show_progress=show_progress)
    train, held = trace.split(held_out)
    results = {"info": trace.info, "train_chunks": len(train.chunks), "held_out_chunks": len(held.chunks)}
    fitted: dict[str, P.RoutingPredictor] = {}
    if "sida" in kinds:
        fitted["sida"] = P.SidaPredictor.create(model, train).train(train, epochs=epochs, show_progress=show_progress)
    if "frequency" in kinds:
        fitted["frequency"] = P.FrequencyPrior.fit(train)
    fitted["random"] = P.RandomPredictor(trace.num_experts, trace.top_k)
    for name, predictor in fitted.items():
        per_layer = P.evaluate(predictor, held)
        results[name] = {"per_layer": per_layer, "mean": P.summary(per_layer)}
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        train.save(out / "trace_train.pt")
        held.save(out / "trace_heldout.pt")
        for name, predictor in fitted.items():
            if hasattr(predictor, "save"):
                predictor.save(out / f"{name}.pt")
        (out / "predictors.json").write_text(json.dumps(results, indent=1, default=str))
    return results


def table(results: dict) -> str:
    from tabulate import tabulate

    rows = []
    for name in [k for k in results if isinstance(results[k], dict) and "per_layer" in results[k]]:
        for layer, m in results[name]["per_layer"].items():
            rows.append([name, layer, m["precision"], m["recall"], m["hit_rate"], m["exact"], m["tokens"]])
        m = results[name]["mean"]
        rows.append([name, "mean", m["precision"], m["recall"], m["hit_rate"], m["exact"], ""])
    return tabulate(rows, headers=["predictor", "layer", "precision", "recall", "hit_rate", "exact", "tokens"],
                    floatfmt=".3f")


def _train(args: argparse.Namespace) -> int:
    suite, model, source, device = build_model(args.suite, args.model, args.tier, args.device)
    wl = replace(suite.workload_for(args.tier), seed=suite.workload_for(args.tier).seed + 7919)
    prompts = [wl.prompts(model.config.vocab_size, round_index=r) for r in range(args.batches)]
    results = train_and_evaluate(model, prompts, wl.new_tokens, kinds=args.kind or KINDS, epochs=args.epochs,
                                 device=device, out=Path(args.out), show_progress=True)
    results["weights"] = source
    print(f"{args.model} ({source}); held-out chunks {results['held_out_chunks']}")
    print(table(results))
    return 0


def _eval(args: argparse.Namespace) -> int:
    from moeoffload import predictors as P

    _, model, source, _ = build_model(args.suite, args.model, args.tier, args.device)
    held = P.RoutingTrace.load(args.trace)
    predictor: P.RoutingPredictor
    if args.kind == "sida":
        predictor = P.SidaPredictor.load(args.predictor, model)
    else:
        predictor = P.FrequencyPrior.load(args.predictor)
    per_layer = P.evaluate(predictor, held)
    print(table({args.kind: {"per_layer": per_layer, "mean": P.summary(per_layer)}}))
    return 0


def add_parser(sub) -> None:
    p = sub.add_parser("predictor", help="train and score routing predictors (SiDA, frequency prior)")
    psub = p.add_subparsers(dest="predictor_command", required=True)
    for name, func, helptext in (("train", _train, "record routing, train, score on a held-out split"),
                                 ("eval", _eval, "score a saved predictor on a saved trace")):
        q = psub.add_parser(name, help=helptext)
        q.add_argument("--suite", required=True, help="suite file or folder, e.g. suites/switch/suite.py")
        q.add_argument("--model", required=True, help="model name in the suite")
        q.add_argument("--tier", choices=("quick", "full"), default="quick")
        q.add_argument("--device", default=None)
        q.set_defaults(func=func)
        if name == "train":
            q.add_argument("--kind", action="append", choices=KINDS, help="repeatable; default both")
            q.add_argument("--batches", type=int, default=12, help="prompt batches recorded (default 12)")
            q.add_argument("--epochs", type=int, default=20)
            q.add_argument("--out", default="predictors", help="folder for traces, predictors, predictors.json")
        else:
            q.add_argument("--kind", choices=KINDS, default="sida")
            q.add_argument("--predictor", required=True, help="saved predictor file")
            q.add_argument("--trace", required=True, help="saved held-out routing trace")
