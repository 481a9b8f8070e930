"""The run's calibrated peak is the best of several probes spread over the run; progress ETA from estimates."""

from __future__ import annotations

import io
import math

from loopscope.bench.meters.calibration import CalibrationProbes, best_of
from loopscope.bench.progress import Progress, remaining_seconds


def _cal(flops: float, bw: float = 1e10) -> dict:
    return {"device": "cpu", "gemm_fp32_flops": flops, "gemm_bf16_flops": math.nan, "gemm_fp16_flops": math.nan,
            "mem_bw_bytes_per_s": bw, "notes": {"gemm_fp32_flops": "torch.matmul 2048x2048"}}


def test_best_of_keeps_the_fastest_probe_per_field():
    best = best_of([_cal(45e9, 9e9), _cal(200e9, 8e9), _cal(198e9, 11e9)])
    assert best["gemm_fp32_flops"] == 200e9 and best["mem_bw_bytes_per_s"] == 11e9
    assert math.isnan(best["gemm_bf16_flops"])  # never measured stays NaN, not 0
    assert best["probes"] == 3 and "best of 3" in best["notes"]["gemm_fp32_flops"]


def test_probes_run_between_cells_when_due_and_record_the_load():
    seen = iter([_cal(150e9), _cal(210e9)])
    probes = CalibrationProbes(device="cpu", first=_cal(45e9), every_s=0.0, probe_fn=lambda _dev: next(seen))
    probes.after_cell("a")
    probes.after_cell("b")
    entries = probes.manifest_entries()
    assert entries["calibration"]["gemm_fp32_flops"] == 210e9
    assert entries["calibration_first"]["gemm_fp32_flops"] == 45e9
    assert len(entries["calibration_probes"]) == 2
    assert set(entries["cell_conditions"]) == {"a", "b"} and entries["cell_conditions"]["a"]["cores"] >= 1


def test_probes_resume_from_the_manifest_and_wait_for_their_interval():
    manifest = {"calibration_first": _cal(100e9), "calibration_probes": [{"gemm_fp32_flops": 120e9}],
                "cell_conditions": {"x": {"load_1m": 0.5, "cores": 2}}}
    probes = CalibrationProbes.resume(manifest, _cal(120e9), "cpu", every_s=3600.0,
                                      probe_fn=lambda _dev: _cal(1e12))
    probes.after_cell("y")  # not due: no probe
    entries = probes.manifest_entries()
    assert entries["calibration"]["gemm_fp32_flops"] == 120e9
    assert set(entries["cell_conditions"]) == {"x", "y"}


def test_uncalibrated_run_records_nothing():
    assert CalibrationProbes(device="cpu", first={}).manifest_entries() == {}


def test_eta_scales_the_remaining_estimates_by_the_measured_ratio():
    assert remaining_seconds([10, 10, 100], 0, 0.0) == 120
    assert remaining_seconds([10, 10, 100], 2, 40.0) == 200  # cells took 2x their estimates
    out = io.StringIO()
    progress = Progress(2, stream=out, estimates=[60.0, 3600.0])
    progress.starting("train gpt-tiny")
    assert "eta 1:01:00" in out.getvalue()


def test_cpu_full_calibration_skips_emulated_fp16():
    from loopscope.bench.meters.calibration import cpu_has_native_fp16, plan_for

    assert plan_for("cpu", quick=False).with_fp16 == cpu_has_native_fp16()
    assert plan_for("cuda:0", quick=False).with_fp16
