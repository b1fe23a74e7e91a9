"""One suite run spread over pytest-xdist workers, one per GPU (`pytest --moebench -n auto suites`).

Each worker measures on its own device and runs whole models: the plugin marks every case with an `xdist_group` per
(suite, model) and makes `--dist loadgroup` the default, so a model is built, offloaded and given its resident
reference once per run. `--dist loadscope` would group by suite file and leave one GPU idle per file.

Records ride on each case's report to the controller, not only in the worker's final output (`workeroutput`): a
worker that dies (the OOM killer, a driver fault) sends no final output, and the cases it had finished would vanish
from the history. The controller merges them into one run and writes the history; workers never write it.
Imported only under --moebench.
"""

from __future__ import annotations

import json
import os
import re
from typing import TYPE_CHECKING

import pytest

from .history import _clean

if TYPE_CHECKING:
    from .state import MoebenchRun

SLOT = "moebench_slot"  # workerinput: the device slot the controller gave this worker
GROUPED = "moebench_loadgroup"  # workerinput: the controller schedules by xdist_group
OUTPUT = "moebench"  # workeroutput: what the worker collected (suites, baselines found, collection messages)
RECORDS = "moebench_records"  # report attribute: the JSON of the records a case made
CRASH_ENV = "MOEBENCH_INJECT_CRASH"


def worker_id(config: pytest.Config) -> str | None:
    """'gw0', 'gw1', ... on an xdist worker; None elsewhere."""
    workerinput = getattr(config, "workerinput", None)
    return None if workerinput is None else str(workerinput["workerid"])


def is_controller(config: pytest.Config) -> bool:
    """This process hands cases to xdist workers and runs none itself (the same test as xdist's own)."""
    option = config.option
    return (worker_id(config) is None and getattr(option, "dist", "no") != "no" and bool(getattr(option, "tx", None))
            and not option.collectonly)


def group_by_model(config: pytest.Config) -> None:
    """On a worker of a loadgroup run, let xdist name each case's group in its node id, which the controller's
    scheduler reads. A worker parses the command line afresh, so it misses the loadgroup that the plugin made the
    default on the controller (`plugin.pytest_cmdline_main`)."""
    workerinput = getattr(config, "workerinput", None)
    if workerinput is not None and workerinput.get(GROUPED):
        config.option.loadgroup = True


def device_slot(config: pytest.Config) -> int | None:
    """The worker's device slot: the one the controller gave it (stable when a crashed worker is replaced), else the
    number in its id; None outside a worker."""
    workerinput = getattr(config, "workerinput", None)
    if workerinput is None:
        return None
    if SLOT in workerinput:
        return int(workerinput[SLOT])
    m = re.search(r"(\d+)$", str(workerinput["workerid"]))
    return int(m.group(1)) if m else 0


def pin_device(config: pytest.Config, requested: str | None) -> str | None:
    """The --moebench-device a worker measures on: with CUDA and no GPU index asked for, its own GPU (slot modulo
    the visible GPUs), made current so that a bare 'cuda' lands there too. Elsewhere `requested` unchanged."""
    slot = device_slot(config)
    if requested not in (None, "", "auto", "cuda"):
        return requested
    import torch

    if is_controller(config):  # measures nothing: no CUDA context of its own on a worker's GPU, where NVML counts it
        return "cuda" if torch.cuda.is_available() else "cpu"
    if slot is None:
        return requested

    count = torch.cuda.device_count()
    if count == 0:
        return requested
    torch.cuda.set_device(slot % count)
    return f"cuda:{slot % count}"


def placement(config: pytest.Config, device: str) -> dict:
    """What each record of this process is tagged with: the worker id under xdist, and the GPU model of a CUDA
    device, so that a baseline compares a case with one measured on the same GPU model."""
    out: dict = {}
    if is_controller(config):
        return out
    worker = worker_id(config)
    if worker is not None:
        out["worker"] = worker
    if device.startswith("cuda"):
        import torch

        out["gpu"] = torch.cuda.get_device_name(torch.device(device))
    return out


def group_mark(suite: str, model: str) -> pytest.MarkDecorator:
    """The xdist group of a case: its suite and model, so that one worker builds the model once."""
    return pytest.mark.xdist_group(f"{suite}.{model}")


def inject_crash(case_name: str) -> None:
    """TEST HOOK, never for real runs: end the process at once (no cleanup, no final output, as a killed worker)
    in every case whose name contains $MOEBENCH_INJECT_CRASH, so the tests can show a crash fails that case only."""
    needle = os.environ.get(CRASH_ENV)
    if needle and needle in case_name:
        os._exit(3)


def worker_output(run: MoebenchRun) -> str:
    """What a worker sends at its end besides the records: JSON, as execnet carries only plain types."""
    return json.dumps(_clean({"suites": run.suites, "baseline_paths": run.comparison.baseline_paths,
                              "messages": run.messages, "device": run.device, **run.placement}))


class Controller:
    """The controller's side of a spread run: gives each worker a device slot, gathers the records from the cases'
    reports and what each worker reports at its end, and notes which worker crashed on which case."""

    def __init__(self, run: MoebenchRun, grouped: bool):
        self.run = run
        self.grouped = grouped
        self.slots: dict[str, int] = {}  # live worker -> slot
        self.order: dict[str, int] = {}  # case node id -> position in the collection
        self.arrived: list[tuple[str, dict]] = []  # (node id, record)

    def pytest_configure_node(self, node) -> None:
        held = set(self.slots.values())
        slot = next(i for i in range(len(held) + 1) if i not in held)  # a replaced worker's slot is reused
        self.slots[node.gateway.id] = slot
        node.workerinput[SLOT] = slot
        node.workerinput[GROUPED] = self.grouped
        self.run.workers[node.gateway.id] = {"slot": slot}

    def pytest_xdist_node_collection_finished(self, node, ids) -> None:
        if not self.order:
            self.order = {nodeid: i for i, nodeid in enumerate(ids)}

    def pytest_runtest_logreport(self, report) -> None:
        text = getattr(report, RECORDS, None)
        if text is not None:
            self.arrived.extend((report.nodeid, r) for r in json.loads(text))
        node = getattr(report, "node", None)
        if report.when == "???" and node is not None:  # xdist's report of the case a worker died in
            self.run.workers.setdefault(node.gateway.id, {})["crashed"] = report.nodeid

    def pytest_handlecrashitem(self, crashitem: str, report, sched) -> None:
        """The case a worker died in fails once and is not run again: a case that kills its worker (a kernel
        fault) would kill every replacement in turn until xdist gives up the whole run. The rest of its group runs on
        the replacement worker. (xdist's group schedulers put the crashed case back with its group.)"""
        workqueue = getattr(sched, "workqueue", None) or {}
        for scope, unit in list(workqueue.items()):
            if crashitem in unit:
                unit[crashitem] = True
                if all(unit.values()):
                    del workqueue[scope]

    def pytest_testnodedown(self, node, error) -> None:
        self.slots.pop(node.gateway.id, None)
        text = getattr(node, "workeroutput", {}).get(OUTPUT)
        entry = self.run.workers.setdefault(node.gateway.id, {})
        if error is not None:
            entry["error"] = str(error).strip().splitlines()[-1] if str(error).strip() else "crashed"
        if text is None:
            return
        out = json.loads(text)
        entry.update(device=out.get("device"), **({"gpu": out["gpu"]} if out.get("gpu") else {}))
        self.run.suites.extend(s for s in out.get("suites", []) if s not in self.run.suites)
        self.run.comparison.baseline_paths.update(out.get("baseline_paths") or {})
        self.run.messages.extend(tuple(m) for m in out.get("messages", []) if tuple(m) not in self.run.messages)

    def merge(self) -> None:
        """The run's records in collection order, whatever worker finished first; suites from the records when
        every worker died before reporting its own."""
        ordered = sorted(self.arrived, key=lambda pair: self.order.get(pair[0], len(self.order)))
        self.run.records = [record for _, record in ordered]
        for record in self.run.records:
            self.run.workers.setdefault(record.get("worker", "?"), {}).setdefault("device", record.get("device"))
            if record.get("suite") not in self.run.suites:
                self.run.suites.append(str(record.get("suite")))
