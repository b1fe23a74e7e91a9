"""pytest plugin: `--moebench` collects suites (`suite.py` / `suite_*.py` files) and runs one item per case.

Kept thin: measuring, checking, tables and history live in plain modules. Heavy imports (torch, transformers,
moeoffload) happen only when --moebench is given, so plain `pytest` pays nothing for this plugin.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from .engine import FETCHES, KERNELS  # plain names, no engine import

if TYPE_CHECKING:
    from .state import MoebenchRun

SKIP_REASON = "moebench suites run only with --moebench"
# 5 a side is the fewest rounds whose Mann-Whitney test can reach p < 0.01 (stats.min_p_value), 7 against a baseline
# of 3; 10 leaves room for ties and reaches the level against any baseline of 3 rounds or more
DEFAULT_ROUNDS = 10
_RUN = pytest.StashKey["MoebenchRun"]()
CONTROLLER = "moebench-xdist-controller"


def moebench_run(config: pytest.Config) -> MoebenchRun | None:
    """This session's `MoebenchRun`; None when --moebench is not given."""
    return config.stash.get(_RUN, None)


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("moebench", "moebench: MoE offloading benchmark suites")
    group.addoption("--moebench", action="store_true", default=False,
                    help="collect and run benchmark suites (suite.py files); without it they are skipped")
    group.addoption("--moebench-policy", action="append", default=None, metavar="NAME",
                    help="run only this policy (repeatable); default: every registered policy")
    group.addoption("--moebench-tier", choices=("quick", "full", "auto"), default="auto",
                    help="quick: depth-reduced models (CPU); full: published sizes; auto: full when CUDA is available")
    group.addoption("--moebench-rounds", type=int, default=DEFAULT_ROUNDS, metavar="N",
                    help=f"timed rounds per case (default {DEFAULT_ROUNDS}: against a stored baseline, 5 a side is the "
                         "fewest that can reach the verdicts' 1%% level)")
    group.addoption("--moebench-history", default=None, metavar="DIR",
                    help="directory of history.jsonl (default: .moebench under the rootdir)")
    group.addoption("--moebench-device", default=None, metavar="DEVICE",
                    help="device for the expert cache and dense weights (default: cuda when available, else cpu)")
    group.addoption("--moebench-compare", nargs="?", const="required", default="auto", metavar="PATH",
                    help="compare with a baseline: bare = baselines/<machine-class>/<suite>.json must exist; PATH = "
                         "that file or folder; 'none' = no comparison (default: compare when the file exists)")
    group.addoption("--moebench-compare-fail", default=None, metavar="SPEC",
                    help="per-metric failure limits, e.g. 'throughput:5%%,gpu_memory:2%%' (the default); metrics: "
                         "throughput, latency (statistical, per-round samples), gpu_memory, h2d")
    group.addoption("--moebench-save-baseline", action="store_true", default=False,
                    help="after a complete run, write baselines/<machine-class>/<suite>.json from it")
    group.addoption("--moebench-baseline-runs", type=int, default=1, metavar="N",
                    help="with --moebench-save-baseline: keep the samples of this run and of up to N-1 earlier runs "
                         "of the suite from the history; from 3 runs on, timed verdicts test at run level (default 1)")
    group.addoption("--moebench-baseline-dir", default=None, metavar="DIR",
                    help="folder of baselines (default: baselines under the rootdir)")
    group.addoption("--moebench-machine-class", default=None, metavar="NAME",
                    help="baseline machine class (default: from the GPU name, e.g. h100; cpu without a GPU)")
    group.addoption("--moebench-time-limit", type=float, default=None, metavar="SECONDS",
                    help="start no case that would end past this many seconds after the run began (judged by the "
                         "longest case so far of its kind: one that builds its model, or one that finds it built): "
                         "the rest are skipped with the reason, and the finished ones are reported and stored as "
                         "usual; for a CI job with a wall-time limit")
    group.addoption("--moebench-kernels", default="auto", choices=KERNELS,
                    help="the engine's MoE kernels for every case, the resident reference included "
                         "(moeoffload.offload(kernels=...)): auto (default), the grouped Triton kernels where they run "
                         "(CUDA), else exact; exact, the per-expert loop, bit-identical to the unoffloaded eager "
                         "model; "
                         "triton; reference, the grouped algorithm in plain torch (any device). An exact policy must "
                         "give the resident model's tokens on the same kernels; off the exact loop the table also "
                         "shows how the resident model agrees with the exact loop")
    group.addoption("--moebench-fetch", default="auto", choices=FETCHES,
                    help="who fetches a missing expert (moeoffload.offload(fetch=...)): auto (default), the engine "
                         "picks; host, a sync per MoE layer and the copy engine; device, the grouped kernels look "
                         "experts up in a directory on the device, for the policies that can (an LRU or next-use "
                         "cache without a predictor; the others fetch on the host)")
    group.addoption("--moebench-weights", choices=("synthetic", "checkpoint", "auto"), default=None,
                    help="synthetic: seeded weights (default; MOEBENCH_WEIGHTS); checkpoint: the published checkpoint "
                         "from $MOEBENCH_CHECKPOINTS/<model> or the offline Hugging Face cache, else an error; auto: "
                         "the checkpoint where found, else synthetic (moebench.zoo.specs)")
    group.addoption("--moebench-routing", choices=("calibrated", "uniform"), default=None,
                    help="synthetic models' routers: calibrated (default; MOEBENCH_ROUTING) to published routing "
                         "statistics where the family has a calibration, or uniform (plain seeded weights, routing "
                         "without language structure); recorded in each case's weights")
    group.addoption("--moebench-workload", choices=("decode", "throughput"), default="decode",
                    help="decode (default): each case times one batch of prompts through generate(); throughput: "
                         "each case serves many requests through moeoffload.serving (continuous batching, the "
                         "policy's token scheduler) and records tokens/s, TTFT and TPOT, experts per step and bytes "
                         "per token (moebench.serving_case); decoder-only models")
    group.addoption("--moebench-inject-delay", default=None, metavar="TIME",
                    help="TEST HOOK: busy-wait before every MoE layer, to fake a slowdown: TIME (e.g. 0.2ms) each "
                         "call, or a percentage (e.g. 5%%: stretch the run by that much, whatever the machine's "
                         "speed); recorded as inject_delay_ms / inject_slowdown and refused as a baseline")


@pytest.hookimpl(tryfirst=True)
def pytest_cmdline_main(config: pytest.Config) -> None:
    """`-n` without `--dist` spreads a moebench run by model (`workers.py`: why), before xdist picks its 'load'."""
    if config.getoption("moebench") and getattr(config.option, "numprocesses", None) \
            and getattr(config.option, "dist", "no") == "no":
        config.option.dist = "loadgroup"


@pytest.hookimpl(tryfirst=True, optionalhook=True)  # a hook of pytest-xdist, absent without it
def pytest_xdist_auto_num_workers(config: pytest.Config) -> int | None:
    """`-n auto` under --moebench: one worker per visible GPU (xdist's count of CPU cores without one, or when
    $PYTEST_XDIST_AUTO_NUM_WORKERS says otherwise)."""
    if not config.getoption("moebench") or os.environ.get("PYTEST_XDIST_AUTO_NUM_WORKERS"):
        return None
    import torch

    return torch.cuda.device_count() or None


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "moebench: a moebench benchmark case (collected from suite files)")
    if not config.getoption("moebench"):
        return
    if config.getoption("moebench_weights"):
        os.environ["MOEBENCH_WEIGHTS"] = config.getoption("moebench_weights")  # suite models read it when built
    if config.getoption("moebench_routing"):
        os.environ["MOEBENCH_ROUTING"] = config.getoption("moebench_routing")  # likewise
    _check_options(config)
    from . import workers
    from .measure import resolve_device, resolve_tier

    try:
        requested = workers.pin_device(config, config.getoption("moebench_device"))
        device = requested if requested and workers.is_controller(config) else resolve_device(requested)
    except Exception as exc:  # a malformed name, or CUDA asked for where there is none
        raise pytest.UsageError(f"--moebench-device: {exc}") from None
    from .deadline import Deadline
    from .regression import configure_comparison, parse_delay_option
    from .state import MoebenchRun
    from .turns import Turns

    comparison = configure_comparison(config, device)  # raises pytest.UsageError on a bad spec or baseline
    delay_s, slowdown = parse_delay_option(config)
    time_limit = config.getoption("moebench_time_limit")
    config.stash[_RUN] = MoebenchRun(
        device=device, tier=resolve_tier(config.getoption("moebench_tier"), device),
        rounds=config.getoption("moebench_rounds"), policies=config.getoption("moebench_policy"),
        kernels=config.getoption("moebench_kernels"), fetch=config.getoption("moebench_fetch"),
        workload=config.getoption("moebench_workload"),
        history=config.getoption("moebench_history") or os.path.join(str(config.rootpath), ".moebench"),
        comparison=comparison, inject_delay_s=delay_s, inject_slowdown=slowdown,
        turns=Turns.from_env(),  # set by `moebench ab`; the first timed round waits for the referee's floor
        deadline=None if time_limit is None else Deadline(time_limit),
        placement=workers.placement(config, device))
    if workers.is_controller(config):
        controller = workers.Controller(config.stash[_RUN], grouped=config.option.dist == "loadgroup")
        config.pluginmanager.register(controller, CONTROLLER)
    workers.group_by_model(config)


def _check_options(config: pytest.Config) -> None:
    """The options that need no engine, and the policy names: bad input is one UsageError naming the fix."""
    rounds = config.getoption("moebench_rounds")
    if rounds < 1:
        raise pytest.UsageError(f"--moebench-rounds must be at least 1, got {rounds}")
    time_limit = config.getoption("moebench_time_limit")
    if time_limit is not None and time_limit <= 0:
        raise pytest.UsageError(f"--moebench-time-limit must be a positive number of seconds, got {time_limit:g}")
    if config.getoption("moebench_fetch") == "device" and config.getoption("moebench_kernels") == "exact":
        raise pytest.UsageError("--moebench-fetch device runs on the grouped kernels; use --moebench-kernels auto "
                                "(reference on a CPU)")
    selected = config.getoption("moebench_policy")
    if selected:
        import moeoffload

        problems = []
        for name in dict.fromkeys(selected):
            try:
                moeoffload.get_policy(name)
            except moeoffload.MoeOffloadError as exc:  # unknown, or its entry point failed to load (named)
                problems.append(str(exc))
        if problems:
            raise pytest.UsageError("--moebench-policy: " + "; ".join(problems))


def pytest_unconfigure(config: pytest.Config) -> None:
    run = moebench_run(config)
    if run is not None and run.turns is not None:
        run.turns.close()  # A/B: the other side runs on alone


def _is_suite_file(path: Path) -> bool:
    """`suite.py` / `suite_*.py` inside a `suites` folder: the plugin is installed for every project in the
    environment, so it must not claim other projects' files that merely share the name."""
    named = path.suffix == ".py" and (path.name == "suite.py" or path.name.startswith("suite_"))
    return named and "suites" in path.parent.parts


def pytest_collect_file(file_path: Path, parent: pytest.Collector):
    if _is_suite_file(file_path):
        return SuiteFile.from_parent(parent, path=file_path)
    return None


class SuiteFile(pytest.File):
    def collect(self):
        run = moebench_run(self.config)
        if run is None:
            # one skipped item rather than a skipped collection: the run reports "1 skipped" and exits 0
            yield DisabledSuite.from_parent(self, name="moebench")
            return
        from .measure import Session
        from .suite import SuiteError, load_suite

        try:
            suite = load_suite(self.path)
            cases = suite.cases(run.policies, tier=run.tier)
        except SuiteError as exc:
            raise self.CollectError(str(exc)) from None
        session = Session(suite, device=run.device, tier=run.tier, rounds=run.rounds,
                          inject_delay_s=run.inject_delay_s, inject_slowdown=run.inject_slowdown,
                          turns=run.turns, kernels=run.kernels, fetch=run.fetch)
        from .regression import load_suite_baseline

        load_suite_baseline(run, suite.name, self)  # a corrupt baseline is a collection error naming the file
        run.sessions[str(self.path)] = session
        if suite.name not in run.suites:
            run.suites.append(suite.name)
        for case in cases:
            yield CaseItem.from_parent(self, name=case.name, case=case, bench=session)


class CaseItem(pytest.Item):
    def __init__(self, *, case, bench, **kwargs):
        super().__init__(**kwargs)
        self.case = case
        self.bench = bench
        self.add_marker(pytest.mark.moebench)
        self.made: list[dict] = []  # the records this case made; an xdist worker sends them on the case's report
        if hasattr(self.config, "workerinput"):  # the xdist_group mark is known where xdist runs
            from .workers import group_mark

            self.add_marker(group_mark(bench.suite.name, case.model))

    def runtest(self) -> None:
        run = moebench_run(self.config)
        assert run is not None  # suite files yield case items only under --moebench
        if run.deadline is None:
            self._run(run)
            return
        model = (self.bench.suite.name, self.case.model)  # built once per suite session (measure.Session.model)
        refusal = run.deadline.refusal(model)
        if refusal is not None:
            pytest.skip(refusal)
        run.deadline.run(model, lambda: self._run(run))

    def _run(self, run: MoebenchRun) -> None:
        from .measure import CaseFailed, CaseSkipped

        if run.serving is not None and run.serving is not self.bench:
            run.serving.close()  # another suite's model leaves the device before this suite's case is measured
        run.serving = self.bench
        if run.placement.get("worker"):
            from .workers import inject_crash

            inject_crash(self.name)
        try:
            record = self._measure(run)
        except CaseSkipped as exc:
            pytest.skip(str(exc))
        except CaseFailed as exc:
            from .measure import expected_failure

            self._keep(run, exc.record)
            reason = expected_failure(exc.record)
            if reason is None:
                raise
            exc.record["expected_failure"] = reason
            pytest.xfail(reason)
        self._keep(run, record)
        from .regression import check_against_baseline

        check_against_baseline(run, record)  # raises CaseFailed when the case regressed

    def _measure(self, run: MoebenchRun) -> dict:
        """The case's record under the run's workload: one batch through generate() (moebench.measure) or many
        requests through the serving loop (moebench.serving_case)."""
        if run.workload == "throughput":
            from .serving_case import run_case

            return run_case(self.bench, self.case)
        return self.bench.run(self.case)

    def _keep(self, run: MoebenchRun, record: dict) -> None:
        record.update(run.placement)
        run.records.append(record)
        self.made.append(record)

    def repr_failure(self, excinfo, style=None):
        from .measure import CaseBroken, CaseFailed

        if excinfo.errisinstance((CaseFailed, CaseBroken)):
            return str(excinfo.value)
        return super().repr_failure(excinfo, style=style)

    def reportinfo(self):
        return self.path, 0, f"moebench {self.name}"


class DisabledSuite(pytest.Item):
    """Stands for a suite file when --moebench is not given: skips with the reason, imports nothing."""

    def runtest(self) -> None:
        raise pytest.skip.Exception(SKIP_REASON, _use_item_location=True)  # report the suite file, not this line

    def reportinfo(self):
        return self.path, 0, f"moebench suite {self.path.parent.name}"


def pytest_report_header(config: pytest.Config):
    run = moebench_run(config)
    if run is None:
        return None
    return (f"moebench: device {run.device}, tier {run.tier}, rounds {run.rounds}, "
            f"policies {', '.join(run.policies) if run.policies else 'all registered'}, "
            f"kernels {run.kernels}, fetch {run.fetch}, workload {run.workload}")


def pytest_sessionfinish(session: pytest.Session, exitstatus) -> None:
    run = moebench_run(session.config)
    if run is None:
        return
    for bench in run.sessions.values():
        bench.close()  # each suite's last model gets its experts back, and the device and pinned memory are freed
    config = session.config
    if hasattr(config, "workerinput"):  # an xdist worker: the controller stores the run
        from .workers import OUTPUT, worker_output

        config.workeroutput[OUTPUT] = worker_output(run)  # type: ignore[attr-defined]  # set by xdist
        return
    controller = config.pluginmanager.get_plugin(CONTROLLER)
    if controller is not None:
        controller.merge()
    if not run.records:
        return
    from .regression import finish_session

    finish_session(session, run, exitstatus)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo):
    """On an xdist worker, a case's records travel to the controller on its report (`workers.py`: why)."""
    report = yield
    made = getattr(item, "made", None)
    if made and call.when == "call" and hasattr(item.config, "workerinput"):
        from .history import _clean
        from .workers import RECORDS

        setattr(report, RECORDS, json.dumps(_clean(made)))
    return report


def pytest_terminal_summary(terminalreporter, exitstatus, config: pytest.Config) -> None:
    run = moebench_run(config)
    if run is None or hasattr(config, "workerinput"):
        return
    from .table import render

    tr = terminalreporter
    tr.write_sep("=", f"moebench: {len(run.records)} cases (device {run.device}, tier {run.tier})")
    if run.records:
        for line in render(run.records).splitlines():
            tr.write_line(line)
    if run.history_path:
        tr.write_line(f"history: appended to {run.history_path}")
    elif run.history_error:
        tr.write_line(f"history: NOT written: {run.history_error}", red=True)
    for line, bad in run.messages:
        tr.write_line(line, red=bad)
