"""Robust statistics for raw timing samples: summaries, bootstrap intervals, rank tests.

Pure functions of numpy arrays; every random draw takes an explicit seed so results are reproducible.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np
from scipy import stats as _sps

DEFAULT_RESAMPLES = 2000


@dataclass(frozen=True)
class Summary:
    n: int
    median: float
    mean: float
    iqr: float
    p10: float
    p90: float
    p99: float
    ci_low: float  # bootstrap 95% CI of the median
    ci_high: float

    def as_dict(self) -> dict[str, float]:
        return asdict(self)


def summarize(samples, *, seed: int = 0, resamples: int = DEFAULT_RESAMPLES) -> Summary:
    """Median, IQR, tail percentiles and a bootstrap 95% CI of the median."""
    x = np.asarray(samples, dtype=np.float64)
    x = x[np.isfinite(x)]
    if x.size == 0:
        nan = float("nan")
        return Summary(0, nan, nan, nan, nan, nan, nan, nan, nan)
    q10, q25, q50, q75, q90, q99 = np.percentile(x, [10, 25, 50, 75, 90, 99])
    lo, hi = bootstrap_ci(x, np.median, seed=seed, resamples=resamples)
    return Summary(int(x.size), float(q50), float(x.mean()), float(q75 - q25), float(q10),
                   float(q90), float(q99), lo, hi)


def bootstrap_ci(x, statistic=np.median, *, level: float = 0.95, seed: int = 0,
                 resamples: int = DEFAULT_RESAMPLES) -> tuple[float, float]:
    """Percentile bootstrap CI of `statistic` over one sample (vectorised over resamples)."""
    x = np.asarray(x, dtype=np.float64)
    if x.size < 2:
        v = float(statistic(x)) if x.size else float("nan")
        return v, v
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, x.size, size=(resamples, x.size))
    boot = statistic(x[idx], axis=1)
    alpha = (1.0 - level) / 2.0
    return float(np.quantile(boot, alpha)), float(np.quantile(boot, 1.0 - alpha))


def ratio_ci(base, cand, *, level: float = 0.95, seed: int = 0,
             resamples: int = DEFAULT_RESAMPLES) -> tuple[float, float, float]:
    """Ratio of medians cand/base with a two-sample percentile bootstrap CI.

    Returns (ratio, ci_low, ci_high). Each side is resampled independently.
    """
    a = np.asarray(base, dtype=np.float64)
    b = np.asarray(cand, dtype=np.float64)
    a, b = a[np.isfinite(a)], b[np.isfinite(b)]
    if a.size == 0 or b.size == 0:
        nan = float("nan")
        return nan, nan, nan
    ratio = float(np.median(b) / np.median(a))
    if a.size < 2 or b.size < 2:
        return ratio, ratio, ratio
    rng = np.random.default_rng(seed)
    ma = np.median(a[rng.integers(0, a.size, size=(resamples, a.size))], axis=1)
    mb = np.median(b[rng.integers(0, b.size, size=(resamples, b.size))], axis=1)
    boot = mb / ma
    alpha = (1.0 - level) / 2.0
    return ratio, float(np.quantile(boot, alpha)), float(np.quantile(boot, 1.0 - alpha))


def mann_whitney_p(base, cand) -> float:
    """Two-sided Mann-Whitney U p-value; NaN when either side has fewer than 2 samples."""
    a = np.asarray(base, dtype=np.float64)
    b = np.asarray(cand, dtype=np.float64)
    if a.size < 2 or b.size < 2:
        return float("nan")
    return float(_sps.mannwhitneyu(a, b, alternative="two-sided").pvalue)


# ---------------------------------------------------------------------------------------------------
# Paired, process-level comparisons (A/B gate). The unit of replication is one process: each value below
# is one process's summary (e.g. the median of its timed calls); samples inside a process are never pooled.


@dataclass(frozen=True)
class PairedChange:
    n_pairs: int
    ratio: float  # geometric mean of cand/base over the pairs
    ci_low: float  # t-interval of the mean log ratio, as a ratio
    ci_high: float
    p_value: float  # one-sample t-test of the log ratios against 0 (two-sided)
    noise_floor: float  # smallest relative change the A/A spread lets this many pairs resolve; NaN: unknown
    n_same: int  # same-code differences (A vs A', B vs B') the floor was estimated from


def paired_change(base, cand, same_code_log_diffs, *, level: float = 0.99) -> PairedChange:
    """cand/base from paired process-level values, with the A/A noise floor measured beside it.

    `base[i]` and `cand[i]` were measured next to each other (one A/B pair of an ABBA block);
    `same_code_log_diffs` are log(x'/x) of two processes running the same code in the same job. Under no
    change, a pair's log ratio spreads like a same-code difference, so the floor is the half-width that
    spread gives a CI of the mean with this many pairs: exp(t * rms / sqrt(n)) - 1.
    """
    a, b = np.asarray(base, dtype=np.float64), np.asarray(cand, dtype=np.float64)
    keep = np.isfinite(a) & np.isfinite(b) & (a > 0) & (b > 0)
    d = np.log(b[keep] / a[keep])
    e = np.asarray(same_code_log_diffs, dtype=np.float64)
    e = e[np.isfinite(e)]
    n = int(d.size)
    nan = float("nan")
    if n == 0:
        return PairedChange(0, nan, nan, nan, nan, nan, int(e.size))
    mean = float(d.mean())
    if n < 2:
        return PairedChange(n, math.exp(mean), nan, nan, nan, nan, int(e.size))
    t_crit = float(_sps.t.ppf(0.5 + level / 2.0, n - 1))
    se = float(d.std(ddof=1)) / math.sqrt(n)
    if se > 0:
        p = float(2.0 * _sps.t.sf(abs(mean) / se, n - 1))
    else:
        p = 0.0 if mean != 0 else 1.0
    floor = nan
    if e.size >= 2:
        rms = float(np.sqrt(np.mean(e * e)))  # about 0, not the sample mean: drift counts as noise
        floor = math.expm1(t_crit * rms / math.sqrt(n))
    return PairedChange(n, math.exp(mean), math.exp(mean - t_crit * se), math.exp(mean + t_crit * se), p,
                        floor, int(e.size))


def unpaired_change(base, cand, *, level: float = 0.99) -> PairedChange:
    """cand/base from independent process-level values (stored runs, one value per run and side).

    Welch's t-interval on the difference of mean log values; the floor is the half-width the pooled
    same-code spread (each side's spread about its own mean) gives with these counts. Fewer than two
    values on a side: no interval and an unknown floor.
    """
    a, b = np.asarray(base, dtype=np.float64), np.asarray(cand, dtype=np.float64)
    la, lb = np.log(a[np.isfinite(a) & (a > 0)]), np.log(b[np.isfinite(b) & (b > 0)])
    nan = float("nan")
    n = int(min(la.size, lb.size))
    if la.size == 0 or lb.size == 0:
        return PairedChange(n, nan, nan, nan, nan, nan, 0)
    diff = float(lb.mean() - la.mean())
    if la.size < 2 or lb.size < 2:
        return PairedChange(n, math.exp(diff), nan, nan, nan, nan, 0)
    va, vb = la.var(ddof=1) / la.size, lb.var(ddof=1) / lb.size
    se = math.sqrt(va + vb)
    dof = (va + vb) ** 2 / ((va**2 / (la.size - 1)) + (vb**2 / (lb.size - 1))) if se > 0 else la.size + lb.size - 2
    t_crit = float(_sps.t.ppf(0.5 + level / 2.0, dof))
    p = float(2.0 * _sps.t.sf(abs(diff) / se, dof)) if se > 0 else (0.0 if diff else 1.0)
    pooled = math.sqrt(((la.size - 1) * la.var(ddof=1) + (lb.size - 1) * lb.var(ddof=1))
                       / (la.size + lb.size - 2))
    t_pool = float(_sps.t.ppf(0.5 + level / 2.0, la.size + lb.size - 2))
    floor = math.expm1(t_pool * pooled * math.sqrt(1.0 / la.size + 1.0 / lb.size))
    return PairedChange(n, math.exp(diff), math.exp(diff - t_crit * se), math.exp(diff + t_crit * se), p, floor,
                        int(la.size + lb.size - 2))
