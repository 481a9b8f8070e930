"""Side-by-side benchmarks of the numba backend against torch eager (and torch.compile): per op, per model
(prefill and batch-1 decode), first-call compile time, and thread-pool interference.

`kernel_benchmarks(quick)` returns tidy rows for the runner's `kernels` workload. Backends are timed
round-robin in one process (one call per backend per round, a short sleep before each timed call so pools
still spinning from the previous backend go idle), because this VM's speed drifts 20-40 % between runs: only
ratios measured side by side mean something. Each row keeps its raw samples.

Row keys: kind (op | model | decode | compile | interference), name, backend, shape, batch, seq_len, metric,
unit, value (median), best, samples, speedup_vs_torch (torch eager time / this backend's time; > 1 = faster),
time_ratio_vs_torch (the inverse: numba / torch, the chart's quantity), threads, loadavg_1m (the machine's
1-minute load average when the row was measured: on a shared 2-core machine, above ~1.5 other processes
competed for the cores and the absolute numbers, and even ratios, are unreliable).
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from loopscope.bench.stats import ratio_ci, summarize

from . import attention, gemm, ops_cpu

F32 = np.float32
TORCH = "torch"
TORCH_COMPILE = "torch.compile"
NUMBA = "numba"
SOURCE = "measured side by side (round-robin, same process)"


@dataclass(frozen=True)
class BenchSettings:
    reps: int
    gap_s: float
    use_compile: bool
    op_rows: int                  # tokens in per-op benchmarks
    model_shapes: tuple[tuple[int, int, int, int], ...]  # (d_model, n_heads, batch, seq)
    decode_prompt: int
    decode_tokens: int


QUICK = BenchSettings(reps=3, gap_s=0.02, use_compile=False, op_rows=512,
                      model_shapes=((128, 2, 4, 128),), decode_prompt=32, decode_tokens=16)
FULL = BenchSettings(reps=7, gap_s=0.1, use_compile=True, op_rows=2048,
                     model_shapes=((256, 4, 8, 256), (512, 8, 4, 512)), decode_prompt=128, decode_tokens=32)


# ------------------------------------------------------------------------------------- timing
def round_robin(fns: dict[str, Callable[[], Any]], reps: int, gap_s: float) -> dict[str, list[float]]:
    """Seconds per call for each backend, timed in turn: one call of each per round, `reps` rounds."""
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(reps):
        for name, fn in fns.items():
            if gap_s:
                time.sleep(gap_s)
            t0 = time.perf_counter()
            fn()
            samples[name].append(time.perf_counter() - t0)
    return samples


def _rows(kind: str, name: str, samples: dict[str, list[float]], *, shape: str, batch: int | None = None,
          seq_len: int | None = None, work: float | None = None, work_metric: str = "", work_unit: str = "",
          threads: int | None = None) -> list[dict[str, Any]]:
    """Tidy rows from per-backend time samples: time_ms always, plus a throughput metric when `work` (units
    of work per call) is given. Ratios (with a bootstrap CI) are against torch eager's samples of the same
    rounds."""
    load = os.getloadavg()[0]
    rows = []
    for backend, secs in samples.items():
        ratio, lo, hi = ratio_ci(samples[TORCH], secs) if TORCH in samples else (math.nan,) * 3
        base = dict(kind=kind, name=name, backend=backend, shape=shape, batch=batch, seq_len=seq_len,
                    time_ratio_vs_torch=ratio, time_ratio_ci_low=lo, time_ratio_ci_high=hi,
                    speedup_vs_torch=1.0 / ratio, threads=threads, loadavg_1m=load, stat="median",
                    source=SOURCE)
        rows.append(_metric(base, "time_ms", "ms", [x * 1e3 for x in secs]))
        if work is not None:
            rows.append(_metric(base, work_metric, work_unit, [work / x for x in secs]))
    return rows


def _metric(base: dict[str, Any], metric: str, unit: str, values: list[float]) -> dict[str, Any]:
    summary = summarize(values)
    return {**base, "metric": metric, "unit": unit, "value": summary.median, "ci_low": summary.ci_low,
            "ci_high": summary.ci_high, "n_samples": summary.n, "best": min(values) if unit == "ms" else max(values)}


# -------------------------------------------------------------------------------------- ops
def op_benchmarks(settings: BenchSettings) -> list[dict[str, Any]]:
    import torch
    import torch.nn.functional as F

    from loopscope.models.blocks import apply_rope, rope_tables

    rng = np.random.default_rng(0)
    n = settings.op_rows
    rows: list[dict[str, Any]] = []
    maybe_compile = _compiler(settings)

    def randn(*shape: int) -> np.ndarray:
        return rng.standard_normal(shape).astype(F32)

    # GEMMs: the hand-tiled packed kernel, np.dot inside njit (scipy BLAS), torch F.linear
    for k_dim, n_out in ((256, 768), (512, 2048), (2048, 512)):
        x, w = randn(n, k_dim), randn(n_out, k_dim)
        packed, w_t, out = gemm.pack_weight(w), np.ascontiguousarray(w.T), np.empty((n, n_out), F32)
        tx, tw = torch.from_numpy(x), torch.from_numpy(w)
        fns = {TORCH: lambda tx=tx, tw=tw: F.linear(tx, tw),
               NUMBA: lambda x=x, p=packed, o=out: gemm.matmul(x, p, o),
               "numba-npdot": lambda x=x, wt=w_t, o=out: gemm.matmul_blas(x, wt, o)}
        rows += _timed("op", f"matmul K{k_dim} N{n_out}", fns, settings, shape=f"{n}x{k_dim}x{n_out}",
                       work=2.0 * n * k_dim * n_out / 1e9, work_metric="gflop_per_s", work_unit="GFLOP/s")

    # fused causal attention (store K/V panels + attention) vs SDPA
    for batch, seq, heads, hd in ((8, 256, 4, 64), (4, 512, 8, 64)) if n >= 2048 else ((2, 128, 4, 32),):
        qkv = randn(batch * seq, 3 * heads * hd)
        k_shape, v_shape = attention.kv_cache_shapes(batch, heads, seq, hd)
        kp, vp, scratch = np.zeros(k_shape, F32), np.zeros(v_shape, F32), attention.scratch_for(seq)
        out = np.empty((batch * seq, heads * hd), F32)

        def numba_attention(qkv=qkv, seq=seq, heads=heads, hd=hd, kp=kp, vp=vp, scratch=scratch, out=out):
            attention.store_kv(qkv, seq, 0, heads, hd, kp, vp)
            attention.causal_attention_prefill(qkv, seq, heads, hd, kp, vp, scratch, out)

        tq, tk, tv = (torch.from_numpy(np.ascontiguousarray(qkv[:, i * heads * hd:(i + 1) * heads * hd]))
                      .view(batch, seq, heads, hd).transpose(1, 2) for i in range(3))
        fns = {TORCH: lambda q=tq, k=tk, v=tv: F.scaled_dot_product_attention(q, k, v, is_causal=True),
               NUMBA: numba_attention}
        rows += _timed("op", f"causal attention T{seq}", fns, settings, shape=f"B{batch} T{seq} H{heads} hd{hd}",
                       batch=batch, seq_len=seq, work=attention.attention_flops(batch, seq, heads, hd) / 1e9,
                       work_metric="gflop_per_s", work_unit="GFLOP/s")

    d, d_ff = 512, 1408
    x, w, h, e = randn(n, d), randn(d), randn(n, d), randn(n, d)
    tx, tw, th, te = (torch.from_numpy(a) for a in (x, w, h, e))
    out = np.empty_like(x)
    eps = F32(1e-5)
    rows += _timed("op", "rmsnorm", {
        TORCH: lambda: F.rms_norm(tx, (d,), tw, 1e-5),
        **maybe_compile(lambda a, b: F.rms_norm(a, (d,), b, 1e-5), tx, tw),
        NUMBA: lambda: ops_cpu.rmsnorm_rows(x, w, eps, out)}, settings, shape=f"{n}x{d}")

    hid = randn(n, 2 * d_ff)
    t_hid = torch.from_numpy(hid)
    act = np.empty((n, d_ff), F32)
    rows += _timed("op", "swiglu", {
        TORCH: lambda: F.silu(t_hid[:, :d_ff]) * t_hid[:, d_ff:],
        **maybe_compile(lambda a: F.silu(a[:, :d_ff]) * a[:, d_ff:], t_hid),
        NUMBA: lambda: ops_cpu.swiglu_rows(hid, d_ff, act)}, settings, shape=f"{n}x{d_ff}")
    hid4 = randn(n, 4 * d)
    t_hid4, out4 = torch.from_numpy(hid4), np.empty_like(hid4)
    rows += _timed("op", "relu2", {
        TORCH: lambda: 0.5 * F.relu(t_hid4).square(),
        **maybe_compile(lambda a: 0.5 * F.relu(a).square(), t_hid4),
        NUMBA: lambda: ops_cpu.relu2_rows(hid4, out4)}, settings, shape=f"{n}x{4 * d}")

    heads, hd = 8, 64
    seq = 256
    qk = randn(n, 2 * d)
    cos, sin = ops_cpu.rope_tables(seq, hd, 50_000.0)
    tcos, tsin = rope_tables(0, seq, hd, 50_000.0, torch.device("cpu"))
    t_qk = torch.from_numpy(qk).view(n // seq, seq, 2 * heads, hd)
    qk_work = qk.copy()

    def torch_rope_norm(a: Any) -> Any:
        return F.rms_norm(apply_rope(a, tcos, tsin), (hd,), eps=1e-5)

    rows += _timed("op", "rope + qk-norm", {
        TORCH: lambda: torch_rope_norm(t_qk),
        **maybe_compile(torch_rope_norm, t_qk),
        NUMBA: lambda: ops_cpu.rope_qknorm_rows(qk_work, seq, 0, cos, sin, 2 * heads, hd, 0, eps, True)},
        settings, shape=f"{n}x{2 * heads}x{hd}")

    b_w, decay, dt = randn(d, d), rng.random(d).astype(F32), rng.random(d).astype(F32)
    packed_b = gemm.pack_weight(b_w)
    t_b, t_decay, t_dt = torch.from_numpy(b_w), torch.from_numpy(decay), torch.from_numpy(dt)
    drive, inj = np.empty_like(h), np.empty_like(h)

    def numba_injection() -> None:
        gemm.matmul(e, packed_b, drive)
        ops_cpu.scale_columns_rows(drive, dt)
        ops_cpu.diagonal_injection_rows(h, drive, decay, inj)

    def torch_injection(a: Any, b: Any) -> Any:
        return t_decay * a + t_dt * F.linear(b, t_b)

    rows += _timed("op", "parcae injection", {
        TORCH: lambda: torch_injection(th, te), **maybe_compile(torch_injection, th, te),
        NUMBA: numba_injection}, settings, shape=f"{n}x{d}")

    w_cat = randn(d, 2 * d)
    w_h, w_e = gemm.pack_weight(w_cat[:, :d]), gemm.pack_weight(w_cat[:, d:])
    t_w = torch.from_numpy(w_cat)
    rows += _timed("op", "rdm concat adapter", {
        TORCH: lambda: F.linear(torch.cat((th, te), dim=-1), t_w),
        NUMBA: lambda: ops_cpu.concat_adapter(h, e, w_h, w_e)}, settings, shape=f"{n}x2{d}->{d}")
    return rows


def _compiler(settings: BenchSettings) -> Callable[..., dict[str, Callable[[], Any]]]:
    """{TORCH_COMPILE: call} for a function compiled with torch.compile and warmed on `args`, or {} when
    compile is off or fails (the failure is not hidden: it is printed)."""
    def make(fn: Callable[..., Any], *args: Any) -> dict[str, Callable[[], Any]]:
        if not settings.use_compile:
            return {}
        import torch

        try:
            compiled = torch.compile(fn)
            compiled(*args)
        except Exception as err:  # noqa: BLE001 - reported, and the row is left out
            print(f"kernel_benchmarks: torch.compile failed: {err!r}", file=sys.stderr)
            return {}
        return {TORCH_COMPILE: lambda: compiled(*args)}
    return make


def _timed(kind: str, name: str, fns: dict[str, Callable[[], Any]], settings: BenchSettings,
           **row_kw: Any) -> list[dict[str, Any]]:
    import torch

    with torch.inference_mode():
        for fn in fns.values():
            fn()  # warm-up: JIT, compile, caches
        samples = round_robin(fns, settings.reps, settings.gap_s)
    return _rows(kind, name, samples, threads=torch.get_num_threads(), **row_kw)


# ------------------------------------------------------------------------------------ models
def bench_configs(d: int, heads: int, seq: int) -> dict[str, Any]:
    """Dense 8x1, looped 1x8 and 2x4 at the same effective depth (8 layer applications), byte vocab."""
    from loopscope.models import ModelConfig

    common = dict(d_model=d, n_heads=heads, vocab_size=256, max_seq_len=max(seq, 512))
    return {
        f"d{d} dense 8x1": ModelConfig("gpt", n_layers=8, **common),
        f"d{d} looped 1x8": ModelConfig("looped", n_core=1, mu_rec=8, **common),
        f"d{d} looped 2x4": ModelConfig("looped", n_core=2, mu_rec=4, **common),
    }


def model_benchmarks(settings: BenchSettings) -> list[dict[str, Any]]:
    import torch

    from loopscope.models import build

    from .engine import NumbaEngine

    rows: list[dict[str, Any]] = []
    for d, heads, batch, seq in settings.model_shapes:
        idx_t = torch.randint(0, 256, (batch, seq), generator=torch.Generator().manual_seed(0))
        idx = idx_t.numpy()
        for name, cfg in bench_configs(d, heads, seq).items():
            model = build(cfg, seed=0).eval()
            engine = NumbaEngine.from_model(model)
            fns: dict[str, Callable[[], Any]] = {TORCH: lambda m=model, i=idx_t: m(i),
                                                 NUMBA: lambda e=engine, i=idx: e.prefill(i)}
            compile_s = float("nan")
            if settings.use_compile:
                compiled = torch.compile(model)
                t0 = time.perf_counter()
                with torch.inference_mode():
                    compiled(idx_t)
                compile_s = time.perf_counter() - t0
                fns[TORCH_COMPILE] = lambda c=compiled, i=idx_t: c(i)
            rows += _timed("model", f"prefill {name}", fns, settings, shape=f"B{batch} T{seq}", batch=batch,
                           seq_len=seq, work=float(batch * seq), work_metric="tokens_per_s", work_unit="tokens/s")
            if settings.use_compile:
                rows.append(_single("compile", f"prefill {name}", TORCH_COMPILE, "compile_s", "s", compile_s,
                                    "first call, torch.compile(model)"))
            rows += decode_benchmark(model, engine, settings, name)
    return rows


def decode_benchmark(model: Any, engine: Any, settings: BenchSettings, name: str) -> list[dict[str, Any]]:
    """Batch-1 decode: `decode_tokens` steps after a `decode_prompt`-token prompt, both with their KV cache."""
    import torch

    from loopscope.models import KVCache

    prompt = np.arange(settings.decode_prompt, dtype=np.int64)[None] % model.config.vocab_size
    max_len = settings.decode_prompt + settings.decode_tokens
    tokens = np.arange(settings.decode_tokens, dtype=np.int64) % model.config.vocab_size

    def torch_decode() -> None:
        cache = KVCache(max_len)
        model(torch.from_numpy(prompt), cache=cache)
        t0 = time.perf_counter()
        for tok in tokens:
            model(torch.tensor([[tok]]), cache=cache)
        timings["torch"] = time.perf_counter() - t0

    def numba_decode() -> None:
        cache = engine.new_cache(1, max_len)
        engine.prefill(prompt, cache=cache)
        t0 = time.perf_counter()
        for tok in tokens:
            engine.decode_step(np.array([tok]), cache)
        timings["numba"] = time.perf_counter() - t0

    timings: dict[str, float] = {}
    samples: dict[str, list[float]] = {TORCH: [], NUMBA: []}
    with torch.inference_mode():
        torch_decode()
        numba_decode()
        for _ in range(settings.reps):
            for backend, fn in ((TORCH, torch_decode), (NUMBA, numba_decode)):
                time.sleep(settings.gap_s)
                fn()
                samples[backend].append(timings[backend])  # decode steps only, prefill excluded
    return _rows("decode", f"decode {name}", samples, shape=f"B1 prompt {settings.decode_prompt}",
                 batch=1, seq_len=settings.decode_prompt, work=float(settings.decode_tokens),
                 work_metric="tokens_per_s", work_unit="tokens/s", threads=torch.get_num_threads())


# ----------------------------------------------------------------------------- compile times
_WARMUP_SCRIPT = """
import json, time
t0 = time.perf_counter()
from loopscope.kernels.engine import NumbaEngine
from loopscope.models import build
t1 = time.perf_counter()
engine = NumbaEngine.from_model(build("parcae-micro", seed=0))
print(json.dumps({"import_s": t1 - t0, "warmup_s": engine.warmup()}))
"""


def compile_benchmarks() -> list[dict[str, Any]]:
    """First-call JIT time of the engine's kernels in a fresh process with an empty numba cache (cold), then
    in a second fresh process that finds the cache the first one wrote (warm)."""
    rows = []
    with tempfile.TemporaryDirectory(prefix="loopscope-numba-cache-") as cache_dir:
        env = {**os.environ, "NUMBA_CACHE_DIR": cache_dir}
        for label in ("cold", "warm"):
            proc = subprocess.run([sys.executable, "-c", _WARMUP_SCRIPT], env=env, capture_output=True,
                                  text=True, timeout=900)
            if proc.returncode != 0:
                raise RuntimeError(f"compile_benchmarks: {label} process failed:\n{proc.stderr[-2000:]}")
            result = json.loads(proc.stdout.strip().splitlines()[-1])
            rows.append(_single("compile", f"numba engine first call ({label} cache)", NUMBA, "compile_s", "s",
                                result["warmup_s"], "parcae-micro warmup in a fresh process"))
    return rows


# ---------------------------------------------------------------------------------- interference
def interference_benchmarks(settings: BenchSettings) -> list[dict[str, Any]]:
    """Does a torch op running just before a numba kernel slow it (two thread pools on 2 cores)? The numba
    kernel is timed alone and right after a torch matmul, with no gap; the same for torch after numba."""
    import torch

    x = np.random.default_rng(0).standard_normal((settings.op_rows, 512)).astype(F32)
    w, out = np.ones(512, F32), np.empty_like(x)
    a = torch.randn(settings.op_rows, 512)
    b = torch.randn(512, 512)
    small = np.ones((2, 64), F32)
    small_w, small_out = np.ones(64, F32), np.empty_like(small)
    eps = F32(1e-5)
    cases = {
        "numba rmsnorm": lambda: ops_cpu.rmsnorm_rows(x, w, eps, out),
        "numba rmsnorm 2 rows": lambda: ops_cpu.rmsnorm_rows(small, small_w, eps, small_out),
    }
    torch_op = lambda: a @ b  # noqa: E731
    numba_op = lambda: ops_cpu.rmsnorm_rows(x, w, eps, out)  # noqa: E731
    rows = []
    with torch.inference_mode():
        for name, fn in cases.items():
            fn()
            alone, after = [], []
            for _ in range(max(20, settings.reps)):
                time.sleep(settings.gap_s)
                t0 = time.perf_counter()
                fn()
                alone.append(time.perf_counter() - t0)
                torch_op()
                t0 = time.perf_counter()
                fn()
                after.append(time.perf_counter() - t0)
            rows += _interference_rows(name, "after torch matmul", alone, after)
        alone, after = [], []
        for _ in range(max(20, settings.reps)):
            time.sleep(settings.gap_s)
            t0 = time.perf_counter()
            torch_op()
            alone.append(time.perf_counter() - t0)
            numba_op()
            t0 = time.perf_counter()
            torch_op()
            after.append(time.perf_counter() - t0)
        rows += _interference_rows("torch matmul", "after numba rmsnorm", alone, after)
    return rows


_LAYER_SCRIPT = """
import json, statistics, time
import numpy as np, torch
import loopscope.kernels, numba
from loopscope.kernels import ops_cpu
from loopscope.kernels.engine import NumbaEngine
from loopscope.models import build
x = np.ones((2, 64), np.float32); w = np.ones(64, np.float32); out = np.empty_like(x)
eps = np.float32(1e-5)
ops_cpu.rmsnorm_rows(x, w, eps, out)
small = []
for _ in range(300):
    t0 = time.perf_counter(); ops_cpu.rmsnorm_rows(x, w, eps, out); small.append(time.perf_counter() - t0)
engine = NumbaEngine.from_model(build("gpt-tiny", seed=0), serial_decode=False)
idx = np.zeros((4, 128), np.int64)
engine.prefill(idx)
big = []
for _ in range(7):
    t0 = time.perf_counter(); engine.prefill(idx); big.append(time.perf_counter() - t0)
print(json.dumps({"layer": numba.threading_layer(), "small_ms": statistics.median(small) * 1e3,
                  "prefill_ms": statistics.median(big) * 1e3}))
"""


def threading_layer_benchmarks() -> list[dict[str, Any]]:
    """numba's `omp` vs `workqueue` threading layer, each in a fresh process with torch imported: a 2-row
    kernel (dispatch cost) and a gpt-tiny prefill (B4 T128) with the parallel kernels."""
    rows = []
    for layer in ("omp", "workqueue"):
        env = {**os.environ, "NUMBA_THREADING_LAYER": layer}
        proc = subprocess.run([sys.executable, "-c", _LAYER_SCRIPT], env=env, capture_output=True, text=True,
                              timeout=900)
        if proc.returncode != 0:
            raise RuntimeError(f"threading_layer_benchmarks: {layer} process failed:\n{proc.stderr[-2000:]}")
        result = json.loads(proc.stdout.strip().splitlines()[-1])
        for metric, key in (("small_kernel_ms", "small_ms"), ("prefill_ms", "prefill_ms")):
            rows.append(_single("threading", f"numba {metric}", f"layer={result['layer']}", metric, "ms",
                                result[key], "median; small: rmsnorm 2x64 (x300), prefill: gpt-tiny B4 T128 (x7)"))
    return rows


def _interference_rows(name: str, condition: str, alone: list[float], after: list[float]) -> list[dict[str, Any]]:
    """time_ms alone and after the other pool's op, and their ratio (with a bootstrap CI)."""
    ratio, lo, hi = ratio_ci(alone, after)
    base = dict(kind="interference", name=name, shape=condition, stat="median", source=SOURCE,
                loadavg_1m=os.getloadavg()[0])
    rows = [_metric({**base, "backend": label}, "time_ms", "ms", [v * 1e3 for v in s])
            for label, s in (("alone", alone), (condition, after))]
    rows.append({**base, "backend": condition, "metric": "slowdown_ratio", "unit": "x", "value": ratio,
                 "ci_low": lo, "ci_high": hi, "n_samples": len(after)})
    return rows


def _single(kind: str, name: str, backend: str, metric: str, unit: str, value: float, shape: str) -> dict[str, Any]:
    return dict(kind=kind, name=name, backend=backend, metric=metric, unit=unit, value=value, stat="single",
                n_samples=1, ci_low=math.nan, ci_high=math.nan, shape=shape, source="measured",
                loadavg_1m=os.getloadavg()[0])


# ------------------------------------------------------------------------------------ targets
# The performance targets (2-core CPU, fp32), as (row kind, name prefix, metric, bound, direction):
# speedup_vs_torch >= bound ("min") or time_ratio_vs_torch <= bound ("max").
TARGETS: tuple[tuple[str, str, str, float, str], ...] = (
    ("model", "prefill", "speedup_vs_torch", 1.0, "min"),
    ("decode", "decode", "speedup_vs_torch", 2.0, "min"),
    ("op", "causal attention T512", "time_ratio_vs_torch", 1.2, "max"),
)


def target_rows(rows: list[dict[str, Any]], decode_tokens: int = FULL.decode_tokens) -> list[dict[str, Any]]:
    """One row per (target, measured numba row): the measured ratio, the bound, met or not, by how much, and
    for a missed target why (diagnose.explain, from the diagnosis rows of the same run)."""
    from .diagnose import explain

    out = []
    for kind, prefix, key, bound, direction in TARGETS:
        for row in rows:
            if (row.get("kind") != kind or row.get("backend") != NUMBA or row.get("metric") != "time_ms"
                    or not str(row.get("name", "")).startswith(prefix)):
                continue
            value = float(row[key])
            met = value >= bound if direction == "min" else value <= bound
            out.append(dict(kind="target", name=row["name"], backend=NUMBA, metric=key, unit="x", value=value,
                            stat="median", bound=bound, direction=direction, met=bool(met),
                            margin=value / bound, shape=row.get("shape"), loadavg_1m=row.get("loadavg_1m"),
                            source=SOURCE, why="" if met else explain(rows, row, decode_tokens)))
    return out


def format_table(rows: list[dict[str, Any]]) -> str:
    """A plain-text table of the rows that carry ratios (for benchmark output and logs)."""
    lines = [f"{'kind':12} {'name':34} {'backend':14} {'metric':18} {'value':>10} {'numba/torch':>11} {'load':>5}"]
    for r in rows:
        if r.get("metric") not in ("time_ms", "slowdown_ratio") and r.get("kind") not in ("target", "compile",
                                                                                           "threading"):
            continue
        ratio = r["value"] if r.get("kind") == "target" else r.get("time_ratio_vs_torch", math.nan)
        verdict = ("  met" if r["met"] else "  MISSED") if r.get("kind") == "target" else ""
        lines.append(f"{r.get('kind', ''):12} {str(r.get('name', ''))[:34]:34} {str(r.get('backend', ''))[:14]:14} "
                     f"{r.get('metric', ''):18} {r.get('value', math.nan):10.3f} {ratio:11.3f} "
                     f"{r.get('loadavg_1m') or math.nan:5.2f}{verdict}")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------- entry
def kernel_benchmarks(quick: bool) -> list[dict[str, Any]]:
    """Every kernel benchmark, as tidy rows. quick=True: small shapes, 3 rounds, no torch.compile, no
    subprocesses, no target rows (under a minute on 2 cores); quick=False: the issue's target shapes with
    torch.compile, cold/warm compile and threading-layer subprocesses, the diagnosis rows, and one `target` row
    per issue target with the reason when it is missed (about 10 minutes)."""
    settings = QUICK if quick else FULL
    rows = op_benchmarks(settings) + model_benchmarks(settings) + interference_benchmarks(settings)
    if quick:  # the targets are defined at the full shapes only
        return rows
    from .diagnose import diagnosis_rows

    rows += diagnosis_rows(settings)
    return rows + compile_benchmarks() + threading_layer_benchmarks() + target_rows(rows, settings.decode_tokens)
