"""Helpers shared by the workloads: building a cell's model, dtypes, devices."""

from __future__ import annotations

import torch

from loopscope.bench.matrix import Cell

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def build_model(cell: Cell, *, seed: int | None = None) -> torch.nn.Module:
    from loopscope.models import ModelConfig, build

    cfg = ModelConfig.from_dict(cell.model_config)
    return build(cfg, device=cell.device, seed=cell.seed if seed is None else seed)


def reseed(model: torch.nn.Module, seed: int) -> None:
    """Reseed the model's own generator (random h0, loop sampling); dense models have none."""
    fn = getattr(model, "reseed", None)
    if fn is not None:
        fn(seed)


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def autocast(cell: Cell) -> torch.autocast:
    """Mixed precision in the cell's dtype (fp32 weights, matmuls in bf16/fp16); float32 runs without it."""
    kind = "cuda" if cell.device.startswith("cuda") else "cpu"
    return torch.autocast(kind, dtype=DTYPES[cell.dtype], enabled=cell.dtype != "float32")


def loop_kwargs(cell: Cell) -> dict[str, int]:
    return {} if cell.loops_test is None else {"loops": int(cell.loops_test)}
