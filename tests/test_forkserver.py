"""Workers forked from the run's fork server: same results as fresh workers, each its own process, and a
server that dies takes no cell's row with it."""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
import time
from pathlib import Path

import pandas as pd
import pytest

from loopscope.bench.context import RunContext
from loopscope.bench.executor import FRESH_WORKERS_ENV, LocalExecutor
from loopscope.bench.forkserver import EXIT_SERVER_DIED
from loopscope.bench.matrix import Cell
from loopscope.bench.store import RunStore
from loopscope.models import preset
from tests.conftest import run_cli
from tests.test_executor import SPEED_PROFILE as PROFILE


def _fake_cell(action: str, timeout_s: float = 30.0) -> Cell:
    return Cell(model=action, model_config=preset("gpt-micro").to_dict(), workload="prefill", timeout_s=timeout_s)


def test_forked_workers_run_the_cells_and_the_run_records_the_one_import(tmp_path):
    profile = tmp_path / "p.toml"
    profile.write_text(PROFILE)
    done = run_cli("run", "--profile", str(profile), "--out", str(tmp_path / "run"), "--no-report")
    assert done.returncode == 0, done.stderr
    manifest = json.loads((tmp_path / "run" / "manifest.json").read_text())
    fixed = manifest["cell_fixed_cost_s"]
    records = [json.loads(p.read_text()) for p in (tmp_path / "run" / "cells").glob("*.json")]
    assert len(records) == 4 and {r["status"] for r in records} == {"ok"}
    # torch was imported once, by the server; a forked worker starts in a small part of that
    assert all(r["startup_s"] < fixed["fork_server_import_s"] / 5 for r in records), (records, fixed)
    assert "fork" in fixed["what"]


def test_fresh_workers_on_request_give_the_same_rows(tmp_path, monkeypatch):
    profile = tmp_path / "p.toml"
    profile.write_text(PROFILE)
    assert run_cli("run", "--profile", str(profile), "--out", str(tmp_path / "forked"), "--no-report").returncode == 0
    monkeypatch.setenv(FRESH_WORKERS_ENV, "1")
    assert run_cli("run", "--profile", str(profile), "--out", str(tmp_path / "fresh"), "--no-report").returncode == 0
    assert "fork_server_import_s" not in json.loads((tmp_path / "fresh" / "manifest.json").read_text())[
        "cell_fixed_cost_s"]
    forked, fresh = (pd.read_parquet(tmp_path / name / "results.parquet") for name in ("forked", "fresh"))
    keys = ["cell_id", "metric", "stat"]
    assert sorted(map(tuple, forked[keys].astype(str).values)) == sorted(map(tuple, fresh[keys].astype(str).values))
    deterministic = ["weights_bytes", "flops_per_token", "params_unique"]
    pick = lambda t: t[t["metric"].isin(deterministic)].sort_values(keys)["value"].tolist()  # noqa: E731
    assert pick(forked) == pick(fresh)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_a_server_that_dies_mid_cell_leaves_an_error_row_and_the_next_cell_gets_a_new_server(tmp_path):
    store = RunStore(tmp_path / "run")
    store.create()
    ex = LocalExecutor(store, RunContext(run_dir=str(store.run_dir)), fork_server=True,
                       worker_entry="tests.fake_worker:main")
    first = ex.prepare()
    first.wait_ready()
    server_pid = first._proc.pid

    def kill_server_when_the_worker_runs() -> None:
        started = store.jobs_dir / _fake_cell("sleep").cell_id / "stdout.txt"
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not started.exists():
            time.sleep(0.02)
        time.sleep(0.3)
        os.kill(server_pid, signal.SIGKILL)

    killer = threading.Thread(target=kill_server_when_the_worker_runs)
    killer.start()
    try:
        records = ex.run([_fake_cell("sleep"), _fake_cell("ok")])
    finally:
        killer.join()
        ex.close()
    assert [r["status"] for r in records] == ["error", "ok"]
    assert f"code {EXIT_SERVER_DIED}" in records[0]["reason"]
    assert "fork server exited" in records[0]["stderr_tail"]
    assert records[0]["wall_s"] < 20  # the worker stopped with its server, long before its 60 s sleep


def test_a_forked_worker_is_in_its_own_process_group(tmp_path):
    store = RunStore(tmp_path / "run")
    store.create()
    ex = LocalExecutor(store, RunContext(run_dir=str(store.run_dir)), fork_server=True,
                       worker_entry="tests.fake_worker:main")
    cell = _fake_cell("sleep")
    job = Path(store.jobs_dir / cell.cell_id)
    job.mkdir(parents=True)
    (job / "cell.json").write_text(json.dumps(cell.to_dict()))
    try:
        worker = ex._start_worker(job, ex._worker_env())
        assert os.getpgid(worker.pid) == worker.pid != os.getpgid(0)
        assert worker.poll() is None
        worker.kill()
        assert worker.wait() == -signal.SIGKILL
    finally:
        ex.close()
