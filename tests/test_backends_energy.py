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


def _decode_cell(device: str) -> Cell:
    from loopscope.models import preset

    return Cell(model="gpt-micro", model_config=preset("gpt-micro").to_dict(), workload="decode", device=device,
                batch=2, seq_len=24,
                settings={"measure": {"min_time_s": 0.0, "min_count": 2, "warmup": 1, "energy": True,
                                      "memory": False, "energy_window_s": 0.2},
                          "decode": {"prompt_len": 16, "new_tokens": 8}})


def test_decode_has_an_energy_pass_over_whole_generations(tmp_path, monkeypatch):
    from loopscope.bench.context import RunContext
    from loopscope.bench.workloads import decode

    seen = {}

    def fake_pass(call, sync, cell, tokens_per_call, window_s, run_dir):
        (ttft, steps) = call()  # one whole generation
        seen.update(tokens=tokens_per_call, steps=len(steps), window=window_s)
        return [{"metric": "energy_j_per_token", "value": 0.5, "unit": "J/token", "source": "fake"}]

    monkeypatch.setattr(decode, "energy_pass", fake_pass)
    result = decode.run(_decode_cell("cpu"), RunContext(run_dir=str(tmp_path)))
    assert seen == {"tokens": 2 * 8, "steps": 7, "window": 0.2}  # batch x new tokens per generation
    assert [r["value"] for r in result.rows if r["metric"] == "energy_j_per_token"] == [0.5]


def test_decode_energy_on_this_cpu_is_measured_or_nan_with_the_reason(tmp_path):
    from loopscope.bench.context import RunContext
    from loopscope.bench.workloads import decode

    result = decode.run(_decode_cell("cpu"), RunContext(run_dir=str(tmp_path)))
    row = next(r for r in result.rows if r["metric"] == "energy_j_per_token")
    assert math.isfinite(row["value"]) or row["source"].startswith("unavailable")
