"""bench/roofline.py: analytic FLOPs and compulsory bytes, checked against real models, and the classification."""

from __future__ import annotations

import math

import pytest
import torch.nn as nn

from loopscope.bench import roofline
from loopscope.models import build, effective_depth, preset

CAL = {"gemm_fp32_flops": 100e9, "gemm_bf16_flops": 400e9, "mem_bw_bytes_per_s": 20e9}


def _linear_weights(modules) -> int:
    return sum(m.weight.numel() for mod in modules for m in mod.modules() if isinstance(m, nn.Linear))


@pytest.mark.parametrize("loops", [1, 3])
def test_weights_touched_per_token_match_a_real_parcae(loops: int) -> None:
    model = build("parcae-micro", device="meta")
    outer = _linear_weights([model.prelude, model.coda, model.readout])
    core = _linear_weights([model.core])
    expected = outer + model.injection.B.numel() + model.wte.weight.numel() + loops * core  # tied head
    assert roofline.matmul_params_per_token(model.config, loops) == expected


def test_weights_touched_per_token_match_a_real_gpt() -> None:
    model = build("gpt-micro", device="meta")
    assert roofline.matmul_params_per_token(model.config) == _linear_weights([model.blocks]) + model.wte.weight.numel()


def test_prefill_bytes_grow_with_loops_and_tokens() -> None:
    cfg = preset("parcae-micro")
    base = roofline.prefill_bytes(cfg, 2, 32, loops=1)
    assert roofline.prefill_bytes(cfg, 2, 32, loops=4) > base
    assert roofline.prefill_bytes(cfg, 4, 32, loops=1) > base
    # fp32 moves twice the bytes of bf16, element for element
    assert roofline.prefill_bytes(cfg, 2, 32, loops=1, dtype_bytes=2) * 2 == base


def test_decode_reads_the_whole_kv_cache_per_layer_application() -> None:
    cfg = preset("parcae-micro")
    a = roofline.decode_step_bytes(cfg, 1, 100, loops=4)
    b = roofline.decode_step_bytes(cfg, 1, 101, loops=4)
    assert b - a == effective_depth(cfg, 4) * 2 * cfg.d_model * 4
    weights = roofline.matmul_params_per_token(cfg, 4) * 4  # read once per step, whatever the batch
    assert roofline.decode_step_bytes(cfg, 3, 100, loops=4) - weights == 3 * (a - weights)


def test_prefill_is_more_intense_than_decode() -> None:
    cfg = preset("parcae-tiny")
    prefill = roofline.arithmetic_intensity(roofline.prefill_flops(cfg, 8, 256, 4),
                                            roofline.prefill_bytes(cfg, 8, 256, 4))
    decode = roofline.arithmetic_intensity(roofline.decode_step_flops(cfg, 1, 256, 4),
                                           roofline.decode_step_bytes(cfg, 1, 256, 4))
    assert decode < 2 < prefill


def test_classification_against_the_ridge() -> None:
    peak, bw = CAL["gemm_fp32_flops"], CAL["mem_bw_bytes_per_s"]
    ridge = roofline.ridge_point(peak, bw)
    assert ridge == 5.0
    assert roofline.classify(4.9, peak, bw) == "memory"
    assert roofline.classify(5.0, peak, bw) == "compute"
    assert roofline.attainable_flops(1.0, peak, bw) == 20e9
    assert roofline.attainable_flops(50.0, peak, bw) == peak
    point = roofline.roofline_point(flops=2e9, bytes_moved=1e9, seconds=1.0, peak_flops=peak, bandwidth=bw)
    assert point.bound == "memory" and point.intensity == 2.0
    assert point.fraction_of_roof == pytest.approx(2e9 / 40e9)


def test_bad_inputs_are_refused() -> None:
    with pytest.raises(ValueError, match="bytes_moved=0"):
        roofline.arithmetic_intensity(1.0, 0.0)
    with pytest.raises(ValueError, match="must be finite"):
        roofline.classify(1.0, math.nan, 1.0)
    with pytest.raises(ValueError, match="seconds=0"):
        roofline.roofline_point(1.0, 1.0, 0.0, 1.0, 1.0)


def test_rows_use_the_dtype_roof_and_say_why_when_uncalibrated() -> None:
    rows = {r["metric"]: r for r in roofline.roofline_rows(6e9, 1e9, 1.0, CAL, "float32", what="a call")}
    assert rows["arithmetic_intensity"]["value"] == 6.0
    assert rows["roofline_bound"]["value"] == 1.0 and rows["roofline_bound"]["source"].startswith("compute-bound")
    assert rows["roofline_attainable_flops"]["value"] == CAL["gemm_fp32_flops"]
    assert rows["roofline_fraction"]["value"] == pytest.approx(0.06)
    bf16 = {r["metric"]: r for r in roofline.roofline_rows(6e9, 1e9, 1.0, CAL, "bfloat16", what="a call")}
    assert bf16["roofline_bound"]["value"] == 0.0  # the bf16 ridge (20 FLOP/byte) is above 6
    bare = {r["metric"]: r for r in roofline.roofline_rows(6e9, 1e9, 1.0, {}, "float32", what="a call")}
    assert bare["arithmetic_intensity"]["value"] == 6.0
    for metric in ("roofline_bound", "roofline_attainable_flops", "roofline_fraction"):
        assert math.isnan(bare[metric]["value"]) and bare[metric]["source"].startswith("unavailable")
