"""Predictors guess which experts a layer will need before its router says so, and feed the prefetcher.

A prediction only decides what is copied early; the router still decides what is computed, so a policy built on
a predictor stays exact: a wrong guess costs bandwidth and a slot, never accuracy. (The one exception is a
policy declared approximate, such as `sida-data-aware`, whose predicted experts replace the router's.)

One module per predictor. Per-layer prefetchers (lookahead) register in `PREFETCHERS`; predictors that guess a
whole stack from its token ids implement `RoutingPredictor` (base.py), run under `RunAhead` (runahead.py) and
register how they are obtained in `PREDICTORS`; `prepare()` obtains them for a policy.
"""

from .base import PREDICTORS, PREFETCHERS, Prediction, PredictorKind, RoutingPredictor, StackInputs
from .evaluate import RandomPredictor, evaluate, summary
from .expertflow import ExpertFlowPredictor, ExpertFlowRunAhead
from .frequency import FrequencyPrior
from .lookahead import LookaheadGate
from .oracle import OracleReplay
from .prepare import needs, prepare
from .runahead import RunAhead
from .sida import SidaPredictor
from .traces import CallTrace, RoutingTrace, collect_trace, record_calls


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

__all__ = [
    "CallTrace", "ExpertFlowPredictor", "ExpertFlowRunAhead",
    "FrequencyPrior", "LookaheadGate", "OracleReplay", "PREDICTORS", "PREFETCHERS", "Prediction",
    "PredictorKind", "RandomPredictor", "RoutingPredictor", "RoutingTrace", "RunAhead", "SidaPredictor",
    "StackInputs", "collect_trace", "evaluate", "needs", "prepare", "record_calls", "summary",
]
