"""calibrate(): real (tiny and quick) measurements on this CPU, dtype lookup, MFU rows, unsupported dtypes."""

from __future__ import annotations

import json
import math
import time

import pytest
import torch

from loopscope.bench.meters import calibration
from loopscope.bench.meters.calibration import Calibration, CalibrationPlan, calibrate, plan_for

TINY = CalibrationPlan(gemm_n=128, gemm_budget_s=0.05, bw_array_bytes=16 * 1024**2, bw_budget_s=0.05,
                       with_triad=True, with_fp16=False)


def test_tiny_calibration_measures_plausible_numbers():
    cal = calibrate("cpu", plan=TINY)
    # Any machine that runs this suite multiplies faster than 0.1 GFLOP/s and copies faster than 0.1 GB/s;
    # a unit slip (ms vs s, FLOP vs GFLOP) would land far outside these bounds.
    assert 1e8 < cal.gemm_fp32_flops < 1e14
    assert 1e8 < cal.gemm_bf16_flops < 1e15
    assert 1e8 < cal.mem_bw_bytes_per_s < 1e13
    assert math.isnan(cal.gemm_fp16_flops) and "not calibrated" in cal.notes["gemm_fp16_flops"]
    assert "triad" in cal.notes["mem_bw_bytes_per_s"] and "copy" in cal.notes["mem_bw_bytes_per_s"]
    assert cal.device == "cpu" and cal.threads == torch.get_num_threads() and cal.seconds_taken > 0
    json.dumps(cal.as_dict())  # goes into manifest.json


def test_quick_calibration_fits_its_budget():
    start = time.perf_counter()
    cal = calibrate("cpu", quick=True)
    elapsed = time.perf_counter() - start
    # ~2 s of measuring by design (default mode takes ~10 s); the slack is for a loaded, shared machine.
    assert cal.seconds_taken < 6.0 and elapsed < 7.0
    assert all(math.isfinite(v) for v in (cal.gemm_fp32_flops, cal.gemm_bf16_flops, cal.mem_bw_bytes_per_s))


def test_unsupported_dtype_is_nan_with_reason(monkeypatch):
    real_matmul = torch.matmul

    def matmul(a, b, out=None):
        if a.dtype == torch.bfloat16:
            raise RuntimeError('"addmm_impl_cpu_" not implemented for \'BFloat16\'')
        return real_matmul(a, b, out=out)

    monkeypatch.setattr(torch, "matmul", matmul)
    cal = calibrate("cpu", plan=TINY)
    assert math.isfinite(cal.gemm_fp32_flops)
    assert math.isnan(cal.gemm_bf16_flops)
    assert cal.notes["gemm_bf16_flops"].startswith("torch.matmul torch.bfloat16 unsupported on cpu")
    row = cal.mfu_row(1e9, "bfloat16")
    assert math.isnan(row["value"]) and "bf16 GEMM peak not calibrated" in row["source"]
    rows = {r["stat"]: r for r in cal.rows() if r["metric"] == "calib_gemm_flops"}
    assert math.isnan(rows["bf16"]["value"]) and rows["bf16"]["source"].startswith("unavailable: ")


def _cal(**kw) -> Calibration:
    values = dict(device="cpu", gemm_fp32_flops=100e9, gemm_bf16_flops=400e9, mem_bw_bytes_per_s=20e9,
                  seconds_taken=1.0)
    values.update(kw)
    return Calibration(**values)


def test_peak_flops_accepts_dtype_spellings():
    cal = _cal(gemm_fp16_flops=300e9)
    for name in ("fp32", "float32", "torch.float32", torch.float32, "FP32"):
        assert cal.peak_flops(name) == 100e9
    for name in ("bf16", "bfloat16", torch.bfloat16):
        assert cal.peak_flops(name) == 400e9
    assert cal.peak_flops("float16") == 300e9 and cal.peak_flops(torch.half) == 300e9
    with pytest.raises(ValueError, match="unknown dtype 'int8'"):
        cal.peak_flops("int8")


def test_mfu_and_rows():
    cal = _cal()
    assert cal.mfu(25e9, "fp32") == pytest.approx(0.25)
    row = cal.mfu_row(25e9, "fp32", cell_id="c")
    assert row["metric"] == "mfu" and row["value"] == pytest.approx(0.25) and row["cell_id"] == "c"
    assert math.isnan(cal.mfu(1e9, "fp16"))  # fp16 was not calibrated
    rows = cal.rows()
    assert [(r["metric"], r["stat"]) for r in rows] == [
        ("calib_gemm_flops", "fp32"), ("calib_gemm_flops", "bf16"), ("calib_gemm_flops", "fp16"),
        ("calib_mem_bw", "")]


def test_plans_scale_with_device_and_mode():
    assert plan_for("cuda:0", quick=False).gemm_n > plan_for("cpu", quick=False).gemm_n
    quick, full = plan_for("cpu", quick=True), plan_for("cpu", quick=False)
    assert quick.gemm_budget_s < full.gemm_budget_s and not quick.with_triad and full.with_triad
    llc = calibration.last_level_cache_bytes()
    if llc:  # arrays must stream from DRAM, not from cache
        assert quick.bw_array_bytes >= min(llc, calibration._available_ram_bytes() // 8)
        assert full.bw_array_bytes >= min(2 * llc, calibration._available_ram_bytes() // 8)
