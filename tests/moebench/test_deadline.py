"""--moebench-time-limit judges a case by the longest case of its kind: building the model, or finding it built."""

import pytest

from moebench.deadline import Deadline


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def case_of(clock, seconds):
    def run():
        clock.now += seconds
        return seconds
    return run


def test_a_built_model_is_judged_by_its_later_cases_not_by_its_build():
    """switch-base-256 on the H100: the first case (build, store, reference) took 151 s, the later ones far less;
    with 147 s left the later cases must still start."""
    clock = Clock()
    deadline = Deadline(400, clock)
    assert deadline.refusal("m") is None
    assert deadline.run("m", case_of(clock, 151)) == 151
    assert deadline.refusal("m") is None  # no later case yet: judged by the build, 151 + 151 <= 400
    deadline.run("m", case_of(clock, 20))
    clock.now = 253  # 147 s left
    assert deadline.refusal("m") is None  # a later case took 20 s
    refusal = deadline.refusal("other")  # another model would be built: 151 s > 147 s left
    assert refusal == ("--moebench-time-limit 400s: not started at 253s (a case that builds its model took up to "
                       "151s so far)")
    clock.now = 390
    assert "a case of a model already built took up to 20s" in deadline.refusal("m")


def test_a_failed_case_still_counts_and_its_model_is_built():
    clock = Clock()
    deadline = Deadline(100, clock)

    def fails():
        clock.now += 30
        raise RuntimeError("case failed")

    with pytest.raises(RuntimeError):
        deadline.run("m", fails)
    clock.now = 75
    assert deadline.refusal("m") is not None  # judged by the first case (30 s): 75 + 30 > 100
    deadline = Deadline(100, clock)
    clock.now = 0
    deadline.run("m", case_of(clock, 30))
    deadline.run("m", case_of(clock, 5))
    clock.now = 90
    assert deadline.refusal("m") is None  # 90 + 5 <= 100
