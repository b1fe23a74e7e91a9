"""The registry of prefetchers: name -> factory building the per-model callable the layers call."""

from __future__ import annotations

PREFETCHERS: dict = {}
