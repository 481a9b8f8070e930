"""pytest-benchmark JSON in and out, so loopscope runs and pytest-benchmark files can be compared both ways.

Export: every (cell, metric) whose unit is a time and that has raw samples becomes one benchmark,
with the statistics pytest-benchmark computes (in seconds) and the raw data, so
`pytest-benchmark compare a.json b.json` reads it. The cell's axes and all its other result rows
(throughput, memory, bpb, ...) ride along in `extra_info["loopscope"]`, and the run's manifest in
`machine_info["loopscope"]`, so importing an exported file gives back the run's rows.

Import: each benchmark becomes a cell with metric `latency_ms` (time per call, from `stats`) and its
raw `data` as samples, so `loopscope gate a.json b.json` gates two pytest-benchmark files.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from loopscope.bench.schema import RESULT_COLUMNS
from loopscope.reports.rundir import (
    AXES,
    RunData,
    UnusableRunError,
    axis_text,
    load_run,
    make_run_data,
    write_run_dir,
)

# Seconds per unit of the time units a metric may carry.
TIME_UNITS: dict[str, float] = {"s": 1.0, "ms": 1e-3, "us": 1e-6, "µs": 1e-6, "ns": 1e-9}
# Layout version written when pytest-benchmark itself is not installed to say which one it is.
FALLBACK_FORMAT_VERSION = "5.1.0"
IMPORTED_METRIC, IMPORTED_UNIT = "latency_ms", "ms"
# pytest-benchmark stats imported as result rows (stat name in loopscope -> key in `stats`).
IMPORTED_STATS = {"median": "median", "mean": "mean", "min": "min", "max": "max", "p25": "q1", "p75": "q3",
                  "stddev": "stddev", "iqr": "iqr"}


# ---------------------------------------------------------------------------------------------------
# Statistics, as pytest-benchmark defines them


def quartiles(sorted_x: np.ndarray) -> tuple[float, float]:
    """Q1 and Q3 by Wikipedia's methods 2 (even n) and 3 (odd n), which pytest-benchmark uses."""
    n = sorted_x.size
    if n == 1:
        return float(sorted_x[0]), float(sorted_x[0])
    if n % 2 == 0:
        return float(np.median(sorted_x[: n // 2])), float(np.median(sorted_x[n // 2:]))
    k, x = n // 4, sorted_x
    if n % 4 == 1:
        return 0.25 * x[k - 1] + 0.75 * x[k], 0.75 * x[3 * k] + 0.25 * x[3 * k + 1]
    return 0.75 * x[k] + 0.25 * x[k + 1], 0.25 * x[3 * k + 1] + 0.75 * x[3 * k + 2]


def benchmark_stats(seconds: np.ndarray) -> dict[str, Any]:
    """pytest-benchmark's `stats` object (without data/iterations) of per-call times in seconds."""
    x = np.sort(np.asarray(seconds, dtype=np.float64))
    n = int(x.size)
    mean = float(x.mean())
    stddev = float(x.std(ddof=1)) if n > 1 else 0.0
    q1, q3 = (float(q) for q in quartiles(x))
    iqr = q3 - q1
    low_fence, high_fence = q1 - 1.5 * iqr, q3 + 1.5 * iqr
    iqr_outliers = int(((x < low_fence) | (x > high_fence)).sum())
    stddev_outliers = int(((x < mean - stddev) | (x > mean + stddev)).sum())
    total = float(x.sum())
    return {
        "min": float(x[0]), "max": float(x[-1]), "mean": mean, "stddev": stddev, "rounds": n,
        "median": float(np.median(x)), "iqr": iqr, "q1": q1, "q3": q3,
        "iqr_outliers": iqr_outliers, "stddev_outliers": stddev_outliers,
        "outliers": f"{stddev_outliers};{iqr_outliers}",
        "ld15iqr": float(x[x >= low_fence][0]), "hd15iqr": float(x[x <= high_fence][-1]),
        "ops": n / total, "total": total,
    }


# ---------------------------------------------------------------------------------------------------
# Export


@dataclass(frozen=True)
class BenchmarkExport:
    document: dict[str, Any]  # the pytest-benchmark JSON document
    skipped: tuple[str, ...]  # time metrics left out, and why


def export_pytest_benchmark(run: str | Path | RunData, out_path: str | Path | None = None) -> BenchmarkExport:
    """Write (if `out_path`) and return a run's timing metrics as a pytest-benchmark JSON document."""
    run = run if isinstance(run, RunData) else load_run(run)
    benchmarks, skipped = [], []
    handled: set[tuple[str, str]] = set()
    cells = run.cells().set_index("cell_id", drop=False)
    for cell_id, metric in run.sample_keys():
        rows = run.results[(run.results["cell_id"] == cell_id) & (run.results["metric"] == metric)]
        unit = str(rows["unit"].iloc[0]) if len(rows) else _sample_unit(run, cell_id, metric)
        if unit not in TIME_UNITS or cell_id not in cells.index:
            continue
        handled.add((cell_id, metric))
        samples = run.samples_for(cell_id, metric)
        if samples.size == 0 or not np.all(samples > 0):
            skipped.append(f"{cell_id} {metric}: raw samples not all positive times")
            continue
        benchmarks.append(_benchmark_entry(run, cells.loc[cell_id].to_dict(), metric, unit, samples))
    for row in run.results[run.results["unit"].isin(list(TIME_UNITS))].to_dict("records"):
        key = (row["cell_id"], row["metric"])
        if key not in handled:
            handled.add(key)
            skipped.append(f"{key[0]} {key[1]}: no raw samples, and pytest-benchmark needs them")
    document = _json_safe({
        "machine_info": _machine_info(run),
        "commit_info": _commit_info(run),
        "benchmarks": benchmarks,
        "datetime": str(run.manifest.get("created", "")),
        "version": _format_version(),
    })
    if out_path is not None:
        out = Path(out_path)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(document, indent=2, allow_nan=False) + "\n", encoding="utf-8")
    return BenchmarkExport(document, tuple(skipped))


def _sample_unit(run: RunData, cell_id: str, metric: str) -> str:
    rows = run.samples[(run.samples["cell_id"] == cell_id) & (run.samples["metric"] == metric)]
    return str(rows["unit"].iloc[0]) if len(rows) and isinstance(rows["unit"].iloc[0], str) else ""


def _benchmark_entry(run: RunData, cell: dict[str, Any], metric: str, unit: str,
                     samples: np.ndarray) -> dict[str, Any]:
    to_seconds = TIME_UNITS[unit]
    seconds = samples * to_seconds
    label = cell["label"]
    axes = {axis: axis_text(cell.get(axis)) for axis in AXES}
    cell_rows = run.results[run.results["cell_id"] == cell["cell_id"]]
    stats = benchmark_stats(seconds)
    stats.update(data=[float(s) for s in seconds], iterations=1)
    return {
        "group": metric,
        "name": f"{metric}[{label}]",
        "fullname": f"loopscope::{metric}[{label}]",
        "params": axes,
        "param": label,
        "extra_info": {"loopscope": {
            "run_id": run.run_id, "cell_id": cell["cell_id"], "metric": metric, "unit": unit,
            "to_seconds": to_seconds, "axes": axes,
            "rows": [_row_record(r) for r in cell_rows.to_dict("records")],
        }},
        "options": {"disable_gc": False, "timer": "loopscope", "min_rounds": int(samples.size),
                    "max_time": None, "min_time": None, "warmup": None},
        "stats": stats,
    }


def _row_record(row: dict[str, Any]) -> dict[str, Any]:
    keep = ("metric", "stat", "value", "unit", "ci_low", "ci_high", "n_samples", "source", "status", "reason",
            "params_unique", "params_non_embedding", "effective_depth", "device_class")
    return {key: row.get(key) for key in keep}


def _machine_info(run: RunData) -> dict[str, Any]:
    """pytest-benchmark's machine_info keys, filled from the fingerprint where it says them."""
    flat = _flatten_leaves(run.fingerprint)

    def find(*words: str) -> str:
        for key, value in flat.items():
            if all(w in key.lower() for w in words) and value not in (None, ""):
                return str(value)
        return ""

    cpu_model = find("cpu", "model") or find("cpu", "brand") or find("processor")
    return {
        "node": find("node") or find("host"), "processor": cpu_model, "machine": find("machine"),
        "python_implementation": "CPython",
        "python_version": str((run.manifest.get("versions") or {}).get("python", "")),
        "release": find("release"), "system": find("system"),
        "cpu": {"brand_raw": cpu_model},
        "loopscope": {key: run.manifest.get(key) for key in ("run_id", "created", "profile", "fingerprint",
                                                              "versions", "git", "cells")},
    }


def _commit_info(run: RunData) -> dict[str, Any]:
    git = run.manifest.get("git") or {}
    return {"id": git.get("commit"), "dirty": bool(git.get("dirty", False)), "project": "loopscope",
            "branch": git.get("branch"), "time": None}


def _format_version() -> str:
    try:
        return metadata.version("pytest-benchmark")
    except metadata.PackageNotFoundError:
        return FALLBACK_FORMAT_VERSION


def _flatten_leaves(obj: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(obj, dict):
        out: dict[str, Any] = {}
        for key, value in obj.items():
            out.update(_flatten_leaves(value, f"{prefix}{key}."))
        return out
    return {prefix.rstrip("."): obj}


def _json_safe(obj: Any) -> Any:
    """NaN and infinities become null: strict JSON, readable by any parser."""
    if isinstance(obj, dict):
        return {str(k): _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_json_safe(v) for v in obj]
    if obj is pd.NA:
        return None
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


# ---------------------------------------------------------------------------------------------------
# Import


def read_pytest_benchmark(path: str | Path) -> RunData:
    """A pytest-benchmark JSON file as a run: one cell per benchmark (loopscope exports restore theirs)."""
    path = Path(path)
    try:
        raw = path.read_bytes()
        doc = json.loads(raw.decode("utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UnusableRunError(f"{path}: unreadable pytest-benchmark JSON ({exc})") from exc
    if not isinstance(doc, dict) or not isinstance(doc.get("benchmarks"), list):
        raise UnusableRunError(f"{path}: key 'benchmarks' missing or not a list "
                               f"(not a pytest-benchmark file)")
    machine_info = _table(doc.get("machine_info"))
    exported_manifest = _table(machine_info.get("loopscope")) or None
    manifest = _manifest(path, raw, doc, machine_info, exported_manifest)

    results: list[dict[str, Any]] = []
    samples: list[pd.DataFrame] = []
    for i, bench in enumerate(doc["benchmarks"]):
        rows, sample_frame = _benchmark_rows(path, i, bench, manifest["run_id"])
        results += rows
        if sample_frame is not None:
            samples.append(sample_frame)
    results_df = pd.DataFrame(results, columns=list(RESULT_COLUMNS))
    # A loopscope export repeats a cell's other rows in each of its benchmarks: keep one of each.
    results_df = results_df.drop_duplicates(subset=["cell_id", "metric", "stat"], keep="first")
    samples_df = pd.concat(samples, ignore_index=True) if samples else pd.DataFrame()
    return make_run_data(path, manifest, results_df, samples_df)


def import_pytest_benchmark(json_path: str | Path, out_dir: str | Path) -> Path:
    """Write a pytest-benchmark JSON file as a loopscope run directory; returns the directory."""
    run = read_pytest_benchmark(json_path)
    return write_run_dir(out_dir, run.manifest, run.results, run.samples)


def _manifest(path: Path, raw: bytes, doc: dict[str, Any], machine_info: dict[str, Any],
              exported: dict[str, Any] | None) -> dict[str, Any]:
    if exported and isinstance(exported.get("run_id"), str) and isinstance(exported.get("fingerprint"), dict):
        return {**exported, "imported_from": str(path)}
    cpu, commit = _table(machine_info.get("cpu")), _table(doc.get("commit_info"))
    benchmarks = doc["benchmarks"]
    return {
        "run_id": path.stem,
        "created": str(doc.get("datetime", "")),
        "profile": {"name": "pytest-benchmark", "path": str(path),
                    "hash": hashlib.sha256(raw).hexdigest()[:16]},
        "fingerprint": {
            "cpu": {"model": cpu.get("brand_raw", ""), "count": cpu.get("count"), "arch": cpu.get("arch")},
            "machine": machine_info.get("machine", ""),
            "system": machine_info.get("system", ""),
            "python_version": machine_info.get("python_version", ""),
            "device_class": "cpu",
            "source": "pytest-benchmark machine_info",
        },
        "versions": {"python": machine_info.get("python_version", ""),
                     "pytest-benchmark": doc.get("version")},
        "git": {"commit": commit.get("id"), "dirty": bool(commit.get("dirty", False))},
        "cells": len(benchmarks),
        "imported_from": str(path),
    }


def _benchmark_rows(path: Path, i: int, bench: Any,
                    run_id: str) -> tuple[list[dict[str, Any]], pd.DataFrame | None]:
    where = f"{path}: benchmarks[{i}]"
    if not isinstance(bench, dict) or not isinstance(bench.get("stats"), dict):
        raise UnusableRunError(f"{where}: key 'stats' missing or not an object")
    stats = bench["stats"]
    meta = _table(bench.get("extra_info")).get("loopscope")
    if isinstance(meta, dict) and {"cell_id", "metric", "unit", "to_seconds", "axes"} <= set(meta):
        return _exported_rows(where, bench, meta, run_id)

    fullname = bench.get("fullname") or bench.get("name")
    if not isinstance(fullname, str) or not fullname:
        raise UnusableRunError(f"{where}: key 'fullname' (or 'name') missing")
    cell_id = "pb-" + hashlib.sha256(fullname.encode()).hexdigest()[:16]
    axes = {axis: "" for axis in AXES}
    axes.update(model=fullname, workload=str(bench.get("group") or ""), backend="pytest-benchmark")
    base = {"run_id": run_id, "cell_id": cell_id, **axes, "source": "pytest-benchmark", "status": "ok",
            "reason": "", "unit": IMPORTED_UNIT, "ci_low": math.nan, "ci_high": math.nan}
    to_unit = 1.0 / TIME_UNITS[IMPORTED_UNIT]
    data = _data(where, stats)
    rows = []
    for stat, key in IMPORTED_STATS.items():
        if key in stats:
            value = _number(where, stats, key) * to_unit
            rows.append({**base, "metric": IMPORTED_METRIC, "stat": stat, "value": value,
                         "n_samples": int(stats.get("rounds", data.size))})
    if not any(r["stat"] == "median" for r in rows):
        raise UnusableRunError(f"{where}: key 'stats.median' missing")
    if not data.size:
        return rows, None
    return rows, _sample_frame(run_id, cell_id, IMPORTED_METRIC, IMPORTED_UNIT, data * to_unit)


def _exported_rows(where: str, bench: dict[str, Any], meta: dict[str, Any],
                   run_id: str) -> tuple[list[dict[str, Any]], pd.DataFrame | None]:
    """Rows of a benchmark loopscope exported: the cell's own rows, its samples back in their unit."""
    if meta["unit"] not in TIME_UNITS:
        raise UnusableRunError(f"{where}: extra_info.loopscope.unit {meta['unit']!r} is not a time unit")
    axes = {axis: meta["axes"].get(axis, "") for axis in AXES}
    base = {"run_id": run_id, "cell_id": str(meta["cell_id"]), **axes}
    rows = [{**base, **record} for record in meta.get("rows", []) if isinstance(record, dict)]
    for row in rows:
        row["value"] = math.nan if row.get("value") is None else row["value"]
    data = _data(where, bench["stats"])
    to_unit = 1.0 / float(meta["to_seconds"])
    frame = _sample_frame(run_id, str(meta["cell_id"]), str(meta["metric"]), str(meta["unit"]),
                          data * to_unit) if data.size else None
    return rows, frame


def _table(value: Any) -> dict[str, Any]:
    """A JSON object, or {} for anything else (absent keys and nulls included)."""
    return value if isinstance(value, dict) else {}


def _number(where: str, stats: dict[str, Any], key: str) -> float:
    value = stats[key]
    if not isinstance(value, int | float) or isinstance(value, bool):
        raise UnusableRunError(f"{where}: key 'stats.{key}' is {value!r}, not a number")
    return float(value)


def _data(where: str, stats: dict[str, Any]) -> np.ndarray:
    data = stats.get("data")
    if data is None:
        return np.empty(0)
    try:
        return np.asarray(data, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise UnusableRunError(f"{where}: key 'stats.data' is not a list of numbers") from exc


def _sample_frame(run_id: str, cell_id: str, metric: str, unit: str, values: np.ndarray) -> pd.DataFrame:
    return pd.DataFrame({"run_id": run_id, "cell_id": cell_id, "metric": metric, "unit": unit,
                         "index": np.arange(values.size), "value": values})
