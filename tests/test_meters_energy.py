"""EnergyMeter against a fake NVML module and a fake powercap tree (this machine has neither)."""

from __future__ import annotations

import math
import os
import time
from pathlib import Path

import pytest

from loopscope.bench.meters import energy
from loopscope.bench.meters.energy import EnergyMeter, discover_rapl_zones, energy_rows, repeat_to_fill
from tests.fake_nvml import FakeGPU, FakeNVML

WINDOW = 0.15  # seconds; tests lower min_window_s so they stay fast


# --- fake powercap tree ----------------------------------------------------------------------------------
def write_atomic(path: Path, text: str) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)  # the poller thread never sees a half-written counter


def make_zone(root: Path, entry: str, name: str, energy_uj: int, max_range_uj: int = 262_143_328_850) -> Path:
    zone = root / entry
    zone.mkdir(parents=True)
    (zone / "name").write_text(name + "\n")
    (zone / "max_energy_range_uj").write_text(f"{max_range_uj}\n")
    (zone / "energy_uj").write_text(f"{energy_uj}\n")
    return zone


def set_energy(zone: Path, energy_uj: int) -> None:
    write_atomic(zone / "energy_uj", f"{energy_uj}\n")


@pytest.fixture
def powercap(tmp_path: Path) -> Path:
    """Two packages plus the zones that must NOT be counted: subzones, psys and the MMIO duplicate."""
    root = tmp_path / "powercap"
    make_zone(root, "intel-rapl:0", "package-0", 1_000_000)
    make_zone(root, "intel-rapl:0:0", "core", 500_000)
    make_zone(root, "intel-rapl:0:1", "dram", 500_000)
    make_zone(root, "intel-rapl:1", "package-1", 2_000_000)
    make_zone(root, "intel-rapl:2", "psys", 7_000_000)
    make_zone(root, "intel-rapl-mmio:0", "package-0", 1_000_000)
    (root / "intel-rapl").mkdir()  # the control-type directory itself, not a zone
    return root


# --- RAPL --------------------------------------------------------------------------------------------------
def test_rapl_discovers_only_top_level_package_zones(powercap: Path):
    zones = discover_rapl_zones(str(powercap))
    assert [z.name for z in zones] == ["package-0", "package-1"]
    assert [Path(z.path).name for z in zones] == ["intel-rapl:0", "intel-rapl:1"]


def test_rapl_counter_delta_sums_packages_and_ignores_subzones(powercap: Path):
    with EnergyMeter("cpu", powercap_root=str(powercap), min_window_s=WINDOW, sample_interval_s=0.01) as m:
        set_energy(powercap / "intel-rapl:0", 4_000_000)  # +3 J
        set_energy(powercap / "intel-rapl:1", 3_000_000)  # +1 J
        set_energy(powercap / "intel-rapl:0:0", 90_000_000)  # subzone: must not count
        set_energy(powercap / "intel-rapl:2", 99_000_000)  # psys: must not count
        set_energy(powercap / "intel-rapl-mmio:0", 99_000_000)  # duplicate of package-0
        time.sleep(WINDOW)
    assert m.source == "rapl"
    assert m.joules == pytest.approx(4.0)
    assert m.avg_power_w == pytest.approx(4.0 / m.duration_s)
    assert m.zones == ["package-0", "package-1"]
    assert not m.too_short


def test_rapl_wrap_around_at_max_energy_range(tmp_path: Path):
    root = tmp_path / "powercap"
    zone = make_zone(root, "intel-rapl:0", "package-0", 999_000_000, max_range_uj=1_000_000_000)
    with EnergyMeter("cpu", powercap_root=str(root), min_window_s=WINDOW, sample_interval_s=0.01) as m:
        set_energy(zone, 999_500_000)  # +0.5 J
        time.sleep(WINDOW / 2)
        set_energy(zone, 500_000)  # wrapped: 0.5 J to the top, then 0.5 J after zero
        time.sleep(WINDOW / 2)
    assert m.source == "rapl"
    assert m.joules == pytest.approx(1.5)
    assert "wrapped" in m.note


def test_rapl_several_wraps_are_all_counted_when_polled(tmp_path: Path):
    root = tmp_path / "powercap"
    zone = make_zone(root, "intel-rapl:0", "package-0", 900_000_000, max_range_uj=1_000_000_000)
    # A slow background poller, so only the explicit polls below (one per wrap period) read the counter.
    with EnergyMeter("cpu", powercap_root=str(root), min_window_s=0.0, sample_interval_s=60.0) as m:
        for value in (400_000_000, 800_000_000, 300_000_000):  # wrap, +400 J, wrap
            set_energy(zone, value)
            m.poll()
    assert m.joules == pytest.approx(500.0 + 400.0 + 500.0)


def test_rapl_window_too_short_is_nan_with_reason(powercap: Path):
    with EnergyMeter("cpu", powercap_root=str(powercap), min_window_s=5.0) as m:
        set_energy(powercap / "intel-rapl:0", 2_000_000)
    assert m.too_short
    assert math.isnan(m.joules) and math.isnan(m.avg_power_w)
    assert m.source.startswith("window too short: ") and m.source.endswith(" s < 5 s")
    assert m.raw_joules == pytest.approx(1.0)  # the counter did move; the window is what is refused


def test_rapl_missing_powercap_directory(tmp_path: Path):
    with EnergyMeter("cpu", powercap_root=str(tmp_path / "absent"), min_window_s=0.0) as m:
        pass
    assert math.isnan(m.joules)
    assert m.source == f"unavailable: no powercap directory at {tmp_path / 'absent'}"


def test_rapl_unreadable_counter_is_unavailable(tmp_path: Path):
    root = tmp_path / "powercap"
    zone = make_zone(root, "intel-rapl:0", "package-0", 0)
    (zone / "energy_uj").unlink()
    (zone / "energy_uj").mkdir()  # reading it fails, as a root-only file does for a normal user
    with EnergyMeter("cpu", powercap_root=str(root), min_window_s=0.0) as m:
        pass
    assert math.isnan(m.joules)
    assert m.source.startswith("unavailable: RAPL under ")
    assert "energy_uj not readable" in m.source


def test_rapl_counter_vanishing_mid_window_is_unavailable(tmp_path: Path):
    root = tmp_path / "powercap"
    zone = make_zone(root, "intel-rapl:0", "package-0", 0)
    with EnergyMeter("cpu", powercap_root=str(root), min_window_s=0.0, sample_interval_s=60.0) as m:
        (zone / "energy_uj").unlink()
    assert math.isnan(m.joules)
    assert m.source.startswith("unavailable: ") and "not readable" in m.source


def test_rapl_without_package_zone_is_unavailable(tmp_path: Path):
    root = tmp_path / "powercap"
    make_zone(root, "intel-rapl:0", "psys", 0)
    make_zone(root, "intel-rapl:0:0", "package-0", 0)  # a subzone, even if oddly named, is not top-level
    with EnergyMeter("cpu", powercap_root=str(root), min_window_s=0.0) as m:
        pass
    assert m.source == f"unavailable: RAPL under {root}: no readable top-level RAPL package zone"


def test_rapl_duplicate_package_names_are_counted_once(tmp_path: Path):
    root = tmp_path / "powercap"
    make_zone(root, "intel-rapl:0", "package-0", 0)
    make_zone(root, "intel-rapl:1", "package-0", 0)
    assert [Path(z.path).name for z in discover_rapl_zones(str(root))] == ["intel-rapl:0"]


def test_rapl_counter_that_does_not_advance_is_unavailable(powercap: Path):
    with EnergyMeter("cpu", powercap_root=str(powercap), min_window_s=0.01) as m:
        time.sleep(0.02)
    assert math.isnan(m.joules)
    assert m.source.startswith("unavailable: rapl did not advance")


def test_this_machine_has_no_rapl_or_reports_it():
    """The real default path runs end to end: either a number from RAPL or NaN with a reason."""
    with EnergyMeter("cpu", min_window_s=0.0) as m:
        sum(range(10_000))
    assert m.source == "rapl" or m.source.startswith("unavailable: ")
    assert math.isfinite(m.joules) == (m.source == "rapl")


# --- NVML --------------------------------------------------------------------------------------------------
def test_nvml_energy_counter_delta():
    fake = FakeNVML([FakeGPU(power_w=250.0)])
    with EnergyMeter("cuda:0", nvml=fake, min_window_s=WINDOW) as m:
        while m.elapsed_s() < WINDOW + 0.05:  # how an executor fills the window
            time.sleep(0.01)
    assert m.duration_s >= WINDOW + 0.05
    assert m.source == "nvml-energy-counter"
    assert m.avg_power_w == pytest.approx(250.0, rel=0.05)
    assert m.joules == pytest.approx(250.0 * m.duration_s, rel=0.05)
    assert fake.initialised == 0  # nvmlShutdown balanced nvmlInit


def test_nvml_power_sampling_when_counter_unsupported():
    fake = FakeNVML([FakeGPU(power_w=200.0, energy_supported=False)])
    with EnergyMeter("cuda", nvml=fake, min_window_s=WINDOW, sample_interval_s=0.01) as m:
        time.sleep(WINDOW + 0.05)
    assert m.source == "nvml-power-sampling"
    assert m.avg_power_w == pytest.approx(200.0, rel=0.05)
    assert fake.calls.count("power") >= 5  # it really sampled during the window
    assert fake.initialised == 0


def test_nvml_window_too_short():
    fake = FakeNVML([FakeGPU(power_w=250.0)])
    with EnergyMeter("cuda:0", nvml=fake) as m:  # default 5 s window
        time.sleep(0.01)
    assert m.too_short and math.isnan(m.joules)
    assert m.source.startswith("window too short: ") and m.source.endswith("s < 5 s")


def test_nvml_missing_device():
    fake = FakeNVML([])
    with EnergyMeter("cuda:0", nvml=fake, min_window_s=0.0) as m:
        pass
    assert m.source == "unavailable: no NVML handle for cuda:0 (cuda:0 not found: NVML sees 0 device(s))"
    assert fake.initialised == 0


def test_nvml_not_loadable():
    fake = FakeNVML(init_error="NVML Shared Library Not Found")
    with EnergyMeter("cuda:0", nvml=fake, min_window_s=0.0) as m:
        pass
    assert m.source == "unavailable: nvmlInit failed (NVML Shared Library Not Found)"


def test_nvml_neither_counter_nor_power():
    fake = FakeNVML([FakeGPU(energy_supported=False, power_supported=False)])
    meter = EnergyMeter("cuda:0", nvml=fake, min_window_s=0.0)
    assert not meter.available()
    with meter as m:
        pass
    assert m.source.startswith("unavailable: neither nvmlDeviceGetTotalEnergyConsumption")
    assert math.isnan(m.joules) and math.isnan(m.avg_power_w)


def test_nvml_counter_that_does_not_advance():
    fake = FakeNVML([FakeGPU(power_w=0.0)])
    with EnergyMeter("cuda:0", nvml=fake, min_window_s=0.01) as m:
        time.sleep(0.02)
    assert m.source.startswith("unavailable: nvml-energy-counter did not advance")


def test_nvml_cuda_visible_devices_maps_to_the_physical_gpu(monkeypatch):
    fake = FakeNVML([FakeGPU(power_w=100.0), FakeGPU(power_w=400.0, uuid="GPU-b")])
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1")
    with EnergyMeter("cuda:0", nvml=fake, min_window_s=WINDOW) as m:
        time.sleep(WINDOW + 0.02)
    assert m.avg_power_w == pytest.approx(400.0, rel=0.05)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "GPU-b")
    with EnergyMeter("cuda:0", nvml=fake, min_window_s=WINDOW) as m:
        time.sleep(WINDOW + 0.02)
    assert m.avg_power_w == pytest.approx(400.0, rel=0.05)


def test_nvml_mig_note():
    fake = FakeNVML([FakeGPU(mig_mode=(1, 1))])
    with EnergyMeter("cuda:0", nvml=fake, min_window_s=0.0) as m:
        time.sleep(0.01)
    assert "whole GPU" in m.note


def test_unknown_device_is_unavailable():
    with EnergyMeter("mps", min_window_s=0.0) as m:
        pass
    assert m.source == "unavailable: no energy counter known for device 'mps'"


# --- rows and helpers --------------------------------------------------------------------------------------
def test_energy_rows_measured_and_unmeasured():
    fake = FakeNVML([FakeGPU(power_w=300.0)])
    with EnergyMeter("cuda:0", nvml=fake, min_window_s=WINDOW) as m:
        calls = repeat_to_fill(lambda: time.sleep(0.01), WINDOW)
    rows = {r["metric"]: r for r in energy_rows(m, tokens=calls * 64, cell_id="c1")}
    assert rows["energy_j_per_token"]["value"] == pytest.approx(m.joules / (calls * 64))
    assert rows["energy_j_per_token"]["unit"] == "J/token"
    assert rows["avg_power_w"]["value"] == pytest.approx(300.0, rel=0.05)
    assert rows["avg_power_w"]["source"] == "nvml-energy-counter" and rows["avg_power_w"]["cell_id"] == "c1"
    with pytest.raises(ValueError, match="tokens must be > 0"):
        energy_rows(m, tokens=0)

    with EnergyMeter("cuda:0", nvml=fake) as short:
        pass
    nan_rows = energy_rows(short, tokens=100)
    assert all(math.isnan(r["value"]) for r in nan_rows)
    assert all(r["source"].startswith("window too short") for r in nan_rows)


def test_available_probe_on_unused_meter_gives_nan_rows(tmp_path: Path):
    probe = EnergyMeter("cpu", powercap_root=str(tmp_path / "absent"))
    assert not probe.available()
    rows = energy_rows(probe, tokens=0)
    assert [r["metric"] for r in rows] == ["energy_j_per_token", "avg_power_w"]
    assert all(math.isnan(r["value"]) and r["source"].startswith("unavailable: no powercap") for r in rows)
    assert EnergyMeter("cuda:0", nvml=FakeNVML()).available()


def test_repeat_to_fill_counts_calls_until_the_window_is_full():
    calls: list[int] = []
    start = time.perf_counter()
    n = repeat_to_fill(lambda: calls.append(1), 0.05, sync=lambda: time.sleep(0.005))
    assert time.perf_counter() - start >= 0.05
    assert n == len(calls) >= 2
    assert repeat_to_fill(lambda: None, 10.0, max_calls=3) == 3
    assert repeat_to_fill(lambda: None, 0.0) == 1  # always at least one call


def test_idle_power_from_fake_gpu_and_unavailable_row(tmp_path: Path):
    fake = FakeNVML([FakeGPU(power_w=60.0)])
    assert energy.idle_power_w("cuda:0", 0.1, nvml=fake) == pytest.approx(60.0, rel=0.05)
    row = energy.idle_power_row("cpu", 0.01, powercap_root=str(tmp_path / "absent"))
    assert row["metric"] == "idle_power_w" and math.isnan(row["value"])
    assert row["source"].startswith("unavailable: no powercap directory")
