"""Executor and store: failures become rows with a status, the sweep goes on, nothing is lost."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from loopscope.bench.context import RunContext
from loopscope.bench.errors import LoopscopeError
from loopscope.bench.executor import LocalExecutor
from loopscope.bench.matrix import Cell
from loopscope.bench.store import RunStore
from loopscope.models import preset
from tests.conftest import REPO, run_cli

FAKE = [sys.executable, str(Path(__file__).with_name("fake_worker.py"))]


def _cell(action: str, timeout_s: float = 20.0) -> Cell:
    return Cell(model=action, model_config=preset("gpt-micro").to_dict(), workload="prefill",
                timeout_s=timeout_s)


@pytest.mark.parametrize("forked", [False, True], ids=["fresh-process", "fork-server"])
def test_failed_cells_get_their_status_and_the_sweep_goes_on(tmp_path, forked):
    store = RunStore(tmp_path / "run")
    store.create()
    ex = LocalExecutor(store, RunContext(run_dir=str(store.run_dir)), memory_limit_bytes=300 * 2**20,
                       worker_cmd=FAKE, fork_server=forked, worker_entry="tests.fake_worker:main")
    cells = [_cell("raise"), _cell("sleep", timeout_s=1.5), _cell("alloc"), _cell("die"), _cell("ok")]
    try:
        records = ex.run(cells)
    finally:
        ex.close()
    assert [r["status"] for r in records] == ["error", "timeout", "oom", "error", "ok"]
    assert "planted" in records[0]["reason"]
    assert "timeout of 1.5 s" in records[1]["reason"]
    assert "exceeded the limit" in records[2]["reason"]
    assert "exited with code 3" in records[3]["reason"]
    results = store.write_tables()
    # every cell has at least one row; failed ones carry their status and a NaN value
    assert results.groupby("cell_id").size().shape[0] == 5
    failed = results[results["status"] != "ok"]
    assert failed["value"].isna().all() and (failed["metric"] == "cell_status").all()
    ok = results[results["status"] == "ok"]
    assert ok["value"].tolist() == [42.0] and ok["params_unique"].iloc[0] > 0


def test_lock_names_its_holder(tmp_path):
    store = RunStore(tmp_path / "run")
    store.create()
    with store.lock():
        with pytest.raises(LoopscopeError, match=f"in use by pid {os.getpid()}"):
            with RunStore(tmp_path / "run").lock():
                pass
    with store.lock():  # released
        pass


def test_stale_lock_of_a_dead_process_is_taken_over(tmp_path):
    store = RunStore(tmp_path / "run")
    store.create()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    (store.run_dir / ".lock").write_text(json.dumps({"pid": int(dead.stdout), "host": os.uname().nodename}))
    with store.lock():
        pass


SPEED_PROFILE = """
[profile]
calibration = "off"
[measure]
min_time_s = 0.05
min_count = 3
energy = false
[[sweep]]
model = ["gpt-micro", "parcae-micro"]
workload = "prefill"
batch = [1, 2]
seq_len = 16
"""


@pytest.mark.slow
def test_sigkill_mid_sweep_then_resume_gives_every_row_once(tmp_path, write_profile):
    profile = write_profile(SPEED_PROFILE)
    out = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "loopscope.bench.cli", "run", "--profile", str(profile),
                             "--out", str(out), "--no-report"], cwd=REPO, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and len(list((out / "cells").glob("*.json"))) < 1:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)  # the runner and the cell in flight
    proc.wait()
    done_before = len(list((out / "cells").glob("*.json")))
    assert 1 <= done_before < 4
    again = run_cli("run", "--profile", str(profile), "--out", str(out), "--no-report")
    assert again.returncode == 0, again.stderr
    assert f"running {4 - done_before} of 4 cells" in again.stdout
    results = pd.read_parquet(out / "results.parquet")
    per_metric = results.groupby(["cell_id", "metric", "stat"]).size()
    assert results["cell_id"].nunique() == 4
    assert (per_metric == 1).all()
    third = run_cli("run", "--profile", str(profile), "--out", str(out), "--no-report")
    assert third.returncode == 0 and "nothing to do" in third.stdout
