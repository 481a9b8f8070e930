"""The tidy results schema: one row per cell x metric (DESIGN.md, "Contracts").

A cell's rows carry the cell's axes and model accounting, so a results table can be read alone.
Raw samples (per-iteration timings, loss curves) live in a second tidy table keyed the same way.
"""

from __future__ import annotations

import math
from typing import Any

# Column order of results.parquet / results.csv.
RESULT_COLUMNS: tuple[str, ...] = (
    "run_id", "cell_id", "model", "family", "preset",
    "params_unique", "params_non_embedding", "effective_depth",
    "loops_train", "loops_test", "backend", "device", "device_class",
    "workload", "batch", "seq_len", "dtype", "kv_policy", "lr", "seed",
    "metric", "stat", "value", "unit", "ci_low", "ci_high", "n_samples",
    "source", "status", "reason",
)

# Column order of samples.parquet: raw per-repetition values behind a summarised metric.
SAMPLE_COLUMNS: tuple[str, ...] = ("run_id", "cell_id", "metric", "unit", "index", "value")

# Cell statuses (DESIGN.md): a failing cell is a row with one of these, never a lost result.
STATUSES: tuple[str, ...] = ("ok", "oom", "timeout", "diverged", "error", "skipped", "unavailable")


def metric_row(metric: str, value: float | None, unit: str, *, source: str = "measured",
               stat: str = "", ci_low: float = math.nan, ci_high: float = math.nan,
               n_samples: int = 0, **extra: Any) -> dict[str, Any]:
    """One metric of one cell. `value=None` becomes NaN: an unmeasured number is never 0."""
    row = {
        "metric": metric,
        "stat": stat,
        "value": math.nan if value is None else float(value),
        "unit": unit,
        "ci_low": ci_low,
        "ci_high": ci_high,
        "n_samples": n_samples,
        "source": source,
    }
    row.update(extra)
    return row


def unmeasured(metric: str, unit: str, why: str, **extra: Any) -> dict[str, Any]:
    """A metric that could not be measured: NaN with the reason in `source`."""
    return metric_row(metric, None, unit, source=why, **extra)
