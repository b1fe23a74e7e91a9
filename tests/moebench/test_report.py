"""moebench report / compare / export on fake runs: HTML with embedded plots, verdict tables, and a
pytest-benchmark JSON that pytest-benchmark's own loader and `compare` command read."""

import base64
import json
import logging
import subprocess
import sys

import numpy as np
import pytest

from moebench import history
from moebench.cli import main as cli_main


def _run(scale=1.0, commit_seed=0, status="complete", rng=None):
    rng = rng or np.random.default_rng(commit_seed)
    recs = []
    for policy, budgets in (("resident", ["all"]), ("lru", ["25%", "50%"])):
        for b in budgets:
            tps = list(100 * scale * np.exp(rng.normal(0, 0.01, 20)))
            frac = {"all": 1.0, "25%": 0.25, "50%": 0.5}[b]
            recs.append({"suite": "s", "case": f"m[{policy}-{b}]", "model": "m", "policy": policy, "budget": b,
                         "tokens_per_s": float(np.mean(tps)), "p50_ms": 1.0, "p99_ms": 2.0, "hit_rate": 0.5,
                         "budget_bytes": int(frac * 1000), "total_expert_bytes": 1000, "cache_bytes": 10,
                         "rounds": 20, "passed": True,
                         "samples": {"tokens_per_s": tps, "round_s": [64 / t for t in tps], "p50_ms": [1.0] * 20}})
    return history.make_run(recs, ["s"], "/nonexistent", machine={"gpu": None, "hostname": "h"}, status=status)


@pytest.fixture
def hist(tmp_path):
    d = tmp_path / "hist"
    rng = np.random.default_rng(1)
    for run in (_run(rng=rng), _run(rng=rng), _run(0.85, rng=rng), _run(rng=rng, status="interrupted")):
        history.append(d, run)
    return d


def test_report_writes_pngs_and_one_self_contained_page(hist, tmp_path, capsys):
    pytest.importorskip("matplotlib")
    out = tmp_path / "rep"
    assert cli_main(["report", "--history", str(hist), "--out", str(out)]) == 0
    page = (out / "index.html").read_text()
    pngs = sorted(p.name for p in out.glob("*.png"))
    assert "budget_s_m.png" in pngs and "history_s_m_lru-25.png" in pngs and len(pngs) == 4
    assert page.count("data:image/png;base64,") == 4 and "src='http" not in page and "INTERRUPTED" in page
    first = page.split("data:image/png;base64,")[1].split("'")[0]
    assert base64.b64decode(first)[:8] == b"\x89PNG\r\n\x1a\n"


def test_report_without_matplotlib_is_a_clear_error(hist, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import fails as if not installed
    assert cli_main(["report", "--history", str(hist), "--out", str(tmp_path / "r")]) == 2
    assert "pip install 'moebench[report]'" in capsys.readouterr().err


def test_compare_two_runs(hist, capsys):
    assert cli_main(["compare", "0", "1", "--history", str(hist)]) == 0
    out = capsys.readouterr().out
    assert "verdict" in out and "unchanged" in out and "REGRESSED" not in out
    assert cli_main(["compare", "0", "2", "--history", str(hist)]) == 1  # 15% slower
    out = capsys.readouterr().out
    assert out.count("REGRESSED") >= 6  # three rows, three messages
    assert cli_main(["compare", "0", "2", "--history", str(hist), "--fail", "throughput:5"]) == 2
    assert "malformed limit" in capsys.readouterr().err


def test_baseline_update_from_history_and_compare_against_the_file(hist, tmp_path, capsys):
    assert cli_main(["baseline", "update", "--history", str(hist), "--dir", str(tmp_path / "b")]) == 0
    path = tmp_path / "b" / "cpu" / "s.json"
    data = json.loads(path.read_text())
    runs, _ = history.read_history(hist)
    assert data["source_run_id"] == runs[2]["run_id"]  # the latest *complete* run, not the interrupted one
    assert "moebench baseline update" in data["command"]
    assert cli_main(["compare", str(path), "1", "--history", str(hist)]) == 0  # run 1 is faster: not a regression
    capsys.readouterr()
    assert cli_main(["baseline", "update", "--history", str(hist), "--dir", str(tmp_path / "b"), "--runs", "3"]) == 0
    assert "and 2 earlier" in capsys.readouterr().out
    assert json.loads(path.read_text())["runs"] == [runs[2]["run_id"], runs[1]["run_id"], runs[0]["run_id"]]
    path.write_text("garbage")
    assert cli_main(["baseline", "update", "--history", str(hist), "--dir", str(tmp_path / "b")]) == 2
    assert "corrupt baseline" in capsys.readouterr().err and path.read_text() == "garbage"


def test_corrupt_history_is_a_clear_cli_error(tmp_path, capsys):
    (tmp_path / "history.jsonl").write_text("a,b\n1,2\n")
    assert cli_main(["history", "--history", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "history.jsonl:1: not JSON" in err and (tmp_path / "history.jsonl").read_text() == "a,b\n1,2\n"


def test_export_is_read_by_pytest_benchmark(hist, tmp_path, capsys):
    from pytest_benchmark.storage.file import FileStorage

    out = tmp_path / "0001_moebench.json"
    assert cli_main(["export", "--format", "pytest-benchmark", "--history", str(hist), "--out", str(out)]) == 0
    data = json.loads(out.read_text())
    assert {"machine_info", "commit_info", "benchmarks", "datetime", "version"} <= set(data)
    storage = FileStorage(str(tmp_path), default_machine_id="x", logger=logging.getLogger("pb"))
    benches = list(storage.load_benchmarks(str(out)))
    assert len(benches) == 3
    b = benches[0]
    for key in ("min", "max", "mean", "stddev", "median", "iqr", "ops", "rounds", "data"):
        assert key in b
    assert b["rounds"] == 20 and b["ops"] == pytest.approx(1 / b["mean"])
    cmd = [sys.executable, "-c", "import sys; from pytest_benchmark.cli import main; sys.exit(main())", "compare",
           str(out)]
    res = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, timeout=60)
    assert res.returncode == 0, res.stderr
    assert "m[lru-25%]" in res.stdout and "Median" in res.stdout


def test_plots_show_the_rounds_quartiles_not_the_median_alone(hist, tmp_path, monkeypatch):
    """Each plotted point is the median of its rounds with a bar from the first to the third quartile."""
    pytest.importorskip("matplotlib")
    from moebench import report

    assert report.spread({"samples": {"tokens_per_s": [1.0, 2.0, 3.0, 4.0, 5.0]}}) == (2.0, 3.0, 4.0)
    assert report.spread({"tokens_per_s": 7.0}) == (7.0, 7.0, 7.0)  # a record without per-round samples
    assert report.spread({}) is None
    drawn = []
    real = report._plot_spread
    monkeypatch.setattr(report, "_plot_spread", lambda ax, xs, spreads, **kw: (drawn.append(spreads),
                                                                                real(ax, xs, spreads, **kw)))
    report.write_report(history.read_history(hist)[0], tmp_path / "rep")
    assert drawn and all(q1 < median < q3 for spreads in drawn for q1, median, q3 in spreads)
