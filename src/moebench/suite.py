"""Suites as data: which models, budgets, policies, workload and accuracy limit a benchmark suite covers.

A suite file (`suites/<name>/suite.py`) defines `SUITE = Suite(...)`; `load_suite(path)` imports it and
`Suite.cases(...)` expands it into cases. Every mistake in a suite is reported as one SuiteError naming the file.
"""

from __future__ import annotations

import importlib.util
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .workload import Workload

TIERS = ("quick", "full")
REFERENCE_POLICY = "resident"
REFERENCE_BUDGET = "all"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$")


class SuiteError(ValueError):
    """A suite file or definition that cannot be run as written."""


@dataclass(frozen=True)
class ModelSpec:
    """A model of a suite. `build(tier, dtype, device)` returns (model, source description)."""

    name: str
    build: Callable[[str, Any, Any], tuple[Any, str]]
    description: str = ""
    tiers: tuple[str, ...] = TIERS  # the tiers that run this model (a large model may be full-tier only)


@dataclass(frozen=True)
class Case:
    model: str
    policy: str
    budget: str

    @property
    def name(self) -> str:
        return f"{self.model}[{self.policy}-{self.budget}]"

    @property
    def is_reference(self) -> bool:
        return self.policy == REFERENCE_POLICY


@dataclass
class Suite:
    name: str
    models: list[ModelSpec]
    budgets: list[str]
    workload: Workload
    policies: list[str] | None = None  # None: every registered policy
    accuracy_limit: float = 0.0  # largest accuracy drop (reference - policy metric, moebench.accuracy) allowed
    dtypes: dict[str, str] = field(default_factory=lambda: {"quick": "float32", "full": "bfloat16"})
    full_workload: Workload | None = None  # the full tier's workload, when it should differ from the quick one
    full_budgets: list[str] | None = None  # the full tier's budgets, when fewer fit a device call's time

    def budgets_for(self, tier: str) -> list[str]:
        return self.full_budgets if tier == "full" and self.full_budgets else self.budgets

    def workload_for(self, tier: str) -> Workload:
        return self.full_workload if tier == "full" and self.full_workload is not None else self.workload

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        def bad(msg: str) -> SuiteError:
            return SuiteError(f"suite {self.name!r}: {msg}")

        if not isinstance(self.name, str) or not _NAME.match(self.name):
            raise SuiteError(f"suite name {self.name!r} must be a non-empty word (letters, digits, '-', '_', '.')")
        if not self.models:
            raise bad("no models; give at least one ModelSpec")
        names = [m.name for m in self.models]
        for m in self.models:
            if not isinstance(m, ModelSpec):
                raise bad(f"models must be ModelSpec objects, got {type(m).__name__}")
            if not _NAME.match(m.name):
                raise bad(f"model name {m.name!r} is not a plain word")
            if not callable(m.build):
                raise bad(f"model {m.name!r}: build is not callable")
        if len(set(names)) != len(names):
            raise bad(f"duplicate model names in {names}")
        if not self.budgets:
            raise bad("no budgets; give at least one, e.g. ['25%', '50%']")
        from moeoffload import BudgetError, parse_budget

        for b in self.budgets + (self.full_budgets or []):
            if not isinstance(b, str):
                raise bad(f"budget {b!r} must be a string such as '25%' or '2GiB'")
            try:
                parse_budget(b, 1 << 40)
            except BudgetError as exc:
                raise bad(str(exc)) from None
        if len(set(self.budgets)) != len(self.budgets):
            raise bad(f"duplicate budgets in {self.budgets}")
        if self.policies is not None and (not self.policies or not all(isinstance(p, str) for p in self.policies)):
            raise bad("policies must be None (every registered policy) or a non-empty list of names")
        if not isinstance(self.workload, Workload):
            raise bad(f"workload must be a moebench Workload, got {type(self.workload).__name__}")
        if not isinstance(self.accuracy_limit, (int, float)) or not 0.0 <= self.accuracy_limit <= 1.0:
            raise bad(f"accuracy_limit must be in [0, 1], got {self.accuracy_limit!r}")
        for tier in TIERS:
            if tier not in self.dtypes:
                raise bad(f"dtypes has no entry for tier {tier!r}")

    def policy_names(self, selected: list[str] | None = None) -> list[str]:
        """The suite's policies (all registered when None), narrowed to `selected`; unknown names raise."""
        import moeoffload

        available = moeoffload.available_policies()
        names = list(available) if self.policies is None else list(self.policies)
        unknown = [p for p in names if p not in available]
        if unknown:
            raise SuiteError(f"suite {self.name!r}: unknown policies {unknown}; available: {', '.join(available)}")
        if selected:
            names = [p for p in names if p in selected]
        return names

    def cases(self, selected_policies: list[str] | None = None, tier: str = "quick") -> list[Case]:
        """Per model: the reference (resident, all) first, then every other policy at every budget.

        The reference is always a case: every other case is compared with it, so it runs anyway.
        """
        import moeoffload

        out: list[Case] = []
        for model in self.models:
            if tier not in model.tiers:
                continue
            out.append(Case(model.name, REFERENCE_POLICY, REFERENCE_BUDGET))
            for policy in self.policy_names(selected_policies):
                if policy == REFERENCE_POLICY or moeoffload.get_policy(policy).preload:
                    continue  # preloading policies need 'all': they are references, not budget sweeps
                out.extend(Case(model.name, policy, b) for b in self.budgets_for(tier))
        return out

    def model(self, name: str) -> ModelSpec:
        for m in self.models:
            if m.name == name:
                return m
        raise KeyError(name)


def load_suite(path: str | Path) -> Suite:
    """Import a suite file and return its SUITE."""
    path = Path(path).resolve()
    mod_name = f"moebench_suite_{abs(hash(str(path))):x}"
    spec = importlib.util.spec_from_file_location(mod_name, path)
    if spec is None or spec.loader is None:
        raise SuiteError(f"{path}: cannot be imported as a Python file")
    module = importlib.util.module_from_spec(spec)
    sys.modules[mod_name] = module
    try:
        spec.loader.exec_module(module)
    except SuiteError as exc:
        raise SuiteError(f"{path}: {exc}") from None
    except Exception as exc:
        raise SuiteError(f"{path}: importing the suite failed: {type(exc).__name__}: {exc}") from exc
    suite = getattr(module, "SUITE", None)
    if suite is None:
        raise SuiteError(f"{path}: defines no SUITE; add SUITE = moebench.suite.Suite(...)")
    if not isinstance(suite, Suite):
        raise SuiteError(f"{path}: SUITE is a {type(suite).__name__}, not a moebench.suite.Suite")
    return suite
