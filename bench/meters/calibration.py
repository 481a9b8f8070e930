"""Calibrate this machine in this process: GEMM FLOP/s per dtype and memory bandwidth.

Throughput divided by these numbers (MFU, fraction of bandwidth) transfers across machines; raw tokens/s
does not. GEMM: torch.matmul of square matrices into a preallocated output, best (minimum) time of
repeated calls, 2*n^3 FLOP each. Bandwidth: a copy (and, outside quick mode, a triad a = b + s*c) over
arrays several times the last-level cache, counted STREAM-style (copy 2 streams, triad 3, no
write-allocate traffic), best time. A dtype the device cannot multiply is NaN with the reason in `notes`.
"""

from __future__ import annotations

import glob
import math
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

from loopscope.bench.meters.timing import measure
from loopscope.bench.schema import metric_row, unmeasured

_DTYPE_ALIASES: dict[str, str] = {
    "fp32": "fp32", "float32": "fp32", "f32": "fp32", "float": "fp32", "torch.float32": "fp32",
    "bf16": "bf16", "bfloat16": "bf16", "torch.bfloat16": "bf16",
    "fp16": "fp16", "float16": "fp16", "f16": "fp16", "half": "fp16", "torch.float16": "fp16",
}


@dataclass(frozen=True)
class CalibrationPlan:
    """Sizes and time budgets of one calibration; chosen per device and mode by `plan_for`."""
    gemm_n: int
    gemm_budget_s: float  # per dtype
    bw_array_bytes: int
    bw_budget_s: float  # per kernel
    with_triad: bool
    with_fp16: bool


@dataclass(frozen=True)
class Calibration:
    device: str
    gemm_fp32_flops: float
    gemm_bf16_flops: float
    mem_bw_bytes_per_s: float
    seconds_taken: float
    gemm_fp16_flops: float = math.nan
    threads: int = 0
    plan: dict[str, Any] = field(default_factory=dict)
    notes: dict[str, str] = field(default_factory=dict)  # per field: how it was measured, or why NaN

    def peak_flops(self, dtype: Any) -> float:
        """Calibrated GEMM FLOP/s for a dtype name ('fp32', 'bfloat16', torch.float16, ...)."""
        key = _DTYPE_ALIASES.get(str(dtype).lower())
        if key is None:
            raise ValueError(f"Calibration.peak_flops: unknown dtype {dtype!r}; "
                             f"known: {sorted(_DTYPE_ALIASES)}")
        return {"fp32": self.gemm_fp32_flops, "bf16": self.gemm_bf16_flops, "fp16": self.gemm_fp16_flops}[key]

    def mfu(self, model_flops_per_s: float, dtype: Any) -> float:
        """Model FLOP/s as a fraction of the calibrated GEMM peak of `dtype` (NaN if that peak is NaN)."""
        peak = self.peak_flops(dtype)
        return model_flops_per_s / peak if math.isfinite(peak) and peak > 0 else math.nan

    def mfu_row(self, model_flops_per_s: float, dtype: Any, **extra: Any) -> dict[str, Any]:
        peak = self.peak_flops(dtype)
        key = _DTYPE_ALIASES[str(dtype).lower()]
        if not (math.isfinite(peak) and peak > 0):
            why = self.notes.get(f"gemm_{key}_flops", "no calibrated peak")
            return unmeasured("mfu", "fraction", f"unavailable: {key} GEMM peak not calibrated ({why})",
                              **extra)
        return metric_row("mfu", model_flops_per_s / peak, "fraction",
                          source=f"model FLOP/s / calibrated {key} GEMM peak {peak:.3g} FLOP/s", **extra)

    def as_dict(self) -> dict[str, Any]:
        """JSON-serialisable (NaN stays NaN; json.dumps writes it as NaN)."""
        return asdict(self)

    def rows(self, **extra: Any) -> list[dict[str, Any]]:
        """Calibration as tidy rows: calib_gemm_flops (stat = dtype) and calib_mem_bw."""
        out = []
        for key in ("fp32", "bf16", "fp16"):
            value = getattr(self, f"gemm_{key}_flops")
            note = self.notes.get(f"gemm_{key}_flops", "")
            if math.isfinite(value):
                out.append(metric_row("calib_gemm_flops", value, "FLOP/s", stat=key, source=note, **extra))
            else:
                out.append(unmeasured("calib_gemm_flops", "FLOP/s", f"unavailable: {note}", stat=key,
                                      **extra))
        note = self.notes.get("mem_bw_bytes_per_s", "")
        if math.isfinite(self.mem_bw_bytes_per_s):
            out.append(metric_row("calib_mem_bw", self.mem_bw_bytes_per_s, "bytes/s", source=note, **extra))
        else:
            out.append(unmeasured("calib_mem_bw", "bytes/s", f"unavailable: {note}", **extra))
        return out


def last_level_cache_bytes() -> int:
    """Largest CPU cache size from sysfs (0 when unknown)."""
    best = 0
    for size_file in glob.glob("/sys/devices/system/cpu/cpu0/cache/index*/size"):
        try:
            with open(size_file) as f:
                text = f.read().strip()
        except OSError:
            continue
        units = {"K": 1024, "M": 1024**2, "G": 1024**3}
        scale = units.get(text[-1:].upper(), 1)
        digits = text[:-1] if text[-1:].upper() in units else text
        if digits.isdigit():
            best = max(best, int(digits) * scale)
    return best


def _available_ram_bytes() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0


def plan_for(device: str, quick: bool) -> CalibrationPlan:
    """Problem sizes: big enough to reach the device's peak, small enough for the time budget
    (quick ~2 s and default ~10 s on a 2-core CPU)."""
    if device.startswith("cuda"):
        return CalibrationPlan(gemm_n=4096 if quick else 8192, gemm_budget_s=0.3 if quick else 1.5,
                               bw_array_bytes=(512 if quick else 2048) * 1024**2,
                               bw_budget_s=0.3 if quick else 1.5, with_triad=not quick, with_fp16=True)
    # A copy's working set (2 arrays) well beyond the last-level cache so it streams from DRAM; capped by
    # free RAM (3 arrays with the triad). Quick mode settles for 2x LLC in all to save page-faulting time.
    llc = last_level_cache_bytes() or 32 * 1024**2
    want = max(256 * 1024**2, (1 if quick else 2) * llc)
    ram = _available_ram_bytes()
    array_bytes = min(want, ram // 8) if ram else want
    return CalibrationPlan(gemm_n=1024 if quick else 2048, gemm_budget_s=0.3 if quick else 1.5,
                           bw_array_bytes=array_bytes, bw_budget_s=0.45 if quick else 1.2,
                           with_triad=not quick, with_fp16=not quick and cpu_has_native_fp16())


def cpu_has_native_fp16() -> bool:
    """An fp16 matmul instruction set (AVX512-FP16, AMX-FP16). Without one torch emulates fp16 GEMMs at
    about 0.1% of the fp32 rate: one 2048^3 product takes minutes and tells nothing a model here uses."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = {word for line in f if line.startswith("flags") for word in line.split()}
    except OSError:
        return False
    return bool(flags & {"avx512_fp16", "amx_fp16"})


def _best_seconds(fn: Callable[[], Any], budget_s: float, device: str) -> tuple[float, int]:
    """Minimum call time within about `budget_s` (one warm-up call first); returns (seconds, calls)."""
    warm = measure(fn, min_time_s=0.0, min_count=1, max_count=1, warmup=1, device=device)
    remaining = budget_s - warm.first_call_s - float(warm.samples_s.sum())
    if remaining <= 0:  # one call already used the budget (e.g. emulated bf16): keep what we have
        return float(warm.samples_s.min()), 1
    timed = measure(fn, min_time_s=remaining, min_count=3, max_count=10_000, warmup=0, device=device)
    return float(min(timed.samples_s.min(), warm.samples_s.min())), timed.summary.n + 1


def _gemm_flops(torch: Any, device: str, dtype: Any, n: int, budget_s: float) -> tuple[float, str]:
    try:
        gen = torch.Generator(device=device).manual_seed(0)
        a = torch.randn(n, n, device=device, dtype=torch.float32, generator=gen).to(dtype)
        b = torch.randn(n, n, device=device, dtype=torch.float32, generator=gen).to(dtype)
        out = torch.empty(n, n, device=device, dtype=dtype)
        seconds, calls = _best_seconds(lambda: torch.matmul(a, b, out=out), budget_s, device)
    except (RuntimeError, TypeError, NotImplementedError) as exc:
        return math.nan, f"torch.matmul {dtype} unsupported on {device}: {type(exc).__name__}: {exc}"
    how = f"torch.matmul {n}x{n} {dtype}, best of {calls}"
    if device.startswith("cuda") and dtype == torch.float32:
        how += f", tf32 {'allowed' if torch.backends.cuda.matmul.allow_tf32 else 'off'}"
    return 2.0 * n**3 / seconds, how


def _bandwidth(torch: Any, device: str, plan: CalibrationPlan) -> tuple[float, str]:
    n = plan.bw_array_bytes // 4
    try:
        a = torch.ones(n, device=device, dtype=torch.float32)  # ones, not empty: touch every page first
        b = torch.ones(n, device=device, dtype=torch.float32)
        c = torch.ones(n, device=device, dtype=torch.float32) if plan.with_triad else None
    except (RuntimeError, MemoryError) as exc:
        return math.nan, f"cannot allocate 3 x {plan.bw_array_bytes} bytes on {device}: {exc}"
    mib = plan.bw_array_bytes / 1024**2
    seconds, calls = _best_seconds(lambda: b.copy_(a), plan.bw_budget_s, device)
    results = {"copy": 2 * plan.bw_array_bytes / seconds}
    details = [f"copy of {mib:.0f} MiB: {results['copy'] / 1e9:.1f} GB/s (best of {calls})"]
    if c is not None:
        seconds, calls = _best_seconds(lambda: torch.add(b, c, alpha=3.0, out=a), plan.bw_budget_s, device)
        results["triad"] = 3 * plan.bw_array_bytes / seconds
        details.append(f"triad: {results['triad'] / 1e9:.1f} GB/s (best of {calls})")
    best = max(results, key=results.get)
    return results[best], f"{'; '.join(details)}; reported {best} (STREAM byte counting)"


def calibrate(device: str = "cpu", *, quick: bool = False,
              plan: CalibrationPlan | None = None) -> Calibration:
    """Measure fp32/bf16 (and fp16 on CUDA or outside quick mode) GEMM FLOP/s and memory bandwidth.
    `plan` overrides the sizes chosen by `plan_for(device, quick)` (tests use tiny ones)."""
    import torch

    start = time.perf_counter()
    plan = plan or plan_for(device, quick)
    notes: dict[str, str] = {}
    flops: dict[str, float] = {}
    dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
    for key, dtype in dtypes.items():
        if key == "fp16" and not plan.with_fp16:
            flops[key] = math.nan
            notes["gemm_fp16_flops"] = (f"fp16 GEMM not calibrated on {device} in quick mode" if quick else
                                        f"fp16 GEMM not calibrated on {device}: no native fp16 matmul "
                                        "(AVX512-FP16 or AMX-FP16); emulated, it would take minutes")
            continue
        flops[key], notes[f"gemm_{key}_flops"] = _gemm_flops(torch, device, dtype, plan.gemm_n,
                                                              plan.gemm_budget_s)
    bandwidth, notes["mem_bw_bytes_per_s"] = _bandwidth(torch, device, plan)
    threads = torch.get_num_threads()  # host threads torch used (they drive the CPU GEMMs)
    return Calibration(device=device, gemm_fp32_flops=flops["fp32"], gemm_bf16_flops=flops["bf16"],
                       mem_bw_bytes_per_s=bandwidth, seconds_taken=time.perf_counter() - start,
                       gemm_fp16_flops=flops["fp16"], threads=threads, plan=asdict(plan), notes=notes)


# --- the run's peak: the best of several probes spread over the run ------------------------------

PEAK_FIELDS: tuple[str, ...] = ("gemm_fp32_flops", "gemm_bf16_flops", "gemm_fp16_flops", "mem_bw_bytes_per_s")


def usable_cores() -> int:
    """CPUs this process may run on (the affinity mask, not the machine's count)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def load_1m() -> float:
    try:
        return float(os.getloadavg()[0])
    except OSError:
        return math.nan


def best_of(calibrations: list[dict[str, Any]]) -> dict[str, Any]:
    """One calibration whose peaks are the best seen by any probe: a probe can only be slowed down
    (a busy machine, a cold clock), never sped up, so the maximum is the closest to the machine's peak."""
    if not calibrations:
        return {}
    out = dict(calibrations[0])
    notes = dict(out.get("notes") or {})
    for key in PEAK_FIELDS:
        values = [float(c[key]) for c in calibrations if isinstance(c.get(key), (int, float))
                  and math.isfinite(float(c[key]))]
        if values:
            out[key] = max(values)
            if len(calibrations) > 1:
                notes[key] = (f"best of {len(values)} probes spread over the run "
                              f"(lowest {min(values):.3g}); first: {notes.get(key, '')}")
    out["notes"] = notes
    out["probes"] = len(calibrations)
    return out


@dataclass
class CalibrationProbes:
    """Short quick-mode probes between cells (every `every_s` seconds) and the conditions each cell ran in
    (1-minute load average against the usable cores). The first calibration of the run is the first probe;
    `manifest_entries` gives the run's best-of calibration, the probes and the per-cell conditions."""

    device: str
    first: dict[str, Any]
    every_s: float = 180.0
    probes: list[dict[str, Any]] = field(default_factory=list)
    conditions: dict[str, dict[str, Any]] = field(default_factory=dict)
    probe_fn: Callable[[str], dict[str, Any]] | None = None  # test seam: device -> calibration dict
    _last: float = field(default_factory=time.monotonic)

    @classmethod
    def resume(cls, manifest: dict[str, Any], calibration: dict[str, Any], device: str,
               **kwargs: Any) -> CalibrationProbes:
        """Continue the probes and conditions a resumed run already recorded."""
        first = manifest.get("calibration_first") or calibration
        return cls(device=device, first=dict(first), probes=list(manifest.get("calibration_probes") or []),
                   conditions=dict(manifest.get("cell_conditions") or {}), **kwargs)

    def after_cell(self, cell_id: str) -> None:
        self.conditions[cell_id] = {"load_1m": load_1m(), "cores": usable_cores()}
        if self.first and time.monotonic() - self._last >= self.every_s:
            self.probe()

    def probe(self) -> None:
        started = time.time()
        cal = self.probe_fn(self.device) if self.probe_fn else calibrate(self.device, quick=True).as_dict()
        self.probes.append({"unix_s": started, "load_1m": load_1m(),
                            **{k: cal.get(k, math.nan) for k in PEAK_FIELDS}})
        self._last = time.monotonic()

    def manifest_entries(self) -> dict[str, Any]:
        if not self.first:
            return {}
        return {"calibration": best_of([self.first, *self.probes]), "calibration_first": self.first,
                "calibration_probes": self.probes, "cell_conditions": self.conditions}
