"""SIGKILL a run at ten moments (a cell's start, mid-cell, between a cell file and the tables, during the
report), resume each time, and finish: the result equals a clean run's, the tables and report are newer
than every cell file, and no worker outlives the run it belonged to (checked by pid after every kill).

The moments are drawn from a seeded generator, so a failure replays. This default version uses a tiny
profile (seconds per cell); tests/benchmarks/test_kill_resume_ci.py runs the same against `ci`.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from tests.conftest import REPO, run_cli

SEED = 20261130
# In the order a run passes through them, so that every kind can happen: each "between" kill keeps one
# more cell, the two "report" kills hit the report of a finished run (the second one on "nothing to do").
MOMENTS = ("cell-start", "mid-cell", "between", "cell-start", "mid-cell", "between", "mid-cell", "between",
           "report", "report")
TINY = """
[profile]
calibration = "off"
timeout_s = 600
[measure]
min_time_s = 0.2
min_count = 3
energy = false
memory = false
[[sweep]]
model = "gpt-micro"
workload = "prefill"
batch = [1, 2]
seq_len = [16, 32]
"""


def workers_of(run: Path) -> list[int]:
    """Live processes whose command line names a job of this run (Linux /proc)."""
    jobs = f"{os.path.abspath(run / 'jobs')}/"
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            cmd = Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ").decode("utf-8", "replace")
        except OSError:
            continue
        if jobs in cmd and alive(int(entry)):
            pids.append(int(entry))
    return pids


def alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[-1].split()[0] != "Z"
    except OSError:
        return False


def gone_within(pid: int, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while alive(pid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def _cell_files(run: Path) -> set[str]:
    return {p.name for p in (run / "cells").glob("*.json")} if (run / "cells").is_dir() else set()


def _in_report(run: Path, since_ns: int) -> bool:
    charts = run / "charts"
    try:
        return any(p.stat().st_mtime_ns > since_ns for p in charts.iterdir())
    except OSError:
        return False


def _start(profile: Path, out: Path) -> subprocess.Popen:
    # Its own session, like a terminal job: the test can kill the run's whole process group.
    return subprocess.Popen([sys.executable, "-m", "loopscope.bench.cli", "run", "--profile", str(profile),
                             "--out", str(out)], cwd=REPO, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def kill_at(profile: Path, out: Path, moment: str, rng: random.Random, timeout_s: float) -> tuple[bool, set[int]]:
    """Start a (resumed) run, SIGKILL it at `moment`; (whether the moment was reached, workers seen)."""
    since = time.time_ns()
    before = _cell_files(out)
    proc = _start(profile, out)
    seen: set[int] = set()
    deadline = time.monotonic() + timeout_s
    reached = False
    while proc.poll() is None and time.monotonic() < deadline:
        workers = workers_of(out)
        seen.update(workers)
        if moment in ("cell-start", "mid-cell") and workers:
            time.sleep(rng.uniform(0.0, 0.2) if moment == "cell-start" else rng.uniform(0.5, 2.5))
            reached = True
        elif moment == "between" and _cell_files(out) - before:
            reached = True
        elif moment == "report" and _in_report(out, since):
            time.sleep(rng.uniform(0.0, 0.5))
            reached = True
        if reached:
            break
        time.sleep(0.01)
    seen.update(workers_of(out))
    if proc.poll() is None:
        if rng.random() < 0.5:
            os.killpg(proc.pid, signal.SIGKILL)  # kill -9 of the run's process group
        else:
            os.kill(proc.pid, signal.SIGKILL)  # kill -9 of the run alone
    proc.wait()
    return reached and proc.returncode == -signal.SIGKILL, seen


def rows_per_cell(run: Path) -> dict[str, int]:
    return pd.read_parquet(run / "results.parquet").groupby("cell_id").size().to_dict()


def check_kill_resume(tmp_path: Path, profile: Path, *, timeout_s: float) -> list[tuple[str, bool]]:
    clean = tmp_path / "clean"
    done = run_cli("run", "--profile", str(profile), "--out", str(clean), timeout=timeout_s)
    assert done.returncode == 0, done.stdout + done.stderr
    expected = rows_per_cell(clean)

    out = tmp_path / "killed"
    rng = random.Random(SEED)
    hits = []
    for moment in MOMENTS:
        reached, workers = kill_at(profile, out, moment, rng, timeout_s)
        hits.append((moment, reached))
        for pid in workers:
            assert gone_within(pid, 5.0), f"worker {pid} outlived the run killed at {moment}"
        assert not workers_of(out)
        for path in (out / "cells").glob("*.json"):  # a cell file is whole, or absent
            record = json.loads(path.read_text())
            assert len(record["rows"]) == expected[record["cell_id"]], path

    final = run_cli("run", "--profile", str(profile), "--out", str(out), timeout=timeout_s)
    assert final.returncode == 0, final.stdout + final.stderr
    assert rows_per_cell(out) == expected
    newest = max(p.stat().st_mtime_ns for p in (out / "cells").glob("*.json"))
    for name in ("results.parquet", "results.csv", "samples.parquet", "report.md", "report.html"):
        assert (out / name).stat().st_mtime_ns >= newest, f"{name} is older than a cell file"
    assert not workers_of(out)
    assert not list(out.rglob("*.tmp")), "a temporary file was left behind"
    reached = {m for m, hit in hits if hit}
    assert reached == set(MOMENTS), f"moments never reached: {hits}"
    return hits


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_sigkill_at_ten_moments_then_resume_equals_a_clean_run(tmp_path):
    profile = tmp_path / "tiny.toml"
    profile.write_text(TINY)
    check_kill_resume(tmp_path, profile, timeout_s=600)
