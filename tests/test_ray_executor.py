"""The ray executor: the local executor's cells, records and failure rows, run as tasks on a Ray cluster.

One local cluster (ray.init(num_cpus=2)) serves the whole module. The stand-in workers keep it fast; the
equivalence of real sweeps (local vs ray vs shards + merge) and the kill and Ctrl-C checks on real
cells are in tests/benchmarks/test_ray_equivalence.py and test_ray_interrupt.py (`tox -e benchmarks`).
"""

from __future__ import annotations

import dataclasses
import os
import re
import signal
import sys
import threading
import time
from pathlib import Path

import pytest

from loopscope.bench.context import RunContext
from loopscope.bench.executors import make_executor
from loopscope.bench.matrix import Cell
from loopscope.bench.store import RunStore
from loopscope.models import preset

ray = pytest.importorskip("ray", reason="the ray executor needs Ray: pip install 'loopscope[ray]'")

FAKE = [sys.executable, str(Path(__file__).with_name("fake_worker.py"))]
SLOW = [sys.executable, str(Path(__file__).with_name("fake_slow_worker.py"))]


@pytest.fixture(scope="module", autouse=True)
def cluster():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, object_store_memory=80 * 2**20)
    yield
    ray.shutdown()


def _cell(action: str, timeout_s: float = 20.0, **kw) -> Cell:
    return Cell(model=action, model_config=preset("gpt-micro").to_dict(), workload="prefill",
                timeout_s=timeout_s, **kw)


def _store(path: Path) -> RunStore:
    store = RunStore(path)
    store.create()
    return store


def _comparable(record: dict) -> tuple:
    """Status, reason (measured numbers in it masked) and rows of a record."""
    def mask(text: str) -> str:
        return re.sub(r"\d+(\.\d+)?", "#", text)

    rows = sorted((r["metric"], r["status"], mask(r["reason"]), r["value"] == r["value"] and r["value"])
                  for r in record["rows"])
    return record["status"], mask(record["reason"]), tuple(rows)


def test_ray_gives_the_same_records_and_failure_rows_as_local(tmp_path):
    cells = [_cell("ok"), _cell("raise", batch=2), _cell("die", batch=3), _cell("sleep", timeout_s=2.0),
             _cell("alloc", batch=4)]
    by = {}
    for name in ("local", "ray"):
        store = _store(tmp_path / name / "run")
        ex = make_executor(name, store, RunContext(run_dir=str(store.run_dir)), memory_limit_bytes=300 * 2**20,
                           worker_cmd=FAKE)
        statuses: dict[str, str] = {}
        ex.run_all(cells, statuses)
        by[name] = store.read_cells()
        assert statuses == {cid: r["status"] for cid, r in by[name].items()}
    assert set(by["local"]) == set(by["ray"]) == {c.cell_id for c in cells}
    for cid in by["local"]:
        assert _comparable(by["local"][cid]) == _comparable(by["ray"][cid])
    statuses = sorted(r["status"] for r in by["ray"].values())
    assert statuses == ["error", "error", "ok", "oom", "timeout"]
    # rows say which machine ran them
    ok = next(r for r in by["ray"].values() if r["status"] == "ok")
    assert ok["node"]["hostname"] == os.uname().nodename
    assert ok["rows"][0]["hardware"] and ok["rows"][0]["node"] == os.uname().nodename
    assert ok["rows"][0]["run_id"] == "run"


def test_eval_cells_wait_for_their_train_cell_or_are_skipped(tmp_path):
    train_ok, train_bad = _cell("ok", seq_len=7), _cell("raise", seq_len=8)
    after_ok = dataclasses.replace(_cell("ok", seq_len=9), depends_on=train_ok.cell_id)
    after_bad = dataclasses.replace(_cell("ok", seq_len=10), depends_on=train_bad.cell_id)
    store = _store(tmp_path / "run")
    ex = make_executor("ray", store, RunContext(run_dir=str(store.run_dir)), worker_cmd=FAKE)
    order: list[str] = []
    statuses: dict[str, str] = {}
    ex.run_all([after_ok, after_bad, train_ok, train_bad], statuses, on_done=lambda c, r: order.append(c.cell_id))
    assert order.index(train_ok.cell_id) < order.index(after_ok.cell_id)
    assert statuses[after_ok.cell_id] == "ok"
    assert statuses[after_bad.cell_id] == "skipped"
    assert train_bad.cell_id in store.read_cells()[after_bad.cell_id]["reason"]


def test_a_gpu_cell_on_a_cluster_without_gpus_is_a_row_not_a_hang(tmp_path):
    store = _store(tmp_path / "run")
    ex = make_executor("ray", store, RunContext(run_dir=str(store.run_dir)), worker_cmd=FAKE)
    statuses: dict[str, str] = {}
    ex.run_all([_cell("ok", device="cuda")], statuses)
    (record,) = store.read_cells().values()
    assert record["status"] == "error" and "largest node of the Ray cluster has 0" in record["reason"]


def _kill_ray_workers(pid_dir: Path, times: int, stop: threading.Event) -> list[int]:
    """Kill the Ray worker that runs the cell (and its worker process) each time one starts."""
    killed: list[int] = []
    seen: set[str] = set()
    while len(killed) < times and not stop.is_set():
        for path in pid_dir.iterdir():
            if path.name in seen or path.name.startswith("."):
                continue
            seen.add(path.name)
            pid, ray_worker = map(int, path.read_text().split())
            os.kill(ray_worker, signal.SIGKILL)
            os.kill(pid, signal.SIGKILL)  # the killed Ray worker's cell process must not outlive it
            killed.append(ray_worker)
        time.sleep(0.05)
    return killed


def test_killed_ray_worker_gives_a_status_row_then_local_resume_completes(tmp_path):
    pid_dir = tmp_path / "pids"
    pid_dir.mkdir()
    store = _store(tmp_path / "run")
    victim, bystander = _cell("slow"), _cell("ok", batch=2)
    ex = make_executor("ray", store, RunContext(run_dir=str(store.run_dir)),
                       worker_cmd=[*SLOW, "--pids", str(pid_dir)])
    stop = threading.Event()
    killed: list[int] = []
    killer = threading.Thread(target=lambda: killed.extend(_kill_ray_workers(pid_dir, 2, stop)))
    killer.start()
    statuses: dict[str, str] = {}
    try:
        ex.run_all([victim], statuses)
    finally:
        stop.set()
        killer.join()
    local = make_executor("local", store, RunContext(run_dir=str(store.run_dir)), worker_cmd=FAKE)
    local.run_all([bystander], statuses)  # the sweep went on
    assert len(killed) == 2  # the first try and Ray's one retry
    record = store.read_cells()[victim.cell_id]
    assert record["status"] == "error" and "died 2 times" in record["reason"]
    assert record["rows"][0]["metric"] == "cell_status"
    # resume on the local executor: the failed cell runs again and completes
    pending = [c for c in (victim, bystander) if statuses[c.cell_id] != "ok"]
    assert pending == [victim]
    local = make_executor("local", store, RunContext(run_dir=str(store.run_dir)), worker_cmd=SLOW)
    local.run_all(pending, statuses)
    assert {cid: r["status"] for cid, r in store.read_cells().items()} == {victim.cell_id: "ok",
                                                                           bystander.cell_id: "ok"}
