"""The `ray` executor: every cell is a Ray task, placed by Ray on a node with the resources it needs.

Inside the task the cell runs exactly as the local executor runs it (an isolated worker process with the
cell's timeout and the profile's memory limit), so failures give the same status rows. The task returns
the cell's record, taken with the identity of the node's hardware, and the driver writes it to the run
store: a run started locally can be finished on a cluster and the other way round.

A dead worker or node is retried once by Ray; a second death becomes an `error` row (`oom` when Ray's
memory monitor killed it) and the sweep goes on. Ctrl-C cancels the outstanding tasks and keeps what
finished. Train cells write their checkpoints under the run directory and eval cells read them there, so
on a multi-node cluster the run directory must be on a filesystem every node mounts at the same path.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import platform
import shutil
import signal
import tempfile
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from loopscope.bench.context import RunContext
from loopscope.bench.errors import LoopscopeError
from loopscope.bench.executor import LocalExecutor, _children
from loopscope.bench.executors import OnDone, OnStart, blocked_by, write_skipped
from loopscope.bench.matrix import Cell
from loopscope.bench.store import RunStore

RAY_RETRIES = 1  # a dead worker or node is retried once, then the cell becomes a status row
CANCEL_GRACE_S = 10.0


def import_ray() -> Any:
    try:
        import ray
    except ImportError as err:
        raise LoopscopeError(f"--executor ray needs Ray ({err}); install it with: pip install 'loopscope[ray]'") \
            from None
    return ray


def node_identity() -> dict[str, Any]:
    """Which machine ran a cell: host name and a short hardware description, without importing torch."""
    from loopscope.bench.fingerprint import cpu_info, gpu_info

    cpu, gpus = cpu_info(), gpu_info()
    gpu_names = [d.get("name") or "gpu" for d in gpus.get("devices", [])]
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    hardware = f"{cpu.get('model') or 'cpu'} x{cpu.get('logical_cores')}"
    if gpu_names:
        hardware += f" + {len(gpu_names)}x {gpu_names[0]}"
    return {"hostname": platform.node(), "hardware": hardware, "cpu": cpu, "gpus": gpus,
            "cuda_visible_devices": visible}


def resources_for(cell: Cell, threads: int) -> dict[str, float]:
    """What the cell's task asks Ray for: a GPU per rank for a cuda cell, CPUs for a CPU cell."""
    ranks = int(cell.settings.get("train", {}).get("world_size", 1)) if cell.workload == "train" else 1
    if cell.device.startswith("cuda"):
        return {"num_gpus": float(ranks), "num_cpus": 1.0}
    return {"num_cpus": float(max(threads, 1) * ranks)}


def run_cell_on_node(cell_data: dict[str, Any], ctx_data: dict[str, Any], run_id: str,
                     memory_limit_bytes: int | None, worker_cmd: list[str] | None,
                     driver_hardware: str) -> dict[str, Any]:
    """The body of a cell's Ray task: the local executor's isolated worker, on this node."""
    cell = Cell.from_dict(cell_data)
    node = node_identity()
    ctx = RunContext(**ctx_data)
    if node["hardware"] != driver_hardware:
        # The run's calibration was measured on the driver's hardware: MFU against it would be wrong here.
        from loopscope.profiles.detect import detect_device_class

        ctx = dataclasses.replace(ctx, calibration={}, device_class=detect_device_class().name)
    # One node-side folder per driver run (named by the run id: rows carry it). The local executor clears a
    # cell's job folder before it starts and removes it when done, so a retry cleans up a killed attempt.
    run_key = hashlib.sha256(ctx.run_dir.encode()).hexdigest()[:10]
    store = CapturingStore(Path(tempfile.gettempdir()) / f"loopscope-ray-{os.getuid()}" / run_key / run_id)
    store.create()
    # One cell per task: a fork server would cost what it saves, so each cell gets a fresh interpreter.
    executor = LocalExecutor(store, ctx, memory_limit_bytes=memory_limit_bytes, worker_cmd=worker_cmd,
                             fork_server=False)
    try:
        executor.run_cell(cell)
    except BaseException:  # cancelled (KeyboardInterrupt in this task): take the cell's worker with us
        _kill_worker_groups()
        shutil.rmtree(store.run_dir / "jobs" / cell.cell_id, ignore_errors=True)
        raise
    record = store.records[-1]
    record["node"] = node
    for row in record["rows"]:
        row["node"] = node["hostname"]
        row["hardware"] = node["hardware"]
    return record


def _kill_worker_groups() -> None:
    for pid in _children(os.getpid()):
        try:
            if os.getpgid(pid) == pid:  # a worker started in its own session by LocalExecutor
                os.killpg(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass


class CapturingStore(RunStore):
    """A run store that keeps the written cell record in memory instead of on disk: the node side of a
    remote executor, whose records travel back to the driver's store."""

    def __init__(self, run_dir: Path) -> None:
        super().__init__(run_dir)
        self.records: list[dict[str, Any]] = []

    def write_cell(self, record: dict[str, Any]) -> None:
        self.records.append(record)


def failure_status(err: BaseException) -> tuple[str, str]:
    """A task that Ray could not finish, as a cell status and reason."""
    ray = import_ray()
    name = type(err).__name__
    first = (str(err).strip().splitlines() or [""])[0][:300]
    if isinstance(err, ray.exceptions.OutOfMemoryError):
        return "oom", f"Ray's memory monitor killed the task's worker ({name}: {first})"
    if isinstance(err, ray.exceptions.TaskCancelledError):
        return "error", "cancelled before it finished"
    if isinstance(err, ray.exceptions.WorkerCrashedError | ray.exceptions.NodeDiedError):
        return "error", (f"the Ray worker running the cell died {RAY_RETRIES + 1} times "
                         f"({name}: {first}); rerun with --retry-failed")
    return "error", f"Ray task failed ({name}: {first})"


class RayExecutor(LocalExecutor):
    def __init__(self, store: RunStore, ctx: RunContext, *, memory_limit_bytes: int | None = None,
                 worker_cmd: list[str] | None = None, address: str | None = None) -> None:
        import_ray()  # refuse at once, not after the first cells, when Ray is missing
        super().__init__(store, ctx, memory_limit_bytes=memory_limit_bytes, worker_cmd=worker_cmd,
                         fork_server=False)
        self.custom_worker_cmd = worker_cmd  # None: the node's own python runs loopscope's worker
        self.address = address

    def run_all(self, cells: Iterable[Cell], statuses: dict[str, str], *, on_start: OnStart | None = None,
                on_done: OnDone | None = None) -> None:
        ray = import_ray()
        started_here = not ray.is_initialized()
        if started_here:  # no address: Ray starts a cluster on this machine
            ray.init(address=self.address, include_dashboard=False, log_to_driver=False)
        try:
            self._schedule(ray, list(cells), statuses, on_start, on_done)
        finally:
            if started_here:
                ray.shutdown()

    def _schedule(self, ray: Any, pending: list[Cell], statuses: dict[str, str], on_start: OnStart | None,
                  on_done: OnDone | None) -> None:
        task = ray.remote(max_retries=RAY_RETRIES, retry_exceptions=False)(run_cell_on_node)
        driver_hardware = node_identity()["hardware"]
        cap = _largest_node(ray)
        inflight: dict[Any, tuple[Cell, float]] = {}

        def finish(cell: Cell, record: dict[str, Any]) -> None:
            statuses[cell.cell_id] = record["status"]
            if on_done:
                on_done(cell, record)

        try:
            while pending or inflight:
                unfinished = {c.cell_id for c in pending} | {c.cell_id for c, _ in inflight.values()}
                waiting = []
                for cell in pending:
                    if cell.depends_on in unfinished:
                        waiting.append(cell)  # its train cell is still queued or running
                        continue
                    dep = blocked_by(cell, statuses)
                    if dep:
                        finish(cell, write_skipped(self, cell, dep))
                        continue
                    want = resources_for(cell, self.ctx.threads)
                    if want.get("num_gpus", 0) > cap.get("num_gpus", 0):
                        finish(cell, self._unplaceable(cell, want["num_gpus"], cap.get("num_gpus", 0)))
                        continue
                    want["num_cpus"] = min(want["num_cpus"], cap.get("num_cpus", want["num_cpus"]))
                    ref = task.options(**want).remote(cell.to_dict(), self.ctx.to_dict(), self.store.run_id,
                                                      self.memory_limit_bytes, self.custom_worker_cmd,
                                                      driver_hardware)
                    inflight[ref] = (cell, time.perf_counter())
                    if on_start:
                        on_start(cell)
                pending = waiting
                if not inflight:
                    break
                ready, _ = ray.wait(list(inflight), num_returns=1)
                for ref in ready:
                    cell, t0 = inflight.pop(ref)
                    finish(cell, self._collect(ray, ref, cell, t0))
        except KeyboardInterrupt:
            for ref in inflight:
                ray.cancel(ref)  # not force: the task kills its worker process first
            ray.wait(list(inflight), num_returns=len(inflight), timeout=CANCEL_GRACE_S)
            raise

    def _unplaceable(self, cell: Cell, gpus: float, most: float) -> dict[str, Any]:
        record = self.make_record(cell, "error", f"needs {gpus:g} GPUs on one node; the largest node of the Ray "
                                  f"cluster has {most:g}", {}, "", 0.0)
        self.store.write_cell(record)
        return record

    def _collect(self, ray: Any, ref: Any, cell: Cell, t0: float) -> dict[str, Any]:
        try:
            record = ray.get(ref)
        except ray.exceptions.RayError as err:
            status, reason = failure_status(err)
            record = self.make_record(cell, status, reason, {}, "", time.perf_counter() - t0)
        self.store.write_cell(record)
        return record


def _largest_node(ray: Any) -> dict[str, float]:
    """The most CPUs and GPUs any one node has: a request above it could never be placed."""
    cap: dict[str, float] = {}
    for node in ray.nodes():
        if not node.get("Alive"):
            continue
        res = node.get("Resources", {})
        cap["num_cpus"] = max(cap.get("num_cpus", 0.0), float(res.get("CPU", 0.0)))
        cap["num_gpus"] = max(cap.get("num_gpus", 0.0), float(res.get("GPU", 0.0)))
    return {k: v for k, v in cap.items() if v > 0}
