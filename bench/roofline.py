"""Roofline: is a cell compute-bound or memory-bound on this machine? Pure functions, no measurement.

    arithmetic intensity  I = FLOPs / bytes moved            (FLOP/byte)
    attainable FLOP/s       = min(peak, I * bandwidth)        (the roof)
    ridge point             = peak / bandwidth                (I above it: compute-bound)

FLOPs are the model's analytic matmul + attention FLOPs (models.flops_per_token). Bytes moved are the
compulsory traffic of one call, a lower bound: every weight matrix read once per layer application
(a looped core is re-read on every loop), each activation tensor written once and read once, the
embedding rows gathered, the logits written, and in decode the whole KV cache read once per layer
application. Cache reuse beyond that (tiles of K/V re-read by attention, weights that stay in cache
across loops) is ignored, so the intensity is an upper bound and "memory-bound" is a safe verdict.
The peak and the bandwidth come from the run's calibration (GEMM FLOP/s, STREAM-like copy bytes/s).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from loopscope.models import ModelConfig, effective_depth, flops_per_token

BOUNDS: tuple[str, ...] = ("memory", "compute")


def _activation_elements_per_layer(cfg: ModelConfig) -> int:
    """Elements written + read per token by one block: norm in/out (2d, twice), qkv (d in, 3d out), attention
    (3d in, d out), output projection with the residual (3d), the MLP (d in, hidden out and back, residual 2d)."""
    assert cfg.d_ff is not None
    d, f = cfg.d_model, cfg.d_ff
    mlp_hidden = 6 * f if cfg.mlp == "swiglu" else 4 * f  # fc out (+up), activation in/out, proj in
    return 18 * d + mlp_hidden


def matmul_params_per_token(cfg: ModelConfig, loops: int | None = None) -> float:
    """Weight elements multiplied per token: non-core matrices once, the core once per loop (from the
    analytic forward FLOPs: 2 FLOPs per weight, minus attention's 4 d S per layer application)."""
    seq = 1
    attention = 4 * cfg.d_model * seq * effective_depth(cfg, loops)
    return (flops_per_token(cfg, seq, loops=loops, mode="forward") - attention) / 2


def prefill_bytes(cfg: ModelConfig, batch: int, seq_len: int, loops: int | None = None,
                  dtype_bytes: int = 4) -> float:
    """Compulsory bytes moved by one forward over batch x seq_len tokens."""
    tokens = batch * seq_len
    weights = matmul_params_per_token(cfg, loops)
    per_token = (cfg.d_model  # embedding row gathered
                 + effective_depth(cfg, loops) * _activation_elements_per_layer(cfg)
                 + 2 * cfg.d_model + cfg.vocab_size)  # final norm in/out, logits written
    return float((weights + tokens * per_token) * dtype_bytes)


def decode_step_bytes(cfg: ModelConfig, batch: int, context: int, loops: int | None = None,
                      dtype_bytes: int = 4) -> float:
    """Compulsory bytes moved by one decode step (one new token per sequence) at `context` cached positions:
    the weights once, and per sequence its activations plus every layer application's K and V over the
    context (under either KV policy each application attends over the whole context)."""
    L = effective_depth(cfg, loops)
    weights = matmul_params_per_token(cfg, loops)
    per_seq = (cfg.d_model + L * _activation_elements_per_layer(cfg) + 2 * cfg.d_model + cfg.vocab_size
               + L * 2 * cfg.d_model * context)
    return float((weights + batch * per_seq) * dtype_bytes)


def prefill_flops(cfg: ModelConfig, batch: int, seq_len: int, loops: int | None = None) -> float:
    return flops_per_token(cfg, seq_len, loops=loops, mode="forward") * batch * seq_len


def decode_step_flops(cfg: ModelConfig, batch: int, context: int, loops: int | None = None) -> float:
    """FLOPs of one decode step: attention over `context` keys is 4 d context per layer application, which is
    what flops_per_token counts per token at seq_len = context."""
    return flops_per_token(cfg, context, loops=loops, mode="forward") * batch


def arithmetic_intensity(flops: float, bytes_moved: float) -> float:
    if not bytes_moved > 0:
        raise ValueError(f"arithmetic_intensity: bytes_moved={bytes_moved} must be > 0")
    return flops / bytes_moved


def ridge_point(peak_flops: float, bandwidth: float) -> float:
    """The intensity (FLOP/byte) where the memory roof meets the compute roof."""
    return peak_flops / bandwidth if bandwidth > 0 else math.nan


def attainable_flops(intensity: float, peak_flops: float, bandwidth: float) -> float:
    return min(peak_flops, intensity * bandwidth)


def classify(intensity: float, peak_flops: float, bandwidth: float) -> str:
    """'compute' at or above the ridge point, 'memory' below it."""
    if not (math.isfinite(peak_flops) and math.isfinite(bandwidth) and peak_flops > 0 and bandwidth > 0):
        raise ValueError(f"classify: peak_flops={peak_flops} and bandwidth={bandwidth} must be finite and > 0")
    return "compute" if intensity >= ridge_point(peak_flops, bandwidth) else "memory"


@dataclass(frozen=True)
class RooflinePoint:
    intensity: float         # FLOP/byte
    achieved_flops: float    # FLOP/s
    peak_flops: float        # FLOP/s, the calibrated compute roof
    bandwidth: float         # bytes/s, the calibrated memory roof
    bound: str               # "compute" | "memory"

    @property
    def attainable_flops(self) -> float:
        return attainable_flops(self.intensity, self.peak_flops, self.bandwidth)

    @property
    def fraction_of_roof(self) -> float:
        return self.achieved_flops / self.attainable_flops


def roofline_point(flops: float, bytes_moved: float, seconds: float, peak_flops: float,
                   bandwidth: float) -> RooflinePoint:
    """One call's position under the roof: `flops` and `bytes_moved` per call, `seconds` per call."""
    if not seconds > 0:
        raise ValueError(f"roofline_point: seconds={seconds} must be > 0")
    intensity = arithmetic_intensity(flops, bytes_moved)
    return RooflinePoint(intensity, flops / seconds, peak_flops, bandwidth, classify(intensity, peak_flops, bandwidth))


def roofline_rows(flops: float, bytes_moved: float, seconds: float, calibration: dict[str, Any],
                  dtype: str, *, what: str) -> list[dict[str, Any]]:
    """Tidy rows: arithmetic_intensity, roofline_bound (1 compute / 0 memory, the class in `source`),
    roofline_attainable_flops and roofline_fraction; NaN with the reason when the run has no calibration.
    `what` names the call, e.g. "one forward of 4 x 64 tokens"."""
    from loopscope.bench.schema import metric_row, unmeasured

    intensity = arithmetic_intensity(flops, bytes_moved)
    src = f"analytic FLOPs / compulsory bytes of {what}"
    rows = [metric_row("arithmetic_intensity", intensity, "FLOP/byte", source=src)]
    key = {"bfloat16": "gemm_bf16_flops", "float16": "gemm_fp16_flops"}.get(dtype, "gemm_fp32_flops")
    peak = float(calibration.get(key, math.nan))
    bandwidth = float(calibration.get("mem_bw_bytes_per_s", math.nan))
    if not (math.isfinite(peak) and math.isfinite(bandwidth) and peak > 0 and bandwidth > 0):
        why = f"unavailable: no calibrated {key} and mem_bw_bytes_per_s in this run"
        return rows + [unmeasured(m, u, why) for m, u in (("roofline_bound", "flag"),
                                                          ("roofline_attainable_flops", "FLOP/s"),
                                                          ("roofline_fraction", "fraction"))]
    point = roofline_point(flops, bytes_moved, seconds, peak, bandwidth)
    roof = (f"{key} {peak:.3g} FLOP/s, bandwidth {bandwidth:.3g} B/s, ridge "
            f"{ridge_point(peak, bandwidth):.3g} FLOP/byte")
    return rows + [
        metric_row("roofline_bound", float(point.bound == "compute"), "flag",
                   source=f"{point.bound}-bound: intensity {intensity:.3g} vs {roof}"),
        metric_row("roofline_attainable_flops", point.attainable_flops, "FLOP/s", source=f"min(peak, I x bw); {roof}"),
        metric_row("roofline_fraction", point.fraction_of_roof, "fraction",
                   source="achieved analytic FLOP/s / attainable under the calibrated roof"),
    ]


def core_weight_bytes(cfg: ModelConfig, dtype_bytes: int = 4) -> float:
    """Bytes of the looped core's weight matrices, read once per loop (0 for a dense model)."""
    if not cfg.is_looped:
        return 0.0
    return float((matmul_params_per_token(cfg, 2) - matmul_params_per_token(cfg, 1)) * dtype_bytes)


def decode_bw_rows(cfg: ModelConfig, batch: int, context: int, loops: int | None, dtype_bytes: int,
                   step_s: float, bandwidth: float, *, llc_bytes: float = math.nan,
                   llc_name: str = "last-level cache") -> list[dict[str, Any]]:
    """Decode as the memory-bound call it is: `bw_util` = bytes that must be read per step / step time /
    calibrated bandwidth. For a looped model twice: stat "core-reread" (every loop re-reads the core from
    DRAM) and "core-once" (the core read once per step, the rest served from cache); with `llc_bytes`, a
    `core_fits_llc` flag says whether the core can stay in the last-level cache between loops."""
    from loopscope.bench.schema import metric_row, unmeasured

    T = loops if (cfg.is_looped and loops) else (cfg.mu_rec if cfg.is_looped else 1)
    reread = decode_step_bytes(cfg, batch, context, loops, dtype_bytes)
    core = core_weight_bytes(cfg, dtype_bytes)
    variants = [("", reread, "weights per effective layer, embeddings and head, KV read")]
    if cfg.is_looped:
        once = reread - (T - 1) * core
        variants = [("core-reread", reread, f"the core re-read from DRAM on each of {T} loops"),
                    ("core-once", once, "the core read once per step (later loops served from cache)")]
    rows: list[dict[str, Any]] = []
    usable = math.isfinite(bandwidth) and bandwidth > 0 and step_s > 0
    for stat, moved, what in variants:
        rows.append(metric_row("decode_bytes_per_step", moved, "bytes", stat=stat,
                               source=f"analytic compulsory bytes of one step at context {context}: {what}"))
        if usable:
            rows.append(metric_row("bw_util", moved / step_s / bandwidth, "fraction", stat=stat,
                                   source=f"{what} / median step time / calibrated {bandwidth:.3g} B/s"))
        else:
            rows.append(unmeasured("bw_util", "fraction", "unavailable: no calibrated memory bandwidth in this run",
                                   stat=stat))
    if cfg.is_looped:
        if math.isfinite(llc_bytes) and llc_bytes > 0:
            fits = core <= llc_bytes
            verdict = ("fits: after the first loop the core can be served from cache, so core-once is the "
                       "honest roofline" if fits else "does not fit: every loop re-reads the core from memory")
            rows.append(metric_row("core_fits_llc", float(fits), "flag",
                                   source=f"core weights {core / 1e6:.1f} MB vs {llc_name} {llc_bytes / 1e6:.1f} MB: "
                                          f"{verdict}"))
        else:
            rows.append(unmeasured("core_fits_llc", "flag", "unavailable: last-level cache size unknown"))
    return rows
