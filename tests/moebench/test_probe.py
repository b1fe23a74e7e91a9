"""The machine-speed probe, the normalization of rounds by it, and the stretch test hook (CPU)."""

import time

import pytest
import torch

from moebench.measure import Stretch
from moebench.probe import PROBE_PARTS, MachineProbe, normalized
from moebench.regression import parse_delay


def test_probe_times_every_part_on_cpu():
    timing = MachineProbe("cpu", scale=0.05).run()
    parts = timing.as_dict()
    assert tuple(parts) == PROBE_PARTS
    assert timing.python_s > 0 and timing.launch_s > 0 and timing.gemm_s > 0
    assert timing.copy_s < 0.01  # no host-to-device link on a CPU
    assert parts["total_s"] == pytest.approx(sum(parts[k] for k in PROBE_PARTS[:-1]))


def test_normalized_cancels_a_uniform_slowdown_of_the_machine():
    rounds = [100.0, 100.0, 50.0, 50.0]  # tokens/s: the machine halves its speed after round 2 ...
    probes = [1.0, 1.0, 2.0, 2.0, 2.0]  # ... and so does the probe around it (round 2 straddles the change)
    assert normalized(rounds, probes) == [100.0, 150.0, 100.0, 100.0]
    with pytest.raises(ValueError, match="4 rounds need 5 probe timings"):
        normalized(rounds, probes[:-1])


@pytest.mark.parametrize("text, want", [("5%", (0.0, 0.05)), ("0.2ms", (0.0002, 0.0)), (None, (0.0, 0.0)),
                                        ("200us", (0.0002, 0.0))])
def test_parse_delay_takes_a_time_or_a_percentage(text, want):
    assert parse_delay(text) == pytest.approx(want)


@pytest.mark.parametrize("text, match", [("5", "malformed"), ("150%", "at most 100%"), ("2s", "over a second")])
def test_parse_delay_refuses_with_the_fix(text, match):
    with pytest.raises(ValueError, match=match):
        parse_delay(text)


def test_stretch_makes_a_known_fraction_whatever_the_pace():
    layers = [torch.nn.Identity() for _ in range(4)]
    x = torch.zeros(1)

    def round_(work_s):
        t0 = time.perf_counter()
        for _ in range(5):
            for layer in layers:
                end = time.perf_counter() + work_s
                while time.perf_counter() < end:
                    pass
                layer(x)
        return time.perf_counter() - t0

    stretch = Stretch(layers, 0.5)
    for work_s in (0.002, 0.004):  # the same fraction at two paces of the machine
        stretch.restart()
        plain = 20 * work_s
        assert round_(work_s) == pytest.approx(plain * 1.5, rel=0.15)
    stretch.remove()
    assert round_(0.001) == pytest.approx(0.02, rel=0.3)  # removed: no more waiting
