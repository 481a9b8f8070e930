"""Robust statistics for raw timing samples: summaries, bootstrap intervals, rank tests.

Pure functions of numpy arrays; every random draw takes an explicit seed so results are reproducible.
"""

from __future__ import annotations

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
