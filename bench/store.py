"""The run store: one directory per run, one atomically written file per finished cell.

A cell's rows appear whole or not at all (write to a temporary file, fsync, rename), so killing
the sweep at any moment loses at most the cell in flight and never damages what is written.
The tidy tables (results.parquet/.csv, samples.parquet) are rebuilt from the cell files.
"""

from __future__ import annotations

import json
import os
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pandas as pd

from loopscope.bench.errors import LoopscopeError
from loopscope.bench.schema import RESULT_COLUMNS, SAMPLE_COLUMNS

LOCK_NAME = ".lock"


def atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w", encoding="utf-8") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def _json_default(value: Any) -> Any:
    if hasattr(value, "item"):
        return value.item()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def dumps(data: Any) -> str:
    # NaN stays NaN (Python's json reads it back); an unmeasured value is never written as 0.
    return json.dumps(data, indent=1, sort_keys=True, default=_json_default)


class RunLockedError(LoopscopeError):
    pass


class RunStore:
    def __init__(self, run_dir: Path) -> None:
        self.run_dir = Path(run_dir)
        self.cells_dir = self.run_dir / "cells"
        self.checkpoints_dir = self.run_dir / "checkpoints"

    @property
    def run_id(self) -> str:
        return self.run_dir.name

    def create(self) -> None:
        """Create the run directory, or fail with a clear message if it cannot be written."""
        try:
            self.cells_dir.mkdir(parents=True, exist_ok=True)
            self.checkpoints_dir.mkdir(exist_ok=True)
            probe = self.run_dir / f".write-test-{os.getpid()}"
            probe.write_text("ok")
            probe.unlink()
        except OSError as err:
            raise LoopscopeError(f"output directory {self.run_dir}: cannot be written "
                                 f"({err.strerror or err}); choose another with --out") from None

    @contextmanager
    def lock(self) -> Iterator[None]:
        """Exclusive use of the run directory; a lock left by a dead process is taken over."""
        path = self.run_dir / LOCK_NAME
        holder = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.time()}
        while True:
            try:
                fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                other = self._read_lock(path)
                if other and other.get("host") == holder["host"] and not _pid_alive(int(other.get("pid", -1))):
                    path.unlink(missing_ok=True)  # stale: its holder is gone
                    continue
                who = f"pid {other.get('pid')} on {other.get('host')}" if other else "an unknown process"
                raise RunLockedError(f"run directory {self.run_dir} is in use by {who} "
                                     f"(lock file {path}); wait for it or use another --out") from None
            with os.fdopen(fd, "w") as fh:
                json.dump(holder, fh)
            break
        try:
            yield
        finally:
            path.unlink(missing_ok=True)

    @staticmethod
    def _read_lock(path: Path) -> dict[str, Any] | None:
        try:
            return json.loads(path.read_text())
        except (OSError, ValueError):
            return None

    # --- cells -----------------------------------------------------------------------------
    def cell_path(self, cell_id: str) -> Path:
        return self.cells_dir / f"{cell_id}.json"

    def write_cell(self, record: dict[str, Any]) -> None:
        atomic_write_text(self.cell_path(record["cell_id"]), dumps(record))

    def read_cells(self) -> dict[str, dict[str, Any]]:
        records: dict[str, dict[str, Any]] = {}
        if not self.cells_dir.is_dir():
            return records
        for path in sorted(self.cells_dir.glob("*.json")):
            try:
                record = json.loads(path.read_text())
            except (OSError, ValueError):
                continue  # an unreadable file is treated as not done; it will be rerun
            records[record["cell_id"]] = record
        return records

    # --- manifest and tables ---------------------------------------------------------------
    def read_manifest(self) -> dict[str, Any]:
        path = self.run_dir / "manifest.json"
        return json.loads(path.read_text()) if path.is_file() else {}

    def write_manifest(self, manifest: dict[str, Any]) -> None:
        atomic_write_text(self.run_dir / "manifest.json", dumps(manifest))

    def tables(self) -> tuple[pd.DataFrame, pd.DataFrame]:
        rows: list[dict[str, Any]] = []
        samples: list[dict[str, Any]] = []
        for record in self.read_cells().values():
            rows.extend(record.get("rows", []))
            samples.extend(record.get("samples", []))
        results = pd.DataFrame(rows, columns=list(RESULT_COLUMNS))
        extra = sorted({k for r in rows for k in r} - set(RESULT_COLUMNS))
        if extra:
            results = pd.concat([results, pd.DataFrame(rows, columns=extra)], axis=1)
        return results, pd.DataFrame(samples, columns=list(SAMPLE_COLUMNS))

    def write_tables(self) -> pd.DataFrame:
        results, samples = self.tables()
        for frame, name in ((results, "results"), (samples, "samples")):
            tmp = self.run_dir / f".{name}.parquet.tmp"
            frame.to_parquet(tmp, index=False)
            os.replace(tmp, self.run_dir / f"{name}.parquet")
        atomic_write_text(self.run_dir / "results.csv", results.to_csv(index=False))
        return results


def _pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True

