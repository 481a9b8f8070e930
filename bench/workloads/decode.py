"""Decode workload: time to first token, per-token latency and tokens/s with an explicit KV cache.

Generation is plain Python around the cache (greedy). Each repetition starts from an empty cache:
the prompt's prefill gives the TTFT sample, each following step a per-token latency sample.
Repetitions continue until both the minimum time and the minimum count are met.
Energy per token is the energy of whole generations over the tokens they generated (each generation's
prompt prefill included, as a request pays it).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from loopscope.bench.context import RunContext
from loopscope.bench.engines import backend_for
from loopscope.bench.matrix import Cell
from loopscope.bench.schema import metric_row
from loopscope.bench.stats import summarize
from loopscope.bench.workloads import WorkloadResult
from loopscope.bench.workloads.budgets import analytic_memory_rows
from loopscope.bench.workloads.common import DTYPES
from loopscope.bench.workloads.prefill import OverlappedEnergy, energy_pass


def _generate(gen: Any, prompt: np.ndarray, new_tokens: int, sync: Callable[[], None]
              ) -> tuple[tuple[float, float], list[tuple[float, float]]]:
    """One generation: (ttft, per-token steps), each as (wall seconds, process CPU seconds)."""
    wall, cpu = time.perf_counter_ns, time.process_time_ns
    c0, t0 = cpu(), wall()
    tok = gen.prefill(prompt, prompt.shape[1] + new_tokens)
    sync()
    ttft = ((wall() - t0) / 1e9, (cpu() - c0) / 1e9)
    steps = []
    for _ in range(new_tokens - 1):
        c0, t0 = cpu(), wall()
        tok = gen.step(tok.astype(np.int64))
        sync()
        steps.append(((wall() - t0) / 1e9, (cpu() - c0) / 1e9))
    return ttft, steps


def run(cell: Cell, ctx: RunContext) -> WorkloadResult:
    measure, dec = cell.settings["measure"], cell.settings["decode"]
    new_tokens = int(dec["new_tokens"])
    prompt_len = cell.seq_len - new_tokens
    backend = backend_for(cell)
    gen = backend.generator(cell)

    def sync() -> None:
        backend.sync(cell)
    rng = np.random.default_rng(cell.seed)
    prompt = rng.integers(0, gen.model.config.vocab_size, size=(cell.batch, prompt_len)).astype(np.int64)

    def one_generation() -> tuple[tuple[float, float], list[tuple[float, float]]]:
        return _generate(gen, prompt, new_tokens, sync)

    t_first = time.perf_counter()
    one_generation()  # warm-up
    first_call_s = time.perf_counter() - t_first
    window_s = float(measure["energy_window_s"])
    # As in prefill: on a GPU the energy window overlaps the timed generations; on a CPU the RAPL poller
    # runs in a pass of its own, after them.
    metered = OverlappedEnergy(one_generation, cell, 0, window_s) \
        if measure["energy"] and cell.device.startswith("cuda") else None
    ttfts, step_s, gen_rates, cpu_ttfts, cpu_step_s = [], [], [], [], []
    start = time.perf_counter()
    while len(ttfts) < int(measure["min_count"]) or time.perf_counter() - start < float(measure["min_time_s"]):
        ttft, steps = (metered or one_generation)()
        ttfts.append(ttft[0])
        cpu_ttfts.append(ttft[1])
        step_s.extend(s[0] for s in steps)
        cpu_step_s.extend(s[1] for s in steps)
        gen_rates.append(cell.batch * len(steps) / sum(s[0] for s in steps))

    result = WorkloadResult(engine=gen.engine_name)
    src = f"perf_counter_ns, prompt {prompt_len}, {new_tokens} new tokens, greedy"
    for metric, values in (("ttft_ms", ttfts), ("latency_ms", step_s)):
        s = summarize(np.asarray(values) * 1e3)
        result.rows.append(metric_row(metric, s.median, "ms", stat="median", ci_low=s.ci_low, ci_high=s.ci_high,
                                      n_samples=s.n, source=src))
        for stat in ("p90", "p99"):
            result.rows.append(metric_row(metric, getattr(s, stat), "ms", stat=stat, n_samples=s.n, source=src))
        result.add_samples(metric, "ms", np.asarray(values) * 1e3)
    if cell.device == "cpu":  # process CPU time (user + sys) beside wall time; blind to GPU work
        cpu_src = f"process_time_ns (user+sys of the worker), prompt {prompt_len}, {new_tokens} new tokens"
        for metric, values in (("cpu_ttft_ms", cpu_ttfts), ("cpu_latency_ms", cpu_step_s)):
            s = summarize(np.asarray(values) * 1e3)
            result.rows.append(metric_row(metric, s.median, "ms", stat="median", ci_low=s.ci_low,
                                          ci_high=s.ci_high, n_samples=s.n, source=cpu_src))
            result.add_samples(metric, "ms", np.asarray(values) * 1e3)
    rate = summarize(gen_rates)
    result.rows.append(metric_row("tokens_per_s", rate.median, "tokens/s", stat="median", ci_low=rate.ci_low,
                                  ci_high=rate.ci_high, n_samples=rate.n,
                                  source=f"batch {cell.batch} x decode steps / step time, per generation"))
    result.rows.append(metric_row("compile_s", max(first_call_s - (np.median(ttfts) + sum(step_s) / len(ttfts)), 0.0),
                                  "s", source="warm-up generation minus a steady one"))
    generated = cell.batch * new_tokens  # energy per generated token: each generation's prompt prefill included
    if metered is not None:
        result.rows += metered.finish(sync, generated, ctx.run_dir)
    elif measure["energy"]:
        result.rows += energy_pass(one_generation, sync, cell, generated, window_s, ctx.run_dir)
    kv = gen.cache_bytes()
    result.rows.append(metric_row("kv_cache_bytes", kv, "bytes", stat="measured",
                                  source=f"KVCache.used_bytes at {prompt_len + new_tokens - 1} positions"))
    result.rows += [r for r in analytic_memory_rows(cell) if r["metric"] != "kv_cache_bytes"]
    from loopscope.models import ModelConfig, kv_bytes_per_token

    cfg = ModelConfig.from_dict(cell.model_config)
    per_token = kv_bytes_per_token(cfg, cell.loops_test, dtype_bytes=torch.finfo(DTYPES[cell.dtype]).bits // 8,
                                   policy=cell.kv_policy or "per-loop")
    expected = per_token * cell.batch * (prompt_len + new_tokens - 1)
    result.rows.append(metric_row("kv_cache_bytes", expected, "bytes", stat="analytic", source="model accounting"))
    if not math.isclose(kv, expected, rel_tol=1e-9):
        result.rows.append(metric_row("kv_accounting_error", (kv - expected) / expected, "fraction",
                                      source="measured vs analytic KV bytes"))
    from loopscope.bench.roofline import decode_bw_rows

    llc, llc_name = last_level_cache(cell.device)
    result.rows += decode_bw_rows(cfg, cell.batch, prompt_len + new_tokens // 2, cell.loops_test,
                                  torch.finfo(DTYPES[cell.dtype]).bits // 8, float(np.median(step_s)),
                                  float(ctx.calibration.get("mem_bw_bytes_per_s", math.nan)),
                                  llc_bytes=llc, llc_name=llc_name)
    if cell.family != "gpt":
        result.rows += deviation_rows(cell, prompt[:1, : min(prompt_len, 48)])
    if ctx.trace:  # after every timed generation, so the profiler never disturbs them
        from loopscope.bench.profiling import profile_generation_rows

        result.rows += profile_generation_rows(cell, ctx, gen, prompt, new_tokens, float(np.median(step_s)))
    return result


def last_level_cache(device: str) -> tuple[float, str]:
    """(bytes, name) of the device's last-level cache: a GPU's L2, a CPU's highest cache level; NaN if unknown."""
    if device.startswith("cuda"):
        try:
            props = torch.cuda.get_device_properties(torch.device(device))
            return float(props.L2_cache_size), f"{props.name} L2"
        except (RuntimeError, AssertionError, AttributeError):
            return math.nan, "GPU L2"
    levels: dict[int, float] = {}
    for index in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*"):
        try:
            level = int((index / "level").read_text())
            size = (index / "size").read_text().strip()
        except (OSError, ValueError):
            continue
        levels[level] = float(size.rstrip("KMG")) * {"K": 2**10, "M": 2**20, "G": 2**30}.get(size[-1:], 1)
    if not levels:
        return math.nan, "CPU cache"
    top = max(levels)
    return levels[top], f"CPU L{top}"


def deviation_rows(cell: Cell, idx: np.ndarray) -> list[dict]:
    """How far cached decoding drifts from the full forward under this KV policy (same h0, fp32).

    `per-loop` should be exact (< 1e-5); `last-loop` trades accuracy for a smaller cache, and this
    measures by how much instead of hiding it.
    """
    from loopscope.models import build
    from loopscope.models.generation import decode_deviation

    model = build(cell.model_config, seed=cell.seed).eval()  # fp32 reference, whatever the cell's dtype
    with torch.inference_mode():
        dev = decode_deviation(model, torch.from_numpy(idx), loops=cell.loops_test,
                               policy=cell.kv_policy or "per-loop", prefill=8, seed=cell.seed)
    src = f"{cell.kv_policy} decode vs full forward, fp32, {idx.shape[1]} tokens, same h0"
    return [metric_row("decode_logit_max_abs_dev", dev["max_abs"], "logit", source=src),
            metric_row("decode_kl_mean", dev["kl_mean"], "nats", source=src),
            metric_row("decode_argmax_mismatch", dev["argmax_mismatch"], "fraction", source=src)]
