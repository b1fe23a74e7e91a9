"""Workloads: prompts (held-out text or seeded random ids), greedy generation, per-token timestamps, prefill and
decode timed apart, Poisson request arrivals served one at a time, and multiple-choice tasks from JSONL files."""

from __future__ import annotations

import json
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path

PROMPT_TEXTS = ("heldout", "synthetic")


@dataclass(frozen=True)
class Arrivals:
    """Request-arrival mode: `requests` single-sequence requests arriving as a Poisson process of `rate_per_s`
    (seeded exponential gaps), served one at a time in arrival order (first come, first served)."""

    rate_per_s: float
    requests: int = 16
    seed: int = 0

    def __post_init__(self) -> None:
        if not isinstance(self.rate_per_s, (int, float)) or not self.rate_per_s > 0:
            raise ValueError(f"Arrivals.rate_per_s must be > 0 requests per second, got {self.rate_per_s!r}")
        if not isinstance(self.requests, int) or self.requests < 1:
            raise ValueError(f"Arrivals.requests must be a positive int, got {self.requests!r}")

    def times(self) -> list[float]:
        """Arrival times in seconds from 0, increasing; the same for the same seed."""
        rng = random.Random(self.seed)
        t, out = 0.0, []
        for _ in range(self.requests):
            t += rng.expovariate(self.rate_per_s)
            out.append(t)
        return out


@dataclass(frozen=True)
class Workload:
    """What a suite runs: `rounds` batches of `batch_size` prompts of `prompt_len` tokens, `new_tokens` generated.

    Prompts are windows of held-out text (`text="heldout"`, moebench.corpus) when the model has a tokenizer,
    else seeded random ids. `eval_sequences` x `eval_len` tokens are scored teacher-forced for the accuracy figures
    (moebench.accuracy); `task` names a JSONL multiple-choice file; `arrivals` adds a latency run.
    """

    batch_size: int = 2
    prompt_len: int = 16
    new_tokens: int = 8
    seed: int = 0
    text: str = "heldout"
    eval_sequences: int = 4
    eval_len: int = 64
    task: str | None = None
    arrivals: Arrivals | None = None

    def __post_init__(self) -> None:
        for field in ("batch_size", "prompt_len", "new_tokens", "eval_sequences", "eval_len"):
            value = getattr(self, field)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"Workload.{field} must be a positive int, got {value!r}")
        if self.eval_len < 2:
            raise ValueError(f"Workload.eval_len must be at least 2 tokens, got {self.eval_len}")
        if self.text not in PROMPT_TEXTS:
            raise ValueError(f"Workload.text must be one of {PROMPT_TEXTS}, got {self.text!r}")
        if self.task is not None and not Path(self.task).is_file():
            raise ValueError(f"Workload.task {self.task!r} is not a file; give the path of a JSONL task file")
        if self.arrivals is not None and not isinstance(self.arrivals, Arrivals):
            raise ValueError(f"Workload.arrivals must be a moebench Arrivals, got {type(self.arrivals).__name__}")

    def as_dict(self) -> dict:
        return asdict(self)

    def uses_text(self, tokenizer) -> bool:
        return tokenizer is not None and self.text == "heldout"

    def prompts(self, vocab_size: int, low: int = 2, round_index: int = 0, tokenizer=None,
                batch_size: int | None = None):
        """[batch_size, prompt_len] token ids; the same for the same seed and round. Each round (and the warm-up,
        round -1) gets its own prompts, so a cache cannot pass a round by having seen its experts the round before.

        With a tokenizer (and text "heldout"): windows of the tokenized held-out text at seeded offsets. Without:
        random ids in [low, vocab_size) (0, 1: pad, eos).
        """
        import torch

        rows = self.batch_size if batch_size is None else batch_size
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + round_index + 1)
        if self.uses_text(tokenizer):
            ids = heldout_ids(tokenizer)
            span = ids.numel() - self.prompt_len
            if span < 1:
                raise ValueError(f"held-out text has {ids.numel()} tokens, fewer than prompt_len {self.prompt_len}")
            starts = torch.randint(0, span, (rows,), generator=gen).tolist()
            return torch.stack([ids[s:s + self.prompt_len] for s in starts])
        if vocab_size <= low:
            raise ValueError(f"vocabulary of {vocab_size} tokens is too small for prompts")
        return torch.randint(low, vocab_size, (rows, self.prompt_len), generator=gen)


_HELDOUT_IDS: dict = {}


def heldout_ids(tokenizer):
    """The held-out corpus text as one 1-D tensor of token ids (memoized per tokenizer)."""
    import torch

    from . import corpus

    key = (getattr(tokenizer, "name_or_path", ""), len(tokenizer), type(tokenizer).__name__)
    if key not in _HELDOUT_IDS:
        lines = corpus.split_text("heldout").splitlines(keepends=True)
        ids = tokenizer(lines, add_special_tokens=False)["input_ids"]
        _HELDOUT_IDS[key] = torch.tensor([t for line in ids for t in line], dtype=torch.long)
    return _HELDOUT_IDS[key]


def find_tokenizer(model):
    """The model's tokenizer when it has one: `model.moebench_tokenizer` if set, else a tokenizer saved in the
    folder the model was loaded from (local files only); None for synthetic weights. Memoized on the model."""
    if hasattr(model, "moebench_tokenizer"):
        return model.moebench_tokenizer
    tokenizer = None
    path = getattr(model, "name_or_path", "") or getattr(model.config, "_name_or_path", "")
    if path and (Path(path) / "tokenizer.json").is_file():
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    model.moebench_tokenizer = tokenizer
    return tokenizer


@dataclass(frozen=True)
class TaskItem:
    prompt: str
    choices: tuple[str, ...]
    answer: int


def load_task(path: str | Path) -> list[TaskItem]:
    """Multiple-choice items from a JSONL file, one `{"prompt": str, "choices": [str, ...], "answer": int}` a line
    (blank lines skipped). Choices are scored as continuations of the prompt: give them their leading space."""
    items = []
    for n, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        where = f"{path}:{n}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{where}: not JSON ({exc.msg}); one object a line") from None
        prompt, choices, answer = obj.get("prompt"), obj.get("choices"), obj.get("answer")
        if not isinstance(prompt, str) or not prompt:
            raise ValueError(f"{where}: 'prompt' must be a non-empty string")
        if not isinstance(choices, list) or len(choices) < 2 or not all(isinstance(c, str) and c for c in choices):
            raise ValueError(f"{where}: 'choices' must be a list of at least 2 non-empty strings")
        if not isinstance(answer, int) or isinstance(answer, bool) or not 0 <= answer < len(choices):
            raise ValueError(f"{where}: 'answer' must be the index of the right choice, 0..{len(choices) - 1}")
        items.append(TaskItem(prompt, tuple(choices), answer))
    if not items:
        raise ValueError(f"{path}: no task items")
    return items


class TokenClock:
    """A logits processor that timestamps every decoding step; it never changes the scores.

    On CUDA each step records an event on the current stream (read after a synchronize); elsewhere it reads
    time.perf_counter(). `start()` marks the call to generate(); step latencies are the gaps between marks, so the
    first one also holds the prompt's prefill (the encoder, for encoder-decoder models).

    `pause`, when given, is called after every step's mark (an interleaved A/B run hands the floor to the other
    process there: `moebench.turns`); the next step is then timed from a fresh mark taken when `pause` returns, so
    a step's latency never includes the time spent paused.
    """

    def __init__(self, device, pause=None) -> None:
        import torch

        self.cuda = torch.device(device).type == "cuda"
        self.pause = pause
        self.starts: list = []
        self.ends: list = []

    def _mark(self):
        if self.cuda:
            import torch

            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def start(self) -> None:
        self.starts, self.ends = [self._mark()], []

    def __call__(self, input_ids, scores):
        self.ends.append(self._mark())
        if self.pause is not None:
            if self.cuda:
                import torch

                torch.cuda.synchronize()  # this step's work is done before the other side's starts
            self.pause()
            self.starts.append(self._mark())
        else:
            self.starts.append(self.ends[-1])
        return scores

    def step_seconds(self) -> list[float]:
        if self.cuda:
            import torch

            torch.cuda.synchronize()
            return [a.elapsed_time(b) / 1000.0 for a, b in zip(self.starts, self.ends)]
        return [b - a for a, b in zip(self.starts, self.ends)]


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


def phase_metrics(round_steps: list[list[float]], batch_size: int, prompt_len: int) -> dict:
    """Prefill and decode apart, from each round's step latencies (TokenClock): the first step of a round is the
    prompt's prefill plus its first token (time to first token); the others are decode steps."""
    ttft = [steps[0] for steps in round_steps if steps]
    decode = [s for steps in round_steps for s in steps[1:]]
    return {
        "ttft_ms": percentile(ttft, 50) * 1e3,
        "prefill_tokens_per_s": batch_size * prompt_len * len(ttft) / sum(ttft) if ttft else float("nan"),
        "decode_tokens_per_s": batch_size * len(decode) / sum(decode) if decode else float("nan"),
        "decode_p50_ms": percentile(decode, 50) * 1e3,
        "decode_p90_ms": percentile(decode, 90) * 1e3,
        "decode_p99_ms": percentile(decode, 99) * 1e3,
    }


def queue_latencies(arrivals: list[float], service: list[float]) -> tuple[list[float], list[float]]:
    """One server, first come first served: request i starts at max(its arrival, the previous finish).
    Returns (latency = finish - arrival, queueing delay = start - arrival) per request."""
    if len(arrivals) != len(service):
        raise ValueError(f"{len(arrivals)} arrivals but {len(service)} service times")
    free_at, latency, waited = 0.0, [], []
    for t, s in zip(arrivals, service):
        start = max(t, free_at)
        free_at = start + s
        latency.append(free_at - t)
        waited.append(start - t)
    return latency, waited


def serve_arrivals(model, workload: Workload, device, tokenizer=None) -> dict:
    """The request-arrival run: each request (one prompt) is generated on its own and timed; latencies follow
    from the seeded arrival times by replaying the single-server queue on the measured service times, which is
    what sequential serving gives when a request's service time does not depend on idle gaps (no sleeping)."""
    import torch

    arr = workload.arrivals
    if arr is None:
        raise ValueError("serve_arrivals needs a workload with arrivals=Arrivals(...)")
    cuda = torch.device(device).type == "cuda"
    service, ttft = [], []
    for i in range(arr.requests):
        ids = workload.prompts(model.config.vocab_size, round_index=10_000 + i, tokenizer=tokenizer,
                               batch_size=1).to(device)
        clock = TokenClock(device)
        if cuda:
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        generate(model, ids, workload.new_tokens, clock)
        if cuda:
            torch.cuda.synchronize(device)
        service.append(time.perf_counter() - t0)
        ttft.append(clock.step_seconds()[0])
    times = arr.times()
    latency, waited = queue_latencies(times, service)
    first_token = [w + f for w, f in zip(waited, ttft)]
    return {
        "rate_per_s": arr.rate_per_s,
        "requests": arr.requests,
        "latency_p50_ms": percentile(latency, 50) * 1e3,
        "latency_p90_ms": percentile(latency, 90) * 1e3,
        "latency_p99_ms": percentile(latency, 99) * 1e3,
        "ttft_p50_ms": percentile(first_token, 50) * 1e3,
        "ttft_p99_ms": percentile(first_token, 99) * 1e3,
        "mean_queue_ms": sum(waited) / len(waited) * 1e3,
        "utilization": min(1.0, sum(service) / max(times[-1] + latency[-1], 1e-12)),
    }


def percentile(values: list[float], q: float) -> float:
    """Linear-interpolated percentile, q in [0, 100]; nan for no values."""
    if not values:
        return float("nan")
    s = sorted(values)
    pos = (len(s) - 1) * q / 100.0
    lo = int(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)
