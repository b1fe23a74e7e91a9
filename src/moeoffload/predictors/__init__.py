"""Predictors guess which experts a layer will need before its router says so, and feed the prefetcher.

A prediction only decides what is copied early; the router still decides what is computed, so a policy built on
a predictor stays exact: a wrong guess costs bandwidth and a slot, never accuracy. (The one exception is a
policy declared approximate, such as `sida-data-aware`, whose predicted experts replace the router's.)

One module per predictor. Per-layer prefetchers (lookahead) register in `PREFETCHERS`; predictors that guess a
whole stack from its token ids implement `RoutingPredictor` (base.py), run under `RunAhead` (runahead.py) and
register how they are obtained in `PREDICTORS`; `prepare()` obtains them for a policy.
"""

from .base import Prediction, RoutingPredictor, StackInputs
from .evaluate import RandomPredictor, evaluate, summary
from .expertflow import ExpertFlowPredictor, ExpertFlowRunAhead
from .frequency import FrequencyPrior
from .lookahead import LookaheadGate
from .oracle import OracleReplay
from .prepare import needs, prepare
from .recording import collect_trace, record_calls
from .registry import PREDICTORS, PREFETCHERS, PredictorKind
from .runahead import RunAhead
from .sida import SidaPredictor
from .traces import CallTrace, RoutingTrace

__all__ = [
    "CallTrace", "ExpertFlowPredictor", "ExpertFlowRunAhead",
    "FrequencyPrior", "LookaheadGate", "OracleReplay", "PREDICTORS", "PREFETCHERS", "Prediction",
    "PredictorKind", "RandomPredictor", "RoutingPredictor", "RoutingTrace", "RunAhead", "SidaPredictor",
    "StackInputs", "collect_trace", "evaluate", "needs", "prepare", "record_calls", "summary",
]
