"""Wall-clock timing of a callable: warm-up, then repeat until a minimum time AND a minimum count are met.

CPU samples use `time.perf_counter_ns` around each call, and beside it `time.process_time_ns` (user + sys
CPU time of this worker process): on a machine shared with other jobs, the CPU time a call consumed moves
less than its wall time, which also counts the time the process waited for a core. On a CUDA device each
call is bracketed by CUDA events and the end event is synchronised, so a sample is the device time of that
call alone. Other async backends (numba-cuda on its own stream, for example) pass a `sync` hook that blocks
until their work is done.

The loop body does four clock reads (wall and CPU, before and after) and two list appends, so it adds
well under 1% to a 10 ms call (tests/benchmarks/test_timing_overhead.py checks this). Statistics are
computed lazily, after the loop.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import numpy as np

from loopscope.bench.schema import metric_row, unmeasured
from loopscope.bench.stats import Summary, summarize

LATENCY_STATS: tuple[str, ...] = ("median", "p50", "p90", "p99", "iqr")


@dataclass
class TimingResult:
    samples_s: np.ndarray  # one duration per timed call, seconds
    first_call_s: float  # duration of the first warm-up call (covers JIT/compile); NaN without warm-up
    warmup_calls: int
    device: str
    timer: str  # how samples were taken: "perf_counter_ns", "perf_counter_ns+sync" or "cuda_event"
    cpu_samples_s: np.ndarray | None = None  # process CPU time (user + sys) per timed call; None on CUDA

    @cached_property
    def cpu_summary(self) -> Summary:
        return summarize(self.cpu_samples_s if self.cpu_samples_s is not None else np.empty(0))

    @cached_property
    def summary(self) -> Summary:
        return summarize(self.samples_s)

    @property
    def median_s(self) -> float:
        return self.summary.median

    @property
    def compile_s(self) -> float:
        """First call minus the steady-state median: the one-off cost of JIT, compile and autotune."""
        if not math.isfinite(self.first_call_s) or self.summary.n == 0:
            return math.nan
        return max(self.first_call_s - self.summary.median, 0.0)

    def latency_rows(self, metric: str = "latency_ms", **extra: Any) -> list[dict[str, Any]]:
        """Per-call latency in ms: median (with its bootstrap 95% CI), p50, p90, p99 and IQR."""
        s = self.summary
        if s.n == 0:
            return [unmeasured(metric, "ms", "no timed samples", stat=st, **extra) for st in LATENCY_STATS]
        ms = 1e3
        common = dict(source=self.timer, n_samples=s.n, **extra)
        return [
            metric_row(metric, s.median * ms, "ms", stat="median", ci_low=s.ci_low * ms,
                       ci_high=s.ci_high * ms, **common),
            metric_row(metric, s.median * ms, "ms", stat="p50", **common),
            metric_row(metric, s.p90 * ms, "ms", stat="p90", **common),
            metric_row(metric, s.p99 * ms, "ms", stat="p99", **common),
            metric_row(metric, s.iqr * ms, "ms", stat="iqr", **common),
        ]

    def throughput_rows(self, units_per_call: float, metric: str = "tokens_per_s", unit: str = "tokens/s",
                        **extra: Any) -> list[dict[str, Any]]:
        """Units per second: `median` = units / median call time (CI from the median's CI);
        `mean` = all units / all timed seconds (what a long run would sustain)."""
        s = self.summary
        if s.n == 0:
            return [unmeasured(metric, unit, "no timed samples", stat=st, **extra)
                    for st in ("median", "mean")]
        if units_per_call <= 0:
            raise ValueError(f"throughput_rows: units_per_call must be > 0, got {units_per_call!r}")
        common = dict(source=self.timer, n_samples=s.n, **extra)
        total_s = float(np.sum(self.samples_s))
        return [
            metric_row(metric, units_per_call / s.median, unit, stat="median",
                       ci_low=units_per_call / s.ci_high, ci_high=units_per_call / s.ci_low, **common),
            metric_row(metric, units_per_call * s.n / total_s, unit, stat="mean", **common),
        ]

    def cpu_rows(self, units_per_call: float, **extra: Any) -> list[dict[str, Any]]:
        """Process CPU time per call (`cpu_latency_ms`) and units per CPU second (`cpu_tokens_per_s`),
        medians; nothing on devices whose work the host's CPU time does not see (CUDA)."""
        if self.cpu_samples_s is None:
            return []
        s = self.cpu_summary
        if s.n == 0 or not s.median > 0:
            reason = "no timed samples" if s.n == 0 else "process CPU time did not advance (timer too coarse)"
            return [unmeasured("cpu_latency_ms", "ms", reason, **extra),
                    unmeasured("cpu_tokens_per_s", "tokens/s", reason, **extra)]
        common = dict(source="process_time_ns (user+sys of the worker)", n_samples=s.n, **extra)
        return [metric_row("cpu_latency_ms", s.median * 1e3, "ms", stat="median", ci_low=s.ci_low * 1e3,
                           ci_high=s.ci_high * 1e3, **common),
                metric_row("cpu_tokens_per_s", units_per_call / s.median, "tokens/s", stat="median", **common)]

    def compile_rows(self, metric: str = "compile_s", **extra: Any) -> list[dict[str, Any]]:
        """`compile_s` = first warm-up call minus the steady-state median (NaN without a warm-up call)."""
        if not math.isfinite(self.compile_s):
            return [unmeasured(metric, "s", "no warm-up call was timed", **extra)]
        return [metric_row(metric, self.compile_s, "s", source="first warm-up call minus steady median",
                           n_samples=1, **extra)]

    def sample_rows(self, metric: str = "latency_ms", **extra: Any) -> list[dict[str, Any]]:
        """Raw per-call samples in ms for samples.parquet (SAMPLE_COLUMNS, less run_id/cell_id)."""
        rows = [{"metric": metric, "unit": "ms", "index": i, "value": float(v) * 1e3, **extra}
                for i, v in enumerate(self.samples_s)]
        if self.cpu_samples_s is not None:
            rows += [{"metric": f"cpu_{metric}", "unit": "ms", "index": i, "value": float(v) * 1e3, **extra}
                     for i, v in enumerate(self.cpu_samples_s)]
        return rows


def measure(fn: Callable[[], Any], *, min_time_s: float = 1.0, min_count: int = 5, max_count: int = 10_000,
            warmup: int = 1, max_warmup_s: float | None = None, sync: Callable[[], None] | None = None,
            device: str = "cpu") -> TimingResult:
    """Time `fn()`: `warmup` untimed calls (the first one's duration is kept as `first_call_s`), then timed
    calls until both `min_time_s` of timed calls and `min_count` calls are reached, or `max_count` calls.

    `max_warmup_s` stops the warm-up early once that much time was spent (at least one call always runs).
    `sync` is called after each call, inside the timed region, for async backends.
    """
    if min_count < 1 or max_count < min_count:
        raise ValueError(f"measure: need 1 <= min_count <= max_count, got min_count={min_count}, "
                         f"max_count={max_count}")
    if warmup < 0 or min_time_s < 0:
        raise ValueError(f"measure: warmup and min_time_s must be >= 0, got warmup={warmup}, "
                         f"min_time_s={min_time_s}")
    if device.startswith("cuda"):
        return _measure_cuda(fn, min_time_s, min_count, max_count, warmup, max_warmup_s, sync, device)
    return _measure_host(fn, min_time_s, min_count, max_count, warmup, max_warmup_s, sync, device)


def _run_warmup(call: Callable[[], float], warmup: int, max_warmup_s: float | None) -> tuple[float, int]:
    """Run `call` (which returns its own duration) up to `warmup` times; return (first duration, calls)."""
    if warmup == 0:
        return math.nan, 0
    first = call()
    spent, calls = first, 1
    while calls < warmup and (max_warmup_s is None or spent < max_warmup_s):
        spent += call()
        calls += 1
    return first, calls


def _measure_host(fn, min_time_s, min_count, max_count, warmup, max_warmup_s, sync, device) -> TimingResult:
    clock = time.perf_counter_ns

    def timed_call() -> float:
        t0 = clock()
        fn()
        if sync is not None:
            sync()
        return (clock() - t0) * 1e-9

    first, warm_calls = _run_warmup(timed_call, warmup, max_warmup_s)

    # The hot loop: keep it free of attribute lookups, numpy and branches beyond the stop test.
    cpu_clock = time.process_time_ns
    durations: list[int] = []
    cpu_durations: list[int] = []
    append, cpu_append = durations.append, cpu_durations.append
    min_time_ns = int(min_time_s * 1e9)
    start = clock()
    count = 0
    if sync is None:
        while count < max_count:
            c0 = cpu_clock()
            t0 = clock()
            fn()
            t1 = clock()
            c1 = cpu_clock()
            append(t1 - t0)
            cpu_append(c1 - c0)
            count += 1
            if count >= min_count and t1 - start >= min_time_ns:
                break
    else:
        while count < max_count:
            c0 = cpu_clock()
            t0 = clock()
            fn()
            sync()
            t1 = clock()
            c1 = cpu_clock()
            append(t1 - t0)
            cpu_append(c1 - c0)
            count += 1
            if count >= min_count and t1 - start >= min_time_ns:
                break
    samples = np.asarray(durations, dtype=np.float64) * 1e-9
    timer = "perf_counter_ns" if sync is None else "perf_counter_ns+sync"
    cpu_samples = np.asarray(cpu_durations, dtype=np.float64) * 1e-9
    return TimingResult(samples, first, warm_calls, device, timer, cpu_samples)


def _measure_cuda(fn, min_time_s, min_count, max_count, warmup, max_warmup_s, sync, device) -> TimingResult:
    import torch  # only needed on CUDA devices

    torch_device = torch.device(device)
    torch.cuda.synchronize(torch_device)
    start_event = torch.cuda.Event(enable_timing=True)
    end_event = torch.cuda.Event(enable_timing=True)

    def timed_call() -> float:
        # Events are recorded on the current stream; synchronising the end event makes each sample one call
        # alone (no queued work from the previous call), including its host-side launch overhead.
        start_event.record()
        fn()
        if sync is not None:
            sync()
        end_event.record()
        end_event.synchronize()
        return start_event.elapsed_time(end_event) * 1e-3  # elapsed_time is in ms

    with torch.cuda.device(torch_device):
        first, warm_calls = _run_warmup(timed_call, warmup, max_warmup_s)
        durations: list[float] = []
        wall_start = time.perf_counter()
        count = 0
        while count < max_count:
            durations.append(timed_call())
            count += 1
            if count >= min_count and time.perf_counter() - wall_start >= min_time_s:
                break
    return TimingResult(np.asarray(durations, dtype=np.float64), first, warm_calls, device, "cuda_event")
