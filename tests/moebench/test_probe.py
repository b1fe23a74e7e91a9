"""The machine-speed probe, the normalization of rounds by it, and the stretch test hook (CPU)."""


import pytest
import torch

from moebench.measure import Stretch
from moebench.probe import PROBE_PARTS, MachineProbe, normalized
from moebench.regression import parse_delay


def test_probe_times_every_part_on_cpu():
    probe = MachineProbe("cpu", scale=0.05)
    timing = probe.run()
    parts = timing.as_dict()
    assert tuple(parts) == PROBE_PARTS
    assert timing.python_s > 0 and timing.launch_s > 0 and timing.gemm_s > 0
    assert probe.host is None and timing.copy_s >= 0  # no host-to-device link on a CPU: the copy is skipped
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
    """A fake clock: the layers' own work advances it, and so does the stretch's work at a per-iteration cost that
    changes mid-round (the machine slowing down). No wall time is measured, so the test cannot flake."""
    now = [0.0]
    cost = [2e-8]  # seconds per iteration of the stretch's work, as the machine runs now

    def work(iterations):
        now[0] += iterations * cost[0]

    layers = [torch.nn.Identity() for _ in range(4)]
    stretch = Stretch(layers, 0.05, clock=lambda: now[0], work=work, per_iter=2e-8)
    x = torch.zeros(1)
    total_plain = 0.0
    for step in range(50):
        if step == 25:
            cost[0] = 4e-8  # the machine halves its speed: the work slows, the estimate follows
        for layer in layers:
            pace = 0.002 if step < 25 else 0.004  # the layers slow down with it
            now[0] += pace
            total_plain += pace
            layer(x)
    stretched = now[0]
    assert stretched == pytest.approx(total_plain * 1.05, rel=0.01)
    stretch.remove()
    before = now[0]
    layers[0](x)
    assert now[0] == before  # removed: no more work


def test_stretch_leaves_out_a_wait_but_keeps_the_step_tail_before_it():
    """At step grain (moebench ab --grain step) a side waits for the other side's step between two of its own.
    The wait must not be stretched, but the end of the step before it (LM head, sampling, waiting for the GPU) must:
    a GPU-bound step spends most of its wall time there, after its last layer call."""
    now = [0.0]

    def work(iterations):
        now[0] += iterations * 1e-8

    layers = [torch.nn.Identity() for _ in range(2)]
    stretch = Stretch(layers, 0.10, clock=lambda: now[0], work=work, per_iter=1e-8)
    x = torch.zeros(1)
    own = 0.0
    for _ in range(20):
        for layer in layers:
            now[0] += 0.001  # launches, CPU ahead of the GPU
            own += 0.001
            layer(x)
        now[0] += 0.008  # the step's tail: LM head, sampling, synchronize
        own += 0.008
        with stretch.excluded():
            now[0] += 0.050  # the other side's step
    waited = 20 * 0.050
    # each step's tail is stretched at the next step's first layer call; the last tail is not (no call follows)
    assert now[0] - waited == pytest.approx(own * 1.10 - 0.008 * 0.10, rel=1e-3)
