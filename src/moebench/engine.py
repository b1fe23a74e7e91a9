"""How the suites name the engine's execution choices, and what a case reports it ran on.

The suites speak the engine's vocabulary (`moeoffload.plan`): kernels "exact" (the per-expert loop in eager's order,
bit-identical to the unoffloaded eager model), "reference" (the grouped algorithm in plain torch), "triton" (grouped
Triton kernels over cache slots) or "auto"; fetch "host", "device" or "auto". `engine_options` is the one place that
turns the options into the arguments of `moeoffload.offload`/`switch`, and `resolved` the one place that reads back
what a case ran on.
"""

from __future__ import annotations

KERNELS = ("auto", "exact", "triton", "reference")
FETCHES = ("auto", "host", "device")
# what stored records of older engines call the kernels ("loop", "torch": the exact loop)
_OLDER_NAMES = {"loop": "exact", "torch": "exact", "grouped-torch": "reference"}


def engine_options(kernels: str, fetch: str, policy: str) -> dict[str, str]:
    """`kernels=` and `fetch=` for `moeoffload.offload`/`switch` serving `policy`.

    An explicit fetch="device" asks for the device path where the policy can take it; a policy that cannot (a
    predictor's cache) fetches on the host, so one suite option serves every case."""
    from moeoffload.plan import device_fetch_serves

    if kernels not in KERNELS:
        raise ValueError(f"kernels {kernels!r} is unknown; use one of {', '.join(KERNELS)}")
    if fetch not in FETCHES:
        raise ValueError(f"fetch {fetch!r} is unknown; use one of {', '.join(FETCHES)}")
    if fetch == "device" and (kernels == "exact" or not device_fetch_serves(policy)):
        fetch = "host"
    return {"kernels": kernels, "fetch": fetch}


def kernels_name(value: str | None) -> str:
    """A record's kernels in the engine's current words (records made before the field existed ran the exact loop)."""
    if not value:
        return "exact"
    return "+".join(_OLDER_NAMES.get(part, part) for part in value.split("+"))


def resolved(handle) -> tuple[str, str]:
    """(kernels, fetch) a served case ran on: the handle's plan."""
    return str(handle.plan.kernels), str(handle.plan.fetch)
