"""Kernels workload: Numba kernels against torch eager and torch.compile, per op and per model.

`loopscope.kernels.bench` measures each case round-robin across backends in one process and returns a
row per (case, backend, metric). Here each row gets a unique `stat` (the case name), the backends get
the profile's spelling, and the numba/torch time ratio becomes a metric of its own for the report.
"""

from __future__ import annotations

import math
from typing import Any

from loopscope.bench.context import RunContext
from loopscope.bench.matrix import Cell
from loopscope.bench.schema import metric_row
from loopscope.bench.workloads import WorkloadResult

BACKEND_NAMES = {"torch.compile": "torch-compile"}


def tidy(rows: list[dict[str, Any]]) -> WorkloadResult:
    result = WorkloadResult()
    for row in rows:
        row = dict(row)
        row["backend"] = BACKEND_NAMES.get(row.get("backend"), row.get("backend"))
        row.setdefault("engine", row["backend"])  # each case names the engine it timed
        case = str(row.get("name") or row.get("kind") or "case")
        samples = row.pop("samples", None)
        row["stat"] = case
        if samples:
            result.add_samples(f"{row['metric']}[{case}|{row['backend']}]", row.get("unit", ""), samples)
        result.rows.append(row)
        ratio = row.get("time_ratio_vs_torch")
        if row["metric"] == "time_ms" and row["backend"] != "torch" and ratio is not None and math.isfinite(ratio):
            result.rows.append(metric_row(
                "time_ratio_vs_torch", ratio, "ratio", stat=case, backend=row["backend"],
                ci_low=row.get("time_ratio_ci_low", math.nan), ci_high=row.get("time_ratio_ci_high", math.nan),
                n_samples=row.get("n_samples", 0), source="backend time / torch eager time, same rounds"))
    return result


def run(cell: Cell, ctx: RunContext) -> WorkloadResult:
    from loopscope.kernels.bench import kernel_benchmarks

    quick = float(cell.settings["measure"]["min_time_s"]) < 1.0
    return tidy(kernel_benchmarks(quick=quick))
