"""The registries of predictors by name: `PREFETCHERS` (per-layer prefetchers a policy names in `prefetch=`) and
`PREDICTORS` (how a whole-stack predictor a policy names in `predictor=` is obtained), with the built-in ones.

Policies validate their names here and the engine builds from here; both import this module, never the package,
so that the predictors' preparation (which runs the engine) stays above the engine. Other packages add entries
before they build a `Policy` that names them."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .expertflow import ExpertFlowPredictor
from .frequency import FrequencyPrior
from .lookahead import LookaheadGate
from .sida import SidaPredictor

PREFETCHERS: dict = {}  # name -> factory(cache, router_weight, next_layer, top_k): per-layer prefetchers (lookahead)


@dataclass(frozen=True)
class PredictorKind:
    """How a policy's predictor is obtained. `needs`: "training-trace" (trained or fitted on a RoutingTrace of a
    workload distinct from the served one) or "exact-trace" (a CallTrace of the very inputs served: bounds only).
    `build(model, trace, **options)` returns the predictor (or, for exact traces, the trace itself)."""

    name: str
    needs: str
    build: Callable[..., Any]


PREDICTORS: dict[str, PredictorKind] = {}


def _train_sida(model, trace, show_progress=None, epochs: int = 20, **options):
    return SidaPredictor.create(model, trace, **options).train(trace, epochs=epochs, show_progress=show_progress)


def _fit_frequency(model, trace, show_progress=None, **options):
    return FrequencyPrior.fit(trace)


def _train_expertflow(model, trace, show_progress=None, steps: int = 300, **options):
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    return ExpertFlowPredictor.train(trace, steps=steps, device=device, show_progress=show_progress, **options)


def _exact(model, trace, **options):
    return trace


PREFETCHERS["lookahead"] = LookaheadGate
PREDICTORS["sida"] = PredictorKind("sida", "training-trace", _train_sida)
PREDICTORS["frequency"] = PredictorKind("frequency", "training-trace", _fit_frequency)
PREDICTORS["expertflow"] = PredictorKind("expertflow", "training-trace", _train_expertflow)
PREDICTORS["oracle"] = PredictorKind("oracle", "exact-trace", _exact)
