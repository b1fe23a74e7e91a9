"""How the suites name the engine's execution choices, and what a case reports it ran on.

The suites speak the engine's vocabulary: kernels "exact" (the per-expert loop in eager's order, bit-identical to the
unoffloaded eager model), "reference" (the grouped algorithm in plain torch), "triton" (grouped Triton kernels over
cache slots) or "auto"; fetch "host", "device" or "auto". `engine_options` is the one place that turns the options
into the arguments of `moeoffload.offload`/`switch`, and `resolved` the one place that reads back what a case ran on.
"""

from __future__ import annotations

import inspect

KERNELS = ("auto", "exact", "triton", "reference")
FETCHES = ("auto", "host", "device")

# Engines whose `offload(kernels=...)` defaults to "torch" name the kernels and their statistics the older way.
# This table and `_legacy_engine` go once the engine takes the names above (`moeoffload.ExecutionPlan`).
_LEGACY_KERNELS = {"exact": "torch", "reference": "grouped-torch", "triton": "triton", "auto": "auto"}
_LEGACY_RESOLVED = {"loop": "exact", "torch": "exact", "grouped-torch": "reference"}


def _legacy_engine() -> bool:
    import moeoffload

    return inspect.signature(moeoffload.offload).parameters["kernels"].default == "torch"


def serves_device_fetch(policy: str) -> bool:
    """Whether `policy` can fetch on the device (an LRU or next-use cache without a predictor, in today's engine)."""
    from moeoffload import offload as engine

    rule = getattr(engine, "device_fetch_serves", None)
    return True if rule is None else bool(rule(policy))


def engine_options(kernels: str, fetch: str, policy: str) -> dict[str, str]:
    """`kernels=` and `fetch=` for `moeoffload.offload`/`switch` serving `policy`.

    An explicit fetch="device" asks for the device path where the policy can take it; a policy that cannot (a
    predictor's cache) fetches on the host, so one suite option serves every case."""
    if kernels not in KERNELS:
        raise ValueError(f"kernels {kernels!r} is unknown; use one of {', '.join(KERNELS)}")
    if fetch not in FETCHES:
        raise ValueError(f"fetch {fetch!r} is unknown; use one of {', '.join(FETCHES)}")
    if fetch == "device" and (kernels == "exact" or not serves_device_fetch(policy)):
        fetch = "host"
    if _legacy_engine():
        # the older engine has no fetch="auto": the host path is what it chose by default
        return {"kernels": _LEGACY_KERNELS[kernels], "fetch": "host" if fetch == "auto" else fetch}
    return {"kernels": kernels, "fetch": fetch}


def kernels_name(value: str | None) -> str:
    """A record's kernels in the engine's current words (records of older engines say "loop" or "grouped-torch";
    records made before the field existed all ran the exact loop)."""
    if not value:
        return "exact"
    return "+".join(_LEGACY_RESOLVED.get(part, part) for part in value.split("+"))


def resolved(handle, stats) -> tuple[str, str]:
    """(kernels, fetch) a served case ran on: the handle's plan where the engine makes one, else its statistics."""
    plan = getattr(handle, "plan", None)
    if plan is not None:
        return str(plan.kernels), str(plan.fetch)
    return kernels_name(stats.kernels), str(stats.fetch)
