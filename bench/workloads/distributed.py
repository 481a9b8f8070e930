"""A train cell on several processes: `[train] world_size = N` (torch.distributed, launched with torchrun).

The cell's worker process starts `python -m torch.distributed.run --standalone --nproc_per_node N` on this
module; every rank trains the same model (DDP, or FSDP for models of FSDP_MIN_PARAMS and more: the 770m and
1.3b presets) on its slice of each step's global batch, so the data order, the schedule and the loss are
those of one process with the same global batch. The loop counts (and h0) are drawn from the step's seed
on every rank, so all ranks run the same number of loops in a step and none waits for another.
Rank 0 writes the result: tokens/s over all ranks, MFU against the peak of all ranks' devices, peak memory
summed (and the largest) over the ranks, energy of all ranks' devices (NVML per GPU; RAPL counts the whole
CPU package, which the CPU ranks share). Uses gloo on CPU and NCCL on CUDA.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from loopscope.bench.context import RunContext
from loopscope.bench.matrix import Cell
from loopscope.bench.schema import metric_row, unmeasured
from loopscope.bench.workloads import WorkloadResult
from loopscope.bench.workloads.budgets import world_size
from loopscope.bench.workloads.common import build_model, reseed, synchronize

FSDP_MIN_PARAMS = 500_000_000  # the 770m and 1.3b presets; smaller models replicate (DDP)
STDERR_TAIL = 3000


def strategy(cell: Cell) -> str:
    from loopscope.models import ModelConfig, param_counts

    chosen = str(cell.settings["train"].get("parallel", "auto"))  # [train] parallel: auto, ddp or fsdp
    if chosen != "auto":
        return chosen
    return "fsdp" if param_counts(ModelConfig.from_dict(cell.model_config)).unique >= FSDP_MIN_PARAMS else "ddp"


# --- the launcher (in the cell's worker process) -------------------------------------------------------
def run(cell: Cell, ctx: RunContext) -> WorkloadResult:
    n = world_size(cell)
    if cell.batch % n:
        raise ValueError(f"train.batch = {cell.batch} does not split over world_size = {n} ranks; "
                         "make the global batch a multiple of world_size")
    with tempfile.TemporaryDirectory(prefix="loopscope-ranks-") as tmp:
        job = Path(tmp)
        (job / "cell.json").write_text(json.dumps(cell.to_dict()))
        (job / "context.json").write_text(json.dumps(ctx.to_dict()))
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}",
               "-m", "loopscope.bench.workloads.distributed", str(job)]
        env = {**os.environ, "OMP_NUM_THREADS": str(ctx.threads or max((os.cpu_count() or 1) // n, 1))}
        with open(job / "stderr.txt", "wb") as err:
            proc = subprocess.run(cmd, stdout=err, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env)
        if not (job / "result.json").is_file():
            tail = (job / "stderr.txt").read_bytes()[-STDERR_TAIL:].decode("utf-8", "replace")
            print(tail, file=sys.stderr)
            raise RuntimeError(f"torchrun with {n} ranks exited with code {proc.returncode} and no result "
                               f"(last line: {(tail.strip().splitlines() or [''])[-1][:300]})")
        data = json.loads((job / "result.json").read_text())
    return WorkloadResult(rows=data["rows"], samples=data["samples"], status=data["status"],
                          reason=data["reason"])


# --- one rank (a torchrun process) ---------------------------------------------------------------------
class Objective(torch.nn.Module):
    """The family's training objective as a forward, so the DDP/FSDP wrapper sees the whole computation
    (the ut family adds its ponder cost outside its forward)."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.inner = model

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.inner.compute_loss(x, y)


def _wrap(objective: Objective, how: str, device: torch.device, looped: bool) -> torch.nn.Module:
    if how == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        # looped families may leave a parameter unused in a step (e.g. a loop count below the core's reach)
        return DistributedDataParallel(objective, device_ids=[device.index] if device.type == "cuda" else None,
                                       find_unused_parameters=looped)
    if how == "fsdp":  # FSDP2: parameters become DTensor shards, gathered around each use
        from torch.distributed.fsdp import fully_shard

        from loopscope.models.blocks import Block

        if not looped:  # each block is used once per forward: shard (and gather) it on its own
            for block in [m for m in objective.modules() if isinstance(m, Block)]:
                fully_shard(block)
        # a looped core runs several times per forward: its blocks stay in the root's one gathered unit
        return fully_shard(objective)
    raise ValueError(f"train.parallel = {how!r}: expected ddp or fsdp")


def _full_state(model: torch.nn.Module, how: str) -> dict[str, torch.Tensor]:
    """The unsharded model weights (on rank 0 for FSDP), keyed as the plain model's state dict."""
    if how == "fsdp":  # every rank takes part in the gather; the full tensors land on CPU
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        return {k.removeprefix("inner."): v for k, v in state.items()}
    return model.module.inner.state_dict()


def _rng_digest(module: torch.nn.Module) -> int:
    """A digest of the model's loop-sampling generator state: equal on all ranks iff they drew alike."""
    rng = getattr(module, "rng", None)
    if rng is None:
        return 0
    return int.from_bytes(hashlib.sha256(rng.cpu.get_state().numpy().tobytes()).digest()[:7], "little")


def rank_main(job: Path) -> None:
    from safetensors.torch import save_file

    from loopscope.bench.corpus import load_corpus
    from loopscope.bench.meters.energy import EnergyMeter
    from loopscope.bench.meters.memory import PeakMemory
    from loopscope.bench.tokenizer import tokenize
    from loopscope.bench.workloads.budgets import token_budget
    from loopscope.bench.workloads.optimizers import build_optimizers
    from loopscope.bench.workloads.train import (
        _state_rows,
        batch_offsets,
        checkpoint_path,
        get_batch,
        lr_at,
    )
    from loopscope.models import ModelConfig, flops_per_token

    cell = Cell.from_dict(json.loads((job / "cell.json").read_text()))
    ctx = RunContext(**json.loads((job / "context.json").read_text()))
    cuda = cell.device.startswith("cuda")
    rank, n = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ["LOCAL_RANK"])
    device = torch.device(f"cuda:{local_rank}") if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    if ctx.threads:
        torch.set_num_threads(ctx.threads)
    dist.init_process_group("nccl" if cuda else "gloo")
    how = strategy(cell)
    train = cell.settings["train"]
    if how == "fsdp" and train.get("optimizer", "adamw") != "adamw":
        raise ValueError(f"train.optimizer = {train['optimizer']!r} does not run on FSDP shards; use adamw")

    data_cfg = cell.settings["data"]
    corpus = load_corpus(data_cfg["corpus"], max_bytes=data_cfg["max_bytes"])
    if rank != 0:
        dist.barrier()  # rank 0 trains (and caches) a BPE tokenizer first
    tok = tokenize(corpus, data_cfg["tokenizer"], Path(ctx.run_dir) / "tokenizers")
    if rank == 0:
        dist.barrier()
    cfg = ModelConfig.from_dict(cell.model_config)
    local = cell.batch // n
    steps = max(token_budget(cell) // (cell.batch * cell.seq_len), 1)
    offsets = batch_offsets(len(tok.train), cell.seq_len, cell.batch, steps, cell.seed)  # the global batch

    torch.manual_seed(cell.seed)
    module = build_model(cell).to(device)
    module.train()
    model = _wrap(Objective(module), how, device, looped=cell.family != "gpt")
    opt = build_optimizers(module, {**train, "lr": cell.lr})  # after wrapping: FSDP's shards are its params
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if cuda else torch.autocast("cpu", enabled=False)

    losses: list[float] = []
    step_times: list[float] = []
    agree = 0
    status, reason = "ok", ""
    energy = EnergyMeter(str(device) if cuda else "cpu")
    memory = PeakMemory(str(device) if cuda else "cpu")
    with memory, energy:
        for step in range(steps):
            t0 = time.perf_counter()
            reseed(module, cell.seed * 1_000_003 + step)  # the same draws on every rank
            for group in opt.param_groups:
                group["lr"] = lr_at(step, steps, cell.lr, train["warmup_frac"], train["cooldown_frac"])
            x, y = get_batch(tok.train, offsets[step][rank * local:(rank + 1) * local], cell.seq_len, str(device))
            with autocast:
                loss = model(x, y)
            opt.zero_grad(set_to_none=True)
            loss.backward()  # DDP / FSDP average the gradients over the ranks
            torch.nn.utils.clip_grad_norm_(model.parameters(), float(train["grad_clip"]))  # DTensor-aware
            opt.step()
            synchronize(str(device))
            stats = torch.tensor([float(loss.detach()), time.perf_counter() - t0], dtype=torch.float64,
                                 device=device)
            digests = torch.tensor([_rng_digest(module)], dtype=torch.int64, device=device)
            gathered = [torch.zeros_like(digests) for _ in range(n)]
            dist.all_gather(gathered, digests)
            agree += int(all(bool((g == gathered[0]).all()) for g in gathered))
            dist.all_reduce(stats[:1], op=dist.ReduceOp.SUM)  # mean of the ranks' means = the global mean
            dist.all_reduce(stats[1:], op=dist.ReduceOp.MAX)  # a step ends when its slowest rank does
            value = float(stats[0]) / n
            step_times.append(float(stats[1]))
            if not math.isfinite(value):
                status, reason = "diverged", f"non-finite loss ({value}) at step {step}"
                break
            losses.append(value)

    per_rank = [None] * n
    dist.all_gather_object(per_rank, {"peak": memory.peak_bytes, "mem_source": memory.source,
                                      "joules": energy.joules, "energy_source": energy.source,
                                      "duration_s": energy.duration_s})
    final = _full_state(model, how) if status == "ok" else {}
    if rank == 0:
        result = WorkloadResult(status=status, reason=reason)
        if status == "ok":
            save_file({k: v.detach().contiguous().cpu() for k, v in final.items()},
                      str(checkpoint_path(ctx, cell)))
        _rank0_rows(result, cell, ctx, cfg, losses, step_times, per_rank, agree, steps, how, n, cuda,
                    flops_per_token(cfg, cell.seq_len, mode="train"), len(tok.train))
        if status == "ok":  # FSDP's shards run only under collectives: measure a plain copy on rank 0
            plain = module
            if how == "fsdp":
                plain = build_model(cell).to(device)
                plain.load_state_dict(final)
            result.rows.extend(_state_rows(plain, tok.val, cell))
        tmp = job / ".result.json.tmp"
        tmp.write_text(json.dumps({"status": result.status, "reason": result.reason, "rows": result.rows,
                                   "samples": result.samples}))
        tmp.replace(job / "result.json")
    dist.barrier()
    dist.destroy_process_group()



def _rank0_rows(result: WorkloadResult, cell: Cell, ctx: RunContext, cfg: Any, losses: list[float],
                step_times: list[float], per_rank: list[dict[str, Any]], agree: int, steps: int, how: str,
                n: int, cuda: bool, flops_per_token: float, train_tokens: int) -> None:
    """Rows over all ranks, in the single-process train cell's metric names."""
    rank_note = f"{n} ranks ({how})"
    tail = losses[-max(len(losses) // 10, 1):]
    if tail:
        result.rows.append(metric_row("train_loss", float(np.mean(tail)), "nats/token", n_samples=len(tail),
                                      source=f"training objective, mean of the last {len(tail)} steps, "
                                             f"averaged over {rank_note}"))
    result.rows.append(metric_row("train_tokens", steps * cell.batch * cell.seq_len, "tokens", source="budget"))
    result.rows.append(metric_row("train_steps", steps, "steps", source="budget"))
    result.rows.append(metric_row("train_epochs", steps * cell.batch * cell.seq_len / train_tokens, "epochs",
                                  source="training tokens / the training split"))
    result.rows.append(metric_row("world_size", n, "ranks", source=rank_note))
    result.rows.append(metric_row("rank_loop_agreement", agree / max(len(step_times), 1), "fraction",
                                  source="steps whose loop-sampling generator state was equal on all ranks"))
    timed = step_times[1:] if len(step_times) > 1 else step_times
    if timed:
        tps = len(timed) * cell.batch * cell.seq_len / sum(timed)
        result.rows.append(metric_row("tokens_per_s", tps, "tokens/s", stat="mean", n_samples=len(timed),
                                      source=f"global batch / step time of the slowest rank, {rank_note}"))
        devices = n if cuda else 1  # CPU ranks share this machine's calibrated peak
        peak = ctx.peak_flops(cell.dtype if cuda else "float32") * devices
        if math.isfinite(peak):
            result.rows.append(metric_row("mfu", flops_per_token * tps / peak, "fraction",
                                          source=f"analytic FLOPs / calibrated GEMM peak x {devices} device(s)"))
        else:
            result.rows.append(unmeasured("mfu", "fraction", "unavailable: no calibration in this run"))
        result.add_samples("step_time_ms", "ms", [t * 1e3 for t in timed])
    peaks = [r["peak"] for r in per_rank]
    if all(math.isfinite(p) for p in peaks):
        result.rows.append(metric_row("peak_mem_bytes", float(sum(peaks)), "bytes", stat="sum_ranks",
                                      source=f"{per_rank[0]['mem_source']}, summed over {n} ranks"))
        result.rows.append(metric_row("peak_mem_bytes", float(max(peaks)), "bytes", stat="max_rank",
                                      source=f"{per_rank[0]['mem_source']}, the largest rank"))
    else:
        result.rows.append(unmeasured("peak_mem_bytes", "bytes", per_rank[0]["mem_source"], stat="sum_ranks"))
    joules = [r["joules"] for r in per_rank] if cuda else [per_rank[0]["joules"]]  # RAPL: one package for all
    tokens = len(step_times) * cell.batch * cell.seq_len
    if all(math.isfinite(j) for j in joules) and tokens:
        total, seconds = float(sum(joules)), float(per_rank[0]["duration_s"])
        where = f"{per_rank[0]['energy_source']}, " + (f"summed over {n} GPUs" if cuda else "the CPU package(s)")
        result.rows.append(metric_row("energy_j_per_token", total / tokens, "J/token", source=where, n_samples=1))
        result.rows.append(metric_row("avg_power_w", total / seconds, "W", source=where, n_samples=1))
    else:
        source = next(r["energy_source"] for r in per_rank if not math.isfinite(r["joules"]))
        result.rows.append(unmeasured("energy_j_per_token", "J/token", source))
        result.rows.append(unmeasured("avg_power_w", "W", source))
    result.add_samples("train_loss", "nats/token", losses)


if __name__ == "__main__":
    rank_main(Path(sys.argv[1]))
