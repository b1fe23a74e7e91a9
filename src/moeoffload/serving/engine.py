"""The serving loop: many requests through one (offloaded) model, continuous batching, chunked prefill.

Each iteration of the loop: requests that have arrived queue; queued requests are admitted first-come while
their KV reservation fits the budget (`kv.py`); one request advances its prefill by up to `prefill_chunk` tokens;
one group of decoding requests, chosen by the scheduler (`schedulers.py`), generates one token each. A finished
request frees its KV at once and the next queued one is admitted: continuous batching.

Greedy decoding only. Exactness: a request's tokens are what `model.generate()` gives it alone, when the model's
arithmetic does not depend on batch mates and padding (fp32 on a CPU: tested); prefill chunks and decode groups
change GEMM shapes, which on a GPU in bf16 may flip a near-tie, as batching does in transformers itself.

Nothing is lost: every request yields exactly one Result. A request that can never run (empty prompt, KV over the
whole budget) fails at arrival with the reason; a forward that raises fails the requests it carried, and the
others go on; a scheduler that raises or returns a bad plan is replaced by first-come for that round (counted in
`ServingRun.scheduler_errors`, with a warning).
"""

from __future__ import annotations

import inspect
import warnings
from collections import deque
from collections.abc import Callable, Hashable, Iterable, Iterator
from dataclasses import dataclass, field

import torch

from .clock import WallClock
from .kv import KVBudget, SequenceKV, append_column, batched_cache, kv_budget_tokens
from .requests import Request, Result, TokenEvent
from .schedulers import ExpertFlow, FirstCome, Scheduler, SequenceView, check_plan, for_handle, predictor_of


@dataclass(frozen=True)
class StepRecord:
    """One forward of the loop. `experts`: distinct (layer, expert) pairs the step asked the expert cache for
    (cache hits + misses); `h2d_bytes`: bytes it copied to the device; both None when the model is not offloaded."""

    kind: str  # "prefill" or "decode"
    requests: tuple[Hashable, ...]
    tokens: int
    start: float
    end: float
    experts: int | None = None
    h2d_bytes: int | None = None


@dataclass
class ServingRun:
    """A run's outcome: one Result per request, in the order the requests were given, and every step."""

    results: list[Result]
    steps: list[StepRecord]
    scheduler: str
    kv_budget_tokens: int | None
    scheduler_errors: list[str] = field(default_factory=list)


@dataclass
class _Active:
    request: Request
    result: Result
    kv: SequenceKV
    prefilled: int = 0

    @property
    def decoding(self) -> bool:
        return self.prefilled == len(self.request.prompt)

    def view(self) -> SequenceView:
        return SequenceView(self.request.id, self.request.arrival, self.request.prompt + tuple(self.result.tokens))


class Server:
    """Serve requests through `model` (offloaded or not). `scheduler`: "auto" (ExpertFlow when the offloaded
    model's policy schedules, else first-come), "first-come", or a Scheduler. `kv_budget`: tokens (int), bytes of
    KV ("2GiB"), or None (no limit). `max_batch`: requests per decode step. `prefill_chunk`: prompt tokens per
    step. `eos_token_id`: "model" (the generation config's), None, an id or ids. `clock`: WallClock by default."""

    def __init__(self, model, *, scheduler: str | Scheduler = "auto", kv_budget: int | str | None = None,
                 max_batch: int = 16, prefill_chunk: int = 512, eos_token_id="model", clock=None):
        for name, value in (("max_batch", max_batch), ("prefill_chunk", prefill_chunk)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if getattr(model.config, "is_encoder_decoder", False):
            raise ValueError("the serving loop serves decoder-only models; an encoder-decoder (Switch) is served "
                             "by model.generate() on whole batches")
        self.model = model
        self.handle = getattr(model, "_moeoffload", None)
        self.scheduler = _resolve_scheduler(scheduler, self.handle)
        self.kv_limit = kv_budget_tokens(kv_budget, model.config, next(model.parameters()).dtype)
        self.max_batch = max_batch
        self.prefill_chunk = prefill_chunk
        self.eos = _eos_ids(model, eos_token_id)
        self.clock = clock if clock is not None else WallClock()
        self.device = next(model.parameters()).device
        # transformers renamed the forward's `past_key_values` to `cache` (the old name warns until 5.40)
        self.cache_kwarg = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"

    def run(self, requests: Iterable[Request], on_token: Callable[[TokenEvent], None] | None = None) -> ServingRun:
        """Serve every request to its end; `on_token` sees each token as it is generated."""
        requests = list(requests)
        results: dict[Hashable, Result] = {}
        steps: list[StepRecord] = []
        errors: list[str] = []
        for event in self._loop(requests, steps, errors):
            if isinstance(event, TokenEvent):
                if on_token is not None:
                    on_token(event)
            else:
                results[event.request_id] = event
        return ServingRun([results[r.id] for r in requests], steps, self.scheduler.name, self.kv_limit, errors)

    def stream(self, requests: Iterable[Request]) -> Iterator[TokenEvent | Result]:
        """Each token (TokenEvent) as it is generated and each request's Result as it ends."""
        return self._loop(list(requests), [], [])

    # -- the loop ----------------------------------------------------------------------------------------------
    def _loop(self, requests: list[Request], steps: list[StepRecord], errors: list[str]):
        _check_requests(requests)
        pending = deque(sorted(requests, key=lambda r: r.arrival))  # sorted() is stable: ties keep their order
        queued: deque[Request] = deque()
        active: dict[Hashable, _Active] = {}
        budget = KVBudget(self.kv_limit)
        self._round: deque[list[Hashable]] = deque()
        self.clock.start()
        while pending or queued or active:
            now = self.clock.now()
            while pending and pending[0].arrival <= now:
                request = pending.popleft()
                refused = self._refuse(request, budget, now)
                if refused is not None:
                    yield refused
                else:
                    queued.append(request)
            while queued and budget.fits(queued[0].kv_tokens):
                request = queued.popleft()
                budget.reserve(request.kv_tokens)
                result = Result(request.id, "running", arrival=request.arrival, admitted=now)
                active[request.id] = _Active(request, result, SequenceKV(request.kv_tokens))
            if not active:  # nothing to run: wait for the next arrival (queued requests always fit an empty budget)
                if pending:
                    self.clock.sleep_until(pending[0].arrival)
                continue
            prefilling = next((a for a in active.values() if not a.decoding), None)
            if prefilling is not None:
                yield from self._step([prefilling], active, budget, steps)
            ready = [a for a in active.values() if a.decoding]
            if ready:
                group = self._next_group(ready, errors)
                yield from self._step([active[i] for i in group], active, budget, steps)

    def _refuse(self, request: Request, budget: KVBudget, now: float) -> Result | None:
        """The Result of a request that cannot or need not run (at its arrival), or None to queue it."""
        reason = None
        if not request.prompt:
            reason = "empty prompt: a request needs at least one prompt token (a BOS token, say)"
        elif (too_big := budget.never_fits(request.kv_tokens)) is not None:
            reason = too_big
        if reason is not None:
            return Result(request.id, "failed", error=reason, arrival=request.arrival, finished=now)
        if request.max_new_tokens == 0:
            return Result(request.id, "finished", arrival=request.arrival, admitted=now, finished=now)
        return None

    def _next_group(self, ready: list[_Active], errors: list[str]) -> list[Hashable]:
        """The next group of the current round; a new round is planned when the last one is spent."""
        ids = {a.request.id for a in ready}
        while self._round:
            group = [i for i in self._round.popleft() if i in ids]
            if group:
                return group
        pool = [a.view() for a in ready]
        try:
            plan = check_plan(self.scheduler.plan(pool, self.max_batch), pool, self.max_batch)
        except Exception as exc:
            message = f"scheduler {self.scheduler.name!r} failed ({type(exc).__name__}: {exc}); first-come served"
            if not errors:
                warnings.warn(f"moeoffload.serving: {message} (this warning shows once per run)", RuntimeWarning,
                              stacklevel=2)
            errors.append(message)
            plan = FirstCome().plan(pool, self.max_batch)
        self._round = deque(plan)
        return self._round.popleft()

    def _step(self, group: list[_Active], active: dict, budget: KVBudget, steps: list[StepRecord]):
        """One forward for `group` (a prefill chunk of one request, or a decode step), then its tokens."""
        before = self._counters()
        start = self.clock.now()
        kind = "decode" if group[0].decoding else "prefill"
        try:
            with torch.no_grad():
                tokens, count = self._decode(group) if kind == "decode" else self._prefill(group[0])
        except Exception as exc:
            end = self.clock.now()
            for a in group:
                yield self._end(a, active, budget, end, f"the model's forward raised {type(exc).__name__}: {exc}")
            return
        end = self.clock.now()
        after = self._counters()
        delta = [None, None] if before is None or after is None else [after[0] - before[0], after[1] - before[1]]
        steps.append(StepRecord(kind, tuple(a.request.id for a in group), count, start, end, *delta))
        for a, token in zip(group, tokens):
            if token is None:
                continue
            result = a.result
            if result.first_token is None:
                result.first_token = end
            result.tokens.append(token)
            result.token_times.append(end)
            yield TokenEvent(a.request.id, token, len(result.tokens) - 1, end)
            if len(result.tokens) == a.request.max_new_tokens or token in self.eos:
                yield self._end(a, active, budget, end)

    def _end(self, a: _Active, active: dict, budget: KVBudget, now: float, error: str | None = None) -> Result:
        del active[a.request.id]
        budget.release(a.request.kv_tokens)
        a.kv = SequenceKV(0)  # the buffers go now, not when the run ends
        a.result.status, a.result.error, a.result.finished = ("failed" if error else "finished"), error, now
        return a.result

    # -- forwards ----------------------------------------------------------------------------------------------
    def _prefill(self, a: _Active) -> tuple[list[int | None], int]:
        """The next chunk of `a`'s prompt; its first token when the chunk ends the prompt."""
        n = a.prefilled
        chunk = a.request.prompt[n : n + self.prefill_chunk]
        ids = torch.tensor([chunk], device=self.device)
        cache = a.kv.cache()
        self._seed_predictor([a.request.prompt[:n]])
        out = self.model(input_ids=ids, attention_mask=torch.ones(1, n + len(chunk), dtype=torch.long,
                                                                  device=self.device),
                         position_ids=torch.arange(n, n + len(chunk), device=self.device).unsqueeze(0),
                         use_cache=True, **{self.cache_kwarg: cache})
        a.kv.write(cache, 0, n, len(chunk))
        a.prefilled += len(chunk)
        token = int(out.logits[0, -1].argmax()) if a.decoding else None
        return [token], len(chunk)

    def _decode(self, group: list[_Active]) -> tuple[list[int | None], int]:
        """One token for each request of `group`, batched with left padding."""
        cache, pads = batched_cache([a.kv for a in group])
        longest = group[0].kv.length + pads[0]
        mask = torch.ones(len(group), longest + 1, dtype=torch.long)
        for row, pad in enumerate(pads):
            mask[row, :pad] = 0
        ids = torch.tensor([[a.result.tokens[-1]] for a in group], device=self.device)
        positions = torch.tensor([[a.kv.length] for a in group], device=self.device)
        self._seed_predictor([a.view().tokens[:-1] for a in group])
        out = self.model(input_ids=ids, attention_mask=mask.to(self.device), position_ids=positions,
                         use_cache=True, **{self.cache_kwarg: cache})
        append_column([a.kv for a in group], cache, longest)
        return out.logits[:, -1].argmax(-1).tolist(), len(group)

    def _seed_predictor(self, contexts: list[tuple[int, ...]]) -> None:
        """Give a path predictor run ahead of the forward (ExpertFlow) the context of the rows about to run: the
        loop's groups change from step to step, so the context it kept from its last call is another group's."""
        predictor = getattr(getattr(self.handle, "runahead", None), "predictor", None)
        set_context = getattr(predictor, "set_context", None)
        if set_context is not None:
            set_context(contexts)

    def _counters(self) -> tuple[int, int] | None:
        if self.handle is None or not getattr(self.handle, "serving", False):
            return None
        s = self.handle.stats()
        return s.hits + s.misses, s.h2d_bytes


def serve(model, requests: Iterable[Request], **options) -> ServingRun:
    """`Server(model, **options).run(requests)`: every request to its end, results in the requests' order."""
    on_token = options.pop("on_token", None)
    return Server(model, **options).run(requests, on_token=on_token)


def _resolve_scheduler(scheduler, handle) -> Scheduler:
    if scheduler == "auto":
        return for_handle(handle) if handle is not None else FirstCome()
    if scheduler == "first-come":
        return FirstCome()
    if scheduler == "expertflow":
        if handle is None:
            raise ValueError("scheduler='expertflow' needs the ExpertFlow predictor of an offloaded model: offload "
                             "it with policy 'expertflow', or pass moeoffload.serving.ExpertFlow(predictor)")
        return ExpertFlow(predictor_of(handle))
    if isinstance(scheduler, Scheduler):
        return scheduler
    raise ValueError(f"scheduler {scheduler!r} is unknown: pass 'auto', 'first-come', 'expertflow' or an object "
                     "with a name and plan(pool, max_batch)")


def _eos_ids(model, eos_token_id) -> frozenset[int]:
    if eos_token_id == "model":
        config = getattr(model, "generation_config", None)
        eos_token_id = getattr(config, "eos_token_id", None)
    if eos_token_id is None:
        return frozenset()
    if isinstance(eos_token_id, torch.Tensor):
        eos_token_id = eos_token_id.tolist()
    return frozenset([eos_token_id] if isinstance(eos_token_id, int) else eos_token_id)


def _check_requests(requests: list[Request]) -> None:
    for r in requests:
        if not isinstance(r, Request):
            raise TypeError(f"serve() takes moeoffload.serving.Request objects, got {type(r).__name__}: build "
                            "them as Request(id, prompt_ids, max_new_tokens, arrival=0.0)")
    ids = [r.id for r in requests]
    if len(set(ids)) != len(ids):
        dup = next(i for i in ids if ids.count(i) > 1)
        raise ValueError(f"request id {dup!r} is used twice; every request needs its own id")
