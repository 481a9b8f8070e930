"""Real runs of a tiny profile under the faults users meet: a changed profile on resume, tables or
report left stale by a kill, every cell failing, Ctrl-C, and `--out .`."""

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

from tests.conftest import REPO, run_cli

PREFILL = """
[profile]
calibration = "off"
timeout_s = {timeout}
[measure]
min_time_s = {min_time}
min_count = 3
energy = false
memory = false
[[sweep]]
model = "gpt-micro"
workload = "prefill"
batch = {batch}
seq_len = 16
"""


def _profile(path: Path, *, batch: str = "1", timeout: float = 300, min_time: float = 0.05) -> Path:
    path.write_text(PREFILL.format(batch=batch, timeout=timeout, min_time=min_time))
    return path


def _cell_ids(run: Path, table: str = "results.parquet") -> set[str]:
    return set(pd.read_parquet(run / table)["cell_id"])


def _one_line(done: subprocess.CompletedProcess) -> str:
    lines = done.stderr.splitlines()
    assert len(lines) == 1 and "Traceback" not in done.stderr, done.stderr
    return lines[0]


def test_a_changed_profile_is_refused_on_resume_then_allowed_with_only_its_cells(tmp_path):
    out = tmp_path / "run"
    first = _profile(tmp_path / "first.toml", batch="1")
    done = run_cli("run", "--profile", str(first), "--out", str(out), "--no-report")
    assert done.returncode == 0, done.stderr
    old_ids = _cell_ids(out)
    old_hash = json.loads((out / "manifest.json").read_text())["profile"]["hash"]

    second = _profile(tmp_path / "second.toml", batch="2")
    refused = run_cli("run", "--profile", str(second), "--out", str(out), "--no-report")
    assert refused.returncode == 2
    line = _one_line(refused)
    assert old_hash in line and "--allow-profile-change" in line and "--out" in line
    new_hash = line.split("(hash ")[-1].split(")")[0]
    assert new_hash != old_hash and len(new_hash) == 16
    assert _cell_ids(out) == old_ids  # nothing was touched

    allowed = run_cli("run", "--profile", str(second), "--out", str(out), "--no-report",
                      "--allow-profile-change")
    assert allowed.returncode == 0, allowed.stderr
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["profile"]["hash"] == new_hash
    new_ids = set(manifest["cell_ids"])
    assert _cell_ids(out) == new_ids and not (new_ids & old_ids)
    assert _cell_ids(out, "samples.parquet") <= new_ids
    assert len(list((out / "cells").glob("*.json"))) == 2  # the old cell's file is kept, but not tabled

    # An edited profile (another eval setting, say) is a changed profile too.
    edited = second.read_text().replace("min_count = 3", "min_count = 4")
    second.write_text(edited)
    again = run_cli("run", "--profile", str(second), "--out", str(out), "--no-report")
    assert again.returncode == 2 and new_hash in _one_line(again)


def test_stale_tables_and_a_missing_report_are_rebuilt_on_resume(tmp_path):
    out = tmp_path / "run"
    profile = _profile(tmp_path / "p.toml", batch="[1, 2]")
    done = run_cli("run", "--profile", str(profile), "--out", str(out), "--no-report")
    assert done.returncode == 0, done.stderr
    full = pd.read_parquet(out / "results.parquet")
    assert full["cell_id"].nunique() == 2
    # As if killed between the last cell file and the table rebuild: tables hold one cell, and are older.
    first = sorted(full["cell_id"].unique())[0]
    full[full["cell_id"] == first].to_parquet(out / "results.parquet", index=False)
    old = min(p.stat().st_mtime for p in (out / "cells").glob("*.json")) - 10
    os.utime(out / "results.parquet", (old, old))
    assert not (out / "report.html").exists()  # as if killed before the report

    resumed = run_cli("run", "--profile", str(profile), "--out", str(out))
    assert resumed.returncode == 0, resumed.stderr
    assert "nothing to do" in resumed.stdout
    assert pd.read_parquet(out / "results.parquet")["cell_id"].nunique() == 2
    newest_cell = max(p.stat().st_mtime_ns for p in (out / "cells").glob("*.json"))
    for name in ("results.parquet", "results.csv", "samples.parquet", "report.md", "report.html"):
        assert (out / name).stat().st_mtime_ns >= newest_cell, name
    # The gate reads the same cells the tables hold.
    gate = run_cli("gate", str(out), str(out))
    assert gate.returncode == 0, gate.stdout + gate.stderr
    assert "missing" not in gate.stdout


def test_a_run_whose_cells_all_fail_exits_3_and_a_gate_between_two_such_runs_fails(tmp_path):
    profile = _profile(tmp_path / "p.toml", batch="[1, 2]", timeout=0.001)
    runs = []
    for name in ("base", "cand"):
        out = tmp_path / name
        done = run_cli("run", "--profile", str(profile), "--out", str(out), "--no-report")
        assert done.returncode == 3, done.stdout + done.stderr
        assert "0 ok, 2 not ok" in done.stdout
        runs.append(out)
    again = run_cli("run", "--profile", str(profile), "--out", str(runs[0]), "--no-report")
    assert again.returncode == 3 and "2 failed" in again.stdout  # "nothing to do" does not hide it
    gate = run_cli("gate", str(runs[0]), str(runs[1]))
    assert gate.returncode == 1, gate.stdout + gate.stderr
    assert "none measured" in gate.stdout


def test_a_gate_that_found_regressions_exits_1_even_when_its_reader_left(tmp_path):
    from dataclasses import replace

    from tests.rundir_factory import default_cells, write_synthetic_run

    base = write_synthetic_run(tmp_path / "base", run_id="base", seed=1)
    worse = [replace(c, bpb=c.bpb * 1.05) for c in default_cells()]  # a quality regression: judged by value
    cand = write_synthetic_run(tmp_path / "cand", run_id="cand", seed=2, cells=worse)
    assert run_cli("gate", str(base), str(cand)).returncode == 1
    proc = subprocess.Popen([sys.executable, "-m", "loopscope.bench.cli", "gate", str(base), str(cand)],
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.close()  # the reader is gone before anything is written (`| head -0`)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 1, err
    assert b"Traceback" not in err


def test_memory_limit_nan_is_refused_before_anything_is_created(tmp_path):
    profile = tmp_path / "p.toml"
    profile.write_text(_profile(tmp_path / "base.toml").read_text().replace(
        "[profile]", "[profile]\nmemory_limit_gb = nan"))
    done = run_cli("run", "--profile", str(profile), "--out", str(tmp_path / "run"))
    assert done.returncode == 2 and "memory_limit_gb = nan" in _one_line(done)
    assert not (tmp_path / "run").exists()


def test_out_dot_names_the_run_after_the_directory(tmp_path):
    work = tmp_path / "myrun"
    work.mkdir()
    profile = _profile(tmp_path / "p.toml", timeout=0.001)
    env = {**os.environ, "PYTHONPATH": str(REPO.parent)}
    done = subprocess.run([sys.executable, "-m", "loopscope.bench.cli", "run", "--profile", str(profile),
                           "--out", ".", "--no-report"], cwd=work, capture_output=True, text=True, env=env,
                          timeout=300)
    assert done.returncode == 3, done.stderr
    assert json.loads((work / "manifest.json").read_text())["run_id"] == "myrun"
    assert set(pd.read_parquet(work / "results.parquet")["run_id"]) == {"myrun"}


def _workers_of(run: Path) -> list[int]:
    jobs = f"{os.path.abspath(run / 'jobs')}/"
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                cmd = Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ").decode()
            except OSError:
                continue
            if jobs in cmd:
                pids.append(int(entry))
    return pids


def _gone(pid: int, within: float) -> bool:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[-1].split()[0]
        except OSError:
            return True
        if state == "Z":
            return True
        time.sleep(0.05)
    return False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
@pytest.mark.parametrize("how", ["ctrl-c", "kill-9-group"])
def test_workers_stop_with_their_run(tmp_path, how):
    out = tmp_path / "run"
    profile = _profile(tmp_path / "p.toml", min_time=120)  # a cell that would run for minutes
    proc = subprocess.Popen([sys.executable, "-m", "loopscope.bench.cli", "run", "--profile", str(profile),
                             "--out", str(out), "--no-report"], cwd=REPO, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 240
        while not list(out.glob("jobs/*/stdout.txt")) and time.monotonic() < deadline:
            time.sleep(0.05)  # the cell's worker has started (forked by the run's fork server, or fresh)
        time.sleep(1.0)  # mid-cell
        workers = _workers_of(out)
        assert workers, "no worker started"
        if how == "ctrl-c":  # what a terminal does: SIGINT to the foreground process group
            os.killpg(proc.pid, signal.SIGINT)
            _, err = proc.communicate(timeout=60)
            assert proc.returncode == 130, err
            assert "interrupted" in err and "Traceback" not in err
        else:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=60)
        for pid in workers:
            assert _gone(pid, within=5.0), f"worker {pid} outlived its run ({how})"
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        for pid in _workers_of(out):
            os.kill(pid, signal.SIGKILL)


def test_a_resumed_run_redoes_a_cell_file_that_is_not_a_record(tmp_path):
    out = tmp_path / "run"
    profile = _profile(tmp_path / "p.toml", batch="[1, 2]", timeout=0.001)
    assert run_cli("run", "--profile", str(profile), "--out", str(out), "--no-report").returncode == 3
    bad, other = sorted((out / "cells").glob("*.json"))
    bad.write_text('{"hello": "world"}')
    other.write_text("[1, 2, 3]")
    report = run_cli("report", str(out))
    assert report.returncode == 2 and "not a cell record" in _one_line(report)
    resumed = run_cli("run", "--profile", str(profile), "--out", str(out), "--no-report")
    assert resumed.returncode == 3, resumed.stderr
    assert "running 2 of 2 cells" in resumed.stdout
    assert {json.loads(p.read_text())["cell_id"] for p in (bad, other)} == {bad.stem, other.stem}
    assert _cell_ids(out) == {bad.stem, other.stem}
