"""Workloads: what a cell does under the meters. Each module exposes `run(cell, ctx) -> WorkloadResult`."""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Any

MODULES = {"train": "train", "eval": "evaluate", "prefill": "prefill", "decode": "decode",
           "kernels": "kernels"}


@dataclass
class WorkloadResult:
    rows: list[dict[str, Any]] = field(default_factory=list)
    samples: list[dict[str, Any]] = field(default_factory=list)
    status: str = "ok"
    reason: str = ""
    engine: str = ""  # what really ran, read from the object that ran (bench/engines.py)

    def add_samples(self, metric: str, unit: str, values) -> None:
        for i, v in enumerate(values):
            self.samples.append({"metric": metric, "unit": unit, "index": i, "value": float(v)})


class Diverged(Exception):
    """Training produced a non-finite loss; carries the partial result."""

    def __init__(self, message: str, result: WorkloadResult) -> None:
        super().__init__(message)
        self.result = result


def run_workload(cell, ctx) -> WorkloadResult:
    module = importlib.import_module(f"loopscope.bench.workloads.{MODULES[cell.workload]}")
    result = module.run(cell, ctx)
    stamp_engine(result)
    return result


def stamp_engine(result: WorkloadResult) -> None:
    """Every row names the engine that ran it (a row that set its own, as the kernels workload's, keeps it)."""
    if result.engine:
        for row in result.rows:
            row.setdefault("engine", result.engine)
