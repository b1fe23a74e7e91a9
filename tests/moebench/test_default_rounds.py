"""The default run can reach a verdict: `--moebench-rounds`' default is enough rounds for the comparison's test to
reach its level against a baseline of the same size, or of the fewest rounds a verdict takes."""

from tests.moebench.test_baseline import TINY_SUITE

from moebench import stats
from moebench.baseline import CONFIDENCE
from moebench.plugin import DEFAULT_ROUNDS

pytest_plugins = ["pytester"]


def test_the_default_rounds_can_reach_the_verdicts_level():
    assert stats.min_p_value(DEFAULT_ROUNDS, DEFAULT_ROUNDS) < 1 - CONFIDENCE
    assert stats.rounds_needed(stats.MIN_ROUNDS, 1 - CONFIDENCE) <= DEFAULT_ROUNDS  # against a 3-round baseline


def test_a_default_sized_run_flags_an_injected_slowdown(pytester):
    """No --moebench-rounds on either run: the run slowed by the test hook is REGRESSED, not 'too few'."""
    suite = pytester.path / "suites" / "tiny"
    suite.mkdir(parents=True)
    (suite / "suite.py").write_text(TINY_SUITE)
    args = ("--moebench", "suites/tiny", "--moebench-policy", "resident",
            "--moebench-history", str(pytester.path / "hist"),
            "--moebench-baseline-dir", str(pytester.path / "baselines"), "-p", "no:cacheprovider")
    pytester.runpytest_subprocess(*args, "--moebench-save-baseline").assert_outcomes(passed=1)
    # 300 ms before each of the 8 MoE layer calls of a round: far beyond the noise of a tiny model's round, even on a
    # loaded machine
    slowed = pytester.runpytest_subprocess(*args, "--moebench-inject-delay=300ms")
    slowed.stdout.fnmatch_lines([f"*rounds {DEFAULT_ROUNDS},*",
                                 "*median tok/s*baseline tok/s*baseline at this speed*delta*rounds b/r*verdict*",
                                 f"tiny-switch*{DEFAULT_ROUNDS}/{DEFAULT_ROUNDS}*REGRESSED (injected 300 ms per*"])
    assert slowed.ret == 1
