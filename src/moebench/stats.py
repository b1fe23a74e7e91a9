"""Regression verdicts from repeated benchmark rounds.

``compare(baseline, current, higher_is_better=...)`` turns two samples of per-round measurements (tokens/s, higher
is better, or latency, lower is better) into a :class:`Verdict`: the ratio of medians, a bootstrap percentile
confidence interval of that ratio, a one-sided Mann-Whitney U p-value, and a status.

Decision rule
-------------
Let ``g = log(median(current) / median(baseline))`` oriented so that ``g > 0`` is better (the sign is flipped for
latency), ``[g_lo, g_hi]`` its two-sided ``confidence`` bootstrap percentile interval (each side resampled
independently), ``t = threshold`` and ``alpha = 1 - confidence``.

* ``inconclusive`` when either side has fewer than :data:`MIN_ROUNDS` samples (the message says how many are needed).
* ``regressed`` when ALL of
    1. ``g_hi < 0``: the interval excludes "no change" on the worse side,
    2. ``g < log(1 - t/2)``: the point estimate is worse by more than half the threshold (a statistically clear
       but practically negligible 1% drift is not flagged), and
    3. the one-sided Mann-Whitney U p-value in the worse direction is ``< alpha``.
* ``improved``: the mirror image (``g_lo > 0``, ``g > -log(1 - t/2)``, Mann-Whitney in the better direction).
* ``unchanged`` when the interval lies inside the threshold band: ``log(1 - t) <= g_lo`` and ``g_hi <= -log(1 - t)``
  (whatever the true change is, it is smaller than the flag threshold).
* ``inconclusive`` otherwise: the interval reaches beyond the threshold (on one side or both) yet the change is not
  flagged. This includes an interval entirely beyond the threshold when the test cannot reach ``alpha`` because there
  are too few rounds: with ``n_b``/``n_c`` rounds the smallest one-sided Mann-Whitney p is ``1 / C(n_b + n_c, n_b)``
  (exact test, no ties), 0.05 at 3/3 and 0.029 at 3/4, so such a run can never be flagged and a halved throughput
  must not read ``unchanged``. :func:`min_p_value` and :func:`rounds_needed` compute this; the verdict's message
  says so whenever ``min_p_value >= alpha``.

Why this rule: the Mann-Whitney test is rank based and, for identical distributions, its one-sided false-alarm rate
is at most ``alpha`` (exact for small samples), whatever the noise shape; the bootstrap interval of small-sample
medians alone under-covers (it is anti-conservative at n = 5-10), so it is not trusted on its own. Requiring all
three conditions can only lower the false-alarm rate below ``alpha`` = 1%. The half-threshold condition costs little
power at a true slowdown of ``t`` (the point estimate is below ``1 - t/2`` in >= 98% of runs whenever the test
itself has 95% power) and keeps tiny but consistent drifts from being called regressions. Everything is symmetric
in log space, so swapping baseline and current swaps ``regressed`` and ``improved`` exactly, and scaling both
samples by the same constant changes nothing.

Whether an injected slowdown of ``t`` is flagged in >= 95% of comparisons depends on the per-round noise and the
number of rounds, not on the rule: ``benchmarks/stats_power.py`` simulates it.

Measured noise (``benchmarks/RESULTS.md``: "The machine runs at two speeds", "Interleaved A/B runs")
-----------------------------------------------------------------------------------------------------
An H100 80GB HBM3 in a VM ran at two speeds, switching every few seconds to minutes. Raw rounds therefore break the
rule's assumption that the two sides differ only by the change under test: resampling blocks of 160 measured rounds
(``benchmarks/stats_power.py --noise-from ... --blocks``), identical code was flagged in 14-17% of raw comparisons
and in 0.0-0.5% of comparisons normalized by the machine-speed probe (``moebench.probe``;
``baseline.compare_metric`` picks them when both sides have them) at 20-30 rounds a side.

What rounds cannot fix: the normalized medians of 8 unchanged runs differ with a log-sd of 2.6%. This rule tests
rounds, so it treats a run's offset as a real change once the rounds are many enough to make it significant
(modelled with ``--run-level``: 5.3% false alarms at 20 rounds a side, 23.5% at 300). A verdict that holds at any
round count tests at run level: :func:`compare_runs`, used when a baseline keeps the samples of several runs
(``--moebench-baseline-runs``).

Interleaved A/B runs: ``moebench ab`` lets two processes take turns and :func:`compare_paired` tests the pairs, so
the machine's slow spells cancel. What pairing cannot cancel is the noise within the pair's time apart (an A/A pair
log-ratio s.d. of 19.2% with whole rounds alternating, 9.4-12.8% with decode steps alternating, the default;
:func:`pairs_needed`), nor the speed offset each process keeps for its whole run (log s.d. 4.0% over 27 A/A process
pairs; with it one process pair's verdict gives ~28% false alarms in simulation). :func:`compare_paired_groups`
tests K process pairs (``moebench ab --processes K``, default 24 of 10 rounds) against their own spread instead: at
24 x 10, 0.5% false alarms and 96.2% detection of a 5% slowdown (2000 simulated comparisons,
``benchmarks/results/h100-2026-11-24/stats_power_default.txt``).

Earlier estimate (before per-round samples were stored)
-------------------------------------------------------
The only device run stored (``benchmarks/results/h100-2026-11-23/history.jsonl``, H100, 3 rounds per case) keeps one
aggregate ``tokens_per_s`` per case (total tokens / sum of the 3 round times) and step-latency ``p50_ms``/``p99_ms``,
never per-round values. :func:`estimate_round_cv` derives the per-round coefficient of variation from the
``tokens_per_s`` of case pairs that do the *same* work (same ``model`` and ``policy``, same ``hit_rate`` and
``h2d_bytes_per_round``; they differ only in the cache budget): for two independent draws with CV ``c``,
``sd(log(x1/x2)) = sqrt(2) c``, so ``c_3rounds = rms(log ratio) / sqrt(2)`` and ``c_round = c_3rounds * sqrt(3)``.
The stored run gives 4 such pairs and ``c_round`` ~ 0.10 (10%): :data:`NOISE_CV_ESTIMATE`. As a cross-check, the
step ``p99_ms/p50_ms`` ratios (median ~3, i.e. a log-normal step sigma ~0.46, spread over 8 decode steps per round)
would give ~0.17, an over-estimate because the p99 of 24 steps is their maximum, typically a systematically slow
first step rather than round-to-round noise. Any systematic difference between the paired cases (budget, order in
the run) is counted as noise, so 10% is pessimistic; it is still an estimate from 4 pairs and must be replaced by the
spread of measured repeated rounds.
"""

from __future__ import annotations

import functools
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy import stats as _sps

__all__ = [
    "DEFAULT_ROUNDS",
    "MIN_ROUNDS",
    "MIN_RUNS",
    "NOISE_CV_ESTIMATE",
    "STATUSES",
    "BatchVerdict",
    "Verdict",
    "compare",
    "compare_many",
    "compare_paired",
    "compare_paired_groups",
    "compare_runs",
    "estimate_round_cv",
    "pairs_needed",
    "processes_needed",
    "min_p_value",
    "rounds_needed",
]

#: Fewer rounds than this on either side gives ``inconclusive``.
MIN_ROUNDS = 3
#: Fewer baseline runs than this gives ``inconclusive`` at run level (:func:`compare_runs`).
MIN_RUNS = 3
#: Fewer round pairs than this gives ``inconclusive`` in an interleaved A/B run (:func:`compare_paired`): the
#: smallest one-sided signed-rank p of n pairs is 2**-n, below 1% from 7 pairs on.
MIN_PAIRS = 7
#: Fewer process pairs than this cannot give a verdict over process pairs (:func:`compare_paired_groups`): their
#: spread is the only measure of the per-process offset, and a t interval needs at least 2 degrees of freedom to be
#: of any use (at 99%, t_2 = 9.9 standard errors).
MIN_PROCESS_PAIRS = 3
#: Per-round coefficient of variation of tokens/s estimated from the stored H100 run (see the module docstring).
NOISE_CV_ESTIMATE = 0.10
#: Rounds per side at which the simulated 5%-slowdown detection rate reaches >= 95% with <= 1% false alarms, at
#: :data:`NOISE_CV_ESTIMATE` with INDEPENDENT rounds (found by ``benchmarks/stats_power.py``). Measured device runs
#: also differ from run to run (log-sd 2.6% between run medians, normalized), which more rounds do not average
#: away: see the module docstring.
DEFAULT_ROUNDS = 250
STATUSES = ("regressed", "improved", "unchanged", "inconclusive")
_CODES = {s: i for i, s in enumerate(STATUSES)}


@dataclass(frozen=True)
class Verdict:
    """Outcome of :func:`compare`. ``ratio`` is ``median(current) / median(baseline)``; ``ci_low``/``ci_high`` bound
    it; ``p_value`` is the one-sided Mann-Whitney U p-value in the direction of "worse"."""

    ratio: float
    ci_low: float
    ci_high: float
    p_value: float
    status: str
    message: str
    #: Smallest one-sided Mann-Whitney p these round counts can give (:func:`min_p_value`).
    min_p: float = math.nan
    #: When ``min_p >= alpha``: how many current rounds could reach ``alpha`` against this baseline; else None.
    rounds_needed: int | None = None


@dataclass(frozen=True)
class BatchVerdict:
    """Outcome of :func:`compare_many`: one entry per row."""

    ratio: np.ndarray
    ci_low: np.ndarray
    ci_high: np.ndarray
    p_value: np.ndarray
    status: np.ndarray  # array of str

    def rate(self, status: str) -> float:
        return float(np.mean(self.status == status))


# --------------------------------------------------------------------------------------------------- validation
def _check_sample(name: str, values) -> np.ndarray:
    try:
        arr = np.asarray(values, dtype=float)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a sequence of numbers; pass per-round measurements as floats") from None
    if arr.ndim != 1:
        raise ValueError(f"{name} must be 1-D (one value per round), got shape {arr.shape}; flatten it or pass one run")
    if arr.size == 0:
        raise ValueError(f"{name} is empty; pass at least {MIN_ROUNDS} per-round measurements")
    bad = np.flatnonzero(~np.isfinite(arr))
    if bad.size:
        raise ValueError(f"{name} has a non-finite value ({arr[bad[0]]!r} at index {bad[0]}); drop failed rounds first")
    bad = np.flatnonzero(arr <= 0)
    if bad.size:
        raise ValueError(f"{name} has a non-positive value ({arr[bad[0]]!r} at index {bad[0]}); "
                         "pass raw positive measurements (tokens/s or seconds), not differences or logs")
    return arr


def _check_options(threshold: float, confidence: float, n_boot: int) -> None:
    if not 0 < threshold < 1:
        raise ValueError(f"threshold must be a fraction in (0, 1), got {threshold!r}; e.g. 0.05 for 5%")
    if not 0.5 < confidence < 1:
        raise ValueError(f"confidence must be in (0.5, 1), got {confidence!r}; e.g. 0.99")
    if int(n_boot) < 100:
        raise ValueError(f"n_boot must be >= 100, got {n_boot!r}; the default 2000 is enough")


# --------------------------------------------------------------------------------------------- attainable p
@functools.lru_cache(maxsize=256)
def min_p_value(n_baseline: int, n_current: int) -> float:
    """Smallest one-sided Mann-Whitney U p-value that ``n_baseline``/``n_current`` rounds can give: that of two
    completely separated samples without ties (``1 / C(n_b + n_c, n_b)`` for the exact test), computed by the same
    scipy call :func:`compare` uses, so it follows scipy's choice of exact or asymptotic method. Ties only raise it."""
    if n_baseline < 1 or n_current < 1:
        raise ValueError(f"round counts must be >= 1, got {n_baseline}/{n_current}")
    cur = np.arange(1.0, n_current + 1)
    base = np.arange(n_current + 1.0, n_current + n_baseline + 1)
    return float(_sps.mannwhitneyu(cur, base, alternative="less").pvalue)


def rounds_needed(n_baseline: int, alpha: float = 0.01, *, at_least: int = MIN_ROUNDS, cap: int = 200) -> int | None:
    """Fewest current rounds (>= ``at_least``) whose :func:`min_p_value` against ``n_baseline`` baseline rounds is
    below ``alpha``: with a 3-round baseline that is 7, with 4 it is 5, with 5 or more it is ``at_least``. None when
    no count up to ``cap`` does (a 1- or 2-round baseline: remake it with more rounds)."""
    if not 0 < alpha < 1:
        raise ValueError(f"alpha must be in (0, 1), got {alpha!r}")
    for n in range(max(1, int(at_least)), int(cap) + 1):
        if min_p_value(n_baseline, n) < alpha:
            return n
    return None


# -------------------------------------------------------------------------------------- bootstrap of the median
@functools.lru_cache(maxsize=64)
def _median_pair_cdf(n: int) -> np.ndarray:
    """Flattened CDF over pairs (a, b) of 0-based sorted-sample indices such that the median of a bootstrap resample
    of size ``n`` is ``(x[a] + x[b]) / 2`` (``a == b`` for odd ``n``).

    Exact distribution of resampling with replacement: with ``N_k`` the number of draws among the ``k`` smallest
    values (Binomial(n, k/n)), ``P(J_lo <= a, J_hi <= b) = P(N_a >= lo, N_b >= hi)``. Sampling a pair from it is
    equivalent in distribution to drawing ``n`` indices and taking the median, at O(1) instead of O(n) per replicate.
    """
    lo, hi = (n - 1) // 2 + 1, n // 2 + 1  # 1-based ranks of the two middle order statistics
    F = np.zeros((n + 1, n + 1))
    i = np.arange(lo, n + 1)
    for a in range(1, n + 1):
        pa = _sps.binom.pmf(i, n, a / n)  # P(N_a = i), i >= lo
        b = np.arange(a, n + 1)
        if a == n:
            F[a, a] = pa.sum()
            continue
        q = (b - a) / (n - a)
        need = hi - i  # further draws needed in (a, b]
        tail = np.where(need[:, None] <= 0, 1.0, _sps.binom.sf(need[:, None] - 1, (n - i)[:, None], q[None, :]))
        F[a, a:] = pa @ tail
    for a in range(1, n + 1):  # a > b: J_lo <= J_hi <= b
        F[a, 1:a] = np.diag(F)[1:a]
    pmf = F[1:, 1:] - F[:-1, 1:] - F[1:, :-1] + F[:-1, :-1]
    pmf = np.clip(pmf, 0.0, None).ravel()
    cdf = np.cumsum(pmf)
    return cdf / cdf[-1]


def _boot_medians(sorted_x: np.ndarray, u: np.ndarray) -> np.ndarray:
    """Bootstrap medians of each row of ``sorted_x`` (shape (B, n), rows sorted) from uniforms ``u`` (B, n_boot)."""
    n = sorted_x.shape[1]
    cdf = _median_pair_cdf(n)
    idx = np.minimum(np.searchsorted(cdf, u, side="right"), n * n - 1)
    a, b = np.divmod(idx, n)
    return 0.5 * (np.take_along_axis(sorted_x, a, axis=1) + np.take_along_axis(sorted_x, b, axis=1))


# ----------------------------------------------------------------------------------------------------- the rule
def _decide(base: np.ndarray, cur: np.ndarray, u_base: np.ndarray, u_cur: np.ndarray, *, higher_is_better: bool,
            threshold: float, confidence: float):
    """Vectorised core shared by :func:`compare` and :func:`compare_many`. ``base``/``cur``: (B, n) arrays."""
    base, cur = np.sort(base, axis=1), np.sort(cur, axis=1)
    ratio = np.median(cur, axis=1) / np.median(base, axis=1)
    log_boot = np.log(_boot_medians(cur, u_cur)) - np.log(_boot_medians(base, u_base))
    alpha = 1.0 - confidence
    q = np.quantile(log_boot, [alpha / 2, 1 - alpha / 2], axis=1)
    ci_low, ci_high = np.exp(q[0]), np.exp(q[1])
    sign = 1.0 if higher_is_better else -1.0
    g = sign * np.log(ratio)
    g_lo, g_hi = np.minimum(sign * q[0], sign * q[1]), np.maximum(sign * q[0], sign * q[1])
    worse_alt, better_alt = ("less", "greater") if higher_is_better else ("greater", "less")
    p_worse = np.atleast_1d(_sps.mannwhitneyu(cur, base, alternative=worse_alt, axis=1).pvalue)
    p_better = np.atleast_1d(_sps.mannwhitneyu(cur, base, alternative=better_alt, axis=1).pvalue)
    half = math.log(1 - threshold / 2)
    full = math.log(1 - threshold)
    regressed = (g_hi < 0) & (g < half) & (p_worse < alpha)
    improved = (g_lo > 0) & (g > -half) & (p_better < alpha)
    inside_band = (g_lo >= full) & (g_hi <= -full)
    code = np.where(regressed, 0, np.where(improved, 1, np.where(inside_band, 2, 3)))
    return ratio, ci_low, ci_high, p_worse, code


def compare(baseline: Sequence[float], current: Sequence[float], *, higher_is_better: bool, threshold: float = 0.05,
            confidence: float = 0.99, n_boot: int = 2000, seed: int = 0) -> Verdict:
    """Verdict on ``current`` against ``baseline`` (per-round samples); see the module docstring for the rule.

    Deterministic given ``seed``. Each side's bootstrap stream is attached to the sample itself (ordered by size,
    then sorted values), not to its role, so swapping the arguments mirrors the interval exactly.
    """
    base = _check_sample("baseline", baseline)
    cur = _check_sample("current", current)
    _check_options(threshold, confidence, n_boot)
    kind = "throughput" if higher_is_better else "latency"
    nb, nc = base.size, cur.size
    ratio = float(np.median(cur) / np.median(base))
    alpha = 1.0 - confidence
    min_p = min_p_value(nb, nc)
    need = rounds_needed(nb, alpha) if min_p >= alpha else None
    if min_p >= alpha:
        fix = (f"run >= {need} rounds (--moebench-rounds) against this {nb}-round baseline" if need is not None else
               f"remake the baseline with >= {rounds_needed(MIN_ROUNDS * 2, alpha)} rounds")
        power = f"{nb}/{nc} rounds cannot reach p<{alpha:g}: {fix}"
    else:
        power = ""
    if nb < MIN_ROUNDS or nc < MIN_ROUNDS:
        msg = (f"{kind} {ratio:.3f}x: inconclusive, baseline has {nb} rounds and current {nc}; need at least "
               f"{MIN_ROUNDS} each"
               + (f"; {power}" if power else ""))
        return Verdict(ratio, math.nan, math.nan, math.nan, "inconclusive", msg, min_p, need)
    ss = np.random.SeedSequence(int(seed)).spawn(2)
    key_b, key_c = (nb, tuple(np.sort(base))), (nc, tuple(np.sort(cur)))
    first, second = (ss[0], ss[1]) if key_b <= key_c else (ss[1], ss[0])
    u_base = np.random.default_rng(first).random((1, int(n_boot)))
    u_cur = np.random.default_rng(second).random((1, int(n_boot)))
    r, lo, hi, p, code = _decide(base[None, :], cur[None, :], u_base, u_cur, higher_is_better=higher_is_better,
                                 threshold=threshold, confidence=confidence)
    status = STATUSES[int(code[0])]
    r, lo, hi, p = float(r[0]), float(lo[0]), float(hi[0]), float(p[0])
    pct = int(round(confidence * 100)) if abs(confidence * 100 - round(confidence * 100)) < 1e-9 else confidence * 100
    head = f"{kind} {r:.3f}x ({pct}% CI {lo:.3f}-{hi:.3f}, Mann-Whitney p={p:.2g}, n={nb}/{nc})"
    change = abs(r - 1) * 100
    worse, better = ("slower", "faster") if higher_is_better else ("higher", "lower")
    if status == "regressed":
        tail = f"regressed, {change:.1f}% {worse} (flag threshold {threshold:.0%})"
    elif status == "improved":
        tail = f"improved, {change:.1f}% {better} (flag threshold {threshold:.0%})"
    elif status == "unchanged":
        tail = f"unchanged, the interval lies within the flag threshold {threshold:.0%}"
    else:
        sign = 1.0 if higher_is_better else -1.0
        g_lo, g_hi = sorted((sign * math.log(lo), sign * math.log(hi)))
        full = math.log(1 - threshold)
        if g_hi < full or g_lo > -full:
            side = worse if g_hi < full else better
            tail = (f"inconclusive, the interval lies entirely beyond the {threshold:.0%} threshold ({side}) but "
                    f"Mann-Whitney is not significant at p<{alpha:g}")
        elif g_lo < full and g_hi > -full:
            tail = (f"inconclusive, the interval spans both -{threshold:.0%} and +{threshold:.0%}; "
                    "run more rounds, or repeat the run: the spread between runs (2.6% on an H100 80GB HBM3) "
                    "bounds what more rounds can settle")
        else:
            side = worse if g_lo < full else better
            tail = (f"inconclusive, the interval reaches beyond the {threshold:.0%} threshold ({side}) without a "
                    "significant change; run more rounds to tell a change from none")
    if power:
        tail += f"; {power}"
    return Verdict(r, lo, hi, p, status, f"{head}: {tail}", min_p, need)


def compare_many(baseline: np.ndarray, current: np.ndarray, *, higher_is_better: bool, threshold: float = 0.05,
                 confidence: float = 0.99, n_boot: int = 2000, seed: int = 0) -> BatchVerdict:
    """Row-wise :func:`compare` for power simulations: ``baseline`` (B, n_b) and ``current`` (B, n_c) arrays of
    positive finite values with n >= :data:`MIN_ROUNDS`. Same statistics and rule; one random stream for the batch,
    so a row's interval is not bit-identical to ``compare`` on that row (it is identically distributed)."""
    base, cur = np.asarray(baseline, dtype=float), np.asarray(current, dtype=float)
    if base.ndim != 2 or cur.ndim != 2 or base.shape[0] != cur.shape[0]:
        raise ValueError(f"compare_many needs two 2-D arrays with the same number of rows, got {base.shape} and "
                         f"{cur.shape}; use compare() for a single comparison")
    if min(base.shape[1], cur.shape[1]) < MIN_ROUNDS:
        raise ValueError(f"compare_many needs at least {MIN_ROUNDS} rounds per side, got "
                         f"{base.shape[1]}/{cur.shape[1]}; use compare() for an inconclusive verdict")
    for name, arr in (("baseline", base), ("current", cur)):
        if not np.all(np.isfinite(arr)) or np.any(arr <= 0):
            raise ValueError(f"{name} has non-finite or non-positive values; pass raw positive measurements")
    _check_options(threshold, confidence, n_boot)
    rng = np.random.default_rng(seed)
    u_base = rng.random((base.shape[0], int(n_boot)))
    u_cur = rng.random((cur.shape[0], int(n_boot)))
    r, lo, hi, p, code = _decide(base, cur, u_base, u_cur, higher_is_better=higher_is_better,
                                 threshold=threshold, confidence=confidence)
    return BatchVerdict(r, lo, hi, p, np.asarray(STATUSES, dtype=object)[code].astype(str))


def _status(g: float, g_lo: float, g_hi: float, p_worse: float, p_better: float, alpha: float,
            threshold: float) -> str:
    """The module docstring's decision rule for one change ``g`` (log, oriented so that > 0 is better) with its
    interval and one-sided p-values: the scalar form of what :func:`_decide` does row-wise."""
    half, full = math.log(1 - threshold / 2), math.log(1 - threshold)
    if g_hi < 0 and g < half and p_worse < alpha:
        return "regressed"
    if g_lo > 0 and g > -half and p_better < alpha:
        return "improved"
    if g_lo >= full and g_hi <= -full:
        return "unchanged"
    return "inconclusive"


# ---------------------------------------------------------------------------------------------------- run level
def compare_runs(baseline_runs: Sequence[Sequence[float]], current: Sequence[float], *, higher_is_better: bool,
                 threshold: float = 0.05, confidence: float = 0.99) -> Verdict:
    """Verdict at run level: is this run's median outside what the baseline's runs vary by among themselves?

    Each run is reduced to the log of its median; with ``m`` baseline runs of mean ``b`` and sample s.d. ``s`` and
    this run's ``c``, the change ``g = c - b`` (oriented so that ``g > 0`` is better) has a Student-t prediction
    interval ``g +- t_{m-1} s sqrt(1 + 1/m)``: it holds whatever part of the spread is round noise and whatever part
    is the machine's run-to-run offset, so its false-alarm rate stays at ``1 - confidence`` at any round count
    (the per-round :func:`compare` does not once runs differ). The statuses follow :func:`compare`'s rule with this
    interval and its one-sided t p-value. Needs :data:`MIN_RUNS` baseline runs; the price is power: with m runs
    spread by s, only changes well beyond ``t_{m-1} s`` can be flagged."""
    _check_options(threshold, confidence, 1000)
    runs = [_check_sample(f"baseline run {i}", r) for i, r in enumerate(baseline_runs)]
    cur = _check_sample("current", current)
    kind = "throughput" if higher_is_better else "latency"
    m = len(runs)
    meds = np.log([float(np.median(r)) for r in runs]) if runs else np.zeros(0)
    c = math.log(float(np.median(cur)))
    if m < MIN_RUNS:
        ratio = math.exp(c - float(meds.mean())) if m else math.nan
        return Verdict(ratio, math.nan, math.nan, math.nan, "inconclusive",
                       f"{kind} {ratio:.3f}x: inconclusive at run level, the baseline keeps {m} run(s); "
                       f"need at least {MIN_RUNS} (--moebench-baseline-runs)")
    sign = 1.0 if higher_is_better else -1.0
    b = float(meds.mean())
    s = max(float(meds.std(ddof=1)), 1e-12)
    se = s * math.sqrt(1 + 1 / m)
    g = sign * (c - b)
    alpha = 1 - confidence
    q = float(_sps.t.ppf(1 - alpha / 2, m - 1))
    g_lo, g_hi = g - q * se, g + q * se
    p_worse = float(_sps.t.cdf(g / se, m - 1))
    p_better = float(_sps.t.sf(g / se, m - 1))
    status = _status(g, g_lo, g_hi, p_worse, p_better, alpha, threshold)
    full = math.log(1 - threshold)
    ratio = math.exp(c - b)
    lo, hi = sorted((math.exp(sign * g_lo), math.exp(sign * g_hi)))
    pct = round(confidence * 100, 6)
    msg = (f"{kind} {ratio:.3f}x against {m} baseline runs ({pct:g}% prediction interval {lo:.3f}-{hi:.3f}, "
           f"run-to-run s.d. {s:.1%}, t p={p_worse:.2g}): {status}")
    if status == "inconclusive" and g_lo < full:
        msg += (f"; the baseline runs vary too much to settle a {threshold:.0%} change: keep more runs "
                "(--moebench-baseline-runs) or repeat this one")
    return Verdict(ratio, lo, hi, p_worse, status, msg)


# ---------------------------------------------------------------------------------------------- paired (A/B)
@functools.lru_cache(maxsize=64)
def _signed_rank_cdf(n: int) -> np.ndarray:
    """P(W+ <= w) for w = 0..n(n+1)/2 under the null of the Wilcoxon signed-rank test with n untied pairs: each
    rank 1..n enters the sum with probability 1/2 (exact, by counting subsets; float64 counts are exact to n ~ 50
    and accurate to 1e-15 relative beyond)."""
    top = n * (n + 1) // 2
    counts = np.zeros(top + 1)
    counts[0] = 1.0
    for k in range(1, n + 1):
        counts[k:] = counts[k:] + counts[: top + 1 - k].copy()
    return np.cumsum(counts) / 2.0**n


def _signed_rank_interval(d: np.ndarray, confidence: float) -> tuple[float, float, float, float, float]:
    """Hodges-Lehmann estimate of the pairs' shift (the median of the Walsh averages (d_i + d_j)/2, i <= j) with
    its distribution-free confidence interval (inverting the signed-rank test: the k-th smallest and largest Walsh
    averages) and the two one-sided signed-rank p-values (P(shift <= 0), P(shift >= 0) rejected)."""
    n = d.size
    i, j = np.triu_indices(n)
    walsh = np.sort((d[i] + d[j]) / 2.0)
    cdf = _signed_rank_cdf(n)
    alpha = 1.0 - confidence
    k = int(np.searchsorted(cdf, alpha / 2, side="right"))  # P(W+ <= k-1) <= alpha/2 < P(W+ <= k)
    k = max(k, 1)
    lo, hi = walsh[k - 1], walsh[walsh.size - k]
    ranks = _sps.rankdata(np.abs(d))
    w_plus = float(ranks[d > 0].sum() + 0.5 * ranks[d == 0].sum())
    top = cdf.size - 1
    p_less = float(cdf[min(int(math.floor(w_plus)), top)])  # small W+: the shift is negative
    p_greater = float(cdf[min(max(top - int(math.ceil(w_plus)), 0), top)])  # P(W+ >= w) = P(W+ <= top - w)
    return float(np.median(walsh)), float(lo), float(hi), p_less, p_greater


def pairs_needed(pair_sd: float, threshold: float = 0.05, confidence: float = 0.99, power: float = 0.95) -> int:
    """Round pairs at which a true change of ``threshold`` is flagged with probability ``power``, for pairs whose log
    ratio has s.d. ``pair_sd`` (normal approximation, inflated by 1/0.955, the signed-rank test's efficiency
    against the t-test at normal noise). At the A/A spreads measured on an H100 80GB HBM3 this is 117 at step grain
    (12.8%) and 262 at round grain (19.2%)."""
    z = float(_sps.norm.ppf(1 - (1 - confidence) / 2)) + float(_sps.norm.ppf(power))
    return max(MIN_PAIRS, int(math.ceil((z * pair_sd / -math.log(1 - threshold)) ** 2 / 0.955)))


def compare_paired(baseline: Sequence[float], current: Sequence[float], *, higher_is_better: bool,
                   threshold: float = 0.05, confidence: float = 0.99) -> Verdict:
    """Verdict from an interleaved A/B run: ``baseline[i]`` and ``current[i]`` are rounds measured back to back
    (``moebench ab`` lets two processes take turns), so whatever the machine did in that moment (its slow
    spells, the run-to-run offset that :func:`compare` and :func:`compare_runs` must live with) hits both and cancels
    in the pair's log ratio ``d_i``. The shift is the Hodges-Lehmann estimate of the ``d_i`` with the signed-rank
    confidence interval and one-sided Wilcoxon signed-rank p-value (distribution free: a slow outlier round moves
    them by at most one rank); ``ratio`` is ``exp(shift)``. The statuses follow :func:`compare`'s rule."""
    base = _check_sample("baseline", baseline)
    cur = _check_sample("current", current)
    _check_options(threshold, confidence, 1000)
    if base.size != cur.size:
        raise ValueError(f"paired samples must have one baseline round per current round, got {base.size} and "
                         f"{cur.size}; pair the rounds of one interleaved run (moebench ab)")
    kind = "throughput" if higher_is_better else "latency"
    n = base.size
    d = np.log(cur) - np.log(base)
    if n < MIN_PAIRS:
        ratio = float(np.exp(np.median(d)))
        return Verdict(ratio, math.nan, math.nan, math.nan, "inconclusive",
                       f"{kind} {ratio:.3f}x: inconclusive, {n} round pairs; need at least {MIN_PAIRS} "
                       "(--moebench-rounds)", 2.0**-n, MIN_PAIRS)
    shift, lo, hi, p_less, p_greater = _signed_rank_interval(d, confidence)
    sign = 1.0 if higher_is_better else -1.0
    g = sign * shift
    g_lo, g_hi = sorted((sign * lo, sign * hi))
    p_worse, p_better = (p_less, p_greater) if higher_is_better else (p_greater, p_less)
    alpha = 1.0 - confidence
    status = _status(g, g_lo, g_hi, p_worse, p_better, alpha, threshold)
    ratio, r_lo, r_hi = math.exp(shift), math.exp(lo), math.exp(hi)
    pct = round(confidence * 100, 6)
    sd = float(np.std(d, ddof=1))
    msg = (f"{kind} {ratio:.3f}x over {n} interleaved round pairs ({pct:g}% CI {r_lo:.3f}-{r_hi:.3f}, pair s.d. "
           f"{sd:.1%}, signed-rank p={p_worse:.2g}): {status}")
    if status == "inconclusive":
        need = pairs_needed(sd, threshold, confidence)
        msg += f"; about {need} pairs would settle a {threshold:.0%} change at this spread (moebench ab --rounds)"
    return Verdict(ratio, r_lo, r_hi, p_worse, status, msg, 2.0**-n, None)


def processes_needed(group_sd: float, threshold: float = 0.05, confidence: float = 0.99, power: float = 0.95,
                     cap: int = 200) -> int | None:
    """Process pairs at which a true change of ``threshold`` is flagged with probability ``power`` when the process
    pairs' mean log ratios spread by ``group_sd`` (the t test's power, noncentral-t approximation by shifted
    quantiles). None beyond ``cap``."""
    k = np.arange(MIN_PROCESS_PAIRS, int(cap) + 1)
    q = _sps.t.ppf(1 - (1 - confidence) / 2, k - 1) + _sps.t.ppf(power, k - 1)
    ok = np.flatnonzero(q * group_sd / np.sqrt(k) <= -math.log(1 - threshold))
    return int(k[ok[0]]) if ok.size else None


def compare_paired_groups(groups: Sequence[tuple[Sequence[float], Sequence[float]]], *, higher_is_better: bool,
                          threshold: float = 0.05, confidence: float = 0.99) -> Verdict:
    """Verdict over several interleaved A/B process pairs (``moebench ab --processes K``): ``groups[j]`` is the
    (baseline, current) rounds of process pair j, paired round by round as in :func:`compare_paired`.

    Why: a process keeps an offset for its whole run (4.0% log s.d. over 27 A/A process pairs on an H100 80GB HBM3),
    the same for all its rounds, so pairing cannot cancel it and :func:`compare_paired` counts it as a real change
    once the pairs are many. Model ``d_ij = mu + u_j + e_ij`` with ``u_j`` the process pair's offset: the shift is
    the mean of the groups' mean log ratios ``m_j``, its interval the Student t interval with K-1 degrees of freedom
    on the ``m_j`` and the p-values one-sided t: the ``m_j`` spread holds both the round noise and the offset, so the
    coverage holds whatever the offset (for roughly normal ``m_j``, which means of many rounds are). Statuses follow
    :func:`compare`'s rule. Unweighted on purpose: weighting groups by their round counts would be more efficient when
    the counts differ, but its interval needs the offset's variance, which K of 3-12 estimate badly."""
    _check_options(threshold, confidence, 1000)
    means, rounds = [], 0
    for j, (baseline, current) in enumerate(groups, start=1):
        base = _check_sample(f"process pair {j} baseline", baseline)
        cur = _check_sample(f"process pair {j} current", current)
        if base.size != cur.size:
            raise ValueError(f"process pair {j} has {base.size} baseline and {cur.size} current rounds; pass the "
                             "rounds both sides finished, one baseline round per current round")
        means.append(float(np.mean(np.log(cur) - np.log(base))))
        rounds += base.size
    k = len(means)
    if k < MIN_PROCESS_PAIRS:
        raise ValueError(f"{k} process pair(s): a verdict over process pairs needs at least {MIN_PROCESS_PAIRS} "
                         f"(moebench ab --processes {MIN_PROCESS_PAIRS} or more); use compare_paired for one")
    m = np.asarray(means)
    shift = float(m.mean())
    s = max(float(m.std(ddof=1)), 1e-12)
    se = s / math.sqrt(k)
    alpha = 1.0 - confidence
    q = float(_sps.t.ppf(1 - alpha / 2, k - 1))
    lo, hi = shift - q * se, shift + q * se
    p_less, p_greater = float(_sps.t.cdf(shift / se, k - 1)), float(_sps.t.sf(shift / se, k - 1))
    sign = 1.0 if higher_is_better else -1.0
    g = sign * shift
    g_lo, g_hi = sorted((sign * lo, sign * hi))
    p_worse, p_better = (p_less, p_greater) if higher_is_better else (p_greater, p_less)
    status = _status(g, g_lo, g_hi, p_worse, p_better, alpha, threshold)
    kind = "throughput" if higher_is_better else "latency"
    ratio, r_lo, r_hi = math.exp(shift), math.exp(lo), math.exp(hi)
    pct = round(confidence * 100, 6)
    msg = (f"{kind} {ratio:.3f}x over {k} process pairs of {rounds} round pairs ({pct:g}% CI {r_lo:.3f}-{r_hi:.3f}, "
           f"process-pair shifts spread by s.d. {s:.1%}, t p={p_worse:.2g}): {status}")
    if status == "inconclusive":
        need = processes_needed(s, threshold, confidence)
        more = f"about {need} process pairs" if need else "far more process pairs"
        msg += f"; {more} would settle a {threshold:.0%} change at this spread (moebench ab --processes)"
    return Verdict(ratio, r_lo, r_hi, p_worse, status, msg, math.nan, None)


# ------------------------------------------------------------------------------------------------- noise estimate
def estimate_round_cv(history_path: str | Path) -> dict:
    """Per-round CV of tokens/s from one stored run (see the module docstring): pairs of records with the same
    ``model``, ``policy``, ``hit_rate`` and ``h2d_bytes_per_round`` (the same work at different budgets)."""
    lines = [ln for ln in Path(history_path).read_text().splitlines() if ln.strip()]
    records = [r for ln in lines for r in json.loads(ln).get("records", [])]
    groups: dict[tuple, list[dict]] = {}
    for r in records:
        if r.get("tokens_per_s") and r.get("rounds"):
            key = (r.get("model"), r.get("policy"), round(float(r.get("hit_rate") or 0), 6),
                   round(float(r.get("h2d_bytes_per_round") or 0)))
            groups.setdefault(key, []).append(r)
    pairs, logs = [], []
    for group in groups.values():
        for x, y in zip(group, group[1:]):
            lr = math.log(x["tokens_per_s"] / y["tokens_per_s"])
            logs.append(lr)
            pairs.append((x["case"], y["case"], x["tokens_per_s"], y["tokens_per_s"], lr))
    if not logs:
        raise ValueError(f"{history_path}: no pair of records doing the same work; cannot estimate the noise")
    rounds = int(records[0]["rounds"])
    cv_agg = math.sqrt(sum(v * v for v in logs) / len(logs)) / math.sqrt(2)
    return {"pairs": pairs, "rounds_per_record": rounds, "cv_aggregate": cv_agg, "cv_round": cv_agg * math.sqrt(rounds)}


def round_noise_from_history(history_path: str | Path, metric: str = "tokens_per_s") -> dict:
    """Measured per-round noise: the log-residuals of every record's per-round samples about its own median,
    pooled over the complete runs of a history (records with an injected delay left out). ``cv_round`` is their
    standard deviation (the CV, for small noise); ``residuals`` keeps the shape of the distribution (skew, outliers)
    for an empirical resampling model. Needs records with at least :data:`MIN_ROUNDS` samples (history schema 2)."""
    from .history import read_history

    runs, _ = read_history(history_path)
    residuals: list[float] = []
    used = []
    for run in runs:
        if run.get("status", "complete") != "complete":
            continue
        for r in run.get("records", []):
            samples = (r.get("samples") or {}).get(metric) or []
            if len(samples) < MIN_ROUNDS or r.get("inject_delay_ms") or r.get("inject_slowdown") or min(samples) <= 0:
                continue
            logs = np.log(np.asarray(samples, dtype=float))
            n = logs.size
            residuals.extend((logs - np.median(logs)) * math.sqrt(n / (n - 1)))  # undo the shrinkage about a median
            used.append((r.get("case"), n))
    if not residuals:
        raise ValueError(f"{history_path}: no record with {MIN_ROUNDS}+ per-round '{metric}' samples; run a suite "
                         "with --moebench-rounds 10 or more (history schema 2) and point at its history")
    res = np.asarray(residuals)
    res = res - np.mean(res)
    return {"cv_round": float(np.std(res, ddof=1)), "residuals": res.tolist(), "records": used,
            "n_samples": int(res.size)}
