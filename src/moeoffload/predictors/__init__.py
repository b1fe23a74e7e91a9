"""Predictors guess which experts a layer will need before its router says so, and feed the prefetcher.

A prediction only decides what is copied early; the router still decides what is computed, so a policy built on
a predictor stays exact: a wrong guess costs bandwidth and a slot, never accuracy. (The one exception is a
policy declared approximate, such as `sida-data-aware`, whose predicted experts replace the router's.)

One module per predictor; each registers its prefetcher factory in `PREFETCHERS` (base.py).
"""

from .base import PREFETCHERS
from .lookahead import LookaheadGate

PREFETCHERS["lookahead"] = LookaheadGate

__all__ = ["PREFETCHERS", "LookaheadGate"]
