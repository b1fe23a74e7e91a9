"""GPU budgets: how many bytes of expert weights the engine may keep on the device.

A budget is written as bytes with a binary unit ("2GiB", "512MiB", "1.5GiB"), as a share of all the model's
expert bytes ("25%"), or as "all". Decimal units ("2GB") are refused on purpose: the difference between GB and
GiB is 7% at this scale, which is larger than the regressions the suites look for.
"""

from __future__ import annotations

import re

from .errors import BudgetError

_BINARY_UNITS = {"B": 1, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}
_DECIMAL_UNITS = {"KB", "MB", "GB", "TB"}
_PATTERN = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([A-Za-z%]*)\s*$")


def parse_budget(budget: str | int | float, total_expert_bytes: int | None = None) -> int:
    """Return the budget in bytes. `total_expert_bytes` is needed for "25%" and "all"."""
    if isinstance(budget, bool):
        raise BudgetError(f"GPU budget {budget!r} is not a size; write bytes with a unit, e.g. '2GiB', or '25%'")
    if isinstance(budget, (int, float)):
        if budget <= 0:
            raise BudgetError(f"GPU budget {budget!r} must be positive; write e.g. '2GiB' or '25%'")
        return int(budget)
    if not isinstance(budget, str):
        raise BudgetError(f"GPU budget {budget!r} is a {type(budget).__name__}; write e.g. '2GiB' or '25%'")
    text = budget.strip()
    if text.lower() == "all":
        return _need_total(budget, total_expert_bytes)
    if text.startswith("-"):
        raise BudgetError(f"GPU budget {budget!r} is negative; write a positive size such as '2GiB' or '25%'")
    match = _PATTERN.match(text)
    if not match:
        raise BudgetError(f"GPU budget {budget!r} is not a size; write e.g. '2GiB', '512MiB', '25%' or 'all'")
    number, unit = float(match.group(1)), match.group(2).upper()
    if number <= 0:
        raise BudgetError(f"GPU budget {budget!r} must be positive; write e.g. '2GiB' or '25%'")
    if unit == "%":
        if number > 100:
            raise BudgetError(f"GPU budget {budget!r} is over 100% of the experts; use at most '100%' (or 'all')")
        return int(_need_total(budget, total_expert_bytes) * number / 100)
    if unit == "":
        n = match.group(1)
        raise BudgetError(f"GPU budget {budget!r} has no unit; write '{n}GiB', '{n}MiB' or '{n}B'")
    if unit in _DECIMAL_UNITS:
        binary = unit[0] + "iB"
        raise BudgetError(
            f"GPU budget {budget!r} uses a decimal unit; write '{match.group(1)}{binary}' "
            f"(binary, 2^{ {'K': 10, 'M': 20, 'G': 30, 'T': 40}[unit[0]] } bytes) as the suites do"
        )
    if unit not in _BINARY_UNITS:
        raise BudgetError(f"GPU budget {budget!r} has an unknown unit {match.group(2)!r}; use B, KiB, MiB, GiB or TiB")
    return int(number * _BINARY_UNITS[unit])


def _need_total(budget: str, total: int | None) -> int:
    if total is None:
        raise BudgetError(f"GPU budget {budget!r} is relative; it needs the model's expert bytes to resolve")
    return total


def format_bytes(n: float) -> str:
    """Bytes as the suites write them: binary units, three significant figures."""
    for unit, scale in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= scale:
            return f"{n / scale:.3g}{unit}"
    return f"{int(n)}B"
