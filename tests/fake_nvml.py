"""Fakes of `pynvml` and `torch.cuda` for the meter, fingerprint and detection tests (no GPU here).

Only the functions loopscope calls exist. Each GPU's energy counter advances with real time at the
GPU's `power_w`, so a window of t seconds reads about power_w * t joules.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from types import SimpleNamespace


class FakeNVMLError(Exception):
    pass


@dataclass
class FakeGPU:
    name: str = "NVIDIA H200"
    uuid: str = "GPU-00000000-1111-2222-3333-444444444444"
    memory_total: int = 150_000_000_000
    brand: int = 2  # NVML_BRAND_TESLA
    power_w: float = 300.0
    energy_supported: bool = True
    power_supported: bool = True
    mig_mode: tuple[int, int] = (0, 0)
    throttle_mask: int = 0
    temperature_c: int = 41
    sm_clock_mhz: int = 1980
    processes: list[tuple[int, int | None]] = field(default_factory=list)  # (pid, used bytes)
    unsupported: set[str] = field(default_factory=set)  # names of queries that raise NOT_SUPPORTED
    created: float = field(default_factory=time.perf_counter)
    energy_offset_mj: int = 123_456_789


class FakeNVML:
    NVMLError = FakeNVMLError

    def __init__(self, gpus: list[FakeGPU] | None = None, *, init_error: str | None = None,
                 driver: str = "550.54.15", cuda: int = 12040):
        self.gpus = [FakeGPU()] if gpus is None else gpus
        self.init_error = init_error
        self.driver = driver
        self.cuda = cuda
        self.initialised = 0  # nvmlInit minus nvmlShutdown calls: must be back to 0 after each meter
        self.calls: list[str] = []

    # --- session ------------------------------------------------------------------------------
    def nvmlInit(self):
        if self.init_error:
            raise FakeNVMLError(self.init_error)
        self.initialised += 1

    def nvmlShutdown(self):
        self.initialised -= 1

    def _gpu(self, handle: FakeGPU, query: str) -> FakeGPU:
        self.calls.append(query)
        if self.initialised <= 0:
            raise FakeNVMLError("Uninitialized")
        if query in handle.unsupported:
            raise FakeNVMLError("Not Supported")
        return handle

    # --- system / handles ---------------------------------------------------------------------
    def nvmlSystemGetDriverVersion(self):
        return self.driver

    def nvmlSystemGetCudaDriverVersion(self):
        return self.cuda

    def nvmlDeviceGetCount(self):
        return len(self.gpus)

    def nvmlDeviceGetHandleByIndex(self, index):
        if not 0 <= index < len(self.gpus):
            raise FakeNVMLError("Invalid Argument")
        return self.gpus[index]

    def nvmlDeviceGetHandleByUUID(self, uuid):
        for gpu in self.gpus:
            if gpu.uuid == uuid:
                return gpu
        raise FakeNVMLError("Not Found")

    # --- device queries -----------------------------------------------------------------------
    def nvmlDeviceGetTotalEnergyConsumption(self, handle):
        gpu = self._gpu(handle, "energy")
        if not gpu.energy_supported:
            raise FakeNVMLError("Not Supported")
        return int(gpu.energy_offset_mj + gpu.power_w * (time.perf_counter() - gpu.created) * 1e3)

    def nvmlDeviceGetPowerUsage(self, handle):
        gpu = self._gpu(handle, "power")
        if not gpu.power_supported:
            raise FakeNVMLError("Not Supported")
        return int(gpu.power_w * 1e3)

    def nvmlDeviceGetName(self, handle):
        return self._gpu(handle, "name").name.encode()  # older bindings return bytes

    def nvmlDeviceGetUUID(self, handle):
        return self._gpu(handle, "uuid").uuid

    def nvmlDeviceGetMemoryInfo(self, handle):
        gpu = self._gpu(handle, "memory")
        return SimpleNamespace(total=gpu.memory_total, used=0, free=gpu.memory_total)

    def nvmlDeviceGetBrand(self, handle):
        return self._gpu(handle, "brand").brand

    def nvmlDeviceGetMigMode(self, handle):
        return list(self._gpu(handle, "mig").mig_mode)

    def nvmlDeviceGetCudaComputeCapability(self, handle):
        self._gpu(handle, "cc")
        return (9, 0)

    def nvmlDeviceGetClockInfo(self, handle, clock_type):
        gpu = self._gpu(handle, "clock")
        return gpu.sm_clock_mhz if clock_type == 1 else 2619

    def nvmlDeviceGetMaxClockInfo(self, handle, clock_type):
        self._gpu(handle, "max_clock")
        return 1980 if clock_type == 1 else 2619

    def nvmlDeviceGetPowerManagementLimit(self, handle):
        self._gpu(handle, "power_limit")
        return 700_000

    def nvmlDeviceGetPersistenceMode(self, handle):
        self._gpu(handle, "persistence")
        return 1

    def nvmlDeviceGetTemperature(self, handle, sensor):
        return self._gpu(handle, "temperature").temperature_c

    def nvmlDeviceGetCurrentClocksThrottleReasons(self, handle):
        return self._gpu(handle, "throttle").throttle_mask

    def nvmlDeviceGetComputeRunningProcesses(self, handle):
        gpu = self._gpu(handle, "processes")
        return [SimpleNamespace(pid=pid, usedGpuMemory=used) for pid, used in gpu.processes]


class FakeTorchCuda:
    """Stands in for `torch.cuda` in device-class detection: a list of (name, total memory bytes)."""

    def __init__(self, devices: list[tuple[str, int]]):
        self.devices = devices

    def is_available(self) -> bool:
        return bool(self.devices)

    def device_count(self) -> int:
        return len(self.devices)

    def get_device_name(self, index: int = 0) -> str:
        return self.devices[index][0]

    def get_device_properties(self, index: int = 0) -> SimpleNamespace:
        name, memory = self.devices[index]
        return SimpleNamespace(name=name, total_memory=memory)
