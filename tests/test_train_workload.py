"""The train workload in-process: divergence is detected, and an interrupted cell resumes exactly."""

from __future__ import annotations

import math

import pytest
import torch

from loopscope.bench.context import RunContext
from loopscope.bench.errors import ConfigError
from loopscope.bench.matrix import DEFAULTS, Cell, expand
from loopscope.bench.workloads import Diverged, train
from loopscope.bench.workloads.budgets import token_budget
from loopscope.bench.workloads.optimizers import build_optimizers, muon_split
from loopscope.models import build, preset
from loopscope.profiles.loader import load_profile


def _cell(model: str = "parcae-micro", steps: int = 12, every: int = 0, optimizer: str = "adamw") -> Cell:
    settings = {"train": {**DEFAULTS["train"], "tokens": steps * 4 * 32, "checkpoint_every": every,
                          "optimizer": optimizer},
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


@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
def test_interrupted_train_cell_resumes_to_the_same_final_loss(ctx, monkeypatch, optimizer):
    cell = _cell(every=5, optimizer=optimizer)
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
    assert token_budget(per_param) == int(2.0 * param_counts(cfg).unique)
    iso_flop = Cell(**{**cell.to_dict(), "settings": {**cell.settings, "train": {
        **cell.settings["train"], "flops": 1e12}}})
    assert token_budget(iso_flop) == int(1e12 / flops_per_token(cfg, 32, mode="train"))
    assert math.isfinite(token_budget(cell))


def test_muon_takes_the_block_matrices_and_adamw_the_rest():
    model = build("parcae-micro")
    muon, rest = muon_split(model)
    names = {id(p): n for n, p in model.named_parameters()}
    muon_names = {names[id(p)] for p in muon}
    rest_names = {names[id(p)] for p in rest}
    assert "core.0.attn.q.weight" in muon_names and "prelude.0.mlp.proj.weight" in muon_names
    assert {"wte.weight", "injection.B", "readout.weight"} <= rest_names  # as Parcae's Table 20
    assert all(p.ndim == 2 for p in muon)
    assert len(muon) + len(rest) == len(list(model.parameters()))
    opt = build_optimizers(model, {**DEFAULTS["train"], "optimizer": "muon"})
    assert [type(o).__name__ for o in opt.parts] == ["AdamW", "Muon"]


def test_epochs_are_training_tokens_over_the_split(ctx):
    result = train.run(_cell("gpt-micro", steps=3), ctx)
    rows = {r["metric"]: r for r in result.rows}
    split = int(rows["train_epochs"]["source"].split("the ")[1].split("-token")[0].replace(",", ""))
    assert rows["train_epochs"]["value"] == pytest.approx(3 * 4 * 32 / split)
    assert 100_000 < split < 200_000  # max_bytes 200k, minus the held-out share


def test_muon_training_lowers_the_loss(ctx):
    result = train.run(_cell("gpt-micro", steps=30, optimizer="muon"), ctx)
    losses = _losses(result)
    assert sum(losses[-5:]) / 5 < losses[0] - 0.5


def test_an_unknown_optimizer_is_a_config_error(tmp_path):
    path = tmp_path / "p.toml"
    path.write_text('[train]\noptimizer = "sgd"\n[[sweep]]\nmodel = "gpt-micro"\nworkload = "train"\n')
    with pytest.raises(ConfigError, match=r"p.toml: train.optimizer = 'sgd': expected one of adamw, muon"):
        expand(load_profile(str(path)))
