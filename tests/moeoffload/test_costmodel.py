"""The cost model's choices on injected measurements: where each miss goes, the split's balance, the floor."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from moeoffload.costmodel import Measurements, combined_floor, copy_floor, on_host, split

MIB = 1 << 20


def machine(h2d_gbps: float, host_gbps: float, gemm_ms: tuple[float, ...] = (2.0, 2.0, 3.0, 8.0, 30.0),
            expert_bytes: int = 336 * MIB) -> Measurements:
    return Measurements(expert_bytes, h2d_gbps * 1e9, host_gbps * 1e9, 8, (1, 4, 16, 64, 256),
                        tuple(t * 1e-3 for t in gemm_ms))


def test_host_seconds_interpolates_and_extrapolates():
    m = machine(50, 100)
    assert m.host_seconds(1) == pytest.approx(2e-3)
    assert m.host_seconds(0) == pytest.approx(2e-3)  # a read of the weights at least
    assert m.host_seconds(40) == pytest.approx(5.5e-3)  # halfway between 16 and 64
    assert m.host_seconds(512) == pytest.approx(30e-3 + 256 * (22e-3 / 192))


def test_fiddler_computes_on_the_host_where_it_beats_the_copy():
    m = machine(50, 100)  # copying 336 MiB at 50 GB/s: about 7 ms
    rows = {0: 1, 1: 16, 2: 64, 3: 256}
    assert on_host("cost-model", m, rows, {}) == {0, 1}
    slow_link = machine(5, 100)  # about 70 ms a copy: the host wins everywhere
    assert on_host("cost-model", slow_link, rows, {}) == {0, 1, 2, 3}
    fast_link = machine(500, 100)  # about 0.7 ms: the copy wins everywhere
    assert on_host("cost-model", fast_link, rows, {}) == set()


def test_fiddler_counts_the_activations_crossing_the_link():
    """16 rows cost 3 ms on the host against a 7 ms copy; rows of 1 MiB each way add 16 MiB at 50 GB/s (0.3 ms), and
    rows of 16 MiB add 5.4 ms, which makes the copy sooner."""
    m = machine(50, 100)
    light = Measurements(**{**m.__dict__, "row_bytes": MIB})
    heavy = Measurements(**{**m.__dict__, "row_bytes": 16 * MIB})
    assert light.host_miss_seconds(16) == pytest.approx(3e-3 + 16 * MIB / 50e9)
    assert on_host("cost-model", light, {1: 16}, {}) == {1}
    assert on_host("cost-model", heavy, {1: 16}, {}) == set()


def test_host_and_copy_modes_and_their_needs():
    rows = {3: 2, 5: 1}
    assert on_host("host", None, rows, {}) == {3, 5}
    assert on_host("copy", None, rows, {}) == set()
    assert on_host("split", machine(50, 100), {}, {}) == set()
    with pytest.raises(ValueError, match="needs measurements"):
        on_host("cost-model", None, rows, {})
    with pytest.raises(ValueError, match="unknown"):
        on_host("sometimes", machine(50, 100), rows, {})


def test_split_copies_the_highest_scores_and_balances_the_two():
    m = machine(50, 100, gemm_ms=(7.0,) * 5)  # host and copy cost the same per expert (about 7 ms)
    rows = {e: 1 for e in range(6)}
    scores = {e: float(e) for e in range(6)}
    chosen = split(m, rows, scores)
    assert chosen == {0, 1, 2}  # half each; the three lowest scores on the host, the highest copied (admitted)


@settings(max_examples=60, deadline=None)
@given(h2d=st.floats(1, 100), rows=st.dictionaries(st.integers(0, 15), st.integers(1, 300), max_size=8),
       gemm=st.lists(st.floats(0.5, 50), min_size=5, max_size=5).map(sorted),
       scores=st.dictionaries(st.integers(0, 15), st.floats(0, 10)))
def test_split_is_the_best_cut_of_the_score_ranking(h2d, rows, gemm, scores):
    m = machine(h2d, 100, tuple(gemm))
    host = split(m, rows, scores)
    ranked = sorted(rows, key=lambda e: (-scores.get(e, 0.0), e))

    def makespan(on_host_set):
        copied = len(rows) - len(on_host_set)
        return max(copied * m.copy_seconds(), sum(m.host_seconds(rows[e]) for e in on_host_set))

    assert host == set(ranked[len(rows) - len(host):])  # a tail of the ranking
    best = min(makespan(set(ranked[c:])) for c in range(len(ranked) + 1))
    assert makespan(host) == pytest.approx(best)


def test_combined_floor_splits_the_bytes_between_the_link_and_host_memory():
    m = machine(50, 150)
    assert combined_floor(400e9, m) == pytest.approx(2.0)
    assert copy_floor(400e9, m) == pytest.approx(8.0)


def test_measurements_refuse_nonsense():
    with pytest.raises(ValueError, match="positive"):
        Measurements(1, 0.0, 1.0, 1, (1,), (1.0,))
    with pytest.raises(ValueError, match="ascending"):
        Measurements(1, 1.0, 1.0, 1, (4, 1), (1.0, 1.0))
