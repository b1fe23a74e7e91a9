"""History store: append/read, run ids, a writer killed mid-write (SIGKILL), and foreign or corrupt files."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from moebench import history
from moebench.fingerprint import machine_class

SRC = str(Path(__file__).resolve().parents[2] / "src")
MACHINE = {"hostname": "h", "python": "3", "cpu": "cpu", "gpu": None, "torch": "t", "transformers": "x"}


def _run(n_records=1, samples=5, **kw):
    recs = [{"suite": "s", "case": f"m[lru-{i}]", "model": "m", "policy": "lru", "budget": f"{i}%",
             "tokens_per_s": 10.0, "samples": {"tokens_per_s": [10.0] * samples}, "passed": True}
            for i in range(n_records)]
    return history.make_run(recs, ["s"], "/nonexistent", {"device": "cpu"}, machine=MACHINE, **kw)


def test_run_carries_id_status_fingerprint_and_weight_source(tmp_path):
    run = _run()
    assert run["schema"] == 2 and run["status"] == "complete" and run["machine_class"] == "cpu"
    assert run["run_id"][:8].isdigit() and run["records"][0]["weight_source"] == "synthetic"
    history.append(tmp_path, run)
    history.append(tmp_path, _run(status="interrupted"))
    runs, problems = history.read_history(tmp_path)
    assert problems == [] and [r["status"] for r in runs] == ["complete", "interrupted"]
    assert history.find_run(runs, run["run_id"][:20])["run_id"] == run["run_id"]
    assert history.find_run(runs, "-1") is runs[-1]
    with pytest.raises(history.HistoryError, match="no run 'zzz'"):
        history.find_run(runs, "zzz")


def test_old_schema_1_device_history_still_reads():
    path = Path(__file__).resolve().parents[2] / "benchmarks" / "results" / "h100-2026-11-23" / "history.jsonl"
    runs, problems = history.read_history(path)
    assert len(runs) == 1 and not problems and runs[0]["schema"] == 1
    assert "INTERRUPTED" not in history.format_run_header(runs[0])


@pytest.mark.parametrize("content, match", [
    (b'{"benchmarks": []}\n', "not a moebench history"),                     # another tool's JSON
    (b'{"schema": 99, "records": []}\n', "schema 99"),                      # a newer moebench
    (b"name,tokens\nx,1\n", "not JSON"),                                     # a CSV
    (b'{"schema": 2, "records": []}\nGARBAGE\n{"schema": 2, "records": []}\n', "not JSON"),  # corrupt middle
])
def test_foreign_or_corrupt_history_is_an_error_and_never_written(tmp_path, content, match):
    path = tmp_path / history.FILENAME
    path.write_bytes(content)
    with pytest.raises(history.HistoryError, match=match) as err:
        history.read_history(tmp_path)
    assert str(path) in str(err.value)
    with pytest.raises(history.HistoryError, match=match):
        history.append(tmp_path, _run())
    assert path.read_bytes() == content


def test_history_path_that_is_a_file_is_refused(tmp_path):
    f = tmp_path / "notadir"
    f.write_text("x")
    with pytest.raises(history.HistoryError, match="is a file, not a history directory"):
        history.append(f, _run())
    assert f.read_text() == "x"


_WRITER = """
import sys
sys.path.insert(0, {src!r})
from moebench import history
run = history.make_run([{{"suite": "s", "case": "c", "samples": {{"tokens_per_s": [1.0] * 200000}}}}], ["s"],
                       "/nonexistent", machine={{"python": "3"}})
history.append({dir!r}, run)
print("ready", flush=True)
while True:
    history.append({dir!r}, run)
"""


def test_writer_killed_mid_write_never_corrupts_what_was_stored(tmp_path):
    """SIGKILL a process that appends large runs (about 1 MB per line) in a loop, at staggered moments: every
    run stored before stays readable, at most the last line is torn, and the next append is intact. (A kill
    lands inside the write itself only now and then; the torn line it leaves is covered deterministically by
    test_moebench_units.test_history_torn_last_line_is_skipped_and_reported.)"""
    d = tmp_path / "h"
    for attempt in range(4):
        before, _ = history.read_history(d)
        proc = subprocess.Popen([sys.executable, "-c", _WRITER.format(src=SRC, dir=str(d))], stdout=subprocess.PIPE)
        assert proc.stdout.readline().strip() == b"ready"
        time.sleep(0.05 + 0.07 * attempt)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        runs, problems = history.read_history(d)
        assert len(runs) > len(before)  # the writer did store runs before it was killed
        assert runs[: len(before)] == before  # nothing stored earlier changed
        assert all(len(r["records"][0]["samples"]["tokens_per_s"]) == 200000 for r in runs)
        assert len(problems) <= attempt + 1  # at most one torn line per kill
    history.append(d, _run())
    runs, _ = history.read_history(d)
    assert runs[-1]["records"][0]["case"] == "m[lru-0]"


def test_machine_class_from_gpu_name():
    gpu = {"gpu": {"names": ["NVIDIA H100 80GB HBM3"], "count": 1}}
    assert machine_class(gpu) == "h100"
    assert machine_class(gpu, device="cpu") == "cpu"
    assert machine_class({"gpu": {"names": ["NVIDIA A100-SXM4-40GB"]}}) == "a100"
    assert machine_class({"gpu": {"names": ["NVIDIA RTX 6000 Ada Generation"]}}) == "nvidia-rtx-6000-ada-generation"
    assert machine_class({"gpu": None}) == "cpu"


def test_clean_json_has_no_nan(tmp_path):
    run = _run()
    run["records"][0]["hit_rate"] = float("nan")
    path = history.append(tmp_path, run)
    assert json.loads(path.read_text())["records"][0]["hit_rate"] is None


def test_commit_can_be_given_for_a_tree_copied_without_its_history(tmp_path, monkeypatch):
    """A device that receives a copy of the tree has a stale or no .git; the caller's HEAD is passed instead."""
    from moebench.fingerprint import git_info

    assert git_info(tmp_path)["commit"] is None  # not a checkout
    monkeypatch.setenv("MOEBENCH_COMMIT", "abc1234")
    assert git_info(tmp_path) == {"commit": "abc1234", "dirty": False, "source": "MOEBENCH_COMMIT"}
