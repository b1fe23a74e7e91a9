"""Running a suite file written by a test in a pytest subprocess, the way a user runs one."""

import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def run_tiny_suite(pytester, monkeypatch, suite_text: str, *args):
    """`suite_text` as suites/tiny/suite.py, run with --moebench in a subprocess (this tree's moebench and test
    models on its path); returns (the pytester result, the runs in its history)."""
    monkeypatch.setenv("PYTHONPATH", f"{ROOT / 'src'}:{ROOT}")
    pytester.mkdir("suites")
    pytester.mkdir("suites/tiny")
    (pytester.path / "suites" / "tiny" / "suite.py").write_text(suite_text)
    result = pytester.runpytest_subprocess("--moebench", "suites", "--moebench-history", "hist", "-p",
                                           "no:cacheprovider", "-p", "no:benchmark", *args)
    path = pytester.path / "hist" / "history.jsonl"
    runs = [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []
    return result, runs
