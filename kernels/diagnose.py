"""Why a numba target is missed, measured in the same run as the target rows (kind = "diagnosis").

- exp: the attention kernel's softmax needs one exp per causal score. `fexp` (numba) and `torch.exp` are
  timed on the same count of elements, from an L2-resident buffer so neither is memory bound.
- fixed cost: the same model at width 16 (same layers, loops and KV policy, almost no arithmetic) decodes
  at the framework's fixed cost per token: Python and op dispatch for torch, parallel-region launches and
  buffer bookkeeping for numba. The full-width time minus it is the arithmetic.
- bandwidth: a parallel read of a buffer four times the last-level cache, the floor for streaming weights.
- prefill split: one model prefill per backend, its time split into matmuls, attention and the other ops:
  numba's kernels timed one by one (`TimedKernels`), torch's ops by torch.profiler self time; what neither
  accounts for is the time between kernels (Python and dispatch).

`explain(rows)` turns these rows, with the op and model rows of the same run, into one sentence per missed
target. Every number in the sentence is a measured row of this run or an analytic count from accounting.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import statistics
import time
from typing import Any

import numpy as np
from numba import njit, prange

from . import attention
from .mathfn import fexp

F32 = np.float32
EXP_BUFFER = 65_536  # floats: 256 KiB, resident in L2 on the machines this targets


@njit(parallel=True, fastmath=True, cache=True)
def _exp_repeated(src, dst, rounds):
    n = src.shape[0]
    chunk = 4096
    for task in prange(rounds * (n // chunk)):
        lo = (task % (n // chunk)) * chunk
        for i in range(lo, lo + chunk):
            dst[i] = fexp(src[i])


@njit(parallel=True, fastmath=True, cache=True)
def _read_sum(buf):
    n = buf.shape[0]
    parts = 64
    total = np.zeros(parts, np.float32)
    for p in prange(parts):
        acc = F32(0.0)
        for i in range(p * (n // parts), (p + 1) * (n // parts)):
            acc += buf[i]
        total[p] = acc
    return total.sum()


def _median_s(fn: Any, reps: int) -> float:
    fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _row(name: str, backend: str, metric: str, unit: str, value: float, shape: str, source: str) -> dict[str, Any]:
    return dict(kind="diagnosis", name=name, backend=backend, metric=metric, unit=unit, value=value,
                stat="median", n_samples=1, ci_low=math.nan, ci_high=math.nan, shape=shape, source=source,
                loadavg_1m=os.getloadavg()[0])


def exp_rows(batch: int, seq: int, heads: int, reps: int = 7) -> list[dict[str, Any]]:
    """Time of the attention's exp count (B*H*T*(T+1)/2) in numba `fexp` and in `torch.exp`."""
    import torch

    count = batch * heads * seq * (seq + 1) // 2
    rounds = max(count // EXP_BUFFER, 1)
    src = np.random.default_rng(0).uniform(-10, 0, EXP_BUFFER).astype(F32)
    dst = np.empty_like(src)
    t_src, t_dst = torch.from_numpy(src), torch.from_numpy(dst.copy())

    def torch_exp() -> None:
        for _ in range(rounds):
            torch.exp(t_src, out=t_dst)

    shape = f"{rounds * EXP_BUFFER} exps (causal scores of B{batch} T{seq} H{heads})"
    src_note = f"{EXP_BUFFER}-float buffer, {rounds} rounds"
    return [_row(f"exp T{seq}", backend, "time_ms", "ms", _median_s(fn, reps) * 1e3, shape, src_note)
            for backend, fn in (("numba", lambda: _exp_repeated(src, dst, rounds)), ("torch", torch_exp))]


def store_kv_row(batch: int, seq: int, heads: int, head_dim: int, reps: int = 7) -> dict[str, Any]:
    """Time of writing K and V into the cache panels, the part of the numba attention op that is not attention."""
    qkv = np.random.default_rng(0).standard_normal((batch * seq, 3 * heads * head_dim)).astype(F32)
    k_shape, v_shape = attention.kv_cache_shapes(batch, heads, seq, head_dim)
    kp, vp = np.zeros(k_shape, F32), np.zeros(v_shape, F32)
    ms = _median_s(lambda: attention.store_kv(qkv, seq, 0, heads, head_dim, kp, vp), reps) * 1e3
    return _row(f"store_kv T{seq}", "numba", "time_ms", "ms", ms, f"B{batch} T{seq} H{heads} hd{head_dim}",
                "K/V panel stores alone")


def bandwidth_row() -> dict[str, Any]:
    """Parallel read bandwidth (GB/s) of a buffer 4x the last-level cache (at least 64 MiB)."""
    from loopscope.bench.meters.calibration import last_level_cache_bytes

    n = max(4 * last_level_cache_bytes(), 64 << 20) // 4
    buf = np.ones(n, F32)
    seconds = min(_median_s(lambda: _read_sum(buf), 5) for _ in range(2))
    return _row("read bandwidth", "numba", "gb_per_s", "GB/s", 4 * n / seconds / 1e9, f"{4 * n >> 20} MiB",
                "parallel read-sum, best of two medians")


def fixed_cost_rows(cfg: Any, settings: Any, name: str) -> list[dict[str, Any]]:
    """Batch-1 decode of the same model at width 16 (one 16-wide head): the per-token fixed cost."""
    from loopscope.models import build

    from .bench import decode_benchmark
    from .engine import NumbaEngine

    narrow = dataclasses.replace(cfg, d_model=16, n_heads=1, d_ff=None)
    model = build(narrow, seed=0).eval()
    rows = decode_benchmark(model, NumbaEngine.from_model(model), settings, f"fixed cost {name}")
    for row in rows:
        row["kind"] = "diagnosis"
        row["shape"] = f"{row['shape']}, width 16 (same layers and loops)"
    return rows


class TimedKernels:
    """The engine's kernel set with every call timed (seconds summed per kernel name)."""

    def __init__(self, kernels: Any) -> None:
        self._kernels = kernels
        self.seconds: dict[str, float] = {}

    def __getattr__(self, name: str) -> Any:
        fn = getattr(self._kernels, name)
        if not callable(fn):
            return fn

        def timed(*args: Any, **kwargs: Any) -> Any:
            t0 = time.perf_counter()
            out = fn(*args, **kwargs)
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - t0
            return out
        return timed


def _category(op: str) -> str:
    if "matmul" in op or op in ("aten::mm", "aten::addmm", "aten::bmm"):
        return "matmul"
    if "attention" in op or op == "store_kv":
        return "attention"
    return "other"


def prefill_split_rows(model: Any, engine: Any, idx: np.ndarray, name: str, reps: int = 3) -> list[dict[str, Any]]:
    """ms per prefill in matmuls, attention, other ops and between kernels, for numba and torch eager."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    rows = []
    shape = f"B{idx.shape[0]} T{idx.shape[1]}"
    own = engine.kernels
    timed = TimedKernels(own)
    engine.kernels = timed
    try:
        engine.prefill(idx)
        timed.seconds.clear()
        t0 = time.perf_counter()
        for _ in range(reps):
            engine.prefill(idx)
        wall = (time.perf_counter() - t0) / reps
    finally:
        engine.kernels = own
    split = {"matmul": 0.0, "attention": 0.0, "other": 0.0}
    for op, sec in timed.seconds.items():
        split[_category(op)] += sec / reps
    split["between"] = wall - sum(split.values())
    rows += [_row(f"prefill split {name}", "numba", f"{k}_ms", "ms", v * 1e3, shape,
                  "engine kernels timed one by one (perf_counter)") for k, v in split.items()]

    idx_t = torch.from_numpy(idx)
    with torch.inference_mode():
        model(idx_t)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            t0 = time.perf_counter()
            for _ in range(reps):
                model(idx_t)
            wall = (time.perf_counter() - t0) / reps
    split = {"matmul": 0.0, "attention": 0.0, "other": 0.0}
    for ev in prof.key_averages():
        split[_category(ev.key)] += ev.self_cpu_time_total / 1e6 / reps
    split["between"] = wall - sum(split.values())
    rows += [_row(f"prefill split {name}", "torch", f"{k}_ms", "ms", v * 1e3, shape,
                  "torch.profiler self CPU time per op (profiled calls)") for k, v in split.items()]
    return rows


def diagnosis_rows(settings: Any) -> list[dict[str, Any]]:
    """Every diagnosis row for the full benchmark shapes: exp counts, fixed costs, weight sizes, bandwidth."""
    from loopscope.bench.meters.calibration import last_level_cache_bytes
    from loopscope.models import effective_depth, flops_per_token, param_counts

    from .bench import bench_configs

    rows = [*exp_rows(4, 512, 8), store_kv_row(4, 512, 8, 64), bandwidth_row()]
    rows.append(_row("last-level cache", "numba", "bytes", "bytes", float(last_level_cache_bytes()), "",
                     "sysfs / lscpu"))
    from loopscope.models import build

    from .engine import NumbaEngine

    for d, heads, batch, seq in settings.model_shapes:
        idx = np.random.default_rng(0).integers(0, 256, (batch, seq)).astype(np.int64)
        for name, cfg in bench_configs(d, heads, seq).items():
            rows.append(_row(f"weights {name}", "numba", "bytes", "bytes", 4.0 * param_counts(cfg).unique, "",
                             "unique float32 parameters (accounting)"))
            per_token = (flops_per_token(cfg, seq, mode="forward") - 4 * d * seq * effective_depth(cfg)) / 2
            rows.append(_row(f"weights read per token {name}", "numba", "bytes", "bytes", 4.0 * per_token, "",
                             "float32 weight elements applied per token, shared weights once per loop (accounting)"))
            rows += fixed_cost_rows(cfg, settings, name)
            model = build(cfg, seed=0).eval()
            rows += prefill_split_rows(model, NumbaEngine.from_model(model), idx, name)
    return rows


# ------------------------------------------------------------------------------------- explain
def _value(rows: list[dict[str, Any]], kind: str, name: str, backend: str, metric: str = "time_ms") -> float:
    for r in rows:
        if (r.get("kind"), r.get("name"), r.get("backend"), r.get("metric")) == (kind, name, backend, metric):
            return float(r["value"])
    return math.nan


def _attention_why(rows: list[dict[str, Any]], name: str, shape: str) -> str:
    seq = int(name.rsplit("T", 1)[1])
    numba_ms, torch_ms = _value(rows, "op", name, "numba"), _value(rows, "op", name, "torch")
    exp_numba, exp_torch = _value(rows, "diagnosis", f"exp T{seq}", "numba"), _value(rows, "diagnosis",
                                                                                      f"exp T{seq}", "torch")
    gemm = max((float(r["value"]) for r in rows if r.get("kind") == "op" and r.get("backend") == "numba"
                and str(r.get("name", "")).startswith("matmul") and r.get("metric") == "gflop_per_s"),
               default=math.nan)
    dims = dict(re.findall(r"(hd|B|T|H)(\d+)", shape))
    b, t, h, hd = (int(dims[k]) for k in ("B", "T", "H", "hd"))
    matmul_ms = attention.attention_flops(b, t, h, hd) / 1e9 / gemm * 1e3
    stores = _value(rows, "diagnosis", f"store_kv T{seq}", "numba")
    stores = 0.0 if math.isnan(stores) else stores
    rest = numba_ms - exp_numba - matmul_ms - stores
    return (f"numba {numba_ms:.1f} ms vs torch {torch_ms:.1f} ms. Of numba's time its exps alone take "
            f"{exp_numba:.1f} ms ({exp_numba / numba_ms:.0%}; torch.exp does the same count in {exp_torch:.1f} ms), "
            f"the K/V panel stores {stores:.1f} ms, and QK^T and PV at the numba GEMM rate ({gemm:.0f} GFLOP/s) "
            f"would take {matmul_ms:.1f} ms; the other {rest:.1f} ms is the score and PV tiles running below the "
            "GEMM rate plus the online-softmax bookkeeping (max, rescale, row sums), which this run does not "
            "separate")


def _decode_why(rows: list[dict[str, Any]], name: str, tokens: int) -> str:
    short = name.removeprefix("decode ")
    torch_ms, numba_ms = (_value(rows, "decode", name, b) / tokens for b in ("torch", "numba"))
    torch_fix, numba_fix = (_value(rows, "diagnosis", f"decode fixed cost {short}", b) / tokens
                            for b in ("torch", "numba"))
    if not all(math.isfinite(v) for v in (torch_ms, numba_ms, torch_fix, numba_fix)):
        return "not diagnosed: the fixed-cost rows for this model were not measured"
    torch_math, numba_math = torch_ms - torch_fix, numba_ms - numba_fix
    need = torch_ms / 2
    text = (f"per token torch takes {torch_ms:.2f} ms = {torch_fix:.2f} ms fixed cost (the same model at width "
            f"16) + {torch_math:.2f} ms arithmetic; numba {numba_ms:.2f} ms = {numba_fix:.2f} ms fixed + "
            f"{numba_math:.2f} ms arithmetic. 2x needs {need:.2f} ms: "
            + ("numba's arithmetic alone exceeds that" if numba_math > need else
               f"numba's fixed cost would have to fall to {need - numba_math:.2f} ms"))
    weights = _value(rows, "diagnosis", f"weights {short}", "numba", "bytes")
    read = _value(rows, "diagnosis", f"weights read per token {short}", "numba", "bytes")
    llc = _value(rows, "diagnosis", "last-level cache", "numba", "bytes")
    bw = _value(rows, "diagnosis", "read bandwidth", "numba", "gb_per_s")
    if all(math.isfinite(v) for v in (weights, read, llc, bw)):
        where = "fit in" if weights <= llc else "exceed"
        text += (f". Per token both read {read / 2**20:.1f} MiB of weights (unique: {weights / 2**20:.1f} MiB, "
                 f"which {where} the {llc / 2**20:.0f} MiB last-level cache): numba's arithmetic runs at "
                 f"{read / numba_math / 1e6:.1f} GB/s of weights, torch's at {read / torch_math / 1e6:.1f} GB/s "
                 f"(a parallel read from DRAM measured {bw:.1f} GB/s)")
    return text


def _prefill_why(rows: list[dict[str, Any]], name: str) -> str:
    """Where the two backends' prefill times differ: matmuls, attention, other ops, time between kernels."""
    short = name.removeprefix("prefill ")
    parts = ("matmul", "attention", "other", "between")
    numba = {k: _value(rows, "diagnosis", f"prefill split {short}", "numba", f"{k}_ms") for k in parts}
    torch_ = {k: _value(rows, "diagnosis", f"prefill split {short}", "torch", f"{k}_ms") for k in parts}
    if not all(math.isfinite(v) for v in (*numba.values(), *torch_.values())):
        return "not diagnosed: the prefill split for this model was not measured"
    gaps = {k: numba[k] - torch_[k] for k in parts}
    worst = max(gaps, key=gaps.get)
    labels = {"matmul": "matmuls", "attention": "attention", "other": "other ops",
              "between": "between kernels (Python, dispatch)"}
    text = "; ".join(f"{labels[k]} {numba[k]:.1f} vs {torch_[k]:.1f}" for k in parts)
    return (f"ms per prefill, numba vs torch (in a timed split pass): {text}. The largest gap is "
            f"{labels[worst]}, {gaps[worst]:+.1f} ms")


def explain(rows: list[dict[str, Any]], target: dict[str, Any], decode_tokens: int) -> str:
    """One sentence on why a target row is missed, from the measured rows of the same run."""
    name = str(target["name"])
    try:
        if name.startswith("causal attention"):
            return _attention_why(rows, name, str(target.get("shape", "")))
        if name.startswith("decode"):
            return _decode_why(rows, name, decode_tokens)
        if name.startswith("prefill"):
            return _prefill_why(rows, name)
    except (ValueError, ZeroDivisionError, KeyError) as err:
        return f"not diagnosed: {err}"
    return ""
