"""Cheap cells: idle power is measured once per run, and on a GPU the energy window overlaps the timed calls."""

from __future__ import annotations

import math

import pytest

from loopscope.bench.matrix import Cell
from loopscope.bench.workloads import common
from loopscope.bench.workloads.prefill import OverlappedEnergy
from tests.fake_nvml import FakeGPU, FakeNVML


def test_idle_power_is_measured_once_per_run(tmp_path, monkeypatch):
    calls = []

    def fake_idle(device, seconds):
        calls.append(device)
        return {"metric": "idle_power_w", "value": 123.0, "unit": "W", "source": "nvml"}

    monkeypatch.setattr("loopscope.bench.meters.energy.idle_power_row", fake_idle)
    first = common.idle_power_once(str(tmp_path), "cuda:0", 1.0)
    second = common.idle_power_once(str(tmp_path), "cuda:0", 1.0)
    assert calls == ["cuda:0"]
    assert first["value"] == second["value"] == 123.0
    assert "once per run" in second["source"]


def test_energy_window_opens_at_the_first_timed_call_and_is_topped_up(tmp_path, monkeypatch):
    monkeypatch.setattr("loopscope.bench.meters.energy.idle_power_row",
                        lambda device, seconds: {"metric": "idle_power_w", "value": 100.0, "unit": "W",
                                                 "source": "fake"})
    cell = Cell(model="gpt-micro", model_config={"family": "gpt"}, workload="prefill", device="cuda:0")
    ran = []
    metered = OverlappedEnergy(lambda: ran.append(1), cell, warmup=2, window_s=0.2,
                               nvml=FakeNVML([FakeGPU(power_w=250.0)]))
    for _ in range(5):  # 2 warm-up calls, then 3 timed ones inside the window
        metered()
    rows = metered.finish(lambda: None, tokens_per_call=10, run_dir=str(tmp_path))
    assert metered.calls >= 3 and len(ran) == 2 + metered.calls  # topped up until the window was long enough
    by = {r["metric"]: r for r in rows}
    assert by["idle_power_w"]["value"] == 100.0
    assert math.isfinite(by["energy_j_per_token"]["value"])
    assert by["energy_j_per_token"]["value"] == pytest.approx(
        by["avg_power_w"]["value"] * metered.meter.duration_s / (10 * metered.calls))
    assert "overlaps the timed calls" in by["energy_j_per_token"]["source"]
