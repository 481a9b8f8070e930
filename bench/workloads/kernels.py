"""Kernels workload: Numba kernels against torch eager and torch.compile, per op and per model."""

from __future__ import annotations

from loopscope.bench.context import RunContext
from loopscope.bench.matrix import Cell
from loopscope.bench.workloads import WorkloadResult


def run(cell: Cell, ctx: RunContext) -> WorkloadResult:
    from loopscope.kernels.bench import kernel_benchmarks

    quick = float(cell.settings["measure"]["min_time_s"]) < 1.0
    return WorkloadResult(rows=kernel_benchmarks(quick=quick))
