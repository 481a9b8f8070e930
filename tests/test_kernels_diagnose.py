"""The diagnosis behind a missed numba target: its measurements run, and explain() reads them correctly."""

from __future__ import annotations

import math

import numpy as np

from loopscope.kernels import diagnose
from loopscope.kernels.bench import QUICK, bench_configs, target_rows


def _time(kind: str, name: str, backend: str, ms: float, **extra: object) -> dict:
    return dict(kind=kind, name=name, backend=backend, metric="time_ms", value=ms, **extra)


def test_exp_and_fixed_cost_measurements_give_finite_rows():
    rows = diagnose.exp_rows(1, 64, 2, reps=2)
    assert {r["backend"] for r in rows} == {"numba", "torch"}
    assert all(r["kind"] == "diagnosis" and r["value"] > 0 for r in rows)
    cfg = bench_configs(64, 2, 32)["d64 looped 2x4"]
    fixed = diagnose.fixed_cost_rows(cfg, QUICK, "d64 looped 2x4")
    names = {r["name"] for r in fixed}
    assert names == {"decode fixed cost d64 looped 2x4"}
    assert all(r["kind"] == "diagnosis" and math.isfinite(r["value"]) for r in fixed)


def test_a_missed_attention_target_is_explained_by_its_parts():
    rows = [_time("op", "causal attention T512", "numba", 90.0, time_ratio_vs_torch=1.8,
                  shape="B4 T512 H8 hd64"),
            _time("op", "causal attention T512", "torch", 50.0, time_ratio_vs_torch=1.0, shape="B4 T512 H8 hd64"),
            _time("diagnosis", "exp T512", "numba", 30.0), _time("diagnosis", "exp T512", "torch", 10.0),
            dict(kind="op", name="matmul K256 N768", backend="numba", metric="gflop_per_s", value=100.0)]
    (target,) = target_rows(rows)
    assert not target["met"] and math.isclose(target["margin"], 1.8 / 1.2)
    flop = 4 * 4 * 8 * 64 * 512 * 513 / 2
    matmul_ms = flop / 100e9 * 1e3
    assert "exps alone take 30.0 ms (33%" in target["why"] and "in 10.0 ms" in target["why"]
    assert "the K/V panel stores 0.0 ms" in target["why"]
    assert f"would take {matmul_ms:.1f} ms; the other {90 - 30 - matmul_ms:.1f} ms" in target["why"]


def test_a_missed_decode_target_splits_fixed_cost_and_arithmetic():
    name = "decode d256 dense 8x1"
    rows = [_time("decode", name, "numba", 64.0, speedup_vs_torch=1.5), _time("decode", name, "torch", 96.0,
                                                                              speedup_vs_torch=1.0),
            _time("diagnosis", "decode fixed cost d256 dense 8x1", "numba", 16.0),
            _time("diagnosis", "decode fixed cost d256 dense 8x1", "torch", 64.0),
            dict(kind="diagnosis", name="weights d256 dense 8x1", backend="numba", metric="bytes", value=2.0**25),
            dict(kind="diagnosis", name="weights read per token d256 dense 8x1", backend="numba", metric="bytes",
                 value=2.0**25),
            dict(kind="diagnosis", name="last-level cache", backend="numba", metric="bytes", value=2.0**24),
            dict(kind="diagnosis", name="read bandwidth", backend="numba", metric="gb_per_s", value=10.0)]
    (target,) = target_rows(rows, decode_tokens=32)
    why = target["why"]
    assert "torch takes 3.00 ms = 2.00 ms fixed cost" in why and "numba 2.00 ms = 0.50 ms fixed + 1.50 ms" in why
    assert "2x needs 1.50 ms: numba's fixed cost would have to fall to 0.00 ms" in why
    assert "read 32.0 MiB of weights (unique: 32.0 MiB, which exceed the 16 MiB last-level cache)" in why
    assert f"numba's arithmetic runs at {2**25 / 1.5e6:.1f} GB/s" in why and "measured 10.0 GB/s" in why


def test_a_missed_prefill_target_names_the_largest_gap():
    name = "prefill d256 dense 8x1"
    rows = [_time("model", name, "numba", 12.0, speedup_vs_torch=0.8, seq_len=256),
            _time("model", name, "torch", 10.0, speedup_vs_torch=1.0, seq_len=256)]
    split = {"numba": (6.0, 3.0, 2.0, 1.0), "torch": (6.5, 1.0, 1.5, 1.0)}
    for backend, values in split.items():
        rows += [dict(kind="diagnosis", name="prefill split d256 dense 8x1", backend=backend, metric=f"{k}_ms",
                      value=v) for k, v in zip(("matmul", "attention", "other", "between"), values, strict=True)]
    (target,) = target_rows(rows)
    assert "matmuls 6.0 vs 6.5; attention 3.0 vs 1.0" in target["why"]
    assert target["why"].endswith("The largest gap is attention, +2.0 ms")


def test_the_prefill_split_adds_up_to_the_call():
    from loopscope.kernels.engine import NumbaEngine
    from loopscope.models import build

    model = build(bench_configs(64, 2, 32)["d64 looped 2x4"], seed=0).eval()
    idx = np.zeros((2, 32), np.int64)
    rows = diagnose.prefill_split_rows(model, NumbaEngine.from_model(model), idx, "x", reps=2)
    for backend in ("numba", "torch"):
        parts = {r["metric"]: r["value"] for r in rows if r["backend"] == backend}
        assert set(parts) == {"matmul_ms", "attention_ms", "other_ms", "between_ms"}
        assert parts["matmul_ms"] > 0 and parts["attention_ms"] > 0, (backend, parts)


def test_a_met_target_has_no_reason():
    rows = [_time("model", "prefill d256 dense 8x1", "numba", 9.0, speedup_vs_torch=1.1, seq_len=256),
            _time("model", "prefill d256 dense 8x1", "torch", 10.0, speedup_vs_torch=1.0, seq_len=256)]
    (target,) = target_rows(rows)
    assert target["met"] and target["why"] == ""
