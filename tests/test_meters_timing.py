"""timing.measure: stop rules, warm-up, sync hook, rows, the CUDA-event path (faked) and a known sleep."""

from __future__ import annotations

import math
import time

import numpy as np
import pytest
import torch

from loopscope.bench.meters import timing
from loopscope.bench.meters.timing import TimingResult, measure


def test_sleep_20ms_is_timed_within_5_percent():
    result = measure(lambda: time.sleep(0.02), min_time_s=0.3, min_count=10)
    assert result.summary.median == pytest.approx(0.02, rel=0.05)
    assert result.timer == "perf_counter_ns"


def test_samples_agree_with_an_outside_clock():
    """The per-call samples add up to the wall time of the timed loop (no time lost or invented)."""
    start = time.perf_counter()
    result = measure(lambda: time.sleep(0.005), min_time_s=0.1, min_count=5, warmup=0)
    outside = time.perf_counter() - start
    assert float(result.samples_s.sum()) == pytest.approx(outside, rel=0.05)


def test_min_count_and_min_time_are_both_met():
    fast = measure(lambda: None, min_time_s=0.0, min_count=7)
    assert fast.summary.n == 7
    timed = measure(lambda: time.sleep(0.002), min_time_s=0.05, min_count=2)
    assert timed.samples_s.sum() >= 0.045 and timed.summary.n >= 2
    slow = measure(lambda: time.sleep(0.02), min_time_s=0.0, min_count=4)
    assert slow.summary.n == 4


def test_max_count_caps_the_loop():
    result = measure(lambda: None, min_time_s=10.0, min_count=1, max_count=50)
    assert result.summary.n == 50


def test_warmup_calls_and_first_call_time():
    calls: list[int] = []

    def fn():
        calls.append(1)
        time.sleep(0.05 if len(calls) == 1 else 0.001)  # first call "compiles"

    result = measure(fn, min_time_s=0.0, min_count=5, warmup=3)
    assert len(calls) == 3 + 5 and result.warmup_calls == 3
    assert result.first_call_s == pytest.approx(0.05, rel=0.3)
    assert result.compile_s == pytest.approx(0.05 - result.median_s, rel=0.3)
    assert result.summary.median < 0.01  # warm-up calls are not samples


def test_max_warmup_s_stops_warmup_early():
    calls: list[int] = []
    result = measure(lambda: (calls.append(1), time.sleep(0.01)), min_time_s=0.0, min_count=1, warmup=100,
                     max_warmup_s=0.03)
    assert 2 <= result.warmup_calls <= 5
    assert len(calls) == result.warmup_calls + 1


def test_no_warmup_means_no_compile_time():
    result = measure(lambda: None, min_time_s=0.0, min_count=3, warmup=0)
    assert math.isnan(result.first_call_s) and math.isnan(result.compile_s)
    (row,) = result.compile_rows()
    assert math.isnan(row["value"]) and row["source"] == "no warm-up call was timed"


def test_sync_hook_runs_inside_the_timed_region():
    syncs: list[int] = []
    result = measure(lambda: None, sync=lambda: (syncs.append(1), time.sleep(0.003)), min_time_s=0.0,
                     min_count=5, warmup=2)
    assert len(syncs) == 2 + 5
    assert result.summary.median >= 0.003 and result.timer == "perf_counter_ns+sync"


def test_invalid_arguments_are_named():
    with pytest.raises(ValueError, match="min_count"):
        measure(lambda: None, min_count=0)
    with pytest.raises(ValueError, match="max_count"):
        measure(lambda: None, min_count=10, max_count=5)
    with pytest.raises(ValueError, match="warmup"):
        measure(lambda: None, warmup=-1)


def _result(samples_ms: list[float]) -> TimingResult:
    return TimingResult(np.asarray(samples_ms) * 1e-3, first_call_s=0.5, warmup_calls=1, device="cpu",
                        timer="perf_counter_ns")


def test_latency_rows():
    result = _result([10.0, 11.0, 12.0, 13.0, 50.0])
    rows = {r["stat"]: r for r in result.latency_rows(cell_id="x")}
    assert set(rows) == {"median", "p50", "p90", "p99", "iqr"}
    assert all(r["metric"] == "latency_ms" and r["unit"] == "ms" and r["cell_id"] == "x"
               for r in rows.values())
    assert rows["median"]["value"] == pytest.approx(12.0) and rows["p50"]["value"] == pytest.approx(12.0)
    assert rows["p90"]["value"] == pytest.approx(np.percentile([10, 11, 12, 13, 50], 90))
    assert rows["iqr"]["value"] == pytest.approx(2.0)
    assert rows["median"]["ci_low"] <= 12.0 <= rows["median"]["ci_high"]
    assert rows["median"]["n_samples"] == 5 and rows["median"]["source"] == "perf_counter_ns"


def test_throughput_rows():
    result = _result([10.0, 10.0, 20.0, 20.0, 20.0])
    rows = {r["stat"]: r for r in result.throughput_rows(units_per_call=1000)}
    assert rows["median"]["value"] == pytest.approx(1000 / 0.020)
    assert rows["mean"]["value"] == pytest.approx(5000 / 0.080)
    assert rows["median"]["ci_low"] <= rows["median"]["value"] <= rows["median"]["ci_high"]
    assert rows["median"]["metric"] == "tokens_per_s" and rows["median"]["unit"] == "tokens/s"
    custom = result.throughput_rows(units_per_call=2, metric="sequences_per_s", unit="seq/s")
    assert custom[0]["metric"] == "sequences_per_s" and custom[0]["unit"] == "seq/s"
    with pytest.raises(ValueError, match="units_per_call"):
        result.throughput_rows(units_per_call=0)


def test_compile_and_sample_rows():
    result = _result([10.0, 12.0, 14.0])
    (row,) = result.compile_rows()
    assert row["metric"] == "compile_s" and row["value"] == pytest.approx(0.5 - 0.012)
    samples = result.sample_rows()
    assert [s["index"] for s in samples] == [0, 1, 2]
    assert [s["value"] for s in samples] == pytest.approx([10.0, 12.0, 14.0])
    assert {s["metric"] for s in samples} == {"latency_ms"} and {s["unit"] for s in samples} == {"ms"}


def test_empty_result_gives_nan_rows():
    result = TimingResult(np.asarray([]), math.nan, 0, "cpu", "perf_counter_ns")
    assert all(math.isnan(r["value"]) for r in result.latency_rows() + result.throughput_rows(10))


# --- CUDA path with fake events ------------------------------------------------------------------------
class FakeEvent:
    """Records host time at record(); elapsed_time in ms like torch.cuda.Event."""

    synchronized = 0

    def __init__(self, enable_timing: bool = False):
        assert enable_timing
        self.t = None

    def record(self, stream=None):
        self.t = time.perf_counter()

    def synchronize(self):
        FakeEvent.synchronized += 1

    def elapsed_time(self, end: FakeEvent) -> float:
        return (end.t - self.t) * 1e3


def test_cuda_path_uses_events_and_synchronizes(monkeypatch):
    from contextlib import nullcontext

    monkeypatch.setattr(torch.cuda, "Event", FakeEvent)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: None)
    monkeypatch.setattr(torch.cuda, "device", lambda device: nullcontext())
    FakeEvent.synchronized = 0
    result = timing.measure(lambda: time.sleep(0.004), min_time_s=0.0, min_count=6, warmup=2, device="cuda:0")
    assert result.timer == "cuda_event" and result.device == "cuda:0"
    assert result.summary.n == 6 and FakeEvent.synchronized == 2 + 6  # every call waited for its end event
    assert result.summary.median == pytest.approx(0.004, rel=0.5)


def test_process_cpu_time_is_recorded_beside_wall_time():
    def spin() -> None:
        end = time.perf_counter() + 0.003
        while time.perf_counter() < end:
            pass

    asleep = measure(lambda: time.sleep(0.01), min_time_s=0.0, min_count=5)
    busy = measure(spin, min_time_s=0.0, min_count=5)
    assert asleep.cpu_samples_s.shape == asleep.samples_s.shape
    assert np.median(asleep.cpu_samples_s) < 0.5 * asleep.median_s  # sleeping costs no CPU time
    assert np.median(busy.cpu_samples_s) > 0.0005  # spinning does (less than wall if the core is shared)
    rows = {r["metric"]: r for r in busy.cpu_rows(units_per_call=100)}
    assert set(rows) == {"cpu_latency_ms", "cpu_tokens_per_s"}
    assert rows["cpu_tokens_per_s"]["value"] == pytest.approx(100 / (rows["cpu_latency_ms"]["value"] / 1e3))
    assert "process_time_ns" in rows["cpu_latency_ms"]["source"]
    metrics = {r["metric"] for r in busy.sample_rows()}
    assert metrics == {"latency_ms", "cpu_latency_ms"}
