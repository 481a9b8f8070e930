"""Ctrl-C during a sweep on Ray: outstanding tasks are cancelled, finished cells are kept, no cell process is
left behind, and the run resumes (here on the local executor) to completion."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from tests.conftest import REPO, run_cli

TINY = str(Path(__file__).parents[1] / "tiny_cluster_profile.toml")


def _processes() -> list[tuple[int, int, str]]:
    """(pid, parent pid, command line) of every process (from /proc: `ps` cuts lines at $COLUMNS)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            args = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        found.append((int(entry.name), ppid, args))
    return found


def _cell_processes(marker: str) -> list[str]:
    return [args for _, _, args in _processes() if marker in args and "loopscope.bench.worker" in args]


@pytest.mark.slow
def test_ctrl_c_cancels_outstanding_tasks_and_keeps_finished_cells(tmp_path):
    pytest.importorskip("ray", reason="the ray executor needs Ray: pip install 'loopscope[ray]'")
    out = tmp_path / f"interrupted-{os.getpid()}"
    proc = subprocess.Popen([sys.executable, "-m", "loopscope.bench.cli", "run", "--profile", TINY, "--out", str(out),
                             "--no-report", "--executor", "ray"], cwd=REPO, start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while time.time() < deadline and not list((out / "cells").glob("*.json")):
        time.sleep(0.1)
    assert list((out / "cells").glob("*.json")), "no cell finished"
    os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C in a terminal does: the whole foreground group
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr[-2000:]
    assert "finished cells are kept" in stderr
    kept = len(list((out / "cells").glob("*.json")))
    assert 1 <= kept <= 3
    time.sleep(2)
    assert _cell_processes(out.name) == []
    again = run_cli("run", "--profile", TINY, "--out", str(out), "--no-report")
    assert again.returncode == 0, again.stderr
    results = pd.read_parquet(out / "results.parquet")
    assert results["cell_id"].nunique() == 3 and (results["status"] == "ok").all()


def _worker_of(cell_id: str, marker: str) -> tuple[int, int] | None:
    """(pid, parent pid) of the cell process running `cell_id` in the run named `marker`, if any."""
    for pid, ppid, args in _processes():
        if "loopscope.bench.worker" in args and f"{marker}/jobs/{cell_id}" in args:
            return pid, ppid
    return None


@pytest.mark.slow
def test_killing_the_ray_worker_of_a_real_cell_gives_a_row_and_local_resume_completes(tmp_path):
    pytest.importorskip("ray", reason="the ray executor needs Ray: pip install 'loopscope[ray]'")
    from loopscope.bench.matrix import expand
    from loopscope.profiles.loader import load_profile

    train = next(c for c in expand(load_profile(TINY)) if c.workload == "train")
    out = tmp_path / f"killed-{os.getpid()}"
    proc = subprocess.Popen([sys.executable, "-m", "loopscope.bench.cli", "run", "--profile", TINY, "--out", str(out),
                             "--no-report", "--executor", "ray"], cwd=REPO, start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    killed: set[int] = set()
    deadline = time.time() + 300
    while len(killed) < 2 and time.time() < deadline and proc.poll() is None:  # the first try and Ray's retry
        found = _worker_of(train.cell_id, out.name)
        if found and found[1] not in killed:
            pid, ray_worker = found
            os.kill(ray_worker, signal.SIGKILL)
            os.kill(pid, signal.SIGKILL)  # its cell process, which would otherwise outlive it
            killed.add(ray_worker)
        time.sleep(0.05)
    stdout, stderr = proc.communicate(timeout=300)
    assert len(killed) == 2 and proc.returncode == 0, stderr[-2000:]
    results = pd.read_parquet(out / "results.parquet")
    status = results.groupby("workload")["status"].first().to_dict()
    assert status == {"train": "error", "eval": "skipped", "prefill": "ok"}
    assert results.loc[results["workload"] == "train", "reason"].str.contains("died 2 times").all()
    again = run_cli("run", "--profile", TINY, "--out", str(out), "--no-report", "--retry-failed")
    assert again.returncode == 0, again.stderr
    assert "running 2 of 3 cells" in again.stdout
    results = pd.read_parquet(out / "results.parquet")
    assert results["cell_id"].nunique() == 3 and (results["status"] == "ok").all()
