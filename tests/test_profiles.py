"""Profiles: shipped ones load and expand; every class of bad profile gives its message and exit 2."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from loopscope.bench.errors import ConfigError
from loopscope.bench.matrix import expand
from loopscope.profiles.loader import builtin_profiles, load_profile
from tests.conftest import run_cli

GOOD = """
[profile]
seed = 1
[train]
tokens = 1000
[[sweep]]
model = ["gpt-micro", "parcae-micro"]
workload = ["train", "eval"]
loops_test = [1, 2]
"""


@pytest.mark.parametrize("name", sorted(builtin_profiles()))
def test_shipped_profiles_validate_and_expand(name):
    cells = expand(load_profile(name))
    assert cells, name
    assert len({c.cell_id for c in cells}) == len(cells)


def test_expansion_pairs_eval_with_its_train_cell(write_profile):
    cells = expand(load_profile(str(write_profile(GOOD))))
    train = {c.model: c for c in cells if c.workload == "train"}
    evals = [c for c in cells if c.workload == "eval"]
    # the dense model is evaluated once; the looped one at each test-time loop count
    assert sorted((c.model, c.loops_test) for c in evals) == [
        ("gpt-micro", None), ("parcae-micro", 1), ("parcae-micro", 2)]
    assert all(c.depends_on == train[c.model].cell_id for c in evals)
    assert [c.workload for c in cells][:2] == ["train", "train"]


def test_cell_ids_are_stable_across_loads(write_profile):
    path = str(write_profile(GOOD))
    assert [c.cell_id for c in expand(load_profile(path))] == [c.cell_id for c in expand(load_profile(path))]


def test_extends_merges_settings_and_replaces_sweeps(write_profile):
    write_profile(GOOD, "base.toml")
    child = write_profile('[profile]\nextends = "base.toml"\n[train]\nbatch = 2\n'
                          '[[sweep]]\nmodel = "gpt-micro"\nworkload = "prefill"\n', "child.toml")
    prof = load_profile(str(child))
    assert prof.settings["train"] == {"tokens": 1000, "batch": 2}
    assert [c.workload for c in expand(prof)] == ["prefill"]


@pytest.mark.parametrize("text, expected", [
    ("[train]\ntokens = 'many'\n[[sweep]]\nmodel='gpt-micro'\nworkload='train'\n", "train.tokens = 'many' must be int"),
    ("[train]\ntokenz = 5\n[[sweep]]\nmodel='gpt-micro'\nworkload='train'\n", "unknown key train.tokenz"),
    ("[[sweep]]\nmodel='gpt-micro'\nworkload='train'\nloopz=[1]\n", "unknown axis 'loopz'"),
    ("[[sweep]]\nmodel='no-such-model'\nworkload='train'\n", "no-such-model"),
    ("[[sweep]]\nmodel='gpt-micro'\nworkload='sing'\n", "workload = 'sing'"),
    ("[[sweep]]\nmodel='gpt-micro'\nworkload='eval'\n", "needs a train cell"),
    ("[[sweep]]\nmodel='gpt-micro'\nworkload='prefill'\nbackend='numba'\ndevice='cuda'\n", "does not run on"),
    ("[models.bad]\npreset='gpt-micro'\nn_heads=3\n[[sweep]]\nmodel='bad'\nworkload='prefill'\n", "n_heads=3"),
    ("[profile]\nseed = 1\n", "at least one [[sweep]]"),
])
def test_bad_profile_is_reported_with_its_key(write_profile, text, expected):
    path = write_profile(text)
    with pytest.raises(ConfigError) as err:
        expand(load_profile(str(path)))
    assert expected in str(err.value)
    assert str(path) in str(err.value)


def test_all_problems_are_reported_together(write_profile):
    path = write_profile("[train]\ntokens = 'x'\nbatch = 'y'\n[[sweep]]\nmodel='gpt-micro'\nworkload='train'\n")
    with pytest.raises(ConfigError) as err:
        load_profile(str(path))
    assert "train.tokens" in str(err.value) and "train.batch" in str(err.value)


def test_cli_unknown_profile_exits_2_with_one_line():
    proc = run_cli("run", "--profile", "no-such-profile", "--dry-run")
    assert proc.returncode == 2
    assert "unknown profile 'no-such-profile'" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


def test_cli_toml_syntax_error_names_file_and_line(write_profile):
    path = write_profile("[profile]\nseed = = 3\n")
    proc = run_cli("run", "--profile", str(path), "--dry-run")
    assert proc.returncode == 2
    assert str(path) in proc.stderr and "line 2" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_cli_wrong_type_names_key(write_profile):
    path = write_profile("[eval]\nseeds = 1.5\n[[sweep]]\nmodel='gpt-micro'\nworkload='prefill'\n")
    proc = run_cli("run", "--profile", str(path), "--dry-run")
    assert proc.returncode == 2 and "eval.seeds = 1.5 must be int" in proc.stderr


def test_cli_unwritable_output_directory(write_profile, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    proc = run_cli("run", "--profile", "ci", "--out", str(blocker / "run"))
    assert proc.returncode == 2
    assert "cannot be written" in proc.stderr and "Traceback" not in proc.stderr


def test_cli_dry_run_prints_the_matrix():
    proc = run_cli("run", "--profile", "ci", "--dry-run")
    assert proc.returncode == 0, proc.stderr
    assert "train gpt-micro" in proc.stdout and "eval parcae-micro" in proc.stdout and "cells" in proc.stdout


def test_profile_numba_threading_is_validated_and_reaches_the_worker(write_profile):
    bad = write_profile('[profile]\nnumba_threading = "fast"\n[[sweep]]\nmodel = "gpt-micro"\nworkload = "prefill"\n')
    with pytest.raises(ConfigError, match=r"profile.numba_threading = 'fast': expected one of omp, workqueue, tbb"):
        expand(load_profile(str(bad)))
    script = ("from loopscope.bench.worker import apply_numba_threading; apply_numba_threading('omp'); "
              "import numpy as np, numba; from loopscope.kernels import ops_cpu; x = np.ones((4, 64), np.float32); "
              "ops_cpu.rmsnorm_rows(x, np.ones(64, np.float32), np.float32(1e-5), np.empty_like(x)); "
              "print(numba.threading_layer())")
    env = {k: v for k, v in os.environ.items() if k != "NUMBA_THREADING_LAYER"}
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "omp"
