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


def idle_power_once(run_dir: str, device: str, seconds: float) -> dict:
    """The run's `idle_power_w` row for this device: measured by the first cell that needs it and kept in the run
    directory, so every later cell reads it instead of idling for seconds again."""
    import json
    from pathlib import Path

    from loopscope.bench.meters.energy import idle_power_row
    from loopscope.bench.store import atomic_write_text

    path = Path(run_dir) / f"idle_power_{device.replace(':', '_')}.json"
    try:
        row = json.loads(path.read_text())
        return {**row, "source": f"{row['source']} (measured once per run)"}
    except (OSError, ValueError, KeyError):
        pass
    row = idle_power_row(device, seconds=seconds)
    try:
        atomic_write_text(path, json.dumps(row))
    except OSError:
        pass  # a read-only run directory: the next cell measures it again
    return row


def autocast(cell: Cell) -> torch.autocast:
    """Mixed precision in the cell's dtype (fp32 weights, matmuls in bf16/fp16); float32 runs without it."""
    kind = "cuda" if cell.device.startswith("cuda") else "cpu"
    return torch.autocast(kind, dtype=DTYPES[cell.dtype], enabled=cell.dtype != "float32")


def loop_kwargs(cell: Cell) -> dict[str, int]:
    return {} if cell.loops_test is None else {"loops": int(cell.loops_test)}
