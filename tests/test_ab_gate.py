"""`loopscope gate --against REF` end to end: real processes, slowdowns planted as committed code changes.

The candidate is a detached worktree of this repository at HEAD, with the change committed there; the base
is HEAD. Each test runs the A/B driver as the CLI does, on a one-cell prefill profile.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from loopscope.reports.abgate import MIN_TIME_S, ab_gate, link_site, timing_profile
from tests import ab_plant
from tests.conftest import run_cli

REPO = Path(__file__).resolve().parents[1]
PROFILE = """
[profile]
seed = 0
timeout_s = 120
calibration = "quick"
threads = 1

[measure]
min_time_s = 0.2
min_count = 5
energy = true

[[sweep]]
name = "quality"
model = "gpt-micro"
workload = ["train", "eval"]

[[sweep]]
name = "speed"
model = "gpt-micro"
workload = "prefill"
batch = 2
seq_len = 32
"""

pytestmark = pytest.mark.skipif(shutil.which("git") is None or not (REPO / ".git").exists(),
                                reason="needs a git checkout of loopscope")


@pytest.fixture
def candidate(tmp_path):
    tree = ab_plant.checkout(REPO, tmp_path / "cand")
    yield tree
    ab_plant.remove(REPO, tree)


def _gate(tree: Path, tmp_path: Path, **kwargs):
    profile = tmp_path / "tiny.toml"
    profile.write_text(PROFILE, encoding="utf-8")
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True,
                          check=True).stdout.strip()
    return ab_gate(head, profile=str(profile), repo=tree, budget_s=0.0, min_blocks=2, seed=0,
                   log=lambda line: None, **kwargs)


def test_timing_profile_keeps_only_timing_sweeps_with_meters_and_calibration_off(tmp_path):
    src = tmp_path / "p.toml"
    src.write_text(PROFILE, encoding="utf-8")
    assert timing_profile(src, tmp_path / "out.toml")
    import tomllib

    doc = tomllib.loads((tmp_path / "out.toml").read_text())
    assert [s["workload"] for s in doc["sweep"]] == ["prefill"]
    assert doc["profile"]["calibration"] == "off"
    assert doc["measure"]["energy"] is False and doc["measure"]["min_time_s"] >= MIN_TIME_S
    only_train = tmp_path / "t.toml"
    only_train.write_text('[[sweep]]\nmodel = "gpt-micro"\nworkload = "train"\n')
    assert not timing_profile(only_train, tmp_path / "none.toml")


def test_one_block_is_refused_with_one_line_and_exit_2():
    proc = run_cli("gate", "--against", "HEAD", "--profile", "ci", "--min-blocks", "1", cwd=REPO)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "--min-blocks 1" in proc.stderr and "at least 2 blocks" in proc.stderr, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr


def test_a_process_on_the_linked_site_imports_that_checkout_not_the_installed_package(candidate, tmp_path):
    # A planted difference in the checkout shows up in a process started on its site, although this
    # interpreter has loopscope installed (editable here, a wheel in tox).
    ab_plant.plant_prefill_slowdown(candidate, 0.5)
    site = link_site(candidate, tmp_path / "site")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | {"PYTHONPATH": str(site)}
    code = ("import loopscope.bench.engines as m, loopscope.reports.gate as g; "
            "print(m.__file__); print(g.__file__); print('(1.0 + 0.5)' in open(m.__file__).read())")
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                         check=True).stdout.split()
    assert out[0].startswith(str(site)) and out[1].startswith(str(site)) and out[2] == "True"
    here = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True,
                          check=True).stdout.split()
    assert here[2] == "False"  # the installed candidate has no planted slowdown


def test_a_planted_prefill_slowdown_is_caught(candidate, tmp_path):
    ab_plant.plant_prefill_slowdown(candidate, 1.0)  # each forward busy-waits as long again
    result = _gate(candidate, tmp_path)
    text = result.render()
    assert result.exit_code == 1, text
    latency = result.table.set_index("metric").loc["latency_ms"]
    assert latency["verdict"] == "fail" and latency["ratio"] > 1.4, text
    assert "noise floor" in text and "2 block(s) = 12 processes" in text
    assert "forked from one `loopscope repeat` process per side and block" in text  # HEAD has the command


def test_a_side_without_repeat_gets_fresh_processes_on_both_sides(candidate, tmp_path):
    ab_plant.remove_repeat_command(candidate)  # as commits before `loopscope repeat`
    result = _gate(candidate, tmp_path)
    text = result.render()
    assert "a fresh `loopscope run` per repetition on both sides" in text and "= 12 processes" in text, text
    latency = result.table.set_index("metric").loc["latency_ms"]
    assert latency["n_pairs"] == 6 and latency["verdict"] in ("pass", "unresolved"), text
