"""The one reader of a run directory (manifest.json, cells/*.json, results.parquet, samples.parquet).

`read_run_dir` is used by report (frames.load_run), compare and gate (load_run) alike, so they agree
on what a run holds, and every way a run can be unusable is reported here, once, as an
`UnusableRunError` whose one-line message names the path (and key) at fault.

What to trust: the cell records (cells/*.json, written atomically, one per finished cell) are the
source of truth, restricted to the cells of the manifest's matrix; results.parquet (or .csv) and
samples.parquet are read only for a directory without cell records (copied tables, importers).
A pytest-benchmark JSON file is accepted wherever a run directory is (see pytest_benchmark.py).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from loopscope.bench.errors import LoopscopeError
from loopscope.bench.schema import RESULT_COLUMNS, SAMPLE_COLUMNS
from loopscope.bench.store import BadCellFileError, RunStore, tables_from_records

# The axes that define a cell; two runs' cells are the same cell when these agree (and usually the
# cell_id agrees too, since it hashes the cell definition).
AXES: tuple[str, ...] = (
    "model", "family", "preset", "loops_train", "loops_test", "backend", "device",
    "workload", "batch", "seq_len", "dtype", "kv_policy", "lr",
)

# Without these a results table cannot be compared at all; other columns are filled if absent.
REQUIRED_RESULT_COLUMNS: tuple[str, ...] = ("cell_id", "metric", "value")
REQUIRED_SAMPLE_COLUMNS: tuple[str, ...] = ("cell_id", "metric", "value")


class UnusableRunError(LoopscopeError):
    """Input to compare or gate (run directory, pytest-benchmark file, rules file) that cannot be used.

    The message is one line naming the path, and the key or column where one is at fault.
    """


@dataclass(frozen=True)
class RunData:
    """One run, read: its manifest, tidy results and raw samples (possibly empty)."""

    path: Path
    manifest: dict[str, Any]
    results: pd.DataFrame
    samples: pd.DataFrame
    notes: tuple[str, ...] = ()
    _sample_index: dict[tuple[str, str], np.ndarray] = field(default_factory=dict, repr=False)

    @property
    def run_id(self) -> str:
        return str(self.manifest["run_id"])

    @property
    def fingerprint(self) -> dict[str, Any]:
        return self.manifest["fingerprint"]

    def samples_for(self, cell_id: str, metric: str) -> np.ndarray:
        """Raw samples of one cell's metric in index order; empty when the run kept none."""
        return self._sample_index.get((cell_id, metric), np.empty(0))

    def sample_keys(self) -> list[tuple[str, str]]:
        """(cell_id, metric) pairs that have raw samples."""
        return sorted(self._sample_index)

    def cells(self) -> pd.DataFrame:
        """One row per cell: cell_id, the axes, a readable label, the cell status and reason."""
        return cell_table(self.results)


@dataclass(frozen=True)
class RunFiles:
    """A run directory as read: the manifest, the tidy tables, the cell records behind them (empty for
    a directory that has only tables) and notes on what was read from where."""

    path: Path
    manifest: dict[str, Any]
    results: pd.DataFrame
    samples: pd.DataFrame
    cells: dict[str, dict[str, Any]]
    notes: tuple[str, ...] = ()


def read_run_dir(path: str | Path) -> RunFiles:
    """Read a run directory (see the module's docstring for what is trusted first)."""
    path = Path(path)
    if not path.exists():
        raise UnusableRunError(f"{path}: no such run directory")
    if not path.is_dir():
        raise UnusableRunError(f"{path}: not a run directory (nor a pytest-benchmark .json file)")
    manifest = read_manifest(path / "manifest.json")
    ids = manifest.get("cell_ids")
    if ids is not None and (not isinstance(ids, list) or not all(isinstance(i, str) for i in ids)):
        raise UnusableRunError(f"{path / 'manifest.json'}: key 'cell_ids' is not a list of cell ids")
    try:
        records = RunStore(path).read_cells(None if ids is None else set(ids), strict=True)
    except BadCellFileError as err:
        raise UnusableRunError(str(err)) from None
    if records:
        results, samples = tables_from_records(records)
        notes: tuple[str, ...] = ()
        if RunStore(path).tables_stale(set(records)):
            notes = (f"{path}: tables absent or older than the cell files (unfinished run?); tables rebuilt "
                     f"from {path / 'cells'}",)
        return RunFiles(path, manifest, results, samples, records, notes)
    if not _has_tables(path) and (path / "cells").is_dir():
        raise UnusableRunError(f"{path / 'results.parquet'}: missing, and {path / 'cells'} holds no "
                               "finished cell")
    results = read_results(path)
    samples, notes = read_samples(path)
    return RunFiles(path, manifest, results, samples, {}, notes)


def load_run(path: str | Path) -> RunData:
    """Read a run directory, or a pytest-benchmark JSON file, into a `RunData`."""
    path = Path(path)
    if path.is_file() and path.suffix == ".json":
        from loopscope.reports.pytest_benchmark import read_pytest_benchmark  # avoids an import cycle

        return read_pytest_benchmark(path)
    files = read_run_dir(path)
    return make_run_data(path, files.manifest, files.results, files.samples, files.notes)


def make_run_data(path: Path, manifest: dict[str, Any], results: pd.DataFrame,
                  samples: pd.DataFrame, notes: tuple[str, ...] = ()) -> RunData:
    """Assemble a RunData from frames already in the schema (used by the loaders)."""
    results = normalise_results(results, where=str(path))
    samples = normalise_samples(samples, where=str(path))
    return RunData(path, manifest, results, samples, notes, index_samples(samples))


# ---------------------------------------------------------------------------------------------------
# Reading the three files


def read_manifest(manifest_path: Path) -> dict[str, Any]:
    if not manifest_path.is_file():
        raise UnusableRunError(f"{manifest_path}: missing (not a loopscope run directory?)")
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UnusableRunError(f"{manifest_path}: unreadable JSON ({exc})") from exc
    return validate_manifest(manifest, where=str(manifest_path))


def validate_manifest(manifest: Any, *, where: str) -> dict[str, Any]:
    if not isinstance(manifest, dict):
        raise UnusableRunError(f"{where}: expected a JSON object, got {type(manifest).__name__}")
    if not isinstance(manifest.get("run_id"), str) or not manifest["run_id"]:
        raise UnusableRunError(f"{where}: key 'run_id' missing or not a non-empty string")
    if not isinstance(manifest.get("fingerprint"), dict):
        raise UnusableRunError(f"{where}: key 'fingerprint' missing or not an object")
    return manifest


def read_results(run_dir: Path) -> pd.DataFrame:
    """results.parquet, or results.csv when the parquet file is absent (never when it is broken)."""
    parquet, csv = run_dir / "results.parquet", run_dir / "results.csv"
    if parquet.exists():
        return _read_table(parquet)
    if csv.exists():
        return _read_table(csv)
    raise UnusableRunError(f"{parquet}: missing (and no results.csv beside it)")


def read_samples(run_dir: Path) -> tuple[pd.DataFrame, tuple[str, ...]]:
    """samples.parquet; a run without one is usable, but nothing in it can be tested for noise."""
    parquet = run_dir / "samples.parquet"
    if not parquet.exists():
        note = f"{parquet}: absent, so timing metrics of run {run_dir.name} have no raw samples"
        return pd.DataFrame(columns=list(SAMPLE_COLUMNS)), (note,)
    return _read_table(parquet), ()


def _has_tables(run_dir: Path) -> bool:
    return (run_dir / "results.parquet").exists() or (run_dir / "results.csv").exists()


def _read_table(path: Path) -> pd.DataFrame:
    try:
        if path.suffix == ".parquet":
            return pd.read_parquet(path)
        return pd.read_csv(path, keep_default_na=True)
    except Exception as exc:  # pyarrow and the csv parser raise many types; all mean the same here
        raise UnusableRunError(f"{path}: unreadable ({type(exc).__name__}: {_one_line(exc)})") from exc


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text[:200] + ("..." if len(text) > 200 else "")


# ---------------------------------------------------------------------------------------------------
# Normalising frames: the same types whichever file format or writer they came from


def normalise_results(results: pd.DataFrame, *, where: str) -> pd.DataFrame:
    missing = [c for c in REQUIRED_RESULT_COLUMNS if c not in results.columns]
    if missing:
        raise UnusableRunError(f"{where}: results lack column(s) {', '.join(missing)}")
    df = results.copy()
    for column in RESULT_COLUMNS:
        if column not in df.columns:
            df[column] = pd.NA
    df["cell_id"] = df["cell_id"].astype(str)
    df["metric"] = df["metric"].astype(str)
    # An empty stat means a single deterministic value; CSV round-trips turn "" into NaN.
    for column, missing in (("stat", ""), ("status", "ok"), ("unit", ""), ("source", ""), ("reason", "")):
        # Cast first: an all-empty column reads back from CSV as float NaN, which cannot hold text.
        df[column] = df[column].astype(object).where(df[column].notna(), missing).astype(str)
    try:
        df["value"] = pd.to_numeric(df["value"], errors="raise").astype(float)
    except (TypeError, ValueError) as exc:
        raise UnusableRunError(f"{where}: column 'value' is not numeric ({_one_line(exc)})") from exc
    return df


def normalise_samples(samples: pd.DataFrame, *, where: str) -> pd.DataFrame:
    if samples.empty and not set(REQUIRED_SAMPLE_COLUMNS) <= set(samples.columns):
        return pd.DataFrame({c: pd.Series(dtype=object) for c in SAMPLE_COLUMNS})
    missing = [c for c in REQUIRED_SAMPLE_COLUMNS if c not in samples.columns]
    if missing:
        raise UnusableRunError(f"{where}: samples lack column(s) {', '.join(missing)}")
    df = samples.copy()
    for column in SAMPLE_COLUMNS:
        if column not in df.columns:
            df[column] = pd.NA
    df["cell_id"] = df["cell_id"].astype(str)
    df["metric"] = df["metric"].astype(str)
    try:
        df["value"] = pd.to_numeric(df["value"], errors="raise").astype(float)
    except (TypeError, ValueError) as exc:
        raise UnusableRunError(f"{where}: samples column 'value' is not numeric ({_one_line(exc)})") from exc
    return df


def index_samples(samples: pd.DataFrame) -> dict[tuple[str, str], np.ndarray]:
    """(cell_id, metric) -> finite sample values, in the order of the `index` column."""
    if samples.empty:
        return {}
    ordered = samples.sort_values("index", kind="stable") if samples["index"].notna().all() else samples
    out: dict[tuple[str, str], np.ndarray] = {}
    for (cell_id, metric), group in ordered.groupby(["cell_id", "metric"], sort=False):
        values = group["value"].to_numpy(dtype=np.float64)
        out[(str(cell_id), str(metric))] = values[np.isfinite(values)]
    return out


# ---------------------------------------------------------------------------------------------------
# Cells


def axis_text(value: Any) -> str:
    """An axis value as stable text: 8 and 8.0 (parquet may widen ints) and None/NaN ("") agree."""
    if value is None or value is pd.NA:
        return ""
    if isinstance(value, float | np.floating):
        if math.isnan(value):
            return ""
        if float(value).is_integer():
            return str(int(value))
    return str(value)


def axes_key(row: Mapping[str, Any]) -> tuple[str, ...]:
    return tuple(axis_text(row.get(axis)) for axis in AXES)


def cell_label(row: Mapping[str, Any]) -> str:
    """A short readable name for a cell, e.g. `parcae-tiny prefill numba/cpu b8 s256 r2/4 fp32`."""
    text = {axis: axis_text(row.get(axis)) for axis in AXES}
    parts = [text["model"] or text["family"] or str(row.get("cell_id", "?")), text["workload"]]
    if text["backend"] or text["device"]:
        parts.append("/".join(p for p in (text["backend"], text["device"]) if p))
    if text["batch"]:
        parts.append(f"b{text['batch']}")
    if text["seq_len"]:
        parts.append(f"s{text['seq_len']}")
    if text["loops_train"] or text["loops_test"]:
        parts.append(f"r{text['loops_train'] or '-'}/{text['loops_test'] or '-'}")
    if text.get("lr"):
        parts.append(f"lr={text['lr']}")
    parts += [text["dtype"], text["kv_policy"]]
    return " ".join(p for p in parts if p)


def cell_table(results: pd.DataFrame) -> pd.DataFrame:
    """One row per cell_id: axes from its first row, status = its first non-ok status, if any."""
    rows = []
    for cell_id, group in results.groupby("cell_id", sort=True):
        first = group.iloc[0].to_dict()
        bad = group[group["status"] != "ok"]
        status = str(bad["status"].iloc[0]) if len(bad) else "ok"
        reason = str(bad["reason"].iloc[0]) if len(bad) else ""
        row = {"cell_id": str(cell_id), **{a: first.get(a) for a in AXES}}
        row.update(label=cell_label(first), status=status, reason=reason)
        rows.append(row)
    columns = ["cell_id", *AXES, "label", "status", "reason"]
    return pd.DataFrame(rows, columns=columns)


# ---------------------------------------------------------------------------------------------------
# Writing (importers and tests produce run directories in the same layout the runner does)


def write_run_dir(out_dir: str | Path, manifest: dict[str, Any], results: pd.DataFrame,
                  samples: pd.DataFrame) -> Path:
    """Write manifest.json, results.parquet (+ .csv) and samples.parquet; returns the directory."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    validate_manifest(manifest, where=str(out / "manifest.json"))
    results = results.reindex(columns=[c for c in RESULT_COLUMNS] +
                              [c for c in results.columns if c not in RESULT_COLUMNS])
    samples = samples.reindex(columns=list(SAMPLE_COLUMNS))
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True, default=str) + "\n",
                                       encoding="utf-8")
    results.to_parquet(out / "results.parquet", index=False)
    results.to_csv(out / "results.csv", index=False)
    samples.to_parquet(out / "samples.parquet", index=False)
    return out
