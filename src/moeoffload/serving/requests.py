"""What a client hands the serving loop (Request) and what it gets back (Result, TokenEvent).

A request is a prompt of token ids, how many tokens to generate, and when it arrives (seconds on the loop's
clock; 0 for an offline batch). Bad requests are refused where they enter: `Request` raises on a malformed field,
and the loop turns a request it can never serve (an empty prompt, more KV than the budget) into a failed Result,
so the other requests of the batch still finish.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field

import torch


@dataclass(frozen=True)
class Request:
    """One generation request. `prompt`: token ids (a list or a 1-D tensor); greedy decoding of up to
    `max_new_tokens` tokens (fewer when an end-of-sequence token comes); `arrival`: seconds on the loop's clock."""

    id: Hashable
    prompt: tuple[int, ...]
    max_new_tokens: int
    arrival: float = 0.0

    def __init__(self, id: Hashable, prompt: Sequence[int] | torch.Tensor, max_new_tokens: int, arrival: float = 0.0):
        if isinstance(prompt, torch.Tensor):
            if prompt.dim() != 1:
                raise ValueError(f"request {id!r}: prompt is a tensor of shape {tuple(prompt.shape)}; pass one "
                                 "sequence of token ids (1-D), one request per sequence")
            prompt = prompt.tolist()
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
            raise ValueError(f"request {id!r}: max_new_tokens must be an int >= 0, got {max_new_tokens!r}")
        if not arrival >= 0:  # also refuses NaN
            raise ValueError(f"request {id!r}: arrival must be a time >= 0 in seconds, got {arrival!r}")
        object.__setattr__(self, "id", id)
        object.__setattr__(self, "prompt", tuple(int(t) for t in prompt))
        object.__setattr__(self, "max_new_tokens", max_new_tokens)
        object.__setattr__(self, "arrival", float(arrival))

    @property
    def kv_tokens(self) -> int:
        """KV entries the request holds at its longest: the prompt and every generated token but the last."""
        return len(self.prompt) + max(self.max_new_tokens - 1, 0)


@dataclass(frozen=True)
class TokenEvent:
    """One generated token, as the loop streams it; `index` counts the request's tokens from 0."""

    request_id: Hashable
    token: int
    index: int
    time: float


@dataclass
class Result:
    """A request's outcome. `status` is "finished" or "failed" (then `error` says why and how to fix it).
    Times are on the loop's clock: `first_token` None when no token came."""

    request_id: Hashable
    status: str
    tokens: list[int] = field(default_factory=list)
    error: str | None = None
    arrival: float = 0.0
    admitted: float | None = None
    first_token: float | None = None
    finished: float | None = None
    token_times: list[float] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.status == "finished"

    @property
    def ttft(self) -> float | None:
        """Time to first token: arrival to the first generated token (queueing and prefill included)."""
        return None if self.first_token is None else self.first_token - self.arrival

    @property
    def tpot(self) -> float | None:
        """Time per output token after the first: (last token - first token) / (tokens - 1); None under 2 tokens."""
        if len(self.token_times) < 2:
            return None
        return (self.token_times[-1] - self.token_times[0]) / (len(self.token_times) - 1)
