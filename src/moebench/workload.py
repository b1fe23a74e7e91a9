"""Workloads: seeded random prompts, greedy generation, per-token timestamps."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class Workload:
    batch_size: int = 2
    prompt_len: int = 16
    new_tokens: int = 8
    seed: int = 0

    def __post_init__(self) -> None:
        for field in ("batch_size", "prompt_len", "new_tokens"):
            value = getattr(self, field)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"Workload.{field} must be a positive int, got {value!r}")

    def as_dict(self) -> dict:
        return asdict(self)

    def prompts(self, vocab_size: int, low: int = 2, round_index: int = 0):
        """[batch_size, prompt_len] token ids in [low, vocab_size) (0, 1: pad, eos); the same for the same seed and
        round. Each round (and the warm-up, round -1) gets its own prompts, so a cache cannot pass a round by
        having seen its experts in the round before."""
        import torch

        if vocab_size <= low:
            raise ValueError(f"vocabulary of {vocab_size} tokens is too small for prompts")
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + round_index + 1)
        return torch.randint(low, vocab_size, (self.batch_size, self.prompt_len), generator=gen)


class TokenClock:
    """A logits processor that timestamps every decoding step; it never changes the scores.

    On CUDA each step records an event on the current stream (read after a synchronize); elsewhere it reads
    time.perf_counter(). `start()` marks the call to generate(); step latencies are the gaps between marks, so the
    first one also holds the prompt's prefill (the encoder, for encoder-decoder models).
    """

    def __init__(self, device) -> None:
        import torch

        self.cuda = torch.device(device).type == "cuda"
        self.marks: list = []

    def _mark(self):
        if self.cuda:
            import torch

            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def start(self) -> None:
        self.marks = [self._mark()]

    def __call__(self, input_ids, scores):
        self.marks.append(self._mark())
        return scores

    def step_seconds(self) -> list[float]:
        if self.cuda:
            import torch

            torch.cuda.synchronize()
            return [a.elapsed_time(b) / 1000.0 for a, b in zip(self.marks, self.marks[1:])]
        return [b - a for a, b in zip(self.marks, self.marks[1:])]


def generate(model, ids, new_tokens: int, clock: TokenClock | None = None):
    """Greedy generation of exactly `new_tokens` tokens; returns (sequences [B, new_tokens], logits [B, T, V])."""
    import torch
    from transformers import LogitsProcessorList

    processors = LogitsProcessorList([clock] if clock is not None else [])
    if clock is not None:
        clock.start()
    with torch.no_grad():
        out = model.generate(
            ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens, min_new_tokens=new_tokens,
            do_sample=False, num_beams=1, logits_processor=processors, return_dict_in_generate=True,
            output_logits=True,
        )
    tokens = out.sequences[:, -new_tokens:]
    logits = torch.stack(out.logits, dim=1)
    return tokens, logits


def percentile(values: list[float], q: float) -> float:
    """Linear-interpolated percentile, q in [0, 100]; nan for no values."""
    if not values:
        return float("nan")
    s = sorted(values)
    pos = (len(s) - 1) * q / 100.0
    lo = int(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)
