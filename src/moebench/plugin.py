"""pytest plugin: `--moebench` collects suites (`suite.py` / `suite_*.py` files) and runs one item per case.

Kept thin: measuring, checking, tables and history live in plain modules. Heavy imports (torch, transformers,
moeoffload) happen only when --moebench is given, so plain `pytest` pays nothing for this plugin.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

SKIP_REASON = "moebench suites run only with --moebench"
_STATE = pytest.StashKey[dict]()


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("moebench", "moebench: MoE offloading benchmark suites")
    group.addoption("--moebench", action="store_true", default=False,
                    help="collect and run benchmark suites (suite.py files); without it they are skipped")
    group.addoption("--moebench-policy", action="append", default=None, metavar="NAME",
                    help="run only this policy (repeatable); default: every registered policy")
    group.addoption("--moebench-tier", choices=("quick", "full", "auto"), default="auto",
                    help="quick: depth-reduced models (CPU); full: published sizes; auto: full when CUDA is available")
    group.addoption("--moebench-rounds", type=int, default=3, metavar="N", help="timed rounds per case (default 3)")
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
    # moeoffload.layer.KERNEL_MODES, spelled out: importing the engine (and torch) here would slow every pytest run
    group.addoption("--moebench-kernels", default="torch", choices=("torch", "auto", "triton", "grouped-torch"),
                    help="the engine's MoE kernels (moeoffload.offload(kernels=...)): torch, the bit-exact per-expert "
                         "loop (default); auto, the grouped Triton kernels where they run (CUDA), else the loop; "
                         "triton; grouped-torch, the grouped path in plain torch (tests). Off the loop an exact "
                         "policy is judged by the accuracy limit, not by identical tokens, and the reference stays "
                         "on the loop")
    group.addoption("--moebench-fetch", default="host", choices=("host", "device"),
                    help="who fetches a missing expert in the LRU and next-use cases, lookahead included "
                         "(moeoffload.offload(fetch=...)): host (default), a sync per MoE layer and the copy engine; "
                         "device (experimental), the grouped kernels look experts up in a directory on the GPU and a "
                         "host thread queues the missing ones on the copy engine (needs --moebench-kernels other than "
                         "torch; other policies keep fetching on the host)")
    group.addoption("--moebench-weights", choices=("synthetic", "checkpoint", "auto"), default=None,
                    help="synthetic: seeded weights (default; MOEBENCH_WEIGHTS); checkpoint: the published checkpoint "
                         "from $MOEBENCH_CHECKPOINTS/<model> or the offline Hugging Face cache, else an error; auto: "
                         "the checkpoint where found, else synthetic (moebench.zoo.specs)")
    group.addoption("--moebench-inject-delay", default=None, metavar="TIME",
                    help="TEST HOOK: busy-wait before every MoE layer, to fake a slowdown: TIME (e.g. 0.2ms) each "
                         "call, or a percentage (e.g. 5%%: stretch the run by that much, whatever the machine's "
                         "speed); recorded as inject_delay_ms / inject_slowdown and refused as a baseline")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "moebench: a moebench benchmark case (collected from suite files)")
    if not config.getoption("moebench"):
        return
    if config.getoption("moebench_weights"):
        os.environ["MOEBENCH_WEIGHTS"] = config.getoption("moebench_weights")  # suite models read it when built
    rounds = config.getoption("moebench_rounds")
    if rounds < 1:
        raise pytest.UsageError(f"--moebench-rounds must be at least 1, got {rounds}")
    time_limit = config.getoption("moebench_time_limit")
    if time_limit is not None and time_limit <= 0:
        raise pytest.UsageError(f"--moebench-time-limit must be a positive number of seconds, got {time_limit:g}")
    if config.getoption("moebench_fetch") == "device" and config.getoption("moebench_kernels") == "torch":
        raise pytest.UsageError("--moebench-fetch device runs on the grouped kernels; add --moebench-kernels auto "
                                "(grouped-torch on a CPU)")
    selected = config.getoption("moebench_policy")
    if selected:
        import moeoffload

        available = moeoffload.available_policies()
        unknown = [p for p in selected if p not in available]
        if unknown:
            raise pytest.UsageError(f"--moebench-policy: unknown policy {', '.join(map(repr, unknown))}; "
                                    f"available: {', '.join(available)}")
    from .measure import resolve_device, resolve_tier

    try:
        device = resolve_device(config.getoption("moebench_device"))
    except Exception as exc:  # a malformed name, or CUDA asked for where there is none
        raise pytest.UsageError(f"--moebench-device: {exc}") from None
    history = config.getoption("moebench_history") or os.path.join(str(config.rootpath), ".moebench")
    from .regression import configure_comparison

    comparison = configure_comparison(config, device)  # raises pytest.UsageError on a bad spec or baseline
    from .deadline import Deadline
    from .turns import Turns

    turns = Turns.from_env()  # set by `moebench ab`; the first timed round waits for the referee to give the floor
    config.stash[_STATE] = {
        "device": device,
        "tier": resolve_tier(config.getoption("moebench_tier"), device),
        "rounds": rounds,
        "policies": selected,
        "kernels": config.getoption("moebench_kernels"),
        "fetch": config.getoption("moebench_fetch"),
        "history": history,
        "sessions": {},  # suite file -> measure.Session
        "serving": None,  # the Session whose model is offloaded now (its handle is kept across its cases)
        "records": [],
        "suites": [],
        "history_path": None,
        "history_error": None,
        "turns": turns,
        "deadline": None if time_limit is None else Deadline(time_limit),
        **comparison,
    }


def pytest_unconfigure(config: pytest.Config) -> None:
    state = config.stash.get(_STATE, None)
    if state is not None and state["turns"] is not None:
        state["turns"].close()  # A/B: the other side runs on alone


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
        state = self.config.stash.get(_STATE, None)
        if state is None:
            # one skipped item rather than a skipped collection: the run reports "1 skipped" and exits 0
            yield DisabledSuite.from_parent(self, name="moebench")
            return
        from .measure import Session
        from .suite import SuiteError, load_suite

        try:
            suite = load_suite(self.path)
            cases = suite.cases(state["policies"], tier=state["tier"])
        except SuiteError as exc:
            raise self.CollectError(str(exc)) from None
        session = Session(suite, device=state["device"], tier=state["tier"], rounds=state["rounds"],
                          inject_delay_s=state["inject_delay_s"], inject_slowdown=state["inject_slowdown"],
                          turns=state["turns"], kernels=state["kernels"], fetch=state["fetch"])
        from .regression import load_suite_baseline

        load_suite_baseline(state, suite.name, self)  # a corrupt baseline is a collection error naming the file
        state["sessions"][str(self.path)] = session
        if suite.name not in state["suites"]:
            state["suites"].append(suite.name)
        for case in cases:
            yield CaseItem.from_parent(self, name=case.name, case=case, bench=session)


class CaseItem(pytest.Item):
    def __init__(self, *, case, bench, **kwargs):
        super().__init__(**kwargs)
        self.case = case
        self.bench = bench
        self.add_marker(pytest.mark.moebench)

    def runtest(self) -> None:
        state = self.config.stash[_STATE]
        deadline = state["deadline"]
        if deadline is None:
            self._run(state)
            return
        model = (self.bench.suite.name, self.case.model)  # built once per suite session (measure.Session.model)
        refusal = deadline.refusal(model)
        if refusal is not None:
            pytest.skip(refusal)
        deadline.run(model, lambda: self._run(state))

    def _run(self, state) -> None:
        from .measure import CaseFailed, CaseSkipped

        if state["serving"] is not None and state["serving"] is not self.bench:
            state["serving"].close()  # another suite's model leaves the device before this suite's case is measured
        state["serving"] = self.bench
        try:
            record = self.bench.run(self.case)
        except CaseSkipped as exc:
            pytest.skip(str(exc))
        except CaseFailed as exc:
            from .measure import expected_failure

            state["records"].append(exc.record)
            reason = expected_failure(exc.record)
            if reason is None:
                raise
            exc.record["expected_failure"] = reason
            pytest.xfail(reason)
        state["records"].append(record)
        from .regression import check_against_baseline

        check_against_baseline(state, record)  # raises CaseFailed when the case regressed

    def repr_failure(self, excinfo, style=None):
        from .measure import CaseFailed

        if excinfo.errisinstance(CaseFailed):
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
    state = config.stash.get(_STATE, None)
    if state is None:
        return None
    return (f"moebench: device {state['device']}, tier {state['tier']}, rounds {state['rounds']}, "
            f"policies {', '.join(state['policies']) if state['policies'] else 'all registered'}"
            + ("" if state["kernels"] == "torch" else f", kernels {state['kernels']}")
            + ("" if state["fetch"] == "host" else f", fetch {state['fetch']}"))


def pytest_sessionfinish(session: pytest.Session, exitstatus) -> None:
    state = session.config.stash.get(_STATE, None)
    if state is None:
        return
    for bench in state["sessions"].values():
        bench.close()  # each suite's last model gets its experts back, and the device and pinned memory are freed
    if not state["records"]:
        return
    from .regression import finish_session

    options = {k: state[k] for k in ("device", "tier", "rounds", "policies", "kernels", "fetch")}
    finish_session(session, state, options, exitstatus)


def pytest_terminal_summary(terminalreporter, exitstatus, config: pytest.Config) -> None:
    state = config.stash.get(_STATE, None)
    if state is None:
        return
    from .table import render

    tr = terminalreporter
    records = state["records"]
    tr.write_sep("=", f"moebench: {len(records)} cases (device {state['device']}, tier {state['tier']})")
    if records:
        for line in render(records).splitlines():
            tr.write_line(line)
    if state["history_path"]:
        tr.write_line(f"history: appended to {state['history_path']}")
    elif state["history_error"]:
        tr.write_line(f"history: NOT written: {state['history_error']}", red=True)
    for line, bad in state["store_messages"]:
        tr.write_line(line, red=bad)
