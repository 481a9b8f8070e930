"""Judging process-level repetitions: per cell and timing metric, paired ratios, A/A noise floor, verdict.

Input: one value per (side, repetition, cell, metric), each the summary of one process (the median or the
fastest of its timed calls). Repetitions come in blocks (the gate runs ABBAAB or BAABBA, order randomised).
From BEST_OF_MIN_BLOCKS blocks on, each block's best process per side is compared (bench/stats.py,
best_of_blocks_change: relabelling inside blocks gives the interval and the noise floor). With fewer, the
i-th A of a block is paired with its i-th B, and A vs A', B vs B' measure what the same code does twice
(paired_change: the pooled floor).

Verdicts (per cell and metric, the metric's bad direction from the rules):
  fail        the change is significant (its CI excludes no change) and larger than both the tolerance and
              the noise floor;
  unresolved  not a fail, and the noise floor is above the tolerance (or unknown): this job cannot tell a
              change of the tolerance's size from noise; it does not fail CI but is printed;
  pass        otherwise: the floor is within the tolerance and no change beyond it was found.
Per metric, four summaries of each process are candidates: wall or process CPU time, each as the median
or the fastest of its timed calls. The one with the lowest noise floor is judged, and named. On a shared
machine the median of a process carries the state that process landed in (a co-running job on its core,
its cache, its frequency) for all its calls, and the fastest call sheds most of it; a change that only
adds occasional slow calls moves the median, so the median stays a candidate.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pandas as pd

from loopscope.bench.stats import (
    BEST_OF_MIN_BLOCKS,
    TRIM,
    PairedChange,
    best_of_blocks_change,
    paired_change,
)

# metric -> its process CPU time twin (same quantity, timed with the worker's user + sys time)
CPU_TWINS = {"latency_ms": "cpu_latency_ms", "ttft_ms": "cpu_ttft_ms", "tokens_per_s": "cpu_tokens_per_s"}
# a metric name with this suffix holds the process's fastest call instead of its median (reports/abgate.py)
FASTEST = ":fastest"
STATISTICS = {"median": "", "fastest": FASTEST}
GATED_METRICS = {"tokens_per_s": "higher", "latency_ms": "lower", "ttft_ms": "lower"}
VERDICTS = ("fail", "unresolved", "pass")


@dataclass(frozen=True)
class Verdict:
    verdict: str
    why: str


def judge_change(change: PairedChange, direction: str, tolerance: float) -> Verdict:
    """pass | fail | unresolved for one paired change (see the module docstring)."""
    if change.n_pairs < 2 or not math.isfinite(change.ci_low):
        return Verdict("unresolved", f"{change.n_pairs} process-level pair(s): no interval, noise floor unknown")
    lower_is_better = direction == "lower"
    worse = change.ratio if lower_is_better else 1.0 / change.ratio  # > 1: worse by that factor
    worse_low = change.ci_low if lower_is_better else 1.0 / change.ci_high
    floor = change.noise_floor
    if not math.isfinite(floor):
        return Verdict("unresolved", "noise floor unknown: fewer than two same-code repeats per side")
    if worse_low > 1.0 and worse - 1.0 > max(tolerance, floor):
        return Verdict("fail", f"{worse - 1.0:.1%} slower, significant, beyond tolerance and noise floor")
    if floor > tolerance:
        return Verdict("unresolved", f"noise floor {floor:.1%} > tolerance {tolerance:.1%}")
    return Verdict("pass", "no change beyond tolerance")


def block_pairs(order: list[str]) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
    """(A index, B index) pairs and same-code (first, second) index pairs of one block's run order."""
    a = [i for i, side in enumerate(order) if side == "A"]
    b = [i for i, side in enumerate(order) if side == "B"]
    pairs = list(zip(a, b, strict=False))
    same = [(a[0], a[1])] if len(a) >= 2 else []
    same += [(b[0], b[1])] if len(b) >= 2 else []
    return pairs, same


def judge_blocks(values: pd.DataFrame, *, tolerance: float, level: float = 0.99,
                 directions: dict[str, str] | None = None) -> pd.DataFrame:
    """One row per (cell, metric): the judged summary, base and cand medians, change, CI, floor, verdict.

    `values` columns: block, pos (position in the block), side (A base | B cand), cell, metric, value;
    a metric is named plainly (the process median), with its CPU twin's name for CPU time, and with
    FASTEST appended for the fastest call.
    """
    directions = directions or GATED_METRICS
    rows = []
    for cell, per_cell in values.groupby("cell", sort=True):
        for metric, direction in directions.items():
            candidates = []
            for timer, name in (("wall", metric), ("cpu", CPU_TWINS.get(metric))):
                for statistic, suffix in STATISTICS.items():
                    if name is None:
                        continue
                    sel = per_cell[per_cell["metric"] == name + suffix]
                    if sel.empty or set(sel["side"]) != {"A", "B"}:
                        continue
                    change = _change(sel, direction, level)
                    candidates.append((timer, statistic, change, sel))
            if not candidates:
                continue
            notes = []
            if metric in CPU_TWINS and not any(c[0] == "cpu" for c in candidates):
                notes.append("process CPU time not recorded by both sides; wall time judged")
            usable = [c for c in candidates if math.isfinite(c[2].noise_floor)]
            timer, statistic, change, sel = min(usable or candidates, key=lambda c: c[2].noise_floor
                                                if math.isfinite(c[2].noise_floor) else math.inf)
            if len(usable) >= 2:
                others = ", ".join(f"{c[0]} {c[1]} {c[2].noise_floor:.1%}" for c in usable
                                   if (c[0], c[1]) != (timer, statistic))
                notes.append(f"{timer} time, {statistic} call: A/A floor {change.noise_floor:.1%} "
                             f"(others: {others})")
            notes.append(ESTIMATORS[_estimator(sel)])
            verdict = judge_change(change, direction, tolerance)
            rows.append(dict(
                cell=cell, metric=metric, timer=timer, statistic=statistic, direction=direction,
                n_pairs=change.n_pairs, n_same=change.n_same,
                base=float(np.median(sel[sel["side"] == "A"]["value"])),
                cand=float(np.median(sel[sel["side"] == "B"]["value"])),
                ratio=change.ratio, ci_low=change.ci_low, ci_high=change.ci_high, p_value=change.p_value,
                noise_floor=change.noise_floor, tolerance=tolerance, verdict=verdict.verdict,
                why="; ".join([verdict.why, *notes]),
            ))
    return pd.DataFrame(rows, columns=["cell", "metric", "timer", "statistic", "direction", "n_pairs", "n_same",
                                       "base", "cand", "ratio", "ci_low", "ci_high", "p_value", "noise_floor",
                                       "tolerance", "verdict", "why"])


ESTIMATORS = {
    "pooled": "pairs judged by their mean, noise floor pooled from A vs A' and B vs B'",
    "best-of-block": (f"each block's best process per side, block ratios {TRIM:.0%}-trimmed; interval and "
                      "noise floor from relabelling each block's processes"),
}


def _estimator(sel: pd.DataFrame) -> str:
    """best-of-block from BEST_OF_MIN_BLOCKS full blocks on (few blocks leave it too few degrees of
    freedom), else pooled. Fixed by the number of blocks, never chosen by which gives the narrower interval."""
    sides = sel.groupby(["block", "side"]).size().unstack(fill_value=0)
    full = int(((sides.get("A", 0) >= 2) & (sides.get("B", 0) >= 2)).sum()) if not sides.empty else 0
    return "best-of-block" if full >= BEST_OF_MIN_BLOCKS else "pooled"


def _change(sel: pd.DataFrame, direction: str, level: float) -> PairedChange:
    if _estimator(sel) == "best-of-block":
        blocks = [(list(block[block["side"] == "A"]["value"].astype(float)),
                   list(block[block["side"] == "B"]["value"].astype(float)))
                  for _, block in sel.groupby("block", sort=True)]
        return best_of_blocks_change(blocks, lower_is_better=direction == "lower", level=level)
    base, cand, same, blocks = _paired_values(sel)
    return paired_change(base, cand, same, blocks=blocks, level=level)


def _paired_values(sel: pd.DataFrame) -> tuple[list[float], list[float], list[float], list[int]]:
    """Per A/B pair: base, cand and block; and the same-code log differences of every block."""
    base, cand, same, blocks = [], [], [], []
    for block_id, block in sel.groupby("block", sort=True):
        block = block.sort_values("pos")
        order = list(block["side"])
        vals = list(block["value"].astype(float))
        pairs, same_idx = block_pairs(order)
        for ia, ib in pairs:
            base.append(vals[ia])
            cand.append(vals[ib])
            blocks.append(int(block_id))
        for i, j in same_idx:
            if vals[i] > 0 and vals[j] > 0:
                same.append(math.log(vals[j] / vals[i]))
    return base, cand, same, blocks


def render(table: pd.DataFrame) -> list[str]:
    from loopscope.reports.gate import text_table

    headers = ["cell", "metric", "timer", "pairs", "base", "cand", "change", "99% CI of ratio",
               "noise floor", "tolerance", "verdict", "why"]
    body = []
    for r in table.to_dict("records"):
        fin = math.isfinite(r["ci_low"])
        body.append([r["cell"], r["metric"], f"{r['timer']}/{r['statistic']}", r["n_pairs"],
                     f"{r['base']:.4g}", f"{r['cand']:.4g}",
                     f"{r['ratio'] - 1:+.1%}" if math.isfinite(r["ratio"]) else "—",
                     f"[{r['ci_low']:.3f}, {r['ci_high']:.3f}]" if fin else "—",
                     f"±{r['noise_floor']:.1%}" if math.isfinite(r["noise_floor"]) else "unknown",
                     f"±{r['tolerance']:.1%}", r["verdict"], r["why"]])
    return text_table(headers, body)
