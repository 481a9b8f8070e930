"""One profile, three ways: the local executor, Ray on a local cluster, and --shard 0/2 + 1/2 + merge give
the same rows (cells, metrics, statuses); deterministic numbers (training loss, bits per byte) agree too.
Timing metrics differ from run to run by nature and are compared by presence only."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from tests.conftest import run_cli

TINY = str(Path(__file__).parents[1] / "tiny_cluster_profile.toml")
KEY = ["cell_id", "metric", "stat", "unit", "status"]
DETERMINISTIC = ("train_loss", "bpb", "params", "train_tokens", "train_steps")


def _rows(run: Path) -> pd.DataFrame:
    return pd.read_parquet(run / "results.parquet").sort_values(KEY).reset_index(drop=True)


def _three_ways(profile: str, tmp_path: Path) -> dict[str, pd.DataFrame]:
    runs = {}
    for name, extra in (("local", []), ("ray", ["--executor", "ray"]),
                        ("shard0", ["--shard", "0/2"]), ("shard1", ["--shard", "1/2"])):
        proc = run_cli("run", "--profile", profile, "--out", str(tmp_path / name), "--no-report", *extra,
                       timeout=1200)
        assert proc.returncode == 0, proc.stderr[-3000:]
        runs[name] = tmp_path / name
    merged = run_cli("merge", str(tmp_path / "merged"), str(runs["shard0"]), str(runs["shard1"]), "--no-report")
    assert merged.returncode == 0, merged.stderr
    return {name: _rows(tmp_path / name) for name in ("local", "ray", "merged")}


def _assert_same_rows(rows: dict[str, pd.DataFrame]) -> None:
    local = rows["local"]
    assert (local["status"] == "ok").all(), local[local["status"] != "ok"][["metric", "reason"]]
    for name in ("ray", "merged"):
        other = rows[name]
        assert other[KEY].equals(local[KEY]), name
        det = local["metric"].str.startswith(DETERMINISTIC)
        pd.testing.assert_series_equal(other.loc[det, "value"], local.loc[det, "value"], rtol=1e-6)
    assert rows["ray"]["node"].notna().all() and rows["ray"]["hardware"].notna().all()


@pytest.mark.slow
def test_tiny_profile_same_rows_local_ray_and_shards(tmp_path):
    pytest.importorskip("ray", reason="the ray executor needs Ray: pip install 'loopscope[ray]'")
    _assert_same_rows(_three_ways(TINY, tmp_path))


@pytest.mark.slow
def test_ci_profile_same_rows_local_ray_and_shards(tmp_path):
    pytest.importorskip("ray", reason="the ray executor needs Ray: pip install 'loopscope[ray]'")
    _assert_same_rows(_three_ways("ci", tmp_path))
