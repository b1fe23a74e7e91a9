"""A session's regression step, for the plugin: baselines loaded before anything runs, each case checked against
its baseline as it finishes, and at the end the run appended to the history and (on request) saved as baseline.

Plain functions over the plugin's state dict, so the plugin's hooks stay one line each.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from . import baseline as bl
from . import history
from .fingerprint import machine_class, machine_info

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


def configure_comparison(config: pytest.Config, device: str) -> dict:
    """Everything the regression step needs, checked before collection; bad input is a pytest.UsageError."""
    try:
        limits = bl.parse_limits(config.getoption("moebench_compare_fail") or bl.DEFAULT_LIMITS)
    except ValueError as exc:
        raise pytest.UsageError(f"--moebench-compare-fail: {exc}") from None
    try:
        delay, stretch = parse_delay(config.getoption("moebench_inject_delay"))
    except ValueError as exc:
        raise pytest.UsageError(f"--moebench-inject-delay: {exc}") from None
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
                explicit = bl.load(explicit)  # a corrupt or foreign file stops the session before any work
            except bl.BaselineError as exc:
                raise pytest.UsageError(f"--moebench-compare: {exc}") from None
        elif not explicit.is_dir():
            raise pytest.UsageError(f"--moebench-compare: {mode} is neither a baseline file nor a folder of them")
    return {"limits": limits, "inject_delay_s": delay, "inject_slowdown": stretch, "machine": machine,
            "machine_class": cls,
            "baseline_dir": base_dir, "compare_mode": mode, "explicit_baseline": explicit, "baselines": {},
            "baseline_paths": {}, "save_baseline": config.getoption("moebench_save_baseline"),
            "baseline_runs": baseline_runs,
            "store_messages": []}


def load_suite_baseline(state: dict, suite: str, collector: pytest.Collector) -> None:
    """Find and load the baseline of `suite` (once); a corrupt one is a collection error naming the file."""
    if suite in state["baselines"] or state["compare_mode"] == "none":
        return
    explicit = state["explicit_baseline"]
    if isinstance(explicit, dict):
        if explicit["suite"] == suite:
            state["baselines"][suite] = explicit
            state["baseline_paths"][suite] = state["compare_mode"]
        else:
            state["baselines"][suite] = None
            state["store_messages"].append((f"baseline: {state['compare_mode']} is for suite {explicit['suite']!r},"
                                            f" not {suite!r}; {suite!r} not compared", True))
        return
    folder = explicit if isinstance(explicit, Path) else state["baseline_dir"] / state["machine_class"]
    path = folder / f"{suite}.json"
    if not path.exists():
        state["baselines"][suite] = None
        if state["compare_mode"] != "auto":
            raise collector.CollectError(f"--moebench-compare: no baseline {path}; make one with "
                                         "--moebench-save-baseline or `moebench baseline update`")
        return
    try:
        state["baselines"][suite] = bl.load(path)
    except bl.BaselineError as exc:
        raise collector.CollectError(f"{exc}; or run with --moebench-compare=none") from None
    state["baseline_paths"][suite] = str(path)


def check_against_baseline(state: dict, record: dict) -> None:
    """Attach the verdict to `record`; raise CaseFailed when the case regressed."""
    from .measure import CaseFailed

    base = state["baselines"].get(record.get("suite"))
    if base is None:
        return
    comparison = bl.compare_case(base["cases"].get(record["case"]), record, state["limits"],
                                 base_machine=base.get("machine"), cur_machine=state["machine"])
    comparison["baseline_file"] = state["baseline_paths"].get(record.get("suite"))
    record["comparison"] = comparison
    if comparison["status"] == "regressed":
        raise CaseFailed(f"{record['case']}: regressed against {comparison['baseline_file']}: "
                         f"{comparison['message']}", record)


def finish_session(session: pytest.Session, state: dict, options: dict, exitstatus) -> None:
    """Append the run to the history (marked 'interrupted' after Ctrl-C) and save baselines when asked."""
    config = session.config
    interrupted = int(exitstatus) == int(pytest.ExitCode.INTERRUPTED)
    command = shlex.join(["pytest", *config.invocation_params.args])
    options = dict(options, inject_delay_ms=state["inject_delay_s"] * 1e3,
                   inject_slowdown=state["inject_slowdown"], compare=state["compare_mode"],
                   limits=state["limits"])
    run = history.make_run(state["records"], state["suites"], config.rootpath, options,
                           status="interrupted" if interrupted else "complete", command=command,
                           machine=state["machine"], machine_cls=state["machine_class"])
    state["run"] = run
    state["store_messages"].extend(bl.verdict_notes(state["records"], state["baseline_paths"]))
    try:
        state["history_path"] = history.append(state["history"], run)
    except (OSError, history.HistoryError) as exc:
        state["history_error"] = str(exc)
    if not state["save_baseline"]:
        return
    if interrupted:
        state["store_messages"].append(("baseline: NOT saved, the run was interrupted", True))
        return
    earlier: list[dict] = []
    if state["baseline_runs"] > 1:
        try:
            stored, _ = history.read_history(state["history"])
            earlier = [r for r in reversed(stored) if r.get("run_id") != run.get("run_id")]
        except (OSError, history.HistoryError) as exc:
            state["store_messages"].append((f"baseline: earlier runs unreadable ({exc}); keeping this run only",
                                            True))
    for suite in state["suites"]:
        path = bl.path_for(state["baseline_dir"], state["machine_class"], suite)
        try:
            baseline = bl.add_earlier_runs(bl.from_run(run, suite, command), earlier, state["baseline_runs"])
            bl.save(path, baseline)
            kept = len(baseline.get("runs") or [run["run_id"]])
            state["store_messages"].append((f"baseline: wrote {path} (run {run['run_id']}"
                                            + (f" and {kept - 1} earlier" if kept > 1 else "") + ")", False))
        except (OSError, bl.BaselineError) as exc:
            state["store_messages"].append((f"baseline: NOT saved: {exc}", True))

