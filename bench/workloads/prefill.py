"""Prefill workload: forward throughput at batch x seq_len, in three separate passes.

Pass 1 times the forward (warm-up covers compilation), pass 2 measures peak memory, pass 3 energy
(repeating the forward to fill the meter's window). One meter never disturbs another.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from loopscope.bench.context import RunContext
from loopscope.bench.engines import PrefillCall, backend_for
from loopscope.bench.matrix import Cell
from loopscope.bench.schema import metric_row, unmeasured
from loopscope.bench.workloads import WorkloadResult
from loopscope.bench.workloads.budgets import analytic_memory_rows
from loopscope.bench.workloads.common import idle_power_once


def forward_fn(cell: Cell) -> tuple[PrefillCall, torch.nn.Module]:
    """The call to time, as the cell's backend runs it (bench/engines.py); the model is returned for accounting."""
    call = backend_for(cell).prefill(cell)
    return call, call.model


def gpu_health(device: str) -> dict | None:
    """Temperature and clock-throttle reasons of the cell's GPU (None on CPU)."""
    if not device.startswith("cuda"):
        return None
    from loopscope.bench.fingerprint import gpu_health as snapshot

    return snapshot(device=device if ":" in device else "cuda:0")


def throttle_rows(before: dict | None, after: dict | None) -> list[dict]:
    """A `gpu_throttled` flag (1/0) for the timed pass, with the reasons and temperatures seen."""
    if before is None or after is None:
        return []
    from loopscope.bench.fingerprint import is_throttled

    if not (before.get("available") and after.get("available")):
        return [unmeasured("gpu_throttled", "flag", "unavailable: no NVML clock-event reasons")]
    reasons = sorted(set(before.get("throttle_reasons") or []) | set(after.get("throttle_reasons") or []))
    source = (f"NVML before/after: reasons {reasons or 'none'}, "
              f"{before.get('temperature_c')} -> {after.get('temperature_c')} C")
    return [metric_row("gpu_throttled", float(is_throttled(before, after)), "flag", source=source)]


def run(cell: Cell, ctx: RunContext) -> WorkloadResult:
    from loopscope.bench.meters import memory, timing
    from loopscope.models import ModelConfig, flops_per_token

    measure = cell.settings["measure"]

    backend = backend_for(cell)

    def sync() -> None:
        backend.sync(cell)
    tokens = cell.batch * cell.seq_len
    result = WorkloadResult()

    # Memory pass first: its baseline is this fresh process after imports, so the peak covers the
    # weights, the activations and (for torch.compile) the compiler's working set.
    if measure["memory"]:
        with memory.PeakMemory(cell.device) as mem:
            call, model = forward_fn(cell)
            call()
            sync()
        result.rows += mem.rows()
    else:
        call, model = forward_fn(cell)
    result.rows += analytic_memory_rows(cell)

    health_before = gpu_health(cell.device)
    warmup = max(int(measure["warmup"]), 1)
    # On a GPU the energy window overlaps the timed repetitions (NVML's energy counter costs the timed calls
    # nothing), then is topped up to its minimum length; on a CPU the RAPL poller runs in a pass of its own.
    metered = OverlappedEnergy(call, cell, warmup, float(measure["energy_window_s"])) \
        if measure["energy"] and cell.device.startswith("cuda") else None
    timed = timing.measure(metered or call, min_time_s=float(measure["min_time_s"]),
                           min_count=int(measure["min_count"]), warmup=warmup, sync=sync,
                           device=backend.timing_device(cell))
    result.engine = call.engine_name
    result.rows += throttle_rows(health_before, gpu_health(cell.device))
    result.rows += timed.latency_rows()
    result.rows += timed.throughput_rows(units_per_call=tokens)
    result.rows += timed.cpu_rows(units_per_call=tokens)
    result.rows += timed.compile_rows()
    result.samples += timed.sample_rows()
    cfg = ModelConfig.from_dict(cell.model_config)
    flops = flops_per_token(cfg, cell.seq_len, loops=cell.loops_test, mode="forward") * tokens / timed.median_s
    peak = ctx.peak_flops(cell.dtype)
    result.rows.append(metric_row("achieved_flops", flops, "FLOP/s", source="analytic FLOPs / median time"))
    result.rows.append(metric_row("mfu", flops / peak, "fraction",
                                  source="model FLOPs (PaLM: no recompute) / calibrated GEMM peak")
                       if math.isfinite(peak) else unmeasured("mfu", "fraction", "unavailable: no calibration"))

    if metered is not None:
        result.rows += metered.finish(sync, tokens, ctx.run_dir)
    elif measure["energy"]:
        result.rows += energy_pass(call, sync, cell, tokens, float(measure["energy_window_s"]), ctx.run_dir)
    if ctx.trace:  # last, so the profiler never disturbs the timed, memory or energy passes
        from loopscope.bench.profiling import profile_forward_rows

        result.rows += profile_forward_rows(cell, ctx, call, timed.median_s, engine=call.numba_engine)
    return result


class OverlappedEnergy:
    """The timed call with an energy window that opens at the first timed (post-warm-up) call."""

    def __init__(self, call: Callable[[], object], cell: Cell, warmup: int, window_s: float, *,
                 nvml: object = None) -> None:
        from loopscope.bench.meters import energy

        self.call, self.cell, self.warmup, self.window_s = call, cell, warmup, window_s
        self.meter = energy.EnergyMeter(cell.device, min_window_s=window_s, nvml=nvml)
        self.available = self.meter.available()
        self.calls = 0  # calls inside the window
        self._seen = 0

    def __call__(self) -> object:
        if self._seen == self.warmup and self.available:
            self.meter.__enter__()
        self._seen += 1
        if self._seen > self.warmup:
            self.calls += 1
        return self.call()

    def finish(self, sync: Callable[[], None], tokens_per_call: int, run_dir: str) -> list[dict]:
        from loopscope.bench.meters import energy

        if not self.available or self.calls == 0:
            return energy.energy_rows(self.meter, tokens=0)
        while self.meter.elapsed_s() < self.window_s:  # top up a window the timed calls left short
            self.call()
            self.calls += 1
        sync()
        self.meter.__exit__(None, None, None)
        rows = energy.energy_rows(self.meter, tokens=self.calls * tokens_per_call)
        for row in rows:
            row["source"] += "; window overlaps the timed calls"
        return [idle_power_once(run_dir, self.cell.device, min(self.window_s, 5.0)), *rows]


def energy_pass(call: Callable[[], object], sync: Callable[[], None], cell: Cell, tokens_per_call: int,
                window_s: float, run_dir: str) -> list[dict]:
    """Repeat the call until the energy window is filled; NaN with the reason when unavailable."""
    from loopscope.bench.meters import energy

    probe = energy.EnergyMeter(cell.device, min_window_s=window_s)
    if not probe.available():
        return energy.energy_rows(probe, tokens=0)
    rows = [idle_power_once(run_dir, cell.device, min(window_s, 5.0))]  # the floor under the pass
    calls = 0
    with energy.EnergyMeter(cell.device, min_window_s=window_s) as meter:
        while meter.elapsed_s() < window_s or calls == 0:
            call()
            calls += 1
        sync()
    return rows + energy.energy_rows(meter, tokens=calls * tokens_per_call)
