"""What a cell will cost, from its settings and the model accounting alone: its token budget, its
analytic memory, whether its ranks split the batch. Torch-free, so the parent process (expansion,
`--dry-run`, the memory check before a run) can use it without paying for `import torch`."""

from __future__ import annotations

from loopscope.bench.matrix import Cell
from loopscope.bench.meters.memory import estimate_row
from loopscope.bench.schema import metric_row

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


def token_budget(cell: Cell) -> int:
    """Tokens to train on: given directly, per unique parameter, or from a FLOP budget (iso-FLOP)."""
    from loopscope.models import ModelConfig, flops_per_token, param_counts

    train = cell.settings["train"]
    cfg = ModelConfig.from_dict(cell.model_config)
    if train.get("flops"):
        return int(train["flops"] / flops_per_token(cfg, cell.seq_len, mode="train"))
    if train.get("tokens_per_param"):
        return int(train["tokens_per_param"] * param_counts(cfg).unique)
    return int(train["tokens"])


def analytic_memory_rows(cell: Cell) -> list[dict]:
    """Weights, KV cache and the estimated peak of an inference cell, from the model accounting."""
    from loopscope.models import ModelConfig, kv_bytes_per_token, param_counts

    cfg = ModelConfig.from_dict(cell.model_config)
    dtype_bytes = DTYPE_BYTES[cell.dtype]
    weights = param_counts(cfg).unique * dtype_bytes
    kv = kv_bytes_per_token(cfg, cell.loops_test, dtype_bytes=dtype_bytes,
                            policy=cell.kv_policy or "per-loop") * cell.batch * cell.seq_len
    # Live activations of one layer at a time in inference: residual, qkv, MLP hidden, logits.
    d_ff = cfg.d_ff or 4 * cfg.d_model
    act = cell.batch * cell.seq_len * (4 * cfg.d_model + d_ff + cfg.vocab_size) * dtype_bytes
    src = "analytic (model accounting)"
    return [metric_row("weights_bytes", weights, "bytes", source=src),
            metric_row("kv_cache_bytes", kv, "bytes", stat="analytic", source=src),
            estimate_row(weights, kv, act)]


def world_size(cell: Cell) -> int:
    return int(cell.settings.get("train", {}).get("world_size", 1))


def world_size_errors(where: str, cells: list[Cell]) -> list[str]:
    """Load-time checks of multi-process train cells: the global batch must split evenly over the ranks."""
    return [f"{where}: train.world_size = {world_size(c)} does not divide the batch {c.batch} of cell "
            f"{c.label!r}; make the batch a multiple of world_size"
            for c in cells if c.workload == "train" and c.batch % world_size(c)]
