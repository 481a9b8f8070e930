"""The run store: one directory per run, one atomically written file per finished cell.

A cell's rows appear whole or not at all (write to a temporary file, fsync, rename), so killing
the sweep at any moment loses at most the cell in flight and never damages what is written.
The tidy tables (results.parquet/.csv, samples.parquet) are rebuilt from the cell files, and hold
only the cells of the matrix named in manifest.json.

The run directory is locked with flock(2) on `.lock`: the kernel releases it when its holder dies,
so an empty, unreadable or stale lock file never locks a directory for good. The lock file names
the holder and its worker processes, so the next holder can stop a worker its dead holder left.
"""

from __future__ import annotations

import fcntl
import json
import os
import signal
import socket
import time
from collections.abc import Callable, Collection, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from loopscope.bench.errors import LoopscopeError
from loopscope.bench.schema import RESULT_COLUMNS, SAMPLE_COLUMNS

if TYPE_CHECKING:  # pandas is imported where tables are built: a cell's worker never needs it
    import pandas as pd

LOCK_NAME = ".lock"
TABLE_NAMES = ("results.parquet", "results.csv", "samples.parquet")
WORKER_EXIT_WAIT_S = 10.0


class StoreWriteError(LoopscopeError):
    """A file of the run directory could not be written (disk full, read-only, permissions)."""


class RunLockedError(LoopscopeError):
    pass


class BadCellFileError(LoopscopeError):
    """A file in cells/ that is not a cell record."""


def _atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """Write through a temporary file beside `path`, then rename; on failure remove the temporary file
    and raise StoreWriteError naming `path` (a full disk is one line, not a traceback)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    except OSError as err:
        tmp.unlink(missing_ok=True)
        raise StoreWriteError(f"{path}: cannot be written ({err.strerror or err}); free some space or "
                              "fix the permissions, then rerun (finished cells are kept)") from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    def write(tmp: Path) -> None:
        with open(tmp, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
    _atomic_write(Path(path), write)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    def write(tmp: Path) -> None:
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
    _atomic_write(Path(path), write)


def _json_default(value: Any) -> Any:
    if hasattr(value, "item"):
        return value.item()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def dumps(data: Any) -> str:
    # NaN stays NaN (Python's json reads it back); an unmeasured value is never written as 0.
    return json.dumps(data, indent=1, sort_keys=True, default=_json_default)


def record_problem(record: Any, cell_id: str) -> str:
    """Why a parsed cell file is not a cell record ("" when it is one)."""
    if not isinstance(record, dict):
        return f"expected a JSON object, got {type(record).__name__}"
    if record.get("cell_id") != cell_id:
        return f"key 'cell_id' = {record.get('cell_id')!r} does not match the file name {cell_id!r}"
    if not isinstance(record.get("status"), str):
        return f"key 'status' = {record.get('status')!r} is not a string"
    for key in ("rows", "samples"):
        value = record.get(key, [])
        if not isinstance(value, list) or not all(isinstance(r, dict) for r in value):
            return f"key {key!r} is not a list of objects"
    if not isinstance(record.get("cell", {}), dict):
        return "key 'cell' is not an object"
    return ""


def run_id_of(run_dir: Path) -> str:
    """The run id: the run directory's own name, also for `.` or a trailing slash."""
    return Path(os.path.abspath(run_dir)).name


class RunStore:
    def __init__(self, run_dir: Path) -> None:
        self.run_dir = Path(run_dir)
        self.cells_dir = self.run_dir / "cells"
        self.checkpoints_dir = self.run_dir / "checkpoints"
        self.jobs_dir = self.run_dir / "jobs"
        self._lock_fd: int | None = None
        self._holder: dict[str, Any] = {}

    @property
    def run_id(self) -> str:
        return run_id_of(self.run_dir)

    def create(self) -> None:
        """Create the run directory, or fail with a clear message if it cannot be written."""
        if not self.run_id:
            raise LoopscopeError(f"output directory {str(self.run_dir)!r}: has no name to serve as the run id; "
                                 "choose another with --out")
        try:
            self.cells_dir.mkdir(parents=True, exist_ok=True)
            self.checkpoints_dir.mkdir(exist_ok=True)
            probe = self.run_dir / f".write-test-{os.getpid()}"
            probe.write_text("ok")
            probe.unlink()
        except OSError as err:
            raise LoopscopeError(f"output directory {self.run_dir}: cannot be written "
                                 f"({err.strerror or err}); choose another with --out") from None

    # --- lock ------------------------------------------------------------------------------
    @contextmanager
    def lock(self) -> Iterator[None]:
        """Exclusive use of the run directory. A lock whose holder died is free (the kernel drops a
        flock with its holder); workers the dead holder left are stopped before anything runs."""
        path = self.run_dir / LOCK_NAME
        fd = self._acquire(path)
        previous = _read_lock_fd(fd)
        self._lock_fd = fd
        self._holder = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.time(), "workers": []}
        try:
            self._stop_leftover_workers(previous)
            self._write_holder()
            yield
        finally:
            self._lock_fd = None
            path.unlink(missing_ok=True)
            os.close(fd)

    def _acquire(self, path: Path) -> int:
        while True:
            try:
                fd = os.open(path, os.O_CREAT | os.O_RDWR, 0o644)
            except OSError as err:
                raise LoopscopeError(f"lock file {path}: cannot be opened ({err.strerror}); "
                                     "choose another --out") from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                other = _read_lock_fd(fd)
                os.close(fd)
                who = f"pid {other.get('pid')} on {other.get('host')}" if other.get("pid") else "another process"
                raise RunLockedError(f"run directory {self.run_dir} is in use by {who} "
                                     f"(lock file {path}); wait for it or use another --out") from None
            except OSError as err:
                os.close(fd)
                raise LoopscopeError(f"lock file {path}: cannot be locked ({err.strerror}); the file system "
                                     "may not support flock: use an --out on a local disk") from None
            try:
                same = os.fstat(fd).st_ino == os.stat(path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                return fd
            os.close(fd)  # the holder before us removed the file while we waited: lock the new one

    def _write_holder(self) -> None:
        if self._lock_fd is None:
            return
        data = json.dumps(self._holder).encode()
        os.ftruncate(self._lock_fd, 0)
        os.pwrite(self._lock_fd, data, 0)

    def note_worker(self, pid: int, running: bool) -> None:
        """Record (or forget) a worker process in the lock file, for the next holder if this one dies."""
        workers = [p for p in self._holder.get("workers", []) if p != pid]
        self._holder["workers"] = workers + [pid] if running else workers
        self._write_holder()

    def _stop_leftover_workers(self, previous: dict[str, Any]) -> None:
        """Kill the process groups of workers a dead holder left behind and wait until they are gone,
        so nothing is ever measured beside them. Only processes whose command line names this run's
        jobs directory are touched."""
        if previous.get("host") not in (None, socket.gethostname()):
            return
        jobs = str(Path(os.path.abspath(self.jobs_dir)))
        leftovers = [int(p) for p in previous.get("workers", []) if isinstance(p, int) and _is_worker_of(int(p), jobs)]
        for pid in _orphan_workers(jobs):
            if pid not in leftovers:
                leftovers.append(pid)
        for pid in leftovers:
            for kill in (os.killpg, os.kill):
                try:
                    kill(pid, signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    pass
        deadline = time.monotonic() + WORKER_EXIT_WAIT_S
        while any(_pid_alive(p) and _is_worker_of(p, jobs) for p in leftovers) and time.monotonic() < deadline:
            time.sleep(0.05)

    # --- cells -----------------------------------------------------------------------------
    def cell_path(self, cell_id: str) -> Path:
        return self.cells_dir / f"{cell_id}.json"

    def write_cell(self, record: dict[str, Any]) -> None:
        atomic_write_text(self.cell_path(record["cell_id"]), dumps(record))

    def cell_files(self) -> list[Path]:
        return sorted(self.cells_dir.glob("*.json")) if self.cells_dir.is_dir() else []

    def read_cells(self, cell_ids: Collection[str] | None = None, *, strict: bool = False
                   ) -> dict[str, dict[str, Any]]:
        """Cell records by id (only those in `cell_ids` when given; other files are not opened). A file
        that is not a record is skipped, so a resumed run redoes that cell, or, with `strict`, refused
        with a BadCellFileError naming the file."""
        records: dict[str, dict[str, Any]] = {}
        for path in self.cell_files():
            if cell_ids is not None and path.stem not in cell_ids:
                continue
            try:
                record = json.loads(path.read_text(encoding="utf-8"))
                problem = record_problem(record, path.stem)
            except (OSError, ValueError) as err:
                problem = f"unreadable JSON ({' '.join(str(err).split())[:120]})"
            if problem:
                if strict:
                    raise BadCellFileError(f"{path}: not a cell record: {problem}; delete it and resume the "
                                           "run to redo that cell")
                continue
            records[record["cell_id"]] = record
        return records

    def newest_cell_mtime_ns(self, cell_ids: Collection[str] | None = None) -> int:
        times = [p.stat().st_mtime_ns for p in self.cell_files() if cell_ids is None or p.stem in cell_ids]
        return max(times, default=0)

    # --- manifest and tables ---------------------------------------------------------------
    def read_manifest(self) -> dict[str, Any]:
        """manifest.json as a dict ({} when absent); an unreadable one is a one-line LoopscopeError."""
        path = self.run_dir / "manifest.json"
        if not path.is_file():
            return {}
        try:
            manifest = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as err:
            raise LoopscopeError(f"{path}: unreadable ({' '.join(str(err).split())[:120]}); move it away to "
                                 "resume this run with a new manifest (cells are kept), or use another --out"
                                 ) from None
        if not isinstance(manifest, dict):
            raise LoopscopeError(f"{path}: expected a JSON object, got {type(manifest).__name__}; move it away "
                                 "to resume this run with a new manifest, or use another --out")
        for key in ("profile", "fingerprint", "calibration"):
            if key in manifest and not isinstance(manifest[key], dict):
                raise LoopscopeError(f"{path}: key {key!r} = {manifest[key]!r:.60} is not an object; move the "
                                     "manifest away to resume this run with a new one, or use another --out")
        return manifest

    def write_manifest(self, manifest: dict[str, Any]) -> None:
        atomic_write_text(self.run_dir / "manifest.json", dumps(manifest))

    def matrix_ids(self) -> list[str] | None:
        """The cell ids of the manifest's matrix, or None when the manifest names none."""
        ids = self.read_manifest().get("cell_ids")
        return [str(i) for i in ids] if isinstance(ids, list) else None

    def tables(self, cell_ids: Collection[str] | None = None, *, strict: bool = False
               ) -> tuple[pd.DataFrame, pd.DataFrame]:
        """results and samples of the finished cells, restricted to `cell_ids` when given."""
        return tables_from_records(self.read_cells(cell_ids, strict=strict))

    def write_tables(self, cell_ids: Collection[str] | None = None) -> pd.DataFrame:
        """Rebuild the tables from the cell files of the matrix (the manifest's, unless given)."""
        if cell_ids is None:
            cell_ids = self.matrix_ids()
        results, samples = self.tables(None if cell_ids is None else set(cell_ids))
        for frame, name in ((results, "results"), (samples, "samples")):
            _atomic_write(self.run_dir / f"{name}.parquet", lambda tmp, f=frame: f.to_parquet(tmp, index=False))
        atomic_write_text(self.run_dir / "results.csv", results.to_csv(index=False))
        return results

    def tables_stale(self, cell_ids: Collection[str] | None = None) -> bool:
        """True when a table is missing or older than the newest cell file."""
        newest = self.newest_cell_mtime_ns(cell_ids)
        paths = [self.run_dir / n for n in TABLE_NAMES]
        return any(not p.is_file() or p.stat().st_mtime_ns < newest for p in paths)

    def report_stale(self, cell_ids: Collection[str] | None = None) -> bool:
        """True when report.md/html is missing or older than a table or the newest cell file."""
        inputs = [self.newest_cell_mtime_ns(cell_ids)] + [(self.run_dir / n).stat().st_mtime_ns
                                                   for n in TABLE_NAMES if (self.run_dir / n).is_file()]
        paths = [self.run_dir / "report.md", self.run_dir / "report.html"]
        return any(not p.is_file() or p.stat().st_mtime_ns < max(inputs) for p in paths)


def tables_from_records(records: dict[str, dict[str, Any]]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The tidy results and samples tables of some cell records."""
    import pandas as pd

    rows: list[dict[str, Any]] = []
    samples: list[dict[str, Any]] = []
    for record in records.values():
        rows.extend(record.get("rows", []))
        samples.extend(record.get("samples", []))
    results = pd.DataFrame(rows, columns=list(RESULT_COLUMNS))
    extra = sorted({k for r in rows for k in r} - set(RESULT_COLUMNS))
    if extra:
        results = pd.concat([results, pd.DataFrame(rows, columns=extra)], axis=1)
    return results, pd.DataFrame(samples, columns=list(SAMPLE_COLUMNS))


def _read_lock_fd(fd: int) -> dict[str, Any]:
    """The holder recorded in a lock file; {} when it is empty or unreadable."""
    try:
        data = json.loads(os.pread(fd, 65536, 0) or b"{}")
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as fh:
            return fh.read().replace(b"\0", b" ").decode("utf-8", "replace")
    except OSError:
        return ""


def _is_worker_of(pid: int, jobs_dir: str) -> bool:
    return pid > 0 and f"{jobs_dir}/" in _cmdline(pid)


def _orphan_workers(jobs_dir: str) -> list[int]:
    """Live processes (Linux /proc) whose command line names a job of this run, other than ours."""
    if not os.path.isdir("/proc"):
        return []
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit() and int(entry) != os.getpid() and _is_worker_of(int(entry), jobs_dir):
            out.append(int(entry))
    return out


def _pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie has exited; it only waits for its parent to read its status
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[-1].split()[0] != "Z"
    except OSError:
        return True
