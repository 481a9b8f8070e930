"""Small NVML seam shared by the energy/memory meters, the fingerprint and device-class detection.

Every caller passes the NVML module explicitly: the real `pynvml` (package `nvidia-ml-py`), imported lazily
when None is given, or a fake object with the same function names in tests. Nothing here keeps state.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

# Clock-event ("throttle") reason bits of nvmlDeviceGetCurrentClocksThrottleReasons, as stable names.
THROTTLE_REASON_BITS: dict[int, str] = {
    0x001: "gpu_idle",
    0x002: "applications_clocks_setting",
    0x004: "sw_power_cap",
    0x008: "hw_slowdown",
    0x010: "sync_boost",
    0x020: "sw_thermal_slowdown",
    0x040: "hw_thermal_slowdown",
    0x080: "hw_power_brake_slowdown",
    0x100: "display_clock_setting",
    0x200: "board_limit",
    0x400: "reliability",
}
# Reasons that mean the clocks were held below what the workload asked for (idle and user settings do not).
THROTTLING_REASONS: frozenset[str] = frozenset({
    "sw_power_cap", "hw_slowdown", "sw_thermal_slowdown", "hw_thermal_slowdown",
    "hw_power_brake_slowdown", "board_limit", "reliability",
})

NVML_CLOCK_SM = 1
NVML_CLOCK_MEM = 2
NVML_TEMPERATURE_GPU = 0


class NvmlUnavailable(RuntimeError):
    """NVML cannot be used here; the message says why (it goes into a row's `source`)."""


def error_types(nvml: Any) -> tuple[type[BaseException], ...]:
    """The exception class(es) an NVML call raises: the module's NVMLError, else any Exception."""
    err = getattr(nvml, "NVMLError", None)
    if isinstance(err, type) and issubclass(err, BaseException):
        return (err,)
    return (Exception,)


@contextmanager
def nvml_session(nvml: Any = None) -> Iterator[Any]:
    """Yield an initialised NVML module (nvmlInit ... nvmlShutdown); raise NvmlUnavailable with the reason."""
    if nvml is None:
        try:
            import pynvml as nvml
        except ImportError as exc:
            raise NvmlUnavailable(f"pynvml not importable ({exc})") from exc
    errors = error_types(nvml)
    try:
        nvml.nvmlInit()
    except errors as exc:
        raise NvmlUnavailable(f"nvmlInit failed ({exc})") from exc
    try:
        yield nvml
    finally:
        try:
            nvml.nvmlShutdown()
        except errors:
            pass


def cuda_index(device: str) -> int:
    """'cuda' -> 0, 'cuda:1' -> 1; a ValueError naming the device otherwise."""
    if device == "cuda":
        return 0
    prefix, _, index = device.partition(":")
    if prefix != "cuda" or not index.isdigit():
        raise ValueError(f"not a CUDA device string: {device!r} (expected 'cuda' or 'cuda:N')")
    return int(index)


def device_handle(nvml: Any, device: str, env: Mapping[str, str] | None = None) -> Any:
    """NVML handle of a torch CUDA device, honouring CUDA_VISIBLE_DEVICES (indices or GPU-/MIG- UUIDs).

    torch numbers visible devices in CUDA_DEVICE_ORDER (fastest first by default) while NVML uses PCI bus
    order; with several GPUs set CUDA_DEVICE_ORDER=PCI_BUS_ID so the two agree.
    """
    env = os.environ if env is None else env
    index = cuda_index(device)
    visible = [v.strip() for v in env.get("CUDA_VISIBLE_DEVICES", "").split(",") if v.strip()]
    if "CUDA_VISIBLE_DEVICES" in env and visible:
        if index >= len(visible):
            raise NvmlUnavailable(
                f"{device} is not among CUDA_VISIBLE_DEVICES={env['CUDA_VISIBLE_DEVICES']!r}")
        entry = visible[index]
        if entry.isdigit():
            return nvml.nvmlDeviceGetHandleByIndex(int(entry))
        return nvml.nvmlDeviceGetHandleByUUID(entry)
    count = nvml.nvmlDeviceGetCount()
    if index >= count:
        raise NvmlUnavailable(f"{device} not found: NVML sees {count} device(s)")
    return nvml.nvmlDeviceGetHandleByIndex(index)


def decode(value: Any) -> str:
    """NVML strings are bytes in older bindings and str in newer ones."""
    return value.decode() if isinstance(value, bytes) else str(value)


def throttle_reason_names(mask: int) -> list[str]:
    """Names of the set bits of a clock-event reason mask; unknown bits appear as hex."""
    names = [name for bit, name in THROTTLE_REASON_BITS.items() if mask & bit]
    unknown = mask & ~sum(THROTTLE_REASON_BITS)
    if unknown:
        names.append(f"unknown_0x{unknown:x}")
    return names


def current_throttle_mask(nvml: Any, handle: Any) -> int:
    """Clock-event reasons; newer drivers name the call ...ClocksEventReasons, older ...ThrottleReasons."""
    failures = []
    for name in ("nvmlDeviceGetCurrentClocksEventReasons", "nvmlDeviceGetCurrentClocksThrottleReasons"):
        fn = getattr(nvml, name, None)
        if fn is None:
            continue
        try:
            return int(fn(handle))
        except error_types(nvml) as exc:
            failures.append(f"{name}: {exc}")
    detail = f" ({'; '.join(failures)})" if failures else ""
    raise NvmlUnavailable("no clock-event reason query worked" + detail)
