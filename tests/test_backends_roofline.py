"""Decode's bandwidth roofline (`bw_util`), twice for a looped model, checked against a real model's weights."""

from __future__ import annotations

import math

import pytest
import torch.nn as nn

from loopscope.bench.roofline import core_weight_bytes, decode_bw_rows, decode_step_bytes
from loopscope.models import build, preset


@pytest.mark.parametrize("name", ["parcae-tiny", "rdm-tiny", "looped-tiny", "parcae-140m"])
def test_core_bytes_are_the_core_blocks_matrices(name):
    model = build(name, device="meta")
    core = sum(m.weight.numel() for m in model.core.modules() if isinstance(m, nn.Linear))
    adapter = getattr(model, "adapter", None)  # rdm's concat injection runs on every loop too
    core += adapter.weight.numel() if adapter is not None else 0
    assert core_weight_bytes(model.config, 2) == pytest.approx(2 * core, rel=1e-3)


def test_parcae_140m_core_fits_an_h200_l2():
    cfg = preset("parcae-140m")
    assert 27e6 < core_weight_bytes(cfg, 2) < 30e6  # ~14M parameters in bf16
    rows = decode_bw_rows(cfg, 1, 1056, 8, 2, 1e-3, 4.13e12, llc_bytes=50e6, llc_name="H200 L2")
    by = {(r["metric"], r["stat"]): r for r in rows}
    assert by[("core_fits_llc", "")]["value"] == 1.0 and "H200 L2" in by[("core_fits_llc", "")]["source"]
    reread, once = by[("bw_util", "core-reread")]["value"], by[("bw_util", "core-once")]["value"]
    assert once < reread
    saved = (by[("decode_bytes_per_step", "core-reread")]["value"]
             - by[("decode_bytes_per_step", "core-once")]["value"])
    assert saved == pytest.approx(7 * core_weight_bytes(cfg, 2))
    assert reread == pytest.approx(decode_step_bytes(cfg, 1, 1056, 8, 2) / 1e-3 / 4.13e12)


def test_dense_decode_has_one_bw_util_and_no_cache_flag():
    rows = decode_bw_rows(preset("gpt-1.3b"), 1, 1056, None, 2, 13.8e-3, 4.13e12, llc_bytes=50e6)
    assert [(r["metric"], r["stat"]) for r in rows] == [("decode_bytes_per_step", ""), ("bw_util", "")]
    # The H200 reference's 13.8 ms/token is ~2.8% of this roofline: a step reads the matrices (1.46 GB in bf16)
    # and the KV cache, but only one row of each value-embedding table, not all 2.6 GB of weights.
    assert 0.02 < rows[1]["value"] < 0.04


def test_without_calibration_bw_util_is_nan_with_the_reason():
    rows = decode_bw_rows(preset("parcae-tiny"), 1, 64, 4, 4, 1e-3, math.nan)
    bw = [r for r in rows if r["metric"] == "bw_util"]
    assert len(bw) == 2 and all(math.isnan(r["value"]) and "no calibrated" in r["source"] for r in bw)
    flag = [r for r in rows if r["metric"] == "core_fits_llc"]
    assert math.isnan(flag[0]["value"]) and "unknown" in flag[0]["source"]
