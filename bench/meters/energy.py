"""Energy over a window, as a context manager: NVML on NVIDIA GPUs, RAPL powercap on CPUs, else NaN.

Sources, in the order tried:
- "nvml-energy-counter": delta of nvmlDeviceGetTotalEnergyConsumption (mJ since driver load, Volta+).
- "nvml-power-sampling": nvmlDeviceGetPowerUsage (mW) sampled in a thread and integrated (trapezoids);
  on Ampere (non-GA100) and newer this reading is itself a ~1 s average, so short windows are biased.
- "rapl": top-level package zones of /sys/class/powercap (intel-rapl:N, also used by AMD Zen; amd-rapl:N
  accepted too), counters polled in a thread so wrap-arounds at max_energy_range_uj are all seen. Subzones
  (core, uncore, dram), psys and the intel-rapl-mmio duplicate are left out so nothing is counted twice.
- "unavailable: <why>".
The counters update every 10-100 ms, so windows shorter than `min_window_s` (default 5 s) are reported as
NaN with source "window too short: X s < 5 s". Fill the window by repeating the workload:

    with EnergyMeter(device) as em:
        calls = repeat_to_fill(step, em.min_window_s, sync=sync)
    rows = energy_rows(em, tokens=calls * tokens_per_call)
"""

from __future__ import annotations

import math
import os
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from loopscope.bench.meters import nvml as nvml_seam
from loopscope.bench.schema import metric_row, unmeasured

POWERCAP_ROOT = "/sys/class/powercap"
# Top-level RAPL zones: "<control type>:<index>" with no sub-index. intel-rapl-mmio duplicates package-N.
_TOP_LEVEL_ZONE = re.compile(r"^(intel-rapl|amd-rapl|amd_rapl):(\d+)$")


class EnergyUnavailable(RuntimeError):
    """No energy reading is possible; the message says why."""


# --- RAPL powercap -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class RaplZone:
    path: str  # the zone directory
    name: str  # e.g. "package-0"
    max_energy_range_uj: int

    def read_uj(self) -> int:
        path = os.path.join(self.path, "energy_uj")
        try:
            with open(path) as f:
                return int(f.read().strip())
        except (OSError, ValueError) as exc:
            raise EnergyUnavailable(f"RAPL counter {path} not readable ({exc})") from exc


def discover_rapl_zones(root: str = POWERCAP_ROOT) -> list[RaplZone]:
    """Top-level package zones under `root` whose counters can be read; EnergyUnavailable says why none."""
    if not os.path.isdir(root):
        raise EnergyUnavailable(f"no powercap directory at {root}")
    zones: list[RaplZone] = []
    seen_names: set[str] = set()
    problems: list[str] = []
    for entry in sorted(os.listdir(root), key=_zone_sort_key):
        if not _TOP_LEVEL_ZONE.match(entry):
            continue
        zone_dir = os.path.join(root, entry)
        try:
            with open(os.path.join(zone_dir, "name")) as f:
                name = f.read().strip()
            with open(os.path.join(zone_dir, "max_energy_range_uj")) as f:
                max_range = int(f.read().strip())
        except (OSError, ValueError) as exc:
            problems.append(f"{zone_dir}: {exc}")
            continue
        if not name.startswith("package"):
            continue  # psys (platform) overlaps the packages; dram/core live in subzones
        if name in seen_names:
            continue  # same package exposed twice (multi-die duplicates): count it once
        zone = RaplZone(zone_dir, name, max_range)
        try:
            zone.read_uj()
        except EnergyUnavailable as exc:
            problems.append(str(exc))
            continue
        seen_names.add(name)
        zones.append(zone)
    if not zones:
        why = "; ".join(problems) if problems else "no readable top-level RAPL package zone"
        raise EnergyUnavailable(f"RAPL under {root}: {why}")
    return zones


def _zone_sort_key(entry: str) -> tuple[str, int]:
    m = _TOP_LEVEL_ZONE.match(entry)
    return (m.group(1), int(m.group(2))) if m else (entry, -1)


class _RaplCounters:
    """Accumulates energy over all zones; `poll()` adds the delta since the last read, handling wrap."""

    def __init__(self, zones: list[RaplZone]):
        self.zones = zones
        self._lock = threading.Lock()
        self._last = {z.path: z.read_uj() for z in zones}
        self.total_uj = 0
        self.wraps = 0

    def poll(self) -> None:
        with self._lock:
            for zone in self.zones:
                now = zone.read_uj()
                delta = now - self._last[zone.path]
                if delta < 0:  # the counter wrapped at max_energy_range_uj
                    delta += zone.max_energy_range_uj
                    self.wraps += 1
                self.total_uj += delta
                self._last[zone.path] = now


# --- NVML ------------------------------------------------------------------------------------------------
class _PowerIntegrator:
    """Samples power (W) in a thread and integrates it over time with the trapezoid rule."""

    def __init__(self, read_w: Callable[[], float], interval_s: float):
        self._read_w = read_w
        self._interval_s = interval_s
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self.joules = 0.0
        self.samples = 0
        self.error: str | None = None
        self._last = (time.perf_counter(), read_w())
        self._thread = threading.Thread(target=self._run, name="loopscope-power-sampler", daemon=True)
        self._thread.start()

    def sample(self) -> None:
        watts = self._read_w()
        now = time.perf_counter()
        with self._lock:
            t0, w0 = self._last
            self.joules += 0.5 * (w0 + watts) * (now - t0)
            self._last = (now, watts)
            self.samples += 1

    def _run(self) -> None:
        while not self._stop.wait(self._interval_s):
            try:
                self.sample()
            except Exception as exc:  # record and stop; the final sample at stop() decides
                self.error = f"{type(exc).__name__}: {exc}"
                return

    def stop(self) -> float:
        self._stop.set()
        self._thread.join()
        self.sample()
        return self.joules


# --- the meter -------------------------------------------------------------------------------------------
class EnergyMeter:
    """`with EnergyMeter(device) as em: work()`; then em.joules, em.duration_s, em.avg_power_w, em.source,
    em.too_short. NaN joules always come with a source that says why."""

    def __init__(self, device: str = "cpu", *, nvml: Any = None, powercap_root: str = POWERCAP_ROOT,
                 min_window_s: float = 5.0, sample_interval_s: float = 0.1):
        self.device = device
        self.min_window_s = min_window_s
        self.sample_interval_s = sample_interval_s
        self._nvml = nvml
        self._powercap_root = powercap_root
        self.joules = math.nan
        self.raw_joules = math.nan  # what the counter said, even when the window was too short
        self.duration_s = math.nan
        self.avg_power_w = math.nan
        self.too_short = False
        self.source = "not measured yet"
        self.note = ""  # caveats that do not make the number wrong (MIG: whole-GPU energy, wraps seen)
        self.zones: list[str] = []  # RAPL zones read, e.g. ["package-0"]
        self._kind = ""
        self._unavailable: str | None = None
        self._rapl: _RaplCounters | None = None
        self._stop_reading: Callable[[], float] | None = None
        self._cleanup: Callable[[], None] | None = None
        self._poller: threading.Thread | None = None
        self._poll_stop = threading.Event()
        self._t0 = 0.0

    def __enter__(self) -> EnergyMeter:
        try:
            if self.device.startswith("cuda"):
                self._start_nvml()
            elif self.device == "cpu":
                self._start_rapl()
            else:
                raise EnergyUnavailable(f"no energy counter known for device {self.device!r}")
        except EnergyUnavailable as exc:
            self._unavailable = str(exc)
        self._t0 = time.perf_counter()
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.duration_s = time.perf_counter() - self._t0
        raw = math.nan
        if self._unavailable is None and self._stop_reading is not None:
            try:
                raw = self._stop_reading()
            except EnergyUnavailable as err:
                self._unavailable = str(err)
        if self._cleanup is not None:
            self._cleanup()
        self.raw_joules = raw
        self.too_short = self.duration_s < self.min_window_s
        if self._unavailable is not None:
            self.source = f"unavailable: {self._unavailable}"
        elif self.too_short:
            self.source = f"window too short: {self.duration_s:.3g} s < {self.min_window_s:g} s"
        elif not raw > 0:
            self.source = f"unavailable: {self._kind} did not advance over {self.duration_s:.3g} s"
        else:
            self.source = self._kind
            self.joules = raw
            self.avg_power_w = raw / self.duration_s

    def available(self) -> bool:
        """Whether a source can be opened now, without starting a window; if not, `source` says why
        (so `energy_rows(meter, tokens=0)` on this unused meter gives the NaN rows)."""
        try:
            if self.device.startswith("cuda"):
                self._probe_nvml()
            elif self.device == "cpu":
                discover_rapl_zones(self._powercap_root)
            else:
                raise EnergyUnavailable(f"no energy counter known for device {self.device!r}")
        except EnergyUnavailable as exc:
            self.source = f"unavailable: {exc}"
            return False
        return True

    def elapsed_s(self) -> float:
        """Seconds since `__enter__` (for loops that fill the window)."""
        return time.perf_counter() - self._t0

    def poll(self) -> None:
        """Read the RAPL counters now (the poller thread does this every sample_interval_s); a no-op
        for other sources. Calling it at least once per wrap period guarantees no wrap is missed."""
        if self._rapl is not None:
            self._rapl.poll()

    # --- RAPL --------------------------------------------------------------------------------------
    def _start_rapl(self) -> None:
        counters = _RaplCounters(discover_rapl_zones(self._powercap_root))
        self._kind = "rapl"
        self.zones = [z.name for z in counters.zones]
        errors: list[str] = []

        def poll_loop() -> None:
            while not self._poll_stop.wait(self.sample_interval_s):
                try:
                    counters.poll()
                except EnergyUnavailable as exc:
                    errors.append(str(exc))
                    return

        def stop_reading() -> float:
            self._poll_stop.set()
            self._poller.join()
            if errors:
                raise EnergyUnavailable(f"RAPL read failed during the window ({errors[0]})")
            counters.poll()
            if counters.wraps:
                self.note = f"RAPL counter wrapped {counters.wraps} time(s); handled"
            return counters.total_uj * 1e-6

        self._rapl = counters
        self._poller = threading.Thread(target=poll_loop, name="loopscope-rapl-poller", daemon=True)
        self._poller.start()
        self._stop_reading = stop_reading

    # --- NVML --------------------------------------------------------------------------------------
    def _start_nvml(self) -> None:
        session = nvml_seam.nvml_session(self._nvml)
        try:
            nvml = session.__enter__()
        except nvml_seam.NvmlUnavailable as exc:
            raise EnergyUnavailable(str(exc)) from exc
        self._cleanup = lambda: session.__exit__(None, None, None)
        errors = nvml_seam.error_types(nvml)
        try:
            handle = nvml_seam.device_handle(nvml, self.device)
        except (nvml_seam.NvmlUnavailable, *errors) as exc:
            raise EnergyUnavailable(f"no NVML handle for {self.device} ({exc})") from exc
        self.note = self._mig_note(nvml, handle, errors)

        try:
            start_mj = nvml.nvmlDeviceGetTotalEnergyConsumption(handle)
        except errors as counter_exc:
            self._start_power_sampling(nvml, handle, errors, counter_exc)
            return
        self._kind = "nvml-energy-counter"

        def stop_reading() -> float:
            try:
                end_mj = nvml.nvmlDeviceGetTotalEnergyConsumption(handle)
            except errors as exc:
                raise EnergyUnavailable(
                    f"nvmlDeviceGetTotalEnergyConsumption failed at exit ({exc})") from exc
            return (end_mj - start_mj) * 1e-3

        self._stop_reading = stop_reading

    def _probe_nvml(self) -> None:
        try:
            with nvml_seam.nvml_session(self._nvml) as nvml:
                errors = nvml_seam.error_types(nvml)
                try:
                    handle = nvml_seam.device_handle(nvml, self.device)
                except (nvml_seam.NvmlUnavailable, *errors) as exc:
                    raise EnergyUnavailable(f"no NVML handle for {self.device} ({exc})") from exc
                failures = []
                for query in ("nvmlDeviceGetTotalEnergyConsumption", "nvmlDeviceGetPowerUsage"):
                    try:
                        getattr(nvml, query)(handle)
                        return
                    except (*errors, AttributeError) as exc:
                        failures.append(f"{query}: {exc}")
                raise EnergyUnavailable(f"no NVML energy or power reading on {self.device} "
                                        f"({'; '.join(failures)})")
        except nvml_seam.NvmlUnavailable as exc:
            raise EnergyUnavailable(str(exc)) from exc

    def _start_power_sampling(self, nvml: Any, handle: Any, errors: tuple,
                              counter_exc: BaseException) -> None:
        try:
            integrator = _PowerIntegrator(lambda: nvml.nvmlDeviceGetPowerUsage(handle) * 1e-3,
                                          self.sample_interval_s)
        except errors as exc:
            raise EnergyUnavailable(f"neither nvmlDeviceGetTotalEnergyConsumption ({counter_exc}) nor "
                                    f"nvmlDeviceGetPowerUsage ({exc}) works on {self.device}") from exc
        self._kind = "nvml-power-sampling"

        def stop_reading() -> float:
            try:
                joules = integrator.stop()
            except errors as exc:
                raise EnergyUnavailable(f"nvmlDeviceGetPowerUsage failed at exit ({exc})") from exc
            if integrator.error:
                raise EnergyUnavailable(f"power sampling failed during the window ({integrator.error})")
            return joules

        self._stop_reading = stop_reading

    @staticmethod
    def _mig_note(nvml: Any, handle: Any, errors: tuple) -> str:
        try:
            current, _pending = nvml.nvmlDeviceGetMigMode(handle)
        except (*errors, AttributeError, TypeError, ValueError):
            return ""
        return "MIG enabled: energy is for the whole GPU, all slices" if current == 1 else ""


# --- helpers for the executor ------------------------------------------------------------------------------
def repeat_to_fill(fn: Callable[[], Any], min_window_s: float, *, sync: Callable[[], None] | None = None,
                   max_calls: int | None = None) -> int:
    """Call `fn` until `min_window_s` has passed (at least once); return the number of calls.

    Use inside an EnergyMeter so its window is long enough; the work done is calls x work per call.
    """
    calls = 0
    start = time.perf_counter()
    while True:
        fn()
        if sync is not None:
            sync()
        calls += 1
        if time.perf_counter() - start >= min_window_s or (max_calls is not None and calls >= max_calls):
            return calls


def energy_rows(meter: EnergyMeter, tokens: float, **extra: Any) -> list[dict[str, Any]]:
    """`energy_j_per_token` and `avg_power_w` of a finished window; NaN + the meter's source if unmeasured."""
    if not math.isfinite(meter.joules):
        return [unmeasured("energy_j_per_token", "J/token", meter.source, **extra),
                unmeasured("avg_power_w", "W", meter.source, **extra)]
    if tokens <= 0:
        raise ValueError(f"energy_rows: tokens must be > 0, got {tokens!r}")
    return [metric_row("energy_j_per_token", meter.joules / tokens, "J/token", source=meter.source,
                       n_samples=1, **extra),
            metric_row("avg_power_w", meter.avg_power_w, "W", source=meter.source, n_samples=1, **extra)]


def idle_power_w(device: str = "cpu", seconds: float = 5.0, **meter_kwargs: Any) -> float:
    """Average power while this process sleeps for `seconds` (NaN when no counter is available)."""
    return measure_idle(device, seconds, **meter_kwargs).avg_power_w


def measure_idle(device: str = "cpu", seconds: float = 5.0, **meter_kwargs: Any) -> EnergyMeter:
    """The finished EnergyMeter of an idle window, for callers that also want its source."""
    meter_kwargs.setdefault("min_window_s", seconds)
    with EnergyMeter(device, **meter_kwargs) as meter:
        time.sleep(seconds)
    return meter


def idle_power_row(device: str = "cpu", seconds: float = 5.0, **meter_kwargs: Any) -> dict[str, Any]:
    """The `idle_power_w` row recorded before a pass."""
    meter = measure_idle(device, seconds, **meter_kwargs)
    if math.isfinite(meter.avg_power_w):
        return metric_row("idle_power_w", meter.avg_power_w, "W", source=meter.source, n_samples=1)
    return unmeasured("idle_power_w", "W", meter.source)
