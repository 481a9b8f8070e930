"""The run store under faults: locks that a dead holder never keeps, leftover workers stopped, a full
disk as one line with no temporary file left, tables that hold only the manifest's matrix."""

from __future__ import annotations

import errno
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from loopscope.bench import store as store_module
from loopscope.bench.corpus import split_documents
from loopscope.bench.errors import ConfigError, LoopscopeError
from loopscope.bench.store import RunStore, StoreWriteError, atomic_write_text, run_id_of
from loopscope.profiles.loader import AXES, AXIS_RANGES, NUM, RANGES, SETTINGS_SCHEMA
from tests.conftest import REPO, run_cli


def _store(tmp_path: Path) -> RunStore:
    store = RunStore(tmp_path / "run")
    store.create()
    return store


def _dead_pid() -> int:
    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    return int(done.stdout)


def _record(cell_id: str, status: str = "ok", rows: int = 2) -> dict:
    return {"cell_id": cell_id, "status": status, "reason": "", "cell": {},
            "rows": [{"cell_id": cell_id, "metric": f"m{i}", "stat": "", "value": float(i), "status": status}
                     for i in range(rows)],
            "samples": [{"cell_id": cell_id, "metric": "m0", "index": 0, "value": 1.0}]}


@pytest.mark.parametrize("content", ["", "   ", "{not json", "[1, 2]", '{"pid": "x"}'])
def test_an_empty_or_unreadable_lock_file_does_not_lock_the_directory(tmp_path, content):
    store = _store(tmp_path)
    (store.run_dir / ".lock").write_text(content)
    with store.lock():
        holder = json.loads((store.run_dir / ".lock").read_text())
        assert holder["pid"] == os.getpid()
    assert not (store.run_dir / ".lock").exists()


def test_a_lock_naming_a_dead_process_is_free(tmp_path):
    store = _store(tmp_path)
    (store.run_dir / ".lock").write_text(json.dumps({"pid": _dead_pid(), "host": socket.gethostname()}))
    with store.lock():
        pass


def test_a_live_holder_is_named_in_one_line(tmp_path):
    store = _store(tmp_path)
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time; from loopscope.bench.store import RunStore\n"
        f"with RunStore({str(store.run_dir)!r}).lock():\n"
        "    print('held', flush=True); time.sleep(60)")], stdout=subprocess.PIPE, text=True, cwd=REPO)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(LoopscopeError, match=f"in use by pid {holder.pid}") as err:
            with store.lock():
                pass
        assert "\n" not in str(err.value)
    finally:
        holder.kill()
        holder.wait()
    with store.lock():  # its holder died: the kernel released the flock
        pass


def _fake_worker(store: RunStore) -> subprocess.Popen:
    """A process that looks like a worker of this run (its command line names a job of the run)."""
    job = Path(os.path.abspath(store.jobs_dir)) / "abc123"
    job.mkdir(parents=True)
    return subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)", str(job)],
                            start_new_session=True)


@pytest.mark.parametrize("recorded", [True, False])
def test_workers_left_by_a_dead_holder_are_stopped_before_the_lock_is_held(tmp_path, recorded):
    store = _store(tmp_path)
    orphan = _fake_worker(store)
    bystander = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        workers = [orphan.pid] if recorded else []
        (store.run_dir / ".lock").write_text(json.dumps({"pid": _dead_pid(), "host": socket.gethostname(),
                                                          "workers": workers}))
        with store.lock():
            assert orphan.poll() is not None or _reaped_within(orphan, 1.0), "orphan worker still alive"
        assert bystander.poll() is None, "a process that is no worker of this run was touched"
    finally:
        for proc in (orphan, bystander):
            proc.kill()
            proc.wait()


def _reaped_within(proc: subprocess.Popen, seconds: float) -> bool:
    try:
        proc.wait(timeout=seconds)
        return True
    except subprocess.TimeoutExpired:
        return False


def test_the_lock_file_names_running_workers(tmp_path):
    store = _store(tmp_path)
    with store.lock():
        store.note_worker(4242, running=True)
        assert json.loads((store.run_dir / ".lock").read_text())["workers"] == [4242]
        store.note_worker(4242, running=False)
        assert json.loads((store.run_dir / ".lock").read_text())["workers"] == []


def test_disk_full_while_writing_is_one_line_and_leaves_no_temporary_file(tmp_path, monkeypatch):
    target = tmp_path / "cells" / "abc.json"
    target.parent.mkdir()

    def full(fd: int) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(store_module.os, "fsync", full)
    with pytest.raises(StoreWriteError, match="No space left on device") as err:
        atomic_write_text(target, "x" * 1000)
    assert "\n" not in str(err.value) and str(target) in str(err.value)
    assert list(target.parent.iterdir()) == []


@pytest.fixture
def tiny_tmpfs(tmp_path):
    """A real 64 KiB file system (needs root and permission to mount; skipped otherwise)."""
    mount = tmp_path / "tiny"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mount)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


def test_a_real_full_disk_while_writing_a_cell_leaves_no_temporary_file(tiny_tmpfs):
    store = RunStore(tiny_tmpfs / "run")
    store.create()
    record = _record("abc123", rows=2)
    record["rows"][0]["reason"] = "x" * 200_000  # larger than the file system
    with pytest.raises(StoreWriteError, match="No space left on device"):
        store.write_cell(record)
    assert [p.name for p in store.cells_dir.iterdir()] == []


def test_report_on_a_full_disk_is_one_line_and_exit_2(tiny_tmpfs, tmp_path):
    from tests.rundir_factory import write_synthetic_run

    run = write_synthetic_run(tiny_tmpfs / "run", run_id="full", seed=1)
    filler = tiny_tmpfs / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT)  # fill what is left
    try:
        while os.write(fd, b"\0" * 512):
            pass
    except OSError:
        pass
    finally:
        os.close(fd)
    done = run_cli("report", str(run))
    assert done.returncode == 2, done.stderr
    lines = done.stderr.splitlines()
    assert len(lines) == 1 and "Traceback" not in done.stderr, done.stderr
    assert "No space left on device" in lines[0]
    assert not [p for p in run.rglob("*.tmp")]


def test_tables_hold_only_the_cells_of_the_manifests_matrix(tmp_path):
    store = _store(tmp_path)
    for cid in ("aaa", "bbb", "old"):
        store.write_cell(_record(cid))
    store.write_manifest({"run_id": "run", "cell_ids": ["aaa", "bbb"]})
    results = store.write_tables()
    assert sorted(results["cell_id"].unique()) == ["aaa", "bbb"]
    assert sorted(pd.read_parquet(store.run_dir / "samples.parquet")["cell_id"].unique()) == ["aaa", "bbb"]


def test_a_cell_file_that_is_not_a_record_is_redone_by_a_run_and_refused_by_readers(tmp_path):
    store = _store(tmp_path)
    store.write_cell(_record("aaa"))
    (store.cells_dir / "bbb.json").write_text('{"hello": "world"}')
    (store.cells_dir / "ccc.json").write_text("[1, 2, 3]")
    assert list(store.read_cells()) == ["aaa"]
    with pytest.raises(LoopscopeError, match="bbb.json: not a cell record"):
        store.read_cells(strict=True)
    assert list(store.read_cells({"aaa"}, strict=True)) == ["aaa"]  # files outside the matrix are not read


def test_stale_tables_are_detected(tmp_path):
    store = _store(tmp_path)
    store.write_cell(_record("aaa"))
    assert store.tables_stale()
    store.write_tables()
    assert not store.tables_stale()
    old = time.time() - 60
    for name in ("results.parquet", "results.csv", "samples.parquet"):
        os.utime(store.run_dir / name, (old, old))
    assert store.tables_stale() and store.report_stale()


@pytest.mark.parametrize("out", [".", "./", "runs/.."])
def test_the_run_id_of_a_relative_directory_is_its_name(tmp_path, monkeypatch, out):
    work = tmp_path / "myrun"
    (work / "runs").mkdir(parents=True)
    monkeypatch.chdir(work)
    assert run_id_of(Path(out)) == "myrun"
    assert RunStore(Path(out)).run_id == "myrun"


def test_the_root_directory_is_no_run_id():
    with pytest.raises(LoopscopeError, match="no name to serve as the run id"):
        RunStore(Path("/")).create()


@pytest.mark.parametrize("name", [f"notes-{i}.txt" for i in range(60)] + ["a", "", "/x/y.md"])
def test_a_single_document_corpus_splits_into_two_non_empty_parts(name):
    train, val = split_documents(iter([(name, b"some text that is long enough to split " * 20)]), None)
    assert len(train) > 0 and len(val) > 0
    train, val = split_documents(iter([(name, b"xy")]), 1_000_000)
    assert len(train) == 1 and len(val) == 1


def test_a_corpus_whose_documents_all_hash_to_the_held_out_side_still_trains():
    from loopscope.bench.corpus import _is_val

    val_names = [n for n in (f"d{i}" for i in range(2000)) if _is_val(n)][:3]
    train, val = split_documents(iter([(n, b"held out text " * 50) for n in val_names]), None)
    assert len(train) > len(val) > 0


@pytest.mark.parametrize("text", [b"", b"x"])
def test_a_corpus_too_small_to_split_is_refused(text):
    with pytest.raises(ConfigError, match="too little to split"):
        split_documents(iter([("doc", text)]), None)


def test_every_numeric_profile_key_has_a_documented_range():
    for section, keys in SETTINGS_SCHEMA.items():
        for key, types in keys.items():
            if set(types) & set(NUM) or key == "betas":
                assert key in RANGES.get(section, {}), f"{section}.{key} has no range"
    for key, types in AXES.items():
        if set(types) & set(NUM):
            assert key in AXIS_RANGES, f"sweep axis {key} has no range"
