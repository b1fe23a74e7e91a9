"""Errors raised where bad input enters the engine; every message names the problem and the fix."""


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
