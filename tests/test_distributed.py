"""Multi-process train cells: 2 gloo ranks on CPU under torchrun train like one process with the same
global batch, and the profile keys are checked at load time."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from loopscope.bench.context import RunContext
from loopscope.bench.errors import ConfigError
from loopscope.bench.matrix import DEFAULTS, Cell, expand
from loopscope.bench.workloads import train as train_workload
from loopscope.bench.workloads.common import build_model
from loopscope.models import preset
from loopscope.profiles.loader import load_profile

pytestmark = pytest.mark.skipif(not torch.distributed.is_gloo_available(), reason="torch built without gloo")

# Same global batch, same data, same seed. The only arithmetic difference between 1 and 2 ranks is the
# order of the float32 gradient reduction (mean of two half-batch means vs one full-batch mean): about one
# ulp of the loss (~5e-7 at a loss of 4) per step, not amplified by Adam's normalisation over 8 steps
# (measured: 9.5e-7 at most). 2e-5 is 40 ulps: far below any real difference (a wrong data slice, a missing
# gradient all-reduce or a wrong learning rate move the loss by 1e-2 or more after the first step).
LOSS_ATOL = 2e-5


def _cell(model: str, ranks: int = 1, parallel: str = "auto") -> Cell:
    train = {**DEFAULTS["train"], "tokens": 8 * 8 * 32, "batch": 8, "seq_len": 32, "lr": 3e-3}
    if ranks > 1:
        train.update(world_size=ranks, parallel=parallel)
    return Cell(model=model, model_config=preset(model).to_dict(), workload="train", batch=8, seq_len=32, lr=3e-3,
                settings={"train": train, "data": {"corpus": "default", "max_bytes": 200_000, "tokenizer": "bytes"}})


def _losses(result) -> np.ndarray:
    return np.array([s["value"] for s in result.samples if s["metric"] == "train_loss"])


def _row(result, metric: str, stat: str = "") -> dict:
    return next(r for r in result.rows if r["metric"] == metric and r.get("stat", "") == stat)


@pytest.fixture(scope="module")
def ctx(tmp_path_factory) -> RunContext:
    run_dir = tmp_path_factory.mktemp("run")
    (run_dir / "checkpoints").mkdir()
    return RunContext(run_dir=str(run_dir), threads=1)


@pytest.fixture(scope="module")
def single(ctx):
    return train_workload.run(_cell("gpt-micro"), ctx)


def test_two_gloo_ranks_match_one_process_with_the_same_global_batch(ctx, single):
    check_matches_one_process(ctx, single, "ddp")  # fsdp: tests/benchmarks/test_distributed_heavy.py


def check_matches_one_process(ctx: RunContext, single, parallel: str) -> None:
    cell = _cell("gpt-micro", ranks=2, parallel=parallel)
    result = train_workload.run(cell, ctx)  # the train workload hands world_size > 1 to torchrun
    assert result.status == "ok", result.reason
    one, two = _losses(single), _losses(result)
    assert len(one) == len(two) == 8
    np.testing.assert_allclose(two, one, rtol=0, atol=LOSS_ATOL)
    assert one[0] - one[-1] > 1.0  # it really trained
    assert _row(result, "world_size")["value"] == 2
    assert _row(result, "rank_loop_agreement")["value"] == 1.0
    assert parallel in _row(result, "tokens_per_s", "mean")["source"]
    assert _row(result, "tokens_per_s", "mean")["value"] > 0
    assert _row(result, "peak_mem_bytes", "sum_ranks")["value"] >= _row(result, "peak_mem_bytes", "max_rank")["value"]
    assert {"energy_j_per_token", "avg_power_w", "mfu"} <= {r["metric"] for r in result.rows}
    # the checkpoint the eval cells read is the plain model's state dict (FSDP's shards gathered)
    model = build_model(cell)
    model.load_state_dict(load_file(str(train_workload.checkpoint_path(ctx, cell))), strict=True)


@pytest.mark.parametrize("line, message", [
    ("world_size = 0", r"train.world_size = 0 is out of range: expected a value in \[1, 4096\]"),
    ('world_size = "2"', "train.world_size = '2' must be int"),
    ('parallel = "zero"', "train.parallel = 'zero' must be one of auto, ddp, fsdp"),
    ("world_size = 3", "train.world_size = 3 does not divide the batch 8"),
])
def test_bad_world_size_is_refused_at_load_time(write_profile, line, message):
    path = write_profile(f'[train]\nbatch = 8\n{line}\n[[sweep]]\nmodel = "gpt-micro"\nworkload = "train"\n')
    with pytest.raises(ConfigError, match=message) as err:
        expand(load_profile(str(path)))
    assert str(path) in str(err.value)


def test_world_size_is_part_of_the_cell(write_profile):
    base = '[[sweep]]\nmodel = "gpt-micro"\nworkload = "train"\n'
    one = expand(load_profile(str(write_profile(base, "one.toml"))))[0]
    two = expand(load_profile(str(write_profile("[train]\nworld_size = 2\n" + base, "two.toml"))))[0]
    assert one.cell_id != two.cell_id and "world_size" not in one.settings["train"]
