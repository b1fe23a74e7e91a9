"""A session's regression step, for the plugin: baselines loaded before anything runs, each case checked against
its baseline as it finishes, and at the end the run appended to the history and (on request) saved as baseline.

Plain functions over the plugin's `state.MoebenchRun`, so the plugin's hooks stay one line each.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from . import baseline as bl
from . import history
from .engine import kernels_name
from .fingerprint import machine_class, machine_info
from .state import Comparison

if TYPE_CHECKING:
    from .state import MoebenchRun

_DELAY = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(s|ms|us|%)\s*$")
_UNITS = {"s": 1.0, "ms": 1e-3, "us": 1e-6}


def parse_delay(text: str | None) -> tuple[float, float]:
    """The injected slowdown as (seconds per MoE layer call, stretch fraction); one of them is 0.

    '0.2ms' -> (0.0002, 0); '200us', '0.001s' likewise; '5%' -> (0, 0.05): every layer call stretches the time since
    the previous one by 5%, a known slowdown whatever the machine's speed (`measure.Stretch`); None -> (0, 0)."""
    if text is None:
        return 0.0, 0.0
    m = _DELAY.match(text)
    if not m:
        raise ValueError(f"malformed delay {text!r}; write a number and a unit, e.g. '5%', '0.2ms', '200us' or "
                         "'0.001s'")
    if m.group(2) == "%":
        fraction = float(m.group(1)) / 100
        if not 0 < fraction <= 1:
            raise ValueError(f"slowdown {text!r} must be above 0% and at most 100%")
        return 0.0, fraction
    seconds = float(m.group(1)) * _UNITS[m.group(2)]
    if seconds > 1.0:
        raise ValueError(f"delay {text!r} is over a second per MoE layer; a slowdown test needs well under 1 ms")
    return seconds, 0.0


def parse_delay_option(config: pytest.Config) -> tuple[float, float]:
    """--moebench-inject-delay as (seconds per MoE layer call, stretch fraction); a malformed one is a UsageError."""
    try:
        return parse_delay(config.getoption("moebench_inject_delay"))
    except ValueError as exc:
        raise pytest.UsageError(f"--moebench-inject-delay: {exc}") from None


def configure_comparison(config: pytest.Config, device: str) -> Comparison:
    """Everything the regression step needs, checked before collection; bad input is a pytest.UsageError."""
    try:
        limits = bl.parse_limits(config.getoption("moebench_compare_fail") or bl.DEFAULT_LIMITS)
    except ValueError as exc:
        raise pytest.UsageError(f"--moebench-compare-fail: {exc}") from None
    baseline_runs = config.getoption("moebench_baseline_runs")
    if baseline_runs < 1:
        raise pytest.UsageError(f"--moebench-baseline-runs: {baseline_runs} is not a run count; use 1 or more")
    machine = machine_info()
    cls = config.getoption("moebench_machine_class") or machine_class(machine, device)
    if not re.match(r"^[a-z0-9][a-z0-9_.\-]*$", cls):
        raise pytest.UsageError(f"--moebench-machine-class: {cls!r} is not a plain lower-case word (e.g. h100)")
    base_dir = Path(config.getoption("moebench_baseline_dir") or Path(str(config.rootpath)) / "baselines")
    mode = config.getoption("moebench_compare")
    explicit: Path | dict | None = None
    if mode not in ("auto", "required", "none"):
        explicit = Path(mode)
        if explicit.is_file():
            try:
                explicit = _in_current_words(bl.load(explicit))  # a corrupt or foreign file stops the session
            except bl.BaselineError as exc:
                raise pytest.UsageError(f"--moebench-compare: {exc}") from None
        elif not explicit.is_dir():
            raise pytest.UsageError(f"--moebench-compare: {mode} is neither a baseline file nor a folder of them")
    return Comparison(limits=limits, machine=machine, machine_class=cls, baseline_dir=base_dir, mode=mode,
                      explicit=explicit, save_baseline=config.getoption("moebench_save_baseline"),
                      baseline_runs=baseline_runs)


def _in_current_words(baseline: dict) -> dict:
    """The baseline with its cases' kernels in the engine's current names, so that a case measured on the exact loop
    compares with a stored one that said "loop" (an older engine's word)."""
    for case in baseline.get("cases", {}).values():
        if isinstance(case, dict):
            case["kernels"] = kernels_name(case.get("kernels"))
    return baseline


def load_suite_baseline(run: MoebenchRun, suite: str, collector: pytest.Collector) -> None:
    """Find and load the baseline of `suite` (once); a corrupt one is a collection error naming the file."""
    c = run.comparison
    if suite in c.baselines or c.mode == "none":
        return
    if isinstance(c.explicit, dict):
        if c.explicit["suite"] == suite:
            c.baselines[suite] = c.explicit
            c.baseline_paths[suite] = c.mode
        else:
            c.baselines[suite] = None
            run.messages.append((f"baseline: {c.mode} is for suite {c.explicit['suite']!r}, not {suite!r}; "
                                 f"{suite!r} not compared", True))
        return
    folder = c.explicit if isinstance(c.explicit, Path) else c.baseline_dir / c.machine_class
    path = folder / f"{suite}.json"
    if not path.exists():
        c.baselines[suite] = None
        if c.mode != "auto":
            raise collector.CollectError(f"--moebench-compare: no baseline {path}; make one with "
                                         "--moebench-save-baseline or `moebench baseline update`")
        return
    try:
        c.baselines[suite] = _in_current_words(bl.load(path))
    except bl.BaselineError as exc:
        raise collector.CollectError(f"{exc}; or run with --moebench-compare=none") from None
    c.baseline_paths[suite] = str(path)


def check_against_baseline(run: MoebenchRun, record: dict) -> None:
    """Attach the verdict to `record`; raise CaseFailed when the case regressed."""
    from .measure import CaseFailed

    c = run.comparison
    suite = str(record.get("suite"))
    base = c.baselines.get(suite)
    if base is None:
        return
    comparison = bl.compare_case(base["cases"].get(record["case"]), record, c.limits,
                                 base_machine=base.get("machine"), cur_machine=c.machine)
    comparison["baseline_file"] = c.baseline_paths.get(suite)
    record["comparison"] = comparison
    if comparison["status"] == "new":  # a policy the baseline lacks: set it against the best stored one instead
        from .versus import best_stored, versus

        rival = best_stored(list(base["cases"].values()), record)
        if rival is not None:
            record["versus"] = versus(record, rival)
    if comparison["status"] == "regressed":
        raise CaseFailed(f"{record['case']}: regressed against {comparison['baseline_file']}: "
                         f"{comparison['message']}", record)


def finish_session(session: pytest.Session, run: MoebenchRun, exitstatus) -> None:
    """Append the run to the history (marked 'interrupted' after Ctrl-C) and save baselines when asked."""
    config = session.config
    c = run.comparison
    interrupted = int(exitstatus) == int(pytest.ExitCode.INTERRUPTED)
    command = shlex.join(["pytest", *config.invocation_params.args])
    options = dict(run.options(), inject_delay_ms=run.inject_delay_s * 1e3, inject_slowdown=run.inject_slowdown,
                   compare=c.mode, limits=c.limits)
    stored = history.make_run(run.records, run.suites, config.rootpath, options,
                              status="interrupted" if interrupted else "complete", command=command,
                              machine=c.machine, machine_cls=c.machine_class, workers=run.workers)
    run.stored_run = stored
    run.messages.extend(bl.verdict_notes(run.records, c.baseline_paths))
    try:
        run.history_path = str(history.append(run.history, stored))
    except (OSError, history.HistoryError) as exc:
        run.history_error = str(exc)
    if not c.save_baseline:
        return
    if interrupted:
        run.messages.append(("baseline: NOT saved, the run was interrupted", True))
        return
    _save_baselines(run, stored, command)


def _save_baselines(run: MoebenchRun, stored: dict, command: str) -> None:
    """Write each suite's baseline from this run, with the samples of up to --moebench-baseline-runs - 1 earlier
    comparable runs from the history."""
    c = run.comparison
    earlier: list[dict] = []
    if c.baseline_runs > 1:
        try:
            runs, _ = history.read_history(run.history)
            earlier = [r for r in reversed(runs) if r.get("run_id") != stored.get("run_id")]
        except (OSError, history.HistoryError) as exc:
            run.messages.append((f"baseline: earlier runs unreadable ({exc}); keeping this run only", True))
    for suite in run.suites:
        path = bl.path_for(c.baseline_dir, c.machine_class, suite)
        try:
            baseline = bl.add_earlier_runs(bl.from_run(stored, suite, command), earlier, c.baseline_runs)
            bl.save(path, baseline)
            kept = len(baseline.get("runs") or [stored["run_id"]])
            run.messages.append((f"baseline: wrote {path} (run {stored['run_id']}"
                                 + (f" and {kept - 1} earlier" if kept > 1 else "") + ")", False))
        except (OSError, bl.BaselineError) as exc:
            run.messages.append((f"baseline: NOT saved: {exc}", True))
