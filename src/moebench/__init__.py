"""moebench: a pytest plugin that benchmarks moeoffload policies on MoE model suites.

`pytest --moebench suites/switch` runs every registered policy at the suite's GPU budgets, checks memory and
accuracy, prints one table of all cases and appends the run to `.moebench/history.jsonl`. Without `--moebench`
the suites are skipped, so plain `pytest` stays fast. The measuring code lives in plain modules (suite, zoo,
workload, measure, table, history) that work without pytest; `plugin.py` only wires them into pytest.
"""

__version__ = "0.1.0"
