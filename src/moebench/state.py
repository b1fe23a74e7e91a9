"""The plugin's shared state: one `MoebenchRun` per pytest session, hung on the config's stash.

Why one typed object: the plugin's hooks, the collector, the case items and the regression step (`regression.py`)
all read and write the same run state; typed fields make a misspelt key an attribute error at the line that made it,
and a reader sees in one place what a run holds. Imported only when --moebench is given.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .deadline import Deadline
    from .measure import Session
    from .turns import Turns


@dataclass
class Comparison:
    """What the regression step needs, checked before collection (`regression.configure_comparison`)."""

    limits: dict[str, float]  # metric -> failure limit (a fraction)
    machine: dict  # this machine's fingerprint (`fingerprint.machine_info`)
    machine_class: str  # the baselines' folder, e.g. h100 or cpu
    baseline_dir: Path
    mode: str  # "auto", "required", "none", or the path given to --moebench-compare
    explicit: Path | dict | None  # --moebench-compare PATH: a folder, or the loaded baseline file
    save_baseline: bool
    baseline_runs: int  # runs a saved baseline keeps (`--moebench-baseline-runs`)
    baselines: dict[str, dict | None] = field(default_factory=dict)  # suite -> loaded baseline (None: none found)
    baseline_paths: dict[str, str] = field(default_factory=dict)  # suite -> where its baseline came from


@dataclass
class MoebenchRun:
    """One `pytest --moebench` session: its options, the suites' measuring sessions, and what it produced."""

    device: str
    tier: str
    rounds: int
    policies: list[str] | None  # --moebench-policy; None: every registered policy
    kernels: str  # --moebench-kernels, as the user wrote it (the records keep what each case resolved to)
    fetch: str  # --moebench-fetch
    history: str  # folder of history.jsonl
    comparison: Comparison
    inject_delay_s: float = 0.0  # test hook: a busy wait per MoE layer call
    inject_slowdown: float = 0.0  # test hook: stretch every round by this fraction
    turns: Turns | None = None  # set by `moebench ab`: the floor is given up before every timed round
    deadline: Deadline | None = None  # --moebench-time-limit
    sessions: dict[str, Session] = field(default_factory=dict)  # suite file -> its measuring session
    serving: Session | None = None  # the session whose model is offloaded now (its handle is kept across its cases)
    records: list[dict] = field(default_factory=list)
    suites: list[str] = field(default_factory=list)
    stored_run: dict | None = None  # the history entry made at the session's end
    history_path: str | None = None
    history_error: str | None = None
    messages: list[tuple[str, bool]] = field(default_factory=list)  # lines under the table, (text, shown in red)
    placement: dict = field(default_factory=dict)  # every record of this process gets these (worker id, GPU model)
    workers: dict[str, dict] = field(default_factory=dict)  # xdist controller: worker id -> slot, device, crash
    workload: str = "decode"  # --moebench-workload: "decode" or "throughput" (moebench.serving_case)

    def options(self) -> dict[str, Any]:
        """The options a history entry records."""
        return {"device": self.device, "tier": self.tier, "rounds": self.rounds, "policies": self.policies,
                "kernels": self.kernels, "fetch": self.fetch, "workload": self.workload}
