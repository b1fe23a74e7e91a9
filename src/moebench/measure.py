"""Run one benchmark case and check it: plain functions and a session object, usable without pytest.

A `Session` builds each model once and runs the reference (policy `resident`, budget `all`) once per model, on the
same kernels as every case: an exact policy's tokens must equal it bit for bit, and off the exact loop the reference
itself is compared with the exact loop (`eager_agreement`, `eager_kl`). The model is offloaded once and each case
switches its policy and budget (`OffloadedModel.switch`): the experts cross the host once per model, not once per
case (at published size that copy takes about a minute). Records are plain dicts (JSON-ready) for the table and history.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, NamedTuple, TypeGuard

from . import accuracy
from .engine import engine_options, resolved
from .probe import PROBE_PARTS, normalized
from .suite import REFERENCE_BUDGET, REFERENCE_POLICY, Case, Suite
from .workload import TokenClock, find_tokenizer, generate, load_task, percentile, phase_metrics, serve_arrivals

if TYPE_CHECKING:
    from moeoffload.errors import PolicyContractError

MEMORY_SLACK = 0.05  # relative slack on the activation allowance
TRAIN_SEED_OFFSET = 7919  # predictors train on prompts of another seed than the measured ones
TRAIN_EPOCHS = {"quick": 10, "full": 30}  # passes over that trace (trained predictors)
TRAIN_BATCHES = {"quick": 4, "full": 16}  # batches of the suite's workload shape recorded to train a predictor


class CaseSkipped(Exception):
    """The case cannot run here as configured (e.g. a budget below one expert per MoE layer)."""


class CaseBroken(Exception):
    """A policy's plug-in part broke its contract with the engine (moeoffload.PolicyContractError): the case fails
    with the message alone, leaves no record (nothing stored describes a run that did not happen), and the session
    goes on with the next case."""


class CaseFailed(AssertionError):
    """A case that ran but broke a limit; `record` holds its measurements (passed: False)."""

    def __init__(self, message: str, record: dict):
        super().__init__(message)
        self.record = record


def resolve_device(device: str | None) -> str:
    """The engine's choice of device (CUDA when present), as a string; "auto" or "" mean no preference."""
    from moeoffload.offload import resolve_device as engine_device

    return str(engine_device(None if device in (None, "", "auto") else device))


def resolve_tier(tier: str, device: str) -> str:
    if tier == "auto":
        return "full" if device.startswith("cuda") else "quick"
    return tier


def _nvml_used_bytes(device: str) -> int | None:
    """Memory used on the GPU as NVML sees it (every process, the CUDA context included); None when unknown."""
    if not device.startswith("cuda"):
        return None
    try:
        import pynvml
        import torch

        pynvml.nvmlInit()
        try:
            index = torch.device(device).index
            index = torch.cuda.current_device() if index is None else index
            return int(pynvml.nvmlDeviceGetMemoryInfo(pynvml.nvmlDeviceGetHandleByIndex(index)).used)
        finally:
            pynvml.nvmlShutdown()
    except Exception:
        return None


@dataclass
class Reference:
    tokens: Any
    logits: Any
    record: dict
    activation_bytes: int | None  # resident peak - dense - all experts (CUDA only)
    skipped: str | None = None  # why there is no resident run (the model does not fit the device): exactness unchecked
    evaluation: Any = None  # accuracy.Evaluation: the reference's teacher-forced results every case is compared to


@dataclass
class TimedRounds:
    """What the timed rounds of one case measured (`Session._timed_rounds`)."""

    totals: list[float] = field(default_factory=list)  # seconds per round
    round_steps: list[list[float]] = field(default_factory=list)  # seconds per step, per round
    probes: list = field(default_factory=list)  # probe.ProbeTiming: one before each round and one after the last
    tokens: list = field(default_factory=list)  # per round, on the CPU
    logits: list = field(default_factory=list)
    nvml_peak: int | None = None

    def add(self, total: float, steps: list[float], tokens, logits) -> None:
        self.totals.append(total)
        self.round_steps.append(steps)
        self.tokens.append(tokens)
        self.logits.append(logits)

    @property
    def steps(self) -> list[float]:
        return [s for steps in self.round_steps for s in steps]

    def samples(self, tokens_per_round: int) -> dict:
        """One entry per timed round: what the regression statistics (moebench.stats) compare."""
        per_round = [tokens_per_round / t for t in self.totals]
        round_p50 = [percentile(steps, 50) * 1e3 for steps in self.round_steps]
        probe_totals = [p.total for p in self.probes]
        return {"tokens_per_s": per_round,
                # machine-normalized throughput (tokens per probe-time): what throughput verdicts compare
                "tokens_per_probe": normalized(per_round, probe_totals),
                "p50_per_probe": normalized(round_p50, probe_totals, per_time=False),
                "round_s": self.totals, "p50_ms": round_p50,
                "probe": {k: [p.as_dict()[k] for p in self.probes] for k in PROBE_PARTS}}


class Measured(NamedTuple):
    record: dict
    tokens: Any  # [rounds x batch, new_tokens], arrival order
    logits: Any
    torch_peak: int | None  # CUDA only
    evaluation: Any  # accuracy.Evaluation, None when not evaluated


@dataclass
class Session:
    """Measures the cases of one suite on one device and tier, memoizing models and references."""

    suite: Suite
    device: str = "cpu"
    tier: str = "quick"
    rounds: int = 3
    inject_delay_s: float = 0.0  # test hook only: a busy wait per MoE layer call, to fake a slower commit
    inject_slowdown: float = 0.0  # test hook only: stretch every round by this fraction (`Stretch`)
    turns: Any = None  # moebench.turns.Turns in an interleaved A/B run: the floor is given up before every round
    kernels: str = "auto"  # the engine's kernels for every case, the resident reference included (`engine.KERNELS`)
    fetch: str = "auto"  # who fetches a missing expert (`engine.FETCHES`); "device" only where the policy can
    _models: dict[str, tuple[Any, str]] = field(default_factory=dict)
    _refs: dict[str, Reference] = field(default_factory=dict)
    throughput_refs: dict[str, dict] = field(default_factory=dict)  # model -> its resident record (serving_case)
    _predictors: dict[tuple[str, str | None], Any] = field(default_factory=dict)  # (model, predictor kind) -> trained
    _probe: Any = None  # probe.MachineProbe, built on first use (on the session's device)
    _handle: Any = None  # moeoffload.OffloadedModel of the current model, kept across its cases (`serve`)

    def __post_init__(self) -> None:
        if self.rounds < 1:
            raise ValueError(f"rounds must be >= 1, got {self.rounds}")

    @property
    def dtype(self):
        import torch

        return getattr(torch, self.suite.dtypes[self.tier])

    def model(self, name: str) -> tuple[Any, str]:
        if name not in self._models:
            # models are built on the CPU; offload() moves the dense part to the device. One model at a time:
            # cases run grouped by model, and a published-size model may take most of the host's memory.
            self.close()
            self._models.clear()
            self._models[name] = self.suite.model(name).build(self.tier, self.dtype, "cpu")
        return self._models[name]

    def serve(self, model, policy: str, budget: str, predictor=None, kernels: str | None = None):
        """The offloaded handle of `model` serving `policy` at `budget` on the session's kernels (or `kernels`): the
        kept handle switched (the store's host copies stay), or a fresh offload when there is none. A budget the
        policy cannot use raises BudgetError with the kept handle untouched. The old cache's pool is freed before the
        new one is allocated, so a case's GPU figures hold its own cache only."""
        import moeoffload

        options = engine_options(kernels or self.kernels, self.fetch, policy)
        handle = self._handle
        if handle is not None and handle.active and handle.model is model:
            return handle.switch(policy, budget, predictor=predictor, kernels=options["kernels"],
                                 fetch=options["fetch"])
        self.close()
        self._handle = moeoffload.offload(model, policy, budget, device=self.device, show_progress=False,
                                          predictor=predictor, kernels=options["kernels"], fetch=options["fetch"])
        return self._handle

    def close(self) -> None:
        """Put the current model's experts back (when the model changes, after a failed case, at the session's
        end); a later case offloads again."""
        handle, self._handle = self._handle, None
        if handle is not None and handle.active:
            handle.unload()

    def probe(self):
        """The machine-speed probe timed around every round (`moebench.probe`: why)."""
        if self._probe is None:
            from .probe import MachineProbe

            self._probe = MachineProbe(self.device)
        return self._probe

    def reference(self, name: str) -> Reference:
        """The resident run of model `name` on the session's kernels, which every case is compared to (a
        token-scheduling policy is compared to `scheduled_reference` instead). Off the exact loop, its record also
        says how the resident model agrees with the exact loop (`eager_agreement`, `eager_kl`)."""
        if name not in self._refs:
            try:
                record, tokens, logits, peak, evaluation = self._measure(Case(name, REFERENCE_POLICY,
                                                                              REFERENCE_BUDGET), None)
            except CaseSkipped as exc:  # all experts do not fit the device: the other cases still run, unchecked
                self._refs[name] = Reference(None, None, {}, None, skipped=str(exc))
                return self._refs[name]
            activation = None
            if peak is not None:
                activation = max(0, peak - record["dense_bytes"] - record["total_expert_bytes"])
            record.update(accuracy.compare(evaluation, evaluation, tokens, tokens), max_abs_logit_diff=0.0,
                          tokens_identical=True)
            if record["kernels"] != "exact":
                record.update(self._eager_agreement(name, tokens, evaluation))
            self._refs[name] = Reference(tokens, logits, record, activation, evaluation=evaluation)
        return self._refs[name]

    def _eager_agreement(self, name: str, tokens, evaluation) -> dict:
        """How the resident model on the session's kernels agrees with the exact loop, which is bit-identical to the
        unoffloaded eager model: greedy-token agreement on the timed rounds' prompts and mean KL(exact || these
        kernels) of the next-token distributions on the reference's teacher-forced text. Untimed."""
        import torch

        model, _ = self.model(name)
        wl = self.suite.workload_for(self.tier)
        tokenizer = find_tokenizer(model)
        handle = self.serve(model, REFERENCE_POLICY, REFERENCE_BUDGET, kernels="exact")
        exact_tokens = torch.cat([generate(model, ids.to(handle.device), wl.new_tokens)[0].cpu()
                                  for ids in (wl.prompts(model.config.vocab_size, round_index=r, tokenizer=tokenizer)
                                              for r in range(self.rounds))])
        task = load_task(wl.task) if wl.task else None
        exact = accuracy.evaluate(model, evaluation.text, handle.device, tokenizer, task)
        compared = accuracy.compare(exact, evaluation, exact_tokens, tokens)
        return {"eager_agreement": compared["token_agreement"], "eager_kl": compared["kl_divergence"]}

    def scheduled_reference(self, name: str, schedule) -> Reference:
        """The resident model served the batches of `schedule` (a token-scheduling policy's regrouping).

        Which sequences share a batch changes a sequence's floating-point result in any MoE implementation
        (transformers' own included): an expert's GEMM sees the tokens the whole batch routed to it, and a GEMM of
        another height may take another kernel and summation order. In bf16 on a GPU that flips greedy near-ties.
        So the engine's exactness under scheduling is judged against the unoffloaded model served the same
        batches, and the drift that the regrouping itself causes is reported apart (`first_come_token_agreement`).
        """
        base = self.reference(name)
        key = f"{name}|schedule={schedule.batches}"
        if base.skipped:
            return base
        if key not in self._refs:
            record, tokens, logits, _, _ = self._measure(Case(name, REFERENCE_POLICY, REFERENCE_BUDGET), base,
                                                         schedule=schedule, evaluate=False)
            self._refs[key] = Reference(tokens, logits, record, base.activation_bytes, evaluation=base.evaluation)
        return self._refs[key]

    def run(self, case: Case) -> dict:
        """Measure `case` and check it; returns its record, raises CaseFailed (record attached) or CaseSkipped."""
        try:
            ref = self.reference(case.model)
            # the reference is the resident case itself, on the same kernels as every other case
            measured = None if case.is_reference else self._measure(case, ref)
        except Exception as exc:
            if is_broken_contract(exc):
                exc.with_traceback(None)  # its frames hold the failed case's tensors
                raise CaseBroken(f"{case.name}: {exc.for_policy(case.policy)}") from None
            if not is_out_of_memory(exc):
                raise
            raise self._out_of_memory(case, exc) from None
        if ref.skipped:
            if measured is None:
                raise CaseSkipped(ref.skipped)
            record = measured[0]
            record.update(token_agreement=None, accuracy_drop=None, tokens_identical=None,
                          exactness=f"unchecked: no resident reference ({ref.skipped})")
        elif measured is None:
            record = dict(ref.record)
        else:
            record, tokens, logits, _, evaluation = measured
            same_batches = ref
            if record.get("schedule") is not None:  # a token-scheduling policy: exact against its own batches
                from moeoffload.scheduler import Schedule

                same_batches = self.scheduled_reference(case.model, Schedule(tuple(map(tuple, record["schedule"]))))
                record["first_come_token_agreement"] = accuracy.token_agreement(ref.tokens, tokens)
            record.update(accuracy.compare(ref.evaluation, evaluation, same_batches.tokens, tokens))
            agree = record["token_agreement"]
            record["max_abs_logit_diff"] = (logits.float() - same_batches.logits.float()).abs().max().item()
            record["tokens_identical"] = bool(agree == 1.0)
        failures = check(record, self.suite.accuracy_limit, ref.activation_bytes)
        record["passed"] = not failures
        record["failures"] = failures
        if failures:
            raise CaseFailed(f"{case.name}: " + "; ".join(failures), record)
        return record

    def _out_of_memory(self, case: Case, exc: BaseException) -> CaseFailed:
        """The case fails with a record and the session goes on: `_measure` has already unloaded the model
        (`close`, in its `finally`), so what is left to free is the allocator's cache of the blocks unload gave back."""
        exc.with_traceback(None)  # its frames hold the failed case's tensors
        release_device_memory(self.device)
        message = f"out of memory: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}"
        record = {"suite": self.suite.name, "case": case.name, "model": case.model, "policy": case.policy,
                  "budget": case.budget, "tier": self.tier, "device": self.device, "rounds": self.rounds,
                  "error": "out_of_memory", "passed": False, "failures": [message]}
        return CaseFailed(f"{case.name}: {message}", record)

    def prepare(self, case: Case, model, wl, prompts):
        """What a predictive policy needs, obtained untimed before the case: a predictor trained on a workload of
        another seed (once per model and kind), or the routing of the exact prompts about to be measured
        (warm-up and rounds, recorded in a separate pass: what makes oracle and Belady upper bounds)."""
        from dataclasses import replace

        import moeoffload
        from moeoffload import predictors

        policy = moeoffload.get_policy(case.policy)
        needs = predictors.needs(policy)
        if needs != "training-trace":
            self._park_predictors()
        if needs is None:
            return None
        if needs == "exact-trace":
            # recorded on the kept handle under an exact policy without a predictor: the routing the case will see
            self._serve_for_recording(model, case)

            def run():
                for ids in prompts:
                    generate(model, ids.to(model.device), wl.new_tokens)

            # past_end="lru": the recording ends with the timed rounds; the untimed accuracy (and arrivals) passes
            # that follow on the same handle are served as LRU, quietly (their calls are not in the statistics)
            return predictors.prepare(policy, model, run=run, budget=case.budget, device=self.device,
                                      show_progress=False, past_end="lru")
        key = (case.model, policy.predictor)
        if key not in self._predictors:
            trace_key = (case.model, "trace")  # one recorded training trace per model, shared by every kind
            if trace_key not in self._predictors:
                self._serve_for_recording(model, case)
                train = replace(wl, seed=wl.seed + TRAIN_SEED_OFFSET)
                batches = TRAIN_BATCHES[self.tier]
                train_prompts = [train.prompts(model.config.vocab_size, round_index=r, tokenizer=find_tokenizer(model))
                                 for r in range(batches)]
                self._predictors[trace_key] = predictors.collect_trace(model, train_prompts, wl.new_tokens,
                                                                       device=self.device)
            kind = predictors.PREDICTORS[str(policy.predictor)]  # set: only predictive policies get here
            options = {"epochs": TRAIN_EPOCHS[self.tier]} if policy.predictor == "sida" else {}
            self._predictors[key] = kind.build(model, self._predictors[trace_key], show_progress=None, **options)
        chosen = self._predictors[key]
        self._park_predictors(keep=key)
        if callable(getattr(chosen, "to", None)):
            chosen.to(self.device)  # back from where `_park_predictors` left it, if an earlier case parked it
        return chosen

    def _park_predictors(self, keep=None) -> None:
        """Trained predictors are kept for the model's later cases (the 50% case reuses the 25% case's SiDA), but on
        the CPU between their cases: one left on the device would count in another case's GPU peak. `keep`: the
        key of the case's own predictor, which stays where it is."""
        for key, kept in self._predictors.items():
            if key != keep and key[1] != "trace" and callable(getattr(kept, "to", None)):
                kept.to("cpu")

    def _serve_for_recording(self, model, case: Case) -> None:
        """Serve `model` for recording routing (a predictor's training trace, an oracle's exact trace). Every exact
        policy routes the same tokens the same way, so the fastest one records it: the resident model when its
        reference ran (it fits the device), else LRU at the case's budget."""
        ref = self._refs.get(case.model)
        if ref is not None and not ref.skipped:
            # a model that barely fits (Qwen3-30B-A3B's 54 GiB of experts on an 80 GB GPU) may find no room for every
            # expert beside what the earlier cases left: then LRU records it, at the case's budget
            try:
                self.serve(model, REFERENCE_POLICY, REFERENCE_BUDGET)
                return
            except Exception as exc:
                if not is_out_of_memory(exc):
                    raise
                exc.with_traceback(None)
                release_device_memory(self.device)
        self.serve(model, "lru", case.budget)

    def _measure(self, case: Case, ref: Reference | None, schedule=None, evaluate: bool = True) -> Measured:
        """One case's timed rounds and untimed accuracy. `schedule`: serve the rounds in these batches (the
        scheduled reference) instead of the batches the policy plans (a token-scheduling policy) or arrival order.
        `evaluate=False` skips the teacher-forced evaluation (returned as None)."""
        import torch

        from moeoffload.scheduler import served_gain

        phases = PhaseClock()  # where a case's wall time goes (a published-size case spends most of it outside rounds)
        model, source = self.model(case.model)
        phases.mark("model")
        wl = self.suite.workload_for(self.tier)
        tokenizer = find_tokenizer(model)
        prompts = [wl.prompts(model.config.vocab_size, round_index=r, tokenizer=tokenizer)
                   for r in range(-1, self.rounds)]
        handle = self._offload(case, model, wl, prompts, phases)
        delay_hooks = inject_delay(handle.hook.layers, self.inject_delay_s)
        stretch = Stretch(handle.hook.layers, self.inject_slowdown) if self.inject_slowdown else None
        measured = False
        try:
            inject_out_of_memory(case.name)
            prompts = [p.to(handle.device) for p in prompts]
            prompts_in_order = prompts[1:]
            prompts, schedule = self._arrange(handle, prompts, schedule)
            start_bytes, predictor_bytes = self._memory_start(handle, prompts[0])
            generate(model, prompts[0], wl.new_tokens)  # warm-up on its own prompts: kernels load, cache fills
            phases.mark("warmup")
            rounds = self._timed_rounds(model, handle, wl, prompts[1:], stretch)
            phases.mark("rounds")
            stats = handle.stats()
            gain = None if schedule is None else served_gain(handle, schedule, wl.batch_size)
            cuda = self.device.startswith("cuda")
            torch_peak = int(torch.cuda.max_memory_allocated(handle.device)) if cuda else None
            # untimed, after the statistics and the memory peak were read
            evaluation, arrivals = self._untimed(model, handle, wl, ref, rounds, prompts_in_order, schedule, evaluate)
            phases.mark("accuracy")
            measured = True
        finally:
            for h in delay_hooks:
                h.remove()
            if stretch is not None:
                stretch.remove()
            if not measured:  # a failed case leaves no offloaded model behind: the next one offloads afresh
                self.close()
        tokens, logits = torch.cat(rounds.tokens), torch.cat(rounds.logits)
        if schedule is not None:  # back to arrival order, where the reference has them
            tokens, logits = schedule.restore(tokens), schedule.restore(logits)
        record = self._record(case, wl, handle, stats, rounds)
        record.update(weights=str(source), arrivals=arrivals, phase_s=phases.seconds,
                      prompts="held-out corpus text" if wl.uses_text(tokenizer) else "seeded random token ids",
                      # the predictor's own networks and tables, or, measured, its peak at the batch shape
                      predictor_bytes=max(stats.predictor_bytes, predictor_bytes),
                      # allocated when the timed part began: dense + cache + predictor + cuBLAS workspaces; a growth
                      # from case to case means something earlier left tensors behind
                      device_bytes_at_start=start_bytes, torch_peak_bytes=torch_peak,
                      # token scheduling (ExpertFlow): distinct experts each batch activated, first-come vs scheduled
                      experts_per_batch_first_come=None if gain is None else gain.first_come,
                      experts_per_batch_scheduled=None if gain is None else gain.scheduled,
                      schedule=None if schedule is None else [list(b) for b in schedule.batches])
        return Measured(record, tokens, logits, torch_peak, evaluation)

    def _offload(self, case: Case, model, wl, prompts, phases: PhaseClock):
        """Prepare the case's predictor and serve its policy and budget; a budget the policy cannot use skips it."""
        import moeoffload

        try:
            predictor = self.prepare(case, model, wl, prompts)
            release_device_memory(self.device)  # what preparing (recording, training) left for the collector
            phases.mark("prepare")
            handle = self.serve(model, case.policy, case.budget, predictor)
            phases.mark("offload")
        except moeoffload.BudgetError as exc:
            raise CaseSkipped(f"{case.name}: {exc}") from None
        except BaseException:
            self.close()
            raise
        return handle

    @staticmethod
    def _arrange(handle, prompts: list, schedule):
        """The rounds' batches: as given (`schedule`), as the policy regroups them (ExpertFlow), or in arrival
        order (schedule None). prompts[0] is the warm-up's."""
        import torch

        from moeoffload.scheduler import plan as plan_schedule

        if schedule is None:
            schedule = plan_schedule(handle, prompts[1:])
        if schedule is not None:
            prompts = prompts[:1] + list(schedule.split(torch.cat(prompts[1:])))
        return prompts, schedule

    def _memory_start(self, handle, warmup_ids) -> tuple[int | None, int]:
        """On CUDA: the bytes allocated as the timed part begins, and the predictor's measured footprint at the
        batch shape; the peak counter is reset here. (None, 0) elsewhere."""
        if not self.device.startswith("cuda"):
            return None, 0
        import torch

        footprint = getattr(getattr(handle, "runahead", None), "footprint", None)
        predictor_bytes = footprint(warmup_ids) if footprint is not None else 0
        # planning and the footprint probe ran GEMMs: drop the cuBLAS workspaces they made, so that the run's own
        # (charged to activations and to predictor_bytes) are not counted twice
        release_device_memory(self.device)
        torch.cuda.synchronize(handle.device)
        torch.cuda.reset_peak_memory_stats(handle.device)
        return int(torch.cuda.memory_allocated(handle.device)), predictor_bytes

    def _timed_rounds(self, model, handle, wl, batches: list, stretch: Stretch | None) -> TimedRounds:
        """Every batch once, timed, each round bracketed by the machine-speed probe (`moebench.probe`)."""
        import torch

        dev, cuda = handle.device, self.device.startswith("cuda")
        probe = self.probe()
        probe.run()  # its own warm-up
        handle.reset_stats()
        rounds = TimedRounds()
        # A/B at step grain: the other side's step k runs between this side's steps k and k+1, and a round's time
        # is the sum of its own steps (the waits in between are not this side's)
        step_turns = self.turns is not None and self.turns.grain == "step"
        pause = self._pause(stretch) if step_turns else None
        for ids in batches:
            if self.turns is not None:
                self.turns.take()  # A/B: the other side's round i runs now, right before this one
            rounds.probes.append(probe.run())
            if stretch is not None:
                stretch.restart()
            clock = TokenClock(dev, pause=pause)
            if cuda:
                torch.cuda.synchronize(dev)
            t0 = time.perf_counter()
            tokens, logits = generate(model, ids, wl.new_tokens, clock)
            if cuda:
                torch.cuda.synchronize(dev)
            wall = time.perf_counter() - t0
            round_steps = clock.step_seconds()
            rounds.add(sum(round_steps) if step_turns else wall, round_steps, tokens.cpu(), logits.cpu())
            used = _nvml_used_bytes(self.device)
            if used is not None:
                rounds.nvml_peak = max(rounds.nvml_peak or 0, used)
        rounds.probes.append(probe.run())
        return rounds

    def _pause(self, stretch: Stretch | None):
        """An A/B run's wait for the other side's step, left out of the injected stretch."""
        def pause() -> None:
            if stretch is None:
                self.turns.take()
                return
            with stretch.excluded():  # the stretch is a fraction of this side's time, not of the wait
                self.turns.take()

        return pause

    def _untimed(self, model, handle, wl, ref: Reference | None, rounds: TimedRounds, prompts_in_order: list,
                 schedule, evaluate: bool):
        """Accuracy on the same inputs as the reference, then the request-arrival latency run when the workload
        asks for one; (None, None) when not `evaluate`."""
        import torch

        if not evaluate:
            return None, None
        tokenizer = find_tokenizer(model)
        if ref is not None and ref.evaluation is not None:
            text = ref.evaluation.text
        elif wl.uses_text(tokenizer):
            text = accuracy.heldout_text(model, tokenizer, wl.eval_sequences, wl.eval_len)
        else:
            run_tokens = torch.cat(rounds.tokens)
            if schedule is not None:
                run_tokens = schedule.restore(run_tokens)
            text = accuracy.continuation_text(prompts_in_order, run_tokens)
        task = load_task(wl.task) if wl.task else None
        evaluation = accuracy.evaluate(model, text, handle.device, tokenizer, task)
        arrivals = serve_arrivals(model, wl, handle.device, tokenizer) if wl.arrivals is not None else None
        return evaluation, arrivals

    def _record(self, case: Case, wl, handle, stats, rounds: TimedRounds) -> dict:
        """The JSON-ready record of a measured case: what ran, how fast, what moved and what it held."""
        import moeoffload

        policy = moeoffload.get_policy(case.policy)
        kernels, fetch = resolved(handle)
        generated = wl.batch_size * wl.new_tokens * self.rounds
        return {
            "suite": self.suite.name, "case": case.name, "model": case.model, "policy": case.policy,
            "policy_version": policy.version,
            # an exact policy's tokens must equal the resident model's on the same kernels (`run`)
            "exact": policy.exact, "kernels": kernels, "fetch": fetch,
            "budget": case.budget, "tier": self.tier, "device": str(handle.device),
            "dtype": self.suite.dtypes[self.tier], "workload": wl.as_dict(), "rounds": self.rounds,
            "tokens_per_s": generated / sum(rounds.totals),
            "p50_ms": percentile(rounds.steps, 50) * 1e3,
            "p99_ms": percentile(rounds.steps, 99) * 1e3,
            **phase_metrics(rounds.round_steps, wl.batch_size, wl.prompt_len),
            **cache_fields(stats, self.rounds),
            "nvml_used_bytes": rounds.nvml_peak,
            "samples": rounds.samples(wl.batch_size * wl.new_tokens),
            # an interleaved A/B run (moebench ab): "round" or "step" turns; at step grain round_s sums own steps
            "interleaved": None if self.turns is None else self.turns.grain,
            "inject_delay_ms": self.inject_delay_s * 1e3,
            "inject_slowdown": self.inject_slowdown,
            "stats": stats.as_dict(),
        }


# Below this median top-1/top-2 probability gap the reference's greedy choices are near ties (`accuracy.
# decision_margin`): a change of the next-token accuracy then measures its flat logits, not the policy.
DECISIVE_MARGIN = 0.01


def cache_fields(stats, rounds: int) -> dict:
    """What the expert cache did over `rounds` rounds (an OffloadStats read after them), as every record holds it:
    the decode workload's and the throughput workload's (moebench.serving_case)."""
    return {
        "hit_rate": stats.hit_rate,
        "h2d_bytes_per_round": stats.h2d_bytes / rounds,
        "h2d_copies_per_round": stats.h2d_copies / rounds,
        # where the misses went: copied into the cache, or computed on the host CPU (host-assisted policies)
        "miss_rule": stats.miss_rule,
        "copied_misses_per_round": (stats.misses - stats.host_misses) / rounds,
        "host_misses_per_round": stats.host_misses / rounds,
        # a low-precision policy: what one expert's copy moves in each precision, and how many misses each served
        "precision": stats.precision,
        "expert_bytes_by_precision": stats.expert_bytes_by_precision or {"full": stats.expert_bytes},
        "misses_by_precision_per_round": {p: n / rounds for p, n in stats.misses_by_precision.items()},
        "cache_bytes": stats.cache_bytes, "budget_bytes": stats.budget_bytes,
        "total_expert_bytes": stats.total_expert_bytes, "dense_bytes": stats.dense_bytes, "n_slots": stats.n_slots,
    }


def expected_failure(record: dict) -> str | None:
    """Why a failed case is an expected failure (pytest's xfail), or None when it is a real failure.

    One kind only: an approximate policy (exact=False) over the accuracy limit where the reference's own next-token
    choices are near ties, and nothing else broken. Seeded random weights give near-uniform next-token distributions
    (a median gap of about 1e-7 between the first and second token on switch-base-8), so a perturbation with a KL of
    1e-7 nats flips a third of the greedy tokens: the drop is measured and reported, with the KL, but says nothing
    of the policy on a model whose choices are decisive (the trained models/kjv-moe: 0.17), where it is judged.
    Whether the routers are calibrated does not change this: they shape which experts run, not the output head."""
    failures = record.get("failures") or []
    margin = record.get("reference_decision_margin")
    if record.get("exact") is not False or margin is None or margin >= DECISIVE_MARGIN or not failures or \
            not all(f.startswith("accuracy drop") for f in failures):
        return None
    return (f"approximate policy {record.get('policy')!r}: {failures[0]}, but the reference's next-token choices "
            f"are near ties (median top-1/top-2 probability gap {margin:.2g} < {DECISIVE_MARGIN}), so greedy "
            f"accuracy measures its flat logits; KL {record.get('kl_divergence', float('nan')):.2g} nats; judged on "
            "weights with decisive logits (trained or a checkpoint)")


def release_device_memory(device: str) -> None:
    """Collect garbage (reference cycles can hold tensors of a finished run), drop cuBLAS's per-stream workspaces
    and return the allocator's cached blocks, so that one case's peak is not raised by what an earlier case left
    (a predictive case's side stream leaves a cuBLAS workspace that would count in every later case's peak)."""
    import gc

    gc.collect()
    if device.startswith("cuda"):
        import torch

        clear_workspaces = getattr(torch._C, "_cuda_clearCublasWorkspaces", None)
        if clear_workspaces is not None:  # cuBLAS keeps a workspace per stream it ran on, allocated from torch's pool
            clear_workspaces()
        torch.cuda.empty_cache()


def inject_delay(layers, seconds: float) -> list:
    """Test hook (never for real runs): busy-wait `seconds` before every MoE layer's forward, so a confirmation
    run can fake a known slowdown. A busy wait, not time.sleep, whose granularity (~50 us+) would swamp 0.2 ms.
    Returns the hook handles to remove."""
    if seconds <= 0:
        return []

    def wait(module, args):
        end = time.perf_counter() + seconds
        while time.perf_counter() < end:
            pass

    return [layer.register_forward_pre_hook(wait) for layer in layers]


class PhaseClock:
    """Wall seconds between named marks, in order: `seconds[name]` is the time since the previous mark."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self._last = time.perf_counter()

    def mark(self, name: str) -> None:
        now = time.perf_counter()
        self.seconds[name] = round(now - self._last, 3)
        self._last = now


class Stretch:
    """Test hook (never for real runs): before every MoE layer call, spend `fraction` of the wall time since the
    previous call (or since `restart()`, at each round's start) in extra interpreter work, so that a round takes
    (1 + fraction) times as long as it would have, at whatever speed the machine runs at that moment. A fixed delay
    in ms cannot promise a percentage: calibrated on one run, it slows a later one by another fraction when the
    machine's speed has drifted in between. The stretch misses only the tail after a round's last layer call (the
    last LM head).

    The work is a counted loop, not a spin on the clock: spinning on time.perf_counter() (two clock reads per layer
    here instead of thousands) is itself a workload a VM may treat differently from the code it stands for. The loop's
    cost per iteration is re-estimated from every wait, so a machine that slows down slows the work with it."""

    def __init__(self, layers, fraction: float, *, clock=time.perf_counter, work=None, per_iter: float | None = None):
        if not 0 < fraction <= 1:
            raise ValueError(f"stretch fraction must be in (0, 1], got {fraction!r}")
        self.fraction = fraction
        self.clock = clock  # tests pass a fake clock, work that advances it and its cost per iteration
        self.work = work or _spin
        self.per_iter = per_iter or _spin_seconds_per_iteration()
        self.last = clock()
        self.handles = [layer.register_forward_pre_hook(self._wait) for layer in layers]

    def restart(self) -> None:
        self.last = self.clock()

    @contextlib.contextmanager
    def excluded(self):
        """Leave out the time spent inside (an A/B run at step grain waiting for the other side's step), but keep
        the time before it: the end of a step (LM head, sampling, the wait for the GPU) is this side's work and must
        be stretched too. Restarting instead dropped it, and since the CPU runs ahead of the GPU inside a step, a 5%
        stretch then slowed a GPU decode step by far less than 5%."""
        paused_at = self.clock()
        try:
            yield
        finally:
            self.last += self.clock() - paused_at

    def _wait(self, module, args) -> None:
        now = self.clock()
        iterations = int(self.fraction * (now - self.last) / self.per_iter)
        self.work(iterations)
        self.last = self.clock()
        if iterations >= 1000:  # long enough to re-estimate the loop's speed at this moment
            self.per_iter = 0.5 * self.per_iter + 0.5 * (self.last - now) / iterations

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []


def _spin(iterations: int) -> int:
    acc = 0
    for i in range(iterations):
        acc ^= i
    return acc


def _spin_seconds_per_iteration(iterations: int = 200_000) -> float:
    t0 = time.perf_counter()
    _spin(iterations)
    return max((time.perf_counter() - t0) / iterations, 1e-10)


INJECT_OOM_ENV = "MOEBENCH_INJECT_OOM"


def inject_out_of_memory(case_name: str) -> None:
    """TEST HOOK, never for real runs: raise torch.OutOfMemoryError inside every case whose name contains the
    value of $MOEBENCH_INJECT_OOM (e.g. "lru-25%"), after the model is offloaded, so the tests can show that an
    out-of-memory fails that one case, frees its memory and lets the session go on."""
    import os

    import torch

    needle = os.environ.get(INJECT_OOM_ENV)
    if needle and needle in case_name:
        raise torch.OutOfMemoryError(f"injected by ${INJECT_OOM_ENV}={needle!r} (test hook)")


def is_broken_contract(exc: BaseException) -> TypeGuard[PolicyContractError]:
    """A policy's plug-in part (eviction rule, rule factory, entry point) broke its contract with the engine."""
    from moeoffload.errors import PolicyContractError

    return isinstance(exc, PolicyContractError)


def is_out_of_memory(exc: BaseException) -> bool:
    """torch's OutOfMemoryError (CUDA caching allocator), or a RuntimeError a CUDA call raised on running out
    (pinned host memory, cuBLAS workspaces)."""
    import torch

    oom = getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError)
    return isinstance(exc, oom) or (isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower())


def check(record: dict, accuracy_limit: float, activation_bytes: int | None) -> list[str]:
    """The limits a case must keep; returns one readable message per broken limit (empty: passed).

    - Expert cache: `cache_bytes <= budget_bytes` (the pool the engine accounts for).
    - CUDA only: torch's peak allocated bytes <= dense + budget + allowance, where the allowance is what the
      resident reference used beyond its weights (its peak - dense - all expert bytes) for the same model and
      workload, i.e. activations and generate()'s buffers, plus MEMORY_SLACK (5%) of that allowance.
    - Exact policies: greedy tokens identical to the reference; approximate ones: accuracy drop (reference
      metric - policy metric, moebench.accuracy: task accuracy when a task is given, else next-token accuracy on
      the same teacher-forced text) <= the suite's accuracy_limit.
    """
    from moeoffload import format_bytes

    failures = []
    if record["cache_bytes"] > record["budget_bytes"]:
        failures.append(f"expert cache {format_bytes(record['cache_bytes'])} is over the budget "
                        f"{format_bytes(record['budget_bytes'])}")
    peak = record.get("torch_peak_bytes")
    if peak is not None and activation_bytes is not None:
        predictor = record.get("predictor_bytes") or 0
        limit = record["dense_bytes"] + record["budget_bytes"] + predictor + activation_bytes * (1 + MEMORY_SLACK)
        record["gpu_limit_bytes"] = int(limit)
        if peak > limit:
            failures.append(f"GPU peak {format_bytes(peak)} is over dense {format_bytes(record['dense_bytes'])} + "
                            f"budget {format_bytes(record['budget_bytes'])} + "
                            + (f"predictor {format_bytes(predictor)} + " if predictor else "")
                            + f"activations {format_bytes(activation_bytes)} (+{MEMORY_SLACK:.0%})")
    if record["policy"] != REFERENCE_POLICY and record.get("token_agreement") is not None:
        if record["exact"]:
            if not record.get("tokens_identical", False):
                failures.append(f"exact policy {record['policy']!r} changed the greedy tokens "
                                f"(agreement {record['token_agreement']:.2%}, max |logit diff| "
                                f"{record['max_abs_logit_diff']:.3g})")
        elif record["accuracy_drop"] > accuracy_limit:
            failures.append(f"accuracy drop {record['accuracy_drop']:.2%} ({record.get('accuracy_metric')}) is over "
                            f"the suite's limit "
                            f"{accuracy_limit:.2%}")
    return failures
