"""The heavier multi-process train checks (about 3 min on 2 cores): FSDP against one process, looped
families on 2 ranks, and a 2-rank train cell with its eval cell through the CLI."""

from __future__ import annotations

import numpy as np
import pytest

from loopscope.bench.workloads import train as train_workload
from tests.conftest import run_cli
from tests.test_distributed import _cell, _losses, _row, check_matches_one_process, ctx, single  # noqa: F401  (fixtures)

pytestmark = pytest.mark.slow


def test_fsdp_matches_one_process(ctx, single):  # noqa: F811
    check_matches_one_process(ctx, single, "fsdp")


@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_looped_family_ranks_draw_the_same_loop_counts(ctx, parallel):  # noqa: F811
    one = train_workload.run(_cell("parcae-micro"), ctx)
    two = train_workload.run(_cell("parcae-micro", ranks=2, parallel=parallel), ctx)
    assert two.status == "ok", two.reason
    assert _row(two, "rank_loop_agreement")["value"] == 1.0
    assert _row(two, "spectral_radius")["value"] < 1.0  # the trained model's state rows (a plain copy)
    # Per-sequence loop counts and h0 are drawn per rank from the step's seed (so every rank runs the same
    # loops), not sliced from one global draw: the curves agree in distribution, not to the ulp.
    assert np.max(np.abs(_losses(two) - _losses(one))) < 0.05


def test_cli_run_with_a_two_rank_train_cell_and_its_eval(write_profile, tmp_path):
    import pandas as pd

    path = write_profile('[profile]\ncalibration = "off"\n[data]\nmax_bytes = 200_000\n'
                         '[train]\ntokens = 2048\nbatch = 4\nseq_len = 32\nworld_size = 2\n'
                         '[eval]\nmax_tokens = 1024\nseeds = 1\n'
                         '[[sweep]]\nmodel = "gpt-micro"\nworkload = ["train", "eval"]\n')
    proc = run_cli("run", "--profile", str(path), "--out", str(tmp_path / "run"), "--no-report")
    assert proc.returncode == 0, proc.stderr
    results = pd.read_parquet(tmp_path / "run" / "results.parquet")
    assert (results["status"] == "ok").all(), results[["metric", "reason"]]
    assert results.loc[results["metric"] == "world_size", "value"].tolist() == [2.0]
    assert results.loc[results["metric"] == "bpb", "value"].notna().all()
