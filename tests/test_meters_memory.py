"""PeakMemory on this CPU (VmHWM reset and RSS sampling), and its CUDA path with torch.cuda and NVML faked."""

from __future__ import annotations

import math
import os
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from loopscope.bench.meters import memory
from loopscope.bench.meters.memory import NvmlProcessMemory, PeakMemory, estimate_memory_bytes
from tests.fake_nvml import FakeGPU, FakeNVML

MB = 1024**2


def touch(nbytes: int) -> np.ndarray:
    """An array whose pages are all resident (np.ones writes every page)."""
    return np.ones(nbytes // 8, dtype=np.float64)


def test_cpu_peak_above_baseline_with_hwm_reset():
    with PeakMemory("cpu") as m:
        block = touch(200 * MB)
        del block  # freed before exit: only a true peak meter still sees it
    assert m.source == "VmHWM after reset via /proc/self/clear_refs"
    assert 190 * MB <= m.peak_bytes <= 320 * MB
    assert m.baseline_bytes > 0 and math.isnan(m.reserved_bytes) and math.isnan(m.nvml_process_bytes)


def test_cpu_peak_is_not_inflated_by_an_earlier_peak():
    big = touch(300 * MB)
    del big  # the process high-water mark is now ~300 MB above the current RSS
    with PeakMemory("cpu") as m:
        small = touch(50 * MB)
        del small
    assert 45 * MB <= m.peak_bytes <= 150 * MB


def test_cpu_sampling_fallback_when_clear_refs_is_not_writable(tmp_path: Path):
    big = touch(300 * MB)
    del big  # VmHWM > VmRSS, and it cannot be reset: the meter must sample instead
    with PeakMemory("cpu", clear_refs=str(tmp_path / "missing" / "clear_refs"), sample_interval_s=0.002) as m:
        held = touch(100 * MB)
        time.sleep(0.05)  # many sampling periods with the block resident
        del held
    assert m.source.startswith("RSS sampled every 2 ms")
    assert 90 * MB <= m.peak_bytes <= 220 * MB


def test_cpu_hwm_already_at_rss_needs_no_reset(tmp_path: Path):
    status = tmp_path / "status"
    status.write_text("Name:\tpython\nVmHWM:\t  204800 kB\nVmRSS:\t  204800 kB\n")
    with PeakMemory("cpu", proc_status=str(status), clear_refs=str(tmp_path / "no" / "clear_refs")) as m:
        status.write_text("Name:\tpython\nVmHWM:\t  307200 kB\nVmRSS:\t  204800 kB\n")
    assert m.source.startswith("VmHWM (peak was already at the current RSS")
    assert m.peak_bytes == 100 * MB


def test_cpu_unreadable_status_gives_nan_row(tmp_path: Path):
    with PeakMemory("cpu", proc_status=str(tmp_path / "absent")) as m:
        pass
    assert math.isnan(m.peak_bytes)
    (row,) = m.rows()
    assert row["metric"] == "peak_mem_bytes" and math.isnan(row["value"])
    assert row["source"].startswith("unavailable: cannot read VmRSS/VmHWM")


def test_cpu_rows():
    with PeakMemory("cpu") as m:
        block = touch(20 * MB)
        del block
    (row,) = m.rows(cell_id="c")
    assert row["metric"] == "peak_mem_bytes" and row["unit"] == "bytes" and row["cell_id"] == "c"
    assert row["value"] == m.peak_bytes and row["source"] == m.source


def test_estimate_memory_bytes():
    assert estimate_memory_bytes(1e6, 2e5, 3e5) == 1.5e6
    row = memory.estimate_row(1e6, 2e5, 3e5)
    assert row["metric"] == "estimated_mem_bytes" and row["value"] == 1.5e6
    with pytest.raises(ValueError, match="kv_bytes must be >= 0"):
        estimate_memory_bytes(1.0, -1.0, 0.0)


# --- CUDA path with fakes --------------------------------------------------------------------------------
class FakeTorchCudaMemory:
    """Stands in for torch.cuda's allocator statistics."""

    def __init__(self):
        self.allocated, self.peak, self.reserved_peak, self.resets, self.syncs = 4 * MB, 999 * MB, 0, 0, 0

    def synchronize(self, device=None):
        self.syncs += 1

    def reset_peak_memory_stats(self, device=None):
        self.resets += 1
        self.peak, self.reserved_peak = self.allocated, self.allocated

    def memory_allocated(self, device=None):
        return self.allocated

    def max_memory_allocated(self, device=None):
        return self.peak

    def max_memory_reserved(self, device=None):
        return self.reserved_peak


@pytest.fixture
def fake_cuda_memory(monkeypatch) -> FakeTorchCudaMemory:
    fake = FakeTorchCudaMemory()
    for name in ("synchronize", "reset_peak_memory_stats", "memory_allocated", "max_memory_allocated",
                 "max_memory_reserved"):
        monkeypatch.setattr(torch.cuda, name, getattr(fake, name))
    return fake


def test_cuda_peak_resets_then_reads_allocator_and_nvml(fake_cuda_memory):
    pid = os.getpid()
    gpu = FakeGPU(processes=[(pid + 1, 10 * MB), (pid, 300 * MB)])
    fake_nvml = FakeNVML([gpu])
    with PeakMemory("cuda:0", nvml=fake_nvml, sample_interval_s=0.005) as m:
        fake_cuda_memory.peak, fake_cuda_memory.reserved_peak = 120 * MB, 160 * MB
        gpu.processes = [(pid, 500 * MB)]
        time.sleep(0.05)
        gpu.processes = [(pid, 350 * MB)]  # the NVML peak must survive the drop
    assert fake_cuda_memory.resets == 1 and fake_cuda_memory.syncs == 2
    assert m.peak_bytes == 120 * MB and m.reserved_bytes == 160 * MB and m.baseline_bytes == 4 * MB
    assert m.nvml_process_bytes == 500 * MB
    rows = {r["metric"]: r for r in m.rows()}
    assert set(rows) == {"peak_mem_bytes", "peak_mem_reserved_bytes", "nvml_process_mem_bytes"}
    assert rows["nvml_process_mem_bytes"]["source"].startswith("NVML per-process used memory")
    assert fake_nvml.initialised == 0


def test_cuda_without_nvml_still_reports_torch_peaks(fake_cuda_memory):
    with PeakMemory("cuda:0", nvml=FakeNVML(init_error="Driver Not Loaded")) as m:
        fake_cuda_memory.peak = 64 * MB
    rows = {r["metric"]: r for r in m.rows()}
    assert rows["peak_mem_bytes"]["value"] == 64 * MB
    assert math.isnan(rows["nvml_process_mem_bytes"]["value"])
    assert rows["nvml_process_mem_bytes"]["source"] == "unavailable: nvmlInit failed (Driver Not Loaded)"


def test_nvml_process_not_listed_is_nan_with_reason():
    meter = NvmlProcessMemory("cuda:0", nvml=FakeNVML([FakeGPU(processes=[(1, MB)])]), pid=4242)
    meter.start()
    value, source = meter.stop()
    assert math.isnan(value)
    assert source.startswith("unavailable: pid 4242 not in NVML's process list for cuda:0")


def test_nvml_process_query_unsupported():
    fake = FakeNVML([FakeGPU(unsupported={"processes"})])
    meter = NvmlProcessMemory("cuda:0", nvml=fake)
    meter.start()
    value, source = meter.stop()
    assert math.isnan(value) and source.startswith("unavailable: nvmlDeviceGetComputeRunningProcesses failed")
    assert fake.initialised == 0


def test_nvml_process_missing_device():
    value, source = _run(NvmlProcessMemory("cuda:3", nvml=FakeNVML([FakeGPU()])))
    assert math.isnan(value) and source == ("unavailable: no NVML handle for cuda:3 "
                                            "(cuda:3 not found: NVML sees 1 device(s))")


def _run(meter: NvmlProcessMemory) -> tuple[float, str]:
    meter.start()
    return meter.stop()
