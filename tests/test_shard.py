"""--shard: a deterministic, complete, non-overlapping split that keeps eval cells with their train cell."""

from __future__ import annotations

import pytest

from loopscope.bench.errors import ConfigError
from loopscope.bench.matrix import expand
from loopscope.bench.shard import Shard, parse_shard, shard_cells
from loopscope.profiles.loader import load_profile
from tests.conftest import run_cli


@pytest.fixture(scope="module")
def ci_cells():
    return expand(load_profile("ci"))


@pytest.mark.parametrize("count", [1, 2, 3, 5])
def test_shards_cover_the_matrix_once_and_keep_eval_with_its_train_cell(ci_cells, count):
    shards = [shard_cells(ci_cells, Shard(i, count)) for i in range(count)]
    ids = [c.cell_id for s in shards for c in s]
    assert sorted(ids) == sorted(c.cell_id for c in ci_cells)  # complete, no overlap
    for cells in shards:
        mine = {c.cell_id for c in cells}
        assert all(c.depends_on in mine for c in cells if c.depends_on)
        # the matrix's order (train before eval) is kept inside a shard
        order = [c.cell_id for c in ci_cells if c.cell_id in mine]
        assert [c.cell_id for c in cells] == order
    sizes = [len(s) for s in shards]
    assert max(sizes) - min(sizes) <= 4  # groups are dealt round-robin (a train cell carries 3 evals)


def test_the_split_does_not_depend_on_the_order_of_the_matrix(ci_cells):
    a = shard_cells(ci_cells, Shard(1, 2))
    b = shard_cells(list(reversed(ci_cells)), Shard(1, 2))
    assert {c.cell_id for c in a} == {c.cell_id for c in b}


def test_parse_given_and_from_the_scheduler():
    assert parse_shard("1/4", env={}) == Shard(1, 4, "given")
    slurm = {"SLURM_ARRAY_TASK_ID": "3", "SLURM_ARRAY_TASK_MIN": "1", "SLURM_ARRAY_TASK_COUNT": "4"}
    assert parse_shard("auto", env=slurm) == Shard(2, 4, "SLURM_ARRAY_TASK_ID")
    assert parse_shard("auto/3", env={"JOB_COMPLETION_INDEX": "2"}) == Shard(2, 3, "JOB_COMPLETION_INDEX")


@pytest.mark.parametrize("spec, env, message", [
    ("2/2", {}, "need 0 <= index < count"),
    ("-1/2", {}, "need 0 <= index < count"),
    ("a/2", {}, "index 'a' is not a whole number"),
    ("3", {}, "expected i/n"),
    ("auto", {}, "neither SLURM_ARRAY_TASK_ID nor JOB_COMPLETION_INDEX"),
    ("auto", {"JOB_COMPLETION_INDEX": "0"}, "use --shard auto/n"),
    ("auto/2", {"JOB_COMPLETION_INDEX": "5"}, "index 5 and count 2"),
])
def test_bad_shards_are_refused_with_the_value(spec, env, message):
    with pytest.raises(ConfigError, match=message):
        parse_shard(spec, env=env)


def test_cli_dry_run_of_a_shard_lists_only_its_cells(ci_cells):
    proc = run_cli("run", "--profile", "ci", "--shard", "0/2", "--dry-run")
    assert proc.returncode == 0, proc.stderr
    expected = shard_cells(ci_cells, Shard(0, 2))
    assert f"{len(expected)} cells" in proc.stdout
    assert all(c.cell_id in proc.stdout for c in expected)
    bad = run_cli("run", "--profile", "ci", "--shard", "2/2", "--dry-run")
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "--shard 2/2" in bad.stderr
