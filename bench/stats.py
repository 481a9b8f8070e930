"""Robust statistics for raw timing samples: summaries, bootstrap intervals, rank tests.

Pure functions of numpy arrays; every random draw takes an explicit seed so results are reproducible.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import asdict, dataclass

import numpy as np

DEFAULT_RESAMPLES = 2000


def _scipy_stats():
    """scipy.stats, imported when a test statistic is needed: it costs most of a second, and a worker
    that only summarises its samples never needs it."""
    from scipy import stats

    return stats


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
    return float(_scipy_stats().mannwhitneyu(a, b, alternative="two-sided").pvalue)


# ---------------------------------------------------------------------------------------------------
# Paired, process-level comparisons (A/B gate). The unit of replication is one process: each value below
# is one process's summary (the median or the fastest of its timed calls); samples inside a process are
# never pooled.


@dataclass(frozen=True)
class PairedChange:
    n_pairs: int
    ratio: float  # geometric mean of cand/base over the pairs
    ci_low: float  # t-interval of the mean log ratio (pooled spread), as a ratio
    ci_high: float
    p_value: float  # t-test of the mean log ratio against 0 (two-sided, pooled spread)
    noise_floor: float  # smallest relative change the A/A spread lets this many pairs resolve; NaN: unknown
    n_same: int  # same-code differences (A vs A', B vs B') pooled into the spread


def paired_change(base, cand, same_code_log_diffs, *, blocks=None, level: float = 0.99) -> PairedChange:
    """cand/base from paired process-level values, with the A/A noise floor measured beside it.

    `base[i]` and `cand[i]` were measured next to each other (one A/B pair of an ABBA block, `blocks[i]`
    names the block); `same_code_log_diffs` are log(x'/x) of two processes running the same code in the
    same block (A vs A', B vs B'). One process-to-process variance v (of a log difference) is estimated
    from both sources that carry no change: the same-code differences about 0 (so drift counts as noise;
    one degree of freedom each), and the spread of the blocks' mean pair ratios about the overall mean
    (k - 1 for k blocks; a block mean of two pairs varies as v / 2). The spread of the two pairs inside
    a block is not used again: in ABBA it is exactly the difference of that block's A/A and B/B
    differences. Without block labels each pair is its own block.
    The interval is mean +- t * sqrt(v / n) for n pairs; the floor is that half-width as a relative
    change, exp(t * sqrt(v / n)) - 1: the smallest change this many pairs at this spread can resolve.
    With fewer than two same-code differences the floor is unknown (NaN) and the pairs alone give v.
    """
    a, b = np.asarray(base, dtype=np.float64), np.asarray(cand, dtype=np.float64)
    labels = np.arange(a.size) if blocks is None else np.asarray(blocks)
    keep = np.isfinite(a) & np.isfinite(b) & (a > 0) & (b > 0)
    d, labels = np.log(b[keep] / a[keep]), labels[keep]
    e = np.asarray(same_code_log_diffs, dtype=np.float64)
    e = e[np.isfinite(e)]
    n, m = int(d.size), int(e.size)
    nan = float("nan")
    if n == 0:
        return PairedChange(0, nan, nan, nan, nan, nan, m)
    mean = float(d.mean())
    if n < 2:
        return PairedChange(n, math.exp(mean), nan, nan, nan, nan, m)
    if m >= 2:
        block_ids, index = np.unique(labels, return_inverse=True)
        size = np.bincount(index).astype(np.float64)
        block_mean = np.bincount(index, weights=d) / size
        squares = float(np.sum(e * e)) + float(np.sum(size * (block_mean - mean) ** 2))
        dof = m + block_ids.size - 1
    else:
        squares, dof = float(np.sum((d - mean) ** 2)), n - 1
    t_crit = float(_scipy_stats().t.ppf(0.5 + level / 2.0, dof))
    se = math.sqrt(squares / dof / n)
    if se > 0:
        p = float(2.0 * _scipy_stats().t.sf(abs(mean) / se, dof))
    else:
        p = 0.0 if mean != 0 else 1.0
    floor = math.expm1(t_crit * se) if m >= 2 else nan
    return PairedChange(n, math.exp(mean), math.exp(mean - t_crit * se), math.exp(mean + t_crit * se), p,
                        floor, m)


BEST_OF_MIN_BLOCKS = 5  # from this many blocks on, the A/B gate judges each block's best process per side
TRIM = 0.2  # fraction of the block ratios trimmed from each end
N_PERMUTATIONS = 4000


def best_of_blocks_change(blocks, *, lower_is_better: bool, level: float = 0.99, trim: float = TRIM,
                          n_permutations: int = N_PERMUTATIONS) -> PairedChange:
    """cand/base from each block's best process per side, robust to processes that run slow all their life.

    On a shared machine a process now and then lands in a state that slows all of it, its fastest call too
    (measured on a 2-core machine with one core busy: 1 process in 3 to 6, by 15-45%). Such a state only
    ever slows, so of a side's processes in a block the better one (the lower latency, the higher
    throughput) is the one to compare; with three per side, all are slow about once in 30 blocks at that
    rate. The statistic is the `trim`-trimmed mean over blocks of log(best B / best A).
    Its interval comes from the block design itself, not from a normal model: within a block, which of the
    processes ran the base and which the candidate is exchangeable when nothing changed, so relabelling
    them (every split of the block's processes into the two sides' sizes, drawn per block) gives the
    statistic's null distribution. The p-value is the share of relabellings at least as extreme as the
    observed; the noise floor is the `level` quantile of |statistic| over relabellings of the data with
    the measured change taken out of the candidate, and the interval is the statistic +- that floor.
    `blocks`: per block, (base values, candidate values), one value per process.
    """
    nan = float("nan")
    logs = []
    for base, cand in blocks:
        a = np.log(np.asarray([v for v in base if np.isfinite(v) and v > 0], dtype=np.float64))
        b = np.log(np.asarray([v for v in cand if np.isfinite(v) and v > 0], dtype=np.float64))
        if a.size and b.size:
            logs.append((a, b))
    k = len(logs)
    if k == 0:
        return PairedChange(0, nan, nan, nan, nan, nan, 0)
    sign = 1.0 if lower_is_better else -1.0  # the better process: min of sign * log value

    def splits(shift: float) -> np.ndarray:
        """(k, max splits) best(B) - best(A) for every split of each block, NaN-padded; column 0 observed."""
        rows = []
        for a, b in logs:
            x = np.concatenate([a, b - shift])
            picks = list(itertools.combinations(range(x.size), a.size))
            row = []
            for pick in picks:
                in_a = np.zeros(x.size, dtype=bool)
                in_a[list(pick)] = True
                row.append(sign * (np.min(sign * x[~in_a]) - np.min(sign * x[in_a])))
            rows.append(row)
        width = max(len(r) for r in rows)
        return np.array([r + [nan] * (width - len(r)) for r in rows])

    def trimmed(values: np.ndarray) -> np.ndarray:
        values = np.sort(values, axis=-1)
        g = int(math.floor(trim * values.shape[-1]))
        return values[..., g:values.shape[-1] - g].mean(axis=-1)

    observed = splits(0.0)
    center = float(trimmed(observed[:, 0]))
    if k < 2:
        return PairedChange(k, math.exp(center), nan, nan, nan, nan, 0)
    sizes = np.array([int(np.sum(np.isfinite(r))) for r in observed])
    rng = np.random.default_rng(0)  # the same data always gives the same verdict
    draw = (rng.random((n_permutations, k)) * sizes).astype(int)

    def relabelled(table: np.ndarray) -> np.ndarray:
        return trimmed(table[np.arange(k), draw])

    p = float((np.sum(np.abs(relabelled(observed)) >= abs(center) - 1e-12) + 1) / (n_permutations + 1))
    half = float(np.quantile(np.abs(relabelled(splits(center))), level))
    return PairedChange(k, math.exp(center), math.exp(center - half), math.exp(center + half), p,
                        math.expm1(half), 0)


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
    t_crit = float(_scipy_stats().t.ppf(0.5 + level / 2.0, dof))
    p = float(2.0 * _scipy_stats().t.sf(abs(diff) / se, dof)) if se > 0 else (0.0 if diff else 1.0)
    pooled = math.sqrt(((la.size - 1) * la.var(ddof=1) + (lb.size - 1) * lb.var(ddof=1))
                       / (la.size + lb.size - 2))
    t_pool = float(_scipy_stats().t.ppf(0.5 + level / 2.0, la.size + lb.size - 2))
    floor = math.expm1(t_pool * pooled * math.sqrt(1.0 / la.size + 1.0 / lb.size))
    return PairedChange(n, math.exp(diff), math.exp(diff - t_crit * se), math.exp(diff + t_crit * se), p, floor,
                        int(la.size + lb.size - 2))
