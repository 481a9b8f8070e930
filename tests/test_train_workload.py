"""The train workload in-process: divergence is detected, and an interrupted cell resumes exactly."""

from __future__ import annotations

import math

import pytest
import torch

from loopscope.bench.context import RunContext
from loopscope.bench.matrix import DEFAULTS, Cell
from loopscope.bench.workloads import Diverged, train
from loopscope.models import preset


def _cell(model: str = "parcae-micro", steps: int = 12, every: int = 0) -> Cell:
    settings = {"train": {**DEFAULTS["train"], "tokens": steps * 4 * 32, "checkpoint_every": every},
                "data": {**DEFAULTS["data"], "max_bytes": 200_000}}
    return Cell(model=model, model_config=preset(model).to_dict(), workload="train", batch=4, seq_len=32,
                lr=3e-3, settings=settings)


@pytest.fixture
def ctx(tmp_path):
    (tmp_path / "checkpoints").mkdir()
    torch.set_num_threads(1)  # bitwise-reproducible steps
    return RunContext(run_dir=str(tmp_path))


def _losses(result) -> list[float]:
    return [s["value"] for s in result.samples if s["metric"] == "train_loss"]


def test_interrupted_train_cell_resumes_to_the_same_final_loss(ctx, monkeypatch):
    cell = _cell(every=5)
    full = train.run(cell, ctx)
    (ctx.checkpoints_dir / f"{cell.cell_id}.safetensors").unlink()

    real_lr_at = train.lr_at

    def crash_at_step_7(step, *args):
        if step == 7:
            raise KeyboardInterrupt("simulated kill")
        return real_lr_at(step, *args)

    monkeypatch.setattr(train, "lr_at", crash_at_step_7)
    with pytest.raises(KeyboardInterrupt):
        train.run(cell, ctx)
    assert (ctx.checkpoints_dir / f"{cell.cell_id}.partial.safetensors").is_file()
    monkeypatch.setattr(train, "lr_at", real_lr_at)

    resumed = train.run(cell, ctx)
    assert any(r["metric"] == "resumed_from_step" and r["value"] == 5 for r in resumed.rows)
    assert _losses(resumed) == _losses(full)  # bitwise: same data order, RNG and optimizer state
    final = {r["metric"]: r["value"] for r in resumed.rows if r["stat"] == "" or r["metric"] == "train_loss"}
    assert final["train_loss"] == next(r["value"] for r in full.rows if r["metric"] == "train_loss")
    assert not (ctx.checkpoints_dir / f"{cell.cell_id}.partial.safetensors").exists()


def test_non_finite_loss_ends_the_cell_as_diverged(ctx, monkeypatch):
    real_build = train.build_model

    def poisoned(cell):
        model = real_build(cell)
        with torch.no_grad():
            model.ln_f.weight.fill_(float("nan"))
        return model

    monkeypatch.setattr(train, "build_model", poisoned)
    with pytest.raises(Diverged) as err:
        train.run(_cell(model="gpt-micro"), ctx)
    result = err.value.result
    assert result.status == "diverged" and "step 0" in result.reason
    assert [r["value"] for r in result.rows if r["metric"] == "diverged_step"] == [0]


def test_budgets_in_tokens_per_param_and_flops():
    from loopscope.models import ModelConfig, flops_per_token, param_counts

    cell = _cell()
    cfg = ModelConfig.from_dict(cell.model_config)
    per_param = Cell(**{**cell.to_dict(), "settings": {**cell.settings, "train": {
        **cell.settings["train"], "tokens_per_param": 2.0}}})
    assert train.token_budget(per_param) == int(2.0 * param_counts(cfg).unique)
    iso_flop = Cell(**{**cell.to_dict(), "settings": {**cell.settings, "train": {
        **cell.settings["train"], "flops": 1e12}}})
    assert train.token_budget(iso_flop) == int(1e12 / flops_per_token(cfg, 32, mode="train"))
    assert math.isfinite(train.token_budget(cell))
