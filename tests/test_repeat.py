"""`loopscope repeat`: one profile run into each directory named on stdin, every cell in a fresh worker forked
from the one server the process keeps; stdout carries only the protocol."""

from __future__ import annotations

import json
import subprocess
import sys

import pandas as pd

from tests.conftest import REPO

PROFILE = """
[profile]
calibration = "off"
threads = 1
[measure]
min_time_s = 0.05
min_count = 3
energy = false
memory = false
[[sweep]]
model = "gpt-micro"
workload = "prefill"
batch = [1, 2]
seq_len = 16
"""


def test_repeat_runs_the_profile_into_each_directory_from_one_fork_server(tmp_path):
    profile = tmp_path / "p.toml"
    profile.write_text(PROFILE)
    blocked = tmp_path / "a-file"
    blocked.write_text("not a directory")
    runs = [tmp_path / "r1", blocked / "r2", tmp_path / "r3"]
    proc = subprocess.run([sys.executable, "-m", "loopscope.bench.cli", "repeat", "--profile", str(profile)],
                          input="".join(f"{r}\n" for r in runs), cwd=REPO, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    replies = proc.stdout.splitlines()
    # progress lines went to stderr: stdout is the protocol, one reply per request after `ready`
    assert len(replies) == 4 and replies[0].startswith("ready "), proc.stdout
    assert replies[1] == "done 0" and replies[3] == "done 0", proc.stdout
    assert replies[2].startswith("error ") and str(blocked) in replies[2], proc.stdout  # the next run still ran
    assert "prefill gpt-micro" in proc.stderr
    imports = []
    for run in (runs[0], runs[2]):
        results = pd.read_parquet(run / "results.parquet")
        assert set(results[results["metric"] == "latency_ms"]["status"]) == {"ok"}
        assert results["cell_id"].nunique() == 2
        manifest = json.loads((run / "manifest.json").read_text())
        imports.append(manifest["cell_fixed_cost_s"]["fork_server_import_s"])
        records = [json.loads(p.read_text()) for p in (run / "cells").glob("*.json")]
        assert all(r["startup_s"] < imports[-1] / 5 for r in records), records  # forked, not fresh
    # both runs' workers came from the one server: the same import, measured once
    assert imports[0] == imports[1] == float(replies[0].split()[1])


def test_repeat_needs_a_profile():
    proc = subprocess.run([sys.executable, "-m", "loopscope.bench.cli", "repeat"], cwd=REPO, capture_output=True,
                          text=True, timeout=60, stdin=subprocess.DEVNULL)
    assert proc.returncode == 2 and "--profile" in proc.stderr
