"""Training workload: equal token budget, data order and seed for every model in a comparison.

AdamW (or Muon for the block matrices, optimizers.py) with a trapezoid schedule (warm-up, constant,
linear cool-down), gradient clipping, bf16 autocast on GPU, each family's own loop sampling (inside the
model's training forward). A non-finite loss ends the cell as `diverged` with the step; spikes above
`spike_factor` x the running median are counted. State is checkpointed with safetensors so an interrupted cell resumes.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from loopscope.bench.context import RunContext
from loopscope.bench.corpus import load_corpus
from loopscope.bench.matrix import Cell
from loopscope.bench.schema import metric_row, unmeasured
from loopscope.bench.tokenizer import tokenize
from loopscope.bench.workloads import Diverged, WorkloadResult
from loopscope.bench.workloads.budgets import token_budget
from loopscope.bench.workloads.common import autocast, build_model, reseed, synchronize
from loopscope.bench.workloads.optimizers import Optimizers, build_optimizers

SPIKE_WINDOW = 50
STATS_POINTS = 25  # how many times per training run the loop stability diagnostics are sampled


def lr_at(step: int, total: int, peak: float, warmup_frac: float, cooldown_frac: float) -> float:
    """Trapezoid: linear warm-up, constant, linear cool-down to zero over the last cooldown_frac."""
    warmup = max(int(total * warmup_frac), 0)
    cooldown = max(int(total * cooldown_frac), 1)
    if step < warmup:
        return peak * (step + 1) / warmup
    if step >= total - cooldown:
        return peak * max(total - step, 0) / cooldown
    return peak


def batch_offsets(n_tokens: int, seq_len: int, batch: int, steps: int, seed: int) -> np.ndarray:
    """Window starts for every step, fixed by the seed alone: the same data order for every model."""
    rng = np.random.default_rng(seed)
    return rng.integers(0, n_tokens - seq_len - 1, size=(steps, batch))


def get_batch(data: np.ndarray, starts: np.ndarray, seq_len: int, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    idx = starts[:, None] + np.arange(seq_len + 1)[None, :]
    chunk = torch.from_numpy(data[idx].astype(np.int64))
    return chunk[:, :-1].to(device), chunk[:, 1:].to(device)


def save_state(path: Path, model: torch.nn.Module, opt: Optimizers, step: int, losses: list[float]) -> None:
    """Model, optimizer moments (numbered in `opt.params()` order), step and loss curve as one safetensors
    file (no pickling)."""
    tensors = {f"model.{k}": v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    for i, (part, param) in enumerate(opt.params()):
        for key, value in part.state.get(param, {}).items():
            tensors[f"opt.{i}.{key}"] = torch.as_tensor(value).detach().contiguous().cpu()
    tensors["meta.step"] = torch.tensor([step], dtype=torch.int64)
    tensors["meta.losses"] = torch.tensor(losses, dtype=torch.float64)
    tmp = path.with_suffix(".tmp")
    save_file(tensors, str(tmp))
    tmp.replace(path)


def load_state(path: Path, model: torch.nn.Module, opt: Optimizers) -> tuple[int, list[float]]:
    tensors = load_file(str(path))
    model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
    for i, (part, param) in enumerate(opt.params()):
        state = {k.split(".", 2)[2]: v for k, v in tensors.items() if k.startswith(f"opt.{i}.")}
        if state:
            part.state[param] = {k: (v.to(param.device) if k != "step" else v) for k, v in state.items()}
    return int(tensors["meta.step"][0]), tensors["meta.losses"].tolist()


def checkpoint_path(ctx: RunContext, cell: Cell, *, partial: bool = False) -> Path:
    return ctx.checkpoints_dir / f"{cell.cell_id}{'.partial' if partial else ''}.safetensors"


def run(cell: Cell, ctx: RunContext) -> WorkloadResult:
    from loopscope.models import ModelConfig, flops_per_token

    train = cell.settings["train"]
    if int(train.get("world_size", 1)) > 1:  # several processes under torchrun (DDP / FSDP)
        from loopscope.bench.workloads.distributed import run as run_distributed

        return run_distributed(cell, ctx)
    data_cfg = cell.settings["data"]
    corpus = load_corpus(data_cfg["corpus"], max_bytes=data_cfg["max_bytes"])
    tok = tokenize(corpus, data_cfg["tokenizer"], Path(ctx.run_dir) / "tokenizers")
    cfg = ModelConfig.from_dict(cell.model_config)
    tokens = token_budget(cell)
    steps = max(tokens // (cell.batch * cell.seq_len), 1)
    offsets = batch_offsets(len(tok.train), cell.seq_len, cell.batch, steps, cell.seed)

    from loopscope.bench.engines import backend_for

    torch.manual_seed(cell.seed)
    backend = backend_for(cell)
    model = backend.prepare_model(build_model(cell))
    model.train()
    opt = build_optimizers(model, {**train, "lr": cell.lr})
    partial = checkpoint_path(ctx, cell, partial=True)
    start, losses = (load_state(partial, model, opt) if partial.is_file() else (0, []))
    result = WorkloadResult()
    if start:
        result.rows.append(metric_row("resumed_from_step", start, "step", source="checkpoint"))

    amp = autocast(cell)  # the cell's dtype, as labelled: float32 runs in fp32 on every device
    step_times: list[float] = []
    spikes = 0
    every = int(train["checkpoint_every"])
    stats_every = max(steps // STATS_POINTS, 1)
    for step in range(start, steps):
        t0 = time.perf_counter()
        reseed(model, cell.seed * 1_000_003 + step)  # loop counts and h0 depend on the step only
        for group in opt.param_groups:
            group["lr"] = lr_at(step, steps, cell.lr, train["warmup_frac"], train["cooldown_frac"])
        x, y = get_batch(tok.train, offsets[step], cell.seq_len, cell.device)
        stats = {} if (step % stats_every == 0 or step == steps - 1) and cell.family != "gpt" else None
        with amp:  # the family's own objective: cross-entropy (+ the ACT ponder cost for ut)
            loss = model.compute_loss(x, y, stats=stats)
        value = float(loss.detach())
        if not math.isfinite(value):
            result.status, result.reason = "diverged", f"non-finite loss ({value}) at step {step}"
            result.engine = backend.model_engine_name(model)
            result.rows.append(metric_row("diverged_step", step, "step"))
            result.add_samples("train_loss", "nats/token", losses)
            raise Diverged(result.reason, result)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), float(train["grad_clip"]))
        opt.step()
        synchronize(cell.device)
        step_times.append(time.perf_counter() - t0)
        window = losses[-SPIKE_WINDOW:]
        if len(window) >= 10 and value > float(train["spike_factor"]) * float(np.median(window)):
            spikes += 1
        losses.append(value)
        if stats:
            _record_loop_stats(result, stats, step)
        if every and (step + 1) % every == 0 and step + 1 < steps:
            save_state(partial, model, opt, step + 1, losses)

    final = checkpoint_path(ctx, cell)
    save_file({k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}, str(final))
    partial.unlink(missing_ok=True)

    tail = losses[-max(len(losses) // 10, 1):]
    objective = "cross-entropy + ponder cost" if cell.family == "ut" else "cross-entropy"
    result.rows.append(metric_row("train_loss", float(np.mean(tail)), "nats/token", n_samples=len(tail),
                                  source=f"training objective ({objective}), mean of the last {len(tail)} steps"))
    result.rows.append(metric_row("train_tokens", steps * cell.batch * cell.seq_len, "tokens", source="budget"))
    result.rows.append(metric_row("train_steps", steps, "steps", source="budget"))
    result.rows.append(metric_row("train_epochs", steps * cell.batch * cell.seq_len / len(tok.train), "epochs",
                                  source=f"training tokens / the {len(tok.train):,}-token training split (above 1: "
                                         "windows repeat)"))
    result.rows.append(metric_row("loss_spikes", spikes, "count",
                                  source=f"loss > {train['spike_factor']} x running median"))
    timed = step_times[1:] if len(step_times) > 1 else step_times  # the first step pays allocation
    if timed:
        tps = len(timed) * cell.batch * cell.seq_len / sum(timed)
        result.rows.append(metric_row("tokens_per_s", tps, "tokens/s", stat="mean",
                                      source="train steps after the first", n_samples=len(timed)))
        flops = flops_per_token(cfg, cell.seq_len, mode="train") * tps
        peak = ctx.peak_flops(cell.dtype if cell.device.startswith("cuda") else "float32")
        if math.isfinite(peak):
            result.rows.append(metric_row("mfu", flops / peak, "fraction",
                                          source="model FLOPs (PaLM: no recompute) / calibrated GEMM peak"))
        else:
            result.rows.append(unmeasured("mfu", "fraction", "unavailable: no calibration in this run"))
        result.add_samples("step_time_ms", "ms", [t * 1e3 for t in timed])
    else:
        result.rows.append(unmeasured("tokens_per_s", "tokens/s", "unavailable: resumed after the last step"))
    result.add_samples("train_loss", "nats/token", losses)
    result.engine = backend.model_engine_name(model)
    result.rows.extend(_state_rows(model, tok.val, cell))
    if ctx.trace:  # activation memory vs loop count and mu_bwd: a few one-sequence forwards, no steps
        from loopscope.bench.profiling import activation_rows

        result.rows.extend(activation_rows(model, *get_batch(tok.train, offsets[0][:1], cell.seq_len, cell.device)))
    return result


def _record_loop_stats(result: WorkloadResult, stats: dict, step: int) -> None:
    """Stability over training: rho(A_bar) (parcae), adapter norm (rdm), last-loop state norm."""
    for key in ("spectral_radius", "adapter_spectral_norm", "final_residual"):
        if key in stats:
            result.samples.append({"metric": key, "unit": "", "index": step, "value": float(stats[key])})
    if stats.get("state_norm"):
        result.samples.append({"metric": "state_norm_last_loop", "unit": "l2", "index": step,
                               "value": float(stats["state_norm"][-1])})


@torch.no_grad()
def _state_rows(model: torch.nn.Module, val: np.ndarray, cell: Cell) -> list[dict]:
    """Per-loop state norms and stability proxies of the trained model, on one held-out batch."""
    if cell.family == "gpt":
        return []
    model.eval()
    reseed(model, cell.seed)
    starts = np.arange(min(cell.batch, 4)) * cell.seq_len
    x, _ = get_batch(val, starts, cell.seq_len, cell.device)
    stats: dict = {}
    model(x, loops=cell.loops_train, stats=stats)
    rows = [metric_row("state_norm", v, "l2", stat=f"loop{i + 1}", source="held-out batch")
            for i, v in enumerate(stats.get("state_norm", []))]
    for key in ("spectral_radius", "final_residual", "adapter_spectral_norm"):
        if key in stats:
            rows.append(metric_row(key, float(stats[key]), "", source="held-out batch"))
    return rows
