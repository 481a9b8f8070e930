"""Synthetic run directories in the runner's layout, for the compare / gate / pytest-benchmark tests.

Timing samples are heavy-tailed like a shared machine's: log-normal around the cell's median, plus a
few outliers 1.5-4x slower. Each run draws its own samples from its own seed, so two runs of the
same cells are an A/A pair; `slowdown` plants a regression in chosen cells.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from loopscope.bench.schema import RESULT_COLUMNS, SAMPLE_COLUMNS
from loopscope.reports.rundir import write_run_dir

FINGERPRINT_A: dict[str, Any] = {
    "cpu": {"model": "Synthetic CPU A @ 3.0GHz", "cores": 2, "threads": 2},
    "gpu": None,
    "ram_bytes": 8 * 2**30,
    "device_class": "cpu",
    "versions": {"torch": "2.13.0"},
}
FINGERPRINT_B: dict[str, Any] = {**FINGERPRINT_A, "cpu": {"model": "Synthetic CPU B @ 2.0GHz", "cores": 2,
                                                          "threads": 2}}
PEAK_FLOPS = 1e12  # calibrated peak of the synthetic machine, for mfu


@dataclass(frozen=True)
class Cell:
    model: str = "gpt-tiny"
    family: str = "gpt"
    preset: str = "tiny"
    loops_train: int = 1
    loops_test: int = 1
    backend: str = "torch"
    device: str = "cpu"
    workload: str = "prefill"
    batch: int = 2
    seq_len: int = 64
    dtype: str = "fp32"
    kv_policy: str = "full"
    latency_ms: float = 8.0  # median of the synthetic latency distribution
    params_unique: int = 1_000_000
    flops_per_token: int = 6_000_000
    bpb: float = 2.5

    def axes(self) -> dict[str, Any]:
        d = asdict(self)
        for key in ("latency_ms", "params_unique", "flops_per_token", "bpb"):
            d.pop(key)
        return d

    def cell_id(self) -> str:
        return hashlib.sha256(json.dumps(self.axes(), sort_keys=True).encode()).hexdigest()[:16]


def default_cells() -> list[Cell]:
    """Dense and looped models on two backends: enough for the in-run ratio rules to apply."""
    gpt = Cell()
    parcae = Cell(model="parcae-tiny", family="parcae", loops_train=2, loops_test=4, latency_ms=12.0,
                  params_unique=1_100_000, flops_per_token=9_000_000, bpb=2.4)
    return [gpt, replace(gpt, backend="numba", latency_ms=6.0),
            parcae, replace(parcae, backend="numba", latency_ms=9.0)]


def noisy_latencies(rng: np.random.Generator, n: int, median_ms: float) -> np.ndarray:
    """Log-normal (sigma 0.12) around median_ms, with ~4% outliers 1.5-4x slower."""
    x = median_ms * rng.lognormal(mean=0.0, sigma=0.12, size=n)
    outliers = rng.random(n) < 0.04
    x[outliers] *= rng.uniform(1.5, 4.0, size=int(outliers.sum()))
    return x


def write_synthetic_run(
    out_dir: Path,
    *,
    run_id: str,
    seed: int,
    cells: list[Cell] | None = None,
    slowdown: Mapping[int, float] | None = None,
    status: Mapping[int, str] | None = None,
    fingerprint: Mapping[str, Any] = FINGERPRINT_A,
    n_samples: int = 60,
    with_samples: bool = True,
    extra_rows: list[dict[str, Any]] | None = None,
    samples_override: Mapping[int, np.ndarray] | None = None,
    throughput_samples: bool = False,
    peak_flops: float = PEAK_FLOPS,
) -> Path:
    """A run directory; `slowdown[i]` multiplies cell i's latencies, `status[i]` makes cell i fail.

    Like the runner, only latencies are kept as samples unless `throughput_samples` (tokens/s and MFU
    then rely on the rules' `samples_from`). `peak_flops` is the machine's calibrated peak, for MFU.
    """
    cells = default_cells() if cells is None else cells
    slowdown, status = slowdown or {}, status or {}
    rng = np.random.default_rng(seed)
    results: list[dict[str, Any]] = []
    samples: list[pd.DataFrame] = []
    for i, cell in enumerate(cells):
        base = {"run_id": run_id, "cell_id": cell.cell_id(), **cell.axes(),
                "params_unique": cell.params_unique, "params_non_embedding": cell.params_unique // 2,
                "effective_depth": 2 + cell.loops_test * 2, "device_class": "cpu"}
        if i in status:
            results.append({**base, "metric": "tokens_per_s", "stat": "median", "value": np.nan,
                            "unit": "tokens/s", "source": "not measured: cell failed", "status": status[i],
                            "reason": "CUDA out of memory (synthetic)"})
            continue
        if samples_override and i in samples_override:
            latency = np.asarray(samples_override[i], dtype=float)
        else:
            latency = noisy_latencies(rng, n_samples, cell.latency_ms) * slowdown.get(i, 1.0)
        tokens = cell.batch * cell.seq_len / (latency / 1000.0)
        ok = {**base, "status": "ok", "reason": "", "source": "measured"}
        for stat, q in (("median", 50), ("p90", 90), ("p99", 99)):
            results.append({**ok, "metric": "latency_ms", "stat": stat, "unit": "ms",
                            "value": float(np.percentile(latency, q)), "n_samples": latency.size})
        tok_median = float(np.median(tokens))
        results.append({**ok, "metric": "tokens_per_s", "stat": "median", "value": tok_median,
                        "unit": "tokens/s", "n_samples": tokens.size})
        results.append({**ok, "metric": "mfu", "stat": "median",
                        "value": tok_median * cell.flops_per_token / peak_flops, "unit": "fraction"})
        for metric, value, unit in (("params_unique", cell.params_unique, "params"),
                                    ("flops_per_token", cell.flops_per_token, "FLOP"),
                                    ("kv_cache_bytes", 2 * cell.seq_len * 4096, "bytes"),
                                    ("bpb", cell.bpb, "bits/byte")):
            results.append({**ok, "metric": metric, "stat": "", "value": float(value), "unit": unit,
                            "source": "analytic" if metric != "bpb" else "measured"})
        results.append({**ok, "metric": "energy_j_per_token", "stat": "", "value": np.nan, "unit": "J/token",
                        "source": "unavailable: no RAPL or NVML"})
        if with_samples:
            kept = [("latency_ms", latency, "ms")]
            if throughput_samples:
                kept.append(("tokens_per_s", tokens, "tokens/s"))
            for metric, values, unit in kept:
                samples.append(pd.DataFrame({"run_id": run_id, "cell_id": cell.cell_id(), "metric": metric,
                                             "unit": unit, "index": np.arange(values.size), "value": values}))
    for row in extra_rows or []:
        results.append({"run_id": run_id, "status": "ok", "stat": "", **row})
    manifest = {
        "run_id": run_id,
        "created": "2026-01-01T00:00:00+00:00",
        "profile": {"name": "synthetic", "path": "tests/rundir_factory.py", "hash": "0"},
        "fingerprint": dict(fingerprint),
        "versions": {"python": "3.11.7", "torch": "2.13.0"},
        "git": {"commit": "abc123", "dirty": False},
        "cells": len(cells),
    }
    results_df = pd.DataFrame(results).reindex(columns=list(RESULT_COLUMNS))
    samples_df = (pd.concat(samples, ignore_index=True) if samples
                  else pd.DataFrame(columns=list(SAMPLE_COLUMNS)))
    if with_samples:
        return write_run_dir(out_dir, manifest, results_df, samples_df)
    path = write_run_dir(out_dir, manifest, results_df, samples_df)
    (path / "samples.parquet").unlink()
    return path
