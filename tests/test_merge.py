"""`loopscope merge`: shards become one run; runs that do not belong together are refused, nothing written."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pandas as pd
import pytest

from loopscope.bench.context import RunContext
from loopscope.bench.errors import LoopscopeError
from loopscope.bench.executors import make_executor
from loopscope.bench.matrix import Cell
from loopscope.bench.merge import merge_runs
from loopscope.bench.store import RunStore
from loopscope.models import preset
from tests.conftest import run_cli

FAKE = [sys.executable, str(Path(__file__).with_name("fake_worker.py"))]


def _cell(action: str, batch: int = 1) -> Cell:
    return Cell(model=action, model_config=preset("gpt-micro").to_dict(), workload="prefill", batch=batch,
                timeout_s=20.0)


def _run(path: Path, cells: list[Cell], profile_hash: str = "h1") -> Path:
    """A run directory written by the local executor (with the stand-in worker) and a minimal manifest."""
    store = RunStore(path)
    store.create()
    store.write_manifest({"run_id": store.run_id, "profile": {"name": "p", "hash": profile_hash},
                          "fingerprint": {"cpu": {"model": "test cpu"}}, "cell_ids": [c.cell_id for c in cells],
                          "cells": len(cells)})
    ex = make_executor("local", store, RunContext(run_dir=str(path)), worker_cmd=FAKE)
    ex.run_all(cells, {})
    (store.checkpoints_dir / f"{cells[0].cell_id}.safetensors").write_bytes(b"weights")
    store.write_tables()
    return path


@pytest.fixture
def shards(tmp_path):
    a = _run(tmp_path / "shard0", [_cell("ok", 1), _cell("raise", 2)])
    b = _run(tmp_path / "shard1", [_cell("ok", 3)])
    return a, b


def test_merge_keeps_every_cell_and_manifest(tmp_path, shards):
    out = tmp_path / "merged"
    assert merge_runs(out, list(shards), report=False) == 3
    results = pd.read_parquet(out / "results.parquet")
    assert results["cell_id"].nunique() == 3
    assert set(results["run_id"]) == {"merged"}
    assert sorted(results["status"]) == ["error", "ok", "ok"]  # a failed cell stays a status row
    manifest = json.loads((out / "manifest.json").read_text())
    assert [m["run_dir"] for m in manifest["merged_from"]] == [str(s) for s in shards]
    assert manifest["merged_from"][0]["manifest"]["run_id"] == "shard0"
    assert manifest["cells"] == 3 and len(manifest["cell_ids"]) == 3
    assert len(list((out / "checkpoints").glob("*.safetensors"))) == 2
    # the merged run resumes like any run: its cells are all done
    assert set(RunStore(out).read_cells()) == set(manifest["cell_ids"])


def test_merge_refuses_duplicate_cells_and_writes_nothing(tmp_path, shards):
    dup = _run(tmp_path / "again", [_cell("ok", 3)])
    with pytest.raises(LoopscopeError, match=r"again: cell \w{12} is also in .*shard1"):
        merge_runs(tmp_path / "merged", [*shards, dup], report=False)
    assert not (tmp_path / "merged").exists()


def test_merge_refuses_another_profile(tmp_path, shards):
    other = _run(tmp_path / "other", [_cell("ok", 4)], profile_hash="h2")
    with pytest.raises(LoopscopeError, match="other: profile hash h2 differs from .*shard0's h1"):
        merge_runs(tmp_path / "merged", [*shards, other], report=False)


def test_cli_merge_errors_are_one_line_and_exit_2(tmp_path, shards):
    other = _run(tmp_path / "other", [_cell("ok", 4)], profile_hash="h2")
    proc = run_cli("merge", str(tmp_path / "merged"), *map(str, shards), str(other), "--no-report")
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and "profile hash h2" in proc.stderr
    missing = run_cli("merge", str(tmp_path / "m2"), str(shards[0]), str(tmp_path / "nope"), "--no-report")
    assert missing.returncode == 2 and "not a run directory" in missing.stderr
    ok = run_cli("merge", str(tmp_path / "m3"), *map(str, shards), "--no-report")
    assert ok.returncode == 0 and "3 cells" in ok.stdout
    again = run_cli("merge", str(tmp_path / "m3"), *map(str, shards), "--no-report")
    assert again.returncode == 2 and "already holds a run" in again.stderr
