"""Run cells one by one, each in a fresh process, and never lose a result.

A worker that raises, runs past its timeout, grows past the memory limit, or dies, gives a row with
its status (`error`, `timeout`, `oom`, `diverged`) and the tail of its stderr; the sweep goes on.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from loopscope.bench.context import RunContext
from loopscope.bench.forkserver import ENTRY as FORK_ENTRY
from loopscope.bench.forkserver import ForkedWorker, ForkServer
from loopscope.bench.matrix import Cell
from loopscope.bench.schema import unmeasured
from loopscope.bench.store import RunStore, atomic_write_text, dumps
from loopscope.bench.worker_guard import PARENT_ENV

POLL_S = 0.05
FRESH_WORKERS_ENV = "LOOPSCOPE_FRESH_WORKERS"  # 1: a fresh interpreter per cell, no fork server
STDERR_TAIL = 2000


def _children(pid: int) -> list[int]:
    out: list[int] = []
    try:
        for task in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{task}/children") as fh:
                out.extend(int(c) for c in fh.read().split())
    except OSError:
        pass
    return out


def tree_rss_bytes(pid: int) -> int:
    """Resident memory of a process and all its descendants (Linux /proc; 0 elsewhere)."""
    total, stack = 0, [pid]
    while stack:
        p = stack.pop()
        try:
            with open(f"/proc/{p}/status") as fh:
                for line in fh:
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1]) * 1024
                        break
        except OSError:
            continue
        stack.extend(_children(p))
    return total


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def cell_columns(cell: Cell, run_id: str, device_class: str) -> dict[str, Any]:
    """The columns every row of a cell carries: its axes and its model's accounting."""
    from loopscope.models import ModelConfig, effective_depth, param_counts

    cfg = ModelConfig.from_dict(cell.model_config)
    counts = param_counts(cfg)
    return {
        "run_id": run_id, "cell_id": cell.cell_id, "model": cell.model, "family": cell.family,
        "preset": cell.model, "params_unique": counts.unique, "params_non_embedding": counts.non_embedding,
        "effective_depth": effective_depth(cfg, cell.loops_test if cell.loops_test else cell.loops_train),
        "loops_train": cell.loops_train, "loops_test": cell.loops_test, "backend": cell.backend,
        "device": cell.device, "device_class": device_class, "workload": cell.workload,
        "batch": cell.batch, "seq_len": cell.seq_len, "dtype": cell.dtype, "kv_policy": cell.kv_policy,
        "lr": cell.lr, "seed": cell.seed,
    }


class LocalExecutor:
    """One subprocess per cell on this machine."""

    def __init__(self, store: RunStore, ctx: RunContext, *, memory_limit_bytes: int | None = None,
                 worker_cmd: list[str] | None = None, fork_server: bool | None = None,
                 worker_entry: str = FORK_ENTRY) -> None:
        self.store = store
        self.ctx = ctx
        self.memory_limit_bytes = memory_limit_bytes
        self.worker_cmd = worker_cmd or [sys.executable, "-m", "loopscope.bench.worker"]
        # Fork workers from a server that imported torch once (bench/forkserver.py), unless a custom worker
        # command is given or LOOPSCOPE_FRESH_WORKERS=1 asks for a fresh interpreter per cell.
        if fork_server is None:
            fork_server = worker_cmd is None and os.environ.get(FRESH_WORKERS_ENV, "") in ("", "0")
        self.fork_server = fork_server
        self.worker_entry = worker_entry  # module:function a forked worker runs
        self._server: ForkServer | None = None
        self.server_import_s: float | None = None  # the fork server's imports, once per run (manifest)
        self.keep_server = False  # True: run_all leaves the fork server up for the next run (bench/repeat.py)

    def _start_worker(self, job: Path, env: dict[str, str]) -> subprocess.Popen | ForkedWorker:
        if not self.fork_server:
            with open(job / "stdout.txt", "wb") as out, open(job / "stderr.txt", "wb") as err:
                return subprocess.Popen([*self.worker_cmd, str(job)], stdout=out, stderr=err,
                                        stdin=subprocess.DEVNULL, process_group=0, env=env)
        return self.prepare(env).spawn(job)

    def prepare(self, env: dict[str, str] | None = None) -> ForkServer | None:
        """Start the fork server now (it imports torch while the run does its own set-up); None without one."""
        if not self.fork_server:
            return None
        if self._server is None or not self._server.alive():
            if self._server is not None:
                self._server.close()
            self._server = ForkServer(env or self._worker_env(), self.store.jobs_dir, entry=self.worker_entry)
        return self._server

    @staticmethod
    def _worker_env() -> dict[str, str]:
        return {**os.environ, PARENT_ENV: str(os.getpid())}

    def close(self) -> None:
        """Stop the fork server, if one was started."""
        if self._server is not None:
            self._server.close()
            self._server = None


    def run_cell(self, cell: Cell) -> dict[str, Any]:
        job = Path(os.path.abspath(self.store.jobs_dir / cell.cell_id))
        shutil.rmtree(job, ignore_errors=True)
        job.mkdir(parents=True)
        atomic_write_text(job / "cell.json", dumps(cell.to_dict()))
        atomic_write_text(job / "context.json", dumps(self.ctx.to_dict()))
        server = self.prepare()
        if server is not None:
            server.wait_ready()  # its imports are the run's cost (manifest: fork_server_import_s), not the cell's
            self.server_import_s = max(self.server_import_s or 0.0, server.preload_s or 0.0)
        started = time.perf_counter()
        # Its own process group (so a timeout kills the worker's whole tree), in this session; the worker
        # stops itself if this process (or its fork server) dies (worker_guard), and an interrupt here
        # kills it before the interrupt goes on.
        proc = self._start_worker(job, self._worker_env())
        self.store.note_worker(proc.pid, running=True)
        try:
            status, reason = self._wait(proc, cell.timeout_s)
        except BaseException:
            self._kill(proc)
            raise
        finally:
            _kill_group(proc.pid)  # anything the worker started and left behind
            self.store.note_worker(proc.pid, running=False)
        wall_s = time.perf_counter() - started
        if isinstance(proc, ForkedWorker) and self._server is not None and self._server.failure:
            with open(job / "stderr.txt", "a", encoding="utf-8") as err:
                err.write(f"\n{self._server.failure}\n")
        stderr_tail = (job / "stderr.txt").read_bytes()[-STDERR_TAIL:].decode("utf-8", "replace")
        result: dict[str, Any] = {}
        if (job / "result.json").is_file():
            try:
                result = json.loads((job / "result.json").read_text())
            except (OSError, ValueError):
                result = {}
        if status == "ok":
            if result:
                status, reason = result["status"], result["reason"]
            elif proc.returncode == -signal.SIGKILL:
                status, reason = "oom", "worker killed by SIGKILL (likely the kernel's OOM killer)"
            else:
                status, reason = "error", f"worker exited with code {proc.returncode} and no result"
        record = self.make_record(cell, status, reason, result, stderr_tail, wall_s)
        self.store.write_cell(record)
        shutil.rmtree(job, ignore_errors=True)
        return record

    def _wait(self, proc: subprocess.Popen, timeout_s: float) -> tuple[str, str]:
        deadline = time.perf_counter() + timeout_s
        peak = 0
        while proc.poll() is None:
            if time.perf_counter() > deadline:
                self._kill(proc)
                return "timeout", f"exceeded its timeout of {timeout_s:g} s"
            if self.memory_limit_bytes:
                peak = max(peak, tree_rss_bytes(proc.pid))
                if peak > self.memory_limit_bytes:
                    self._kill(proc)
                    return "oom", (f"resident memory {peak / 2**30:.2f} GiB exceeded the limit of "
                                   f"{self.memory_limit_bytes / 2**30:.2f} GiB")
            time.sleep(POLL_S)
        return "ok", ""

    @staticmethod
    def _kill(proc: subprocess.Popen) -> None:
        _kill_group(proc.pid)
        try:
            proc.kill()
        except ProcessLookupError:
            pass
        proc.wait()

    def make_record(self, cell: Cell, status: str, reason: str, result: dict[str, Any], stderr_tail: str,
                wall_s: float) -> dict[str, Any]:
        common = cell_columns(cell, self.store.run_id, self.ctx.device_class)
        metric_rows = result.get("rows") or []
        if not metric_rows and status != "ok":
            metric_rows = [unmeasured("cell_status", "", f"{status}: {reason}")]
        rows = [{**common, **r, "status": status, "reason": reason} for r in metric_rows]
        samples = [{"run_id": self.store.run_id, "cell_id": cell.cell_id, **s} for s in result.get("samples", [])]
        return {
            "cell_id": cell.cell_id, "label": cell.label, "cell": cell.to_dict(), "status": status,
            "reason": reason, "rows": rows, "samples": samples, "wall_s": wall_s,
            "startup_s": result.get("startup_s"), "traceback": result.get("traceback", ""),
            "stderr_tail": stderr_tail if status != "ok" else "",
            "finished": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        }

    def run(self, cells: Iterable[Cell], *, on_done: Callable[[Cell, dict[str, Any]], None] | None = None
            ) -> list[dict[str, Any]]:
        records = []
        for cell in cells:
            record = self.run_cell(cell)
            records.append(record)
            if on_done:
                on_done(cell, record)
        return records
