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

TINY = str(Path(__file__).with_name("tiny_cluster_profile.toml"))


def _cell_processes(marker: str) -> list[str]:
    out = subprocess.run(["ps", "-eo", "pid,args"], capture_output=True, text=True).stdout
    return [line for line in out.splitlines() if marker in line and "loopscope.bench.worker" in line]


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
