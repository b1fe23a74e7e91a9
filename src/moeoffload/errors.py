"""Errors raised where bad input enters the engine; every message names the problem and the fix."""

from __future__ import annotations


class MoeOffloadError(Exception):
    """Base class of every error the engine raises on purpose."""


class BudgetError(MoeOffloadError, ValueError):
    """A GPU budget that is malformed, too small for the model, or larger than the device."""


class UnknownPolicyError(MoeOffloadError, KeyError):
    """A policy name that no registered policy carries."""

    def __str__(self) -> str:  # KeyError quotes its message; keep it one readable line.
        return str(self.args[0]) if self.args else ""


class UnsupportedModelError(MoeOffloadError, TypeError):
    """A model whose MoE layers the engine has no hook for."""


class NotOffloadedError(MoeOffloadError, RuntimeError):
    """unload() or stats on a model that is not (or no longer) offloaded."""


class HostMemoryError(MoeOffloadError, MemoryError):
    """Host memory for the experts that could not be allocated or page-locked."""


class PolicyContractError(MoeOffloadError):
    """A plug-in part of a policy (an eviction rule, a prefetcher, a policy factory) broke its contract with the
    engine: the message names the part, what it did and what it must do. `policy` is the policy's name where the
    raiser knows it; `for_policy` names it once the caller does (the cache knows its rule, not the policy)."""

    def __init__(self, problem: str, policy: str | None = None):
        super().__init__(problem, policy)
        self.problem, self.policy = problem, policy

    def __str__(self) -> str:
        return self.problem if self.policy is None else f"policy {self.policy!r}: {self.problem}"

    def for_policy(self, policy: str) -> PolicyContractError:
        """This error with `policy` named (unchanged when it already names one)."""
        return self if self.policy is not None else PolicyContractError(self.problem, policy)
