"""One cell in its own process: `python -m loopscope.bench.worker JOB_DIR`.

Reads JOB_DIR/cell.json and JOB_DIR/context.json, runs the workload, and writes
JOB_DIR/result.json atomically. Whatever happens (an exception, an OOM, a divergence), the result
says so with a status; the parent handles timeouts and kills.
"""

from __future__ import annotations

import time

_T_START = time.perf_counter()

import json  # noqa: E402
import os  # noqa: E402
import sys  # noqa: E402
import traceback  # noqa: E402
from pathlib import Path  # noqa: E402


def _status_of(err: BaseException) -> str:
    import torch

    from loopscope.bench.backends import BackendUnavailable

    if isinstance(err, BackendUnavailable):
        return "unavailable"
    if isinstance(err, MemoryError | torch.OutOfMemoryError):
        return "oom"
    if isinstance(err, RuntimeError) and "out of memory" in str(err).lower():
        return "oom"
    return "error"


def apply_numba_threading(layer: str) -> None:
    """Choose numba's threading layer for this process (the profile's `numba_threading`); it must happen
    before the first parallel kernel runs. loopscope.kernels keeps a user-set NUMBA_THREADING_LAYER."""
    if not layer:
        return
    os.environ["NUMBA_THREADING_LAYER"] = layer
    if "numba" in sys.modules:
        from numba.core import config

        config.reload_config()


def main(job_dir: str, *, started: float | None = None) -> int:
    """Run the cell of `job_dir`. `started`: when this process began (perf_counter), for a worker forked
    by bench/forkserver.py; by default, when this module was imported."""
    from loopscope.bench.worker_guard import watch_parent

    watch_parent()
    job = Path(job_dir)
    apply_numba_threading(json.loads((job / "context.json").read_text()).get("numba_threading", ""))
    from loopscope.bench.context import RunContext
    from loopscope.bench.matrix import Cell
    from loopscope.bench.store import atomic_write_text, dumps
    from loopscope.bench.workloads import Diverged, WorkloadResult, run_workload, stamp_engine

    cell = Cell.from_dict(json.loads((job / "cell.json").read_text()))
    ctx = RunContext(**json.loads((job / "context.json").read_text()))
    if ctx.threads:
        from loopscope.bench.threads import set_threads

        set_threads(ctx.threads)
    import torch  # noqa: F401  (import cost is part of the measured start-up)

    startup_s = time.perf_counter() - (_T_START if started is None else started)
    t0 = time.perf_counter()
    tb = ""
    try:
        result = run_workload(cell, ctx)
    except Diverged as err:
        result = err.result
        stamp_engine(result)
    except BaseException as err:  # noqa: BLE001 - every failure becomes a row, never a lost cell
        result = WorkloadResult(status=_status_of(err), reason=f"{type(err).__name__}: {err}"[:500])
        tb = traceback.format_exc()
        print(tb, file=sys.stderr)
    record = {"status": result.status, "reason": result.reason, "rows": result.rows,
              "samples": result.samples, "traceback": tb[-4000:], "startup_s": startup_s,
              "workload_s": time.perf_counter() - t0}
    atomic_write_text(job / "result.json", dumps(record))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
