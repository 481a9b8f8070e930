"""Peak memory of a block of code, as a context manager.

CPU: peak resident set size of this process above its RSS at `__enter__`. Linux keeps the peak in
/proc/self/status VmHWM; writing "5" to /proc/self/clear_refs resets it to the current RSS, which makes
VmHWM exact for the window. Where that write is refused and the old peak is above the current RSS, a
background thread samples RSS every few ms instead (which can miss short spikes). `source` says which.
Only this process is counted, not its children; run each cell in a fresh process and enter the meter
before building the model so the weights count.

CUDA: torch's caching-allocator peaks (allocated and reserved) after resetting them, as absolute values
(tensors alive at `__enter__` count), plus this process's used memory as NVML sees it (includes the CUDA
context and non-torch allocations such as cuBLAS workspaces or numba-cuda arrays), sampled during the window.
"""

from __future__ import annotations

import math
import os
import threading
from typing import Any

from loopscope.bench.meters import nvml as nvml_seam
from loopscope.bench.schema import metric_row, unmeasured

PROC_STATUS = "/proc/self/status"
PROC_STATM = "/proc/self/statm"
CLEAR_REFS = "/proc/self/clear_refs"
PAGE_SIZE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def read_status_bytes(path: str = PROC_STATUS) -> dict[str, int]:
    """VmRSS and VmHWM (and any other 'kB' fields) of /proc/<pid>/status, in bytes."""
    values: dict[str, int] = {}
    with open(path) as f:
        for line in f:
            key, _, rest = line.partition(":")
            parts = rest.split()
            if len(parts) == 2 and parts[1] == "kB":
                values[key] = int(parts[0]) * 1024
    return values


def current_rss_bytes(statm: str = PROC_STATM) -> int:
    """Resident set size now (second field of /proc/self/statm, in pages)."""
    with open(statm) as f:
        return int(f.read().split()[1]) * PAGE_SIZE


def estimate_memory_bytes(weights_bytes: float, kv_bytes: float, activation_bytes: float) -> float:
    """The analytic estimate reported beside the measured peak: weights + KV cache + live activations."""
    parts = {"weights_bytes": weights_bytes, "kv_bytes": kv_bytes, "activation_bytes": activation_bytes}
    for name, value in parts.items():
        if value < 0:
            raise ValueError(f"estimate_memory_bytes: {name} must be >= 0, got {value!r}")
    return float(weights_bytes + kv_bytes + activation_bytes)


def estimate_row(weights_bytes: float, kv_bytes: float, activation_bytes: float,
                 **extra: Any) -> dict[str, Any]:
    total = estimate_memory_bytes(weights_bytes, kv_bytes, activation_bytes)
    return metric_row("estimated_mem_bytes", total, "bytes", source="analytic: weights + kv + activations",
                      **extra)


class _Sampler:
    """Calls `read()` every `interval_s` in a daemon thread and keeps the maximum."""

    def __init__(self, read, interval_s: float):
        self._read = read
        self._interval_s = interval_s
        self._stop = threading.Event()
        self.peak = read()
        self.error: str | None = None
        self._thread = threading.Thread(target=self._run, name="loopscope-mem-sampler", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self._interval_s):
            try:
                self.peak = max(self.peak, self._read())
            except Exception as exc:  # a failed read must not kill the measurement thread silently
                self.error = f"{type(exc).__name__}: {exc}"
                return

    def stop(self) -> float:
        self._stop.set()
        self._thread.join()
        try:
            self.peak = max(self.peak, self._read())
        except Exception as exc:
            self.error = f"{type(exc).__name__}: {exc}"
        return self.peak


class NvmlProcessMemory:
    """Peak of this process's used GPU memory as NVML reports it, sampled from start() to stop()."""

    def __init__(self, device: str, *, nvml: Any = None, interval_s: float = 0.01, pid: int | None = None):
        self.device = device
        self.interval_s = interval_s
        self.pid = os.getpid() if pid is None else pid
        self._nvml = nvml
        self._session = None
        self._sampler: _Sampler | None = None
        self._unavailable: str | None = None

    def start(self) -> None:
        session = nvml_seam.nvml_session(self._nvml)
        try:
            nvml = session.__enter__()
        except nvml_seam.NvmlUnavailable as exc:
            self._unavailable = str(exc)
            return
        self._session = session
        errors = nvml_seam.error_types(nvml)
        try:
            handle = nvml_seam.device_handle(nvml, self.device)
        except (nvml_seam.NvmlUnavailable, *errors) as exc:
            self._unavailable = f"no NVML handle for {self.device} ({exc})"
            return

        def read() -> float:  # -1 while this pid is not listed, so the running max stays NaN-free
            procs = nvml.nvmlDeviceGetComputeRunningProcesses(handle)
            used = [p.usedGpuMemory for p in procs if p.pid == self.pid and p.usedGpuMemory is not None]
            return float(sum(used)) if used else -1.0

        try:
            self._sampler = _Sampler(read, self.interval_s)
        except errors as exc:
            self._unavailable = f"nvmlDeviceGetComputeRunningProcesses failed ({exc})"

    def stop(self) -> tuple[float, str]:
        """(peak bytes or NaN, source)."""
        try:
            if self._unavailable is not None:
                return math.nan, f"unavailable: {self._unavailable}"
            assert self._sampler is not None, "NvmlProcessMemory.stop() called before start()"
            peak = self._sampler.stop()
            note = f"; sampling stopped early ({self._sampler.error})" if self._sampler.error else ""
            if peak < 0:
                return math.nan, (f"unavailable: pid {self.pid} not in NVML's process list for {self.device} "
                                  f"(PID namespace of a container?){note}")
            every = f"{self.interval_s * 1e3:g} ms"
            return peak, f"NVML per-process used memory, peak of samples every {every}{note}"
        finally:
            if self._session is not None:
                self._session.__exit__(None, None, None)
                self._session = None


class PeakMemory:
    """`with PeakMemory(device) as m: work()` then read m.peak_bytes, m.reserved_bytes,
    m.nvml_process_bytes, m.source, or m.rows()."""

    def __init__(self, device: str = "cpu", *, sample_interval_s: float = 0.002, nvml: Any = None,
                 proc_status: str = PROC_STATUS, proc_statm: str = PROC_STATM, clear_refs: str = CLEAR_REFS):
        self.device = device
        self.sample_interval_s = sample_interval_s
        self._nvml = nvml
        self._proc_status = proc_status
        self._proc_statm = proc_statm
        self._clear_refs = clear_refs
        self.peak_bytes = math.nan
        self.baseline_bytes = math.nan
        self.reserved_bytes = math.nan
        self.nvml_process_bytes = math.nan
        self.source = "not measured yet"
        self.nvml_source = "not measured yet"
        self._method = ""
        self._sampler: _Sampler | None = None
        self._nvml_process: NvmlProcessMemory | None = None

    # --- context manager -------------------------------------------------------------------------
    def __enter__(self) -> PeakMemory:
        if self.device.startswith("cuda"):
            self._enter_cuda()
        else:
            self._enter_cpu()
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if self.device.startswith("cuda"):
            self._exit_cuda()
        else:
            self._exit_cpu()

    # --- CPU ---------------------------------------------------------------------------------------
    def _enter_cpu(self) -> None:
        try:
            status = read_status_bytes(self._proc_status)
            rss, hwm = status["VmRSS"], status["VmHWM"]
        except (OSError, KeyError, ValueError) as exc:
            self._method = "unavailable"
            self.source = f"unavailable: cannot read VmRSS/VmHWM from {self._proc_status} ({exc})"
            return
        self.baseline_bytes = float(rss)
        if self._reset_hwm():
            self._method = "hwm"
            self.source = f"VmHWM after reset via {self._clear_refs}"
        elif hwm <= rss:
            self._method = "hwm"
            self.source = "VmHWM (peak was already at the current RSS, no reset needed)"
        else:
            try:
                self._sampler = _Sampler(lambda: current_rss_bytes(self._proc_statm), self.sample_interval_s)
            except (OSError, ValueError, IndexError) as exc:
                self._method = "unavailable"
                self.source = (f"unavailable: VmHWM not resettable ({self._clear_refs} not writable) and "
                               f"RSS not readable from {self._proc_statm} ({exc})")
                return
            self._method = "sampling"
            self.source = (f"RSS sampled every {self.sample_interval_s * 1e3:g} ms ({self._clear_refs} not "
                           "writable; short spikes can be missed)")

    def _reset_hwm(self) -> bool:
        try:
            with open(self._clear_refs, "w") as f:
                f.write("5")
            return True
        except OSError:
            return False

    def _exit_cpu(self) -> None:
        if self._method == "hwm":
            try:
                peak = read_status_bytes(self._proc_status)["VmHWM"]
            except (OSError, KeyError, ValueError) as exc:
                self.source = f"unavailable: cannot read VmHWM from {self._proc_status} at exit ({exc})"
                return
            self.peak_bytes = max(float(peak) - self.baseline_bytes, 0.0)
        elif self._method == "sampling" and self._sampler is not None:
            peak = self._sampler.stop()
            if self._sampler.error:
                self.source += f"; sampling stopped early ({self._sampler.error})"
            self.peak_bytes = max(float(peak) - self.baseline_bytes, 0.0)

    # --- CUDA --------------------------------------------------------------------------------------
    def _enter_cuda(self) -> None:
        import torch

        dev = torch.device(self.device)
        torch.cuda.synchronize(dev)
        torch.cuda.reset_peak_memory_stats(dev)
        self.baseline_bytes = float(torch.cuda.memory_allocated(dev))
        self.source = "torch.cuda.max_memory_allocated after reset_peak_memory_stats"
        self._nvml_process = NvmlProcessMemory(self.device, nvml=self._nvml,
                                               interval_s=max(self.sample_interval_s, 0.01))
        self._nvml_process.start()

    def _exit_cuda(self) -> None:
        import torch

        dev = torch.device(self.device)
        torch.cuda.synchronize(dev)
        self.peak_bytes = float(torch.cuda.max_memory_allocated(dev))
        self.reserved_bytes = float(torch.cuda.max_memory_reserved(dev))
        if self._nvml_process is not None:
            self.nvml_process_bytes, self.nvml_source = self._nvml_process.stop()

    # --- rows --------------------------------------------------------------------------------------
    def rows(self, **extra: Any) -> list[dict[str, Any]]:
        """Tidy rows: peak_mem_bytes; on CUDA also peak_mem_reserved_bytes and nvml_process_mem_bytes."""
        rows = [self._row("peak_mem_bytes", self.peak_bytes, self.source, **extra)]
        if self.device.startswith("cuda"):
            rows.append(self._row("peak_mem_reserved_bytes", self.reserved_bytes,
                                  "torch.cuda.max_memory_reserved after reset_peak_memory_stats", **extra))
            rows.append(self._row("nvml_process_mem_bytes", self.nvml_process_bytes, self.nvml_source,
                                  **extra))
        return rows

    @staticmethod
    def _row(metric: str, value: float, source: str, **extra: Any) -> dict[str, Any]:
        if math.isfinite(value):
            return metric_row(metric, value, "bytes", source=source, n_samples=1, **extra)
        return unmeasured(metric, "bytes", source if source.startswith("unavailable") else
                          f"unavailable: {source}", **extra)
