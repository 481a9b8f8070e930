"""The report: frames, fits, the charts (drawn or left out with a reason), tables, escaping, HTML/Markdown.

Runs are synthetic run directories in the runner's own format (cells/*.json records, written by
`write_run` below): cells are real `bench.matrix.Cell`s with real model configs, and their rows carry
the columns the executor writes (`cell_columns`), so the report reads them exactly as a real run. The
numbers are planted from known formulas (a saturation curve for bpb, a known numba/torch ratio), so the
tests check that what the report says follows from the data.
"""

from __future__ import annotations

import base64
import dataclasses
import math
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import pytest

from loopscope.bench.executor import cell_columns
from loopscope.bench.matrix import Cell
from loopscope.bench.schema import metric_row, unmeasured
from loopscope.bench.store import RunStore
from loopscope.models import ModelConfig, kv_bytes_per_token, param_counts, preset
from loopscope.reports import charts as charts_module
from loopscope.reports import frames, tables
from loopscope.reports import report as report_module
from loopscope.reports.charts import CHARTS, Chart, Omitted
from loopscope.reports.fits import fit_saturation, overthinking
from loopscope.reports.frames import load_run
from loopscope.reports.report import write_report

EVIL = "<script>alert('x')</script>|pipe"
PEAK_FP32 = 6.0e10
TRAIN_SEQ = 64
TRAIN_TOKENS = 40_960

# Planted bpb curves per family: L(T) = L_inf + Z exp(-zT).
BPB_CURVE: dict[str, tuple[float, float, float]] = {"parcae": (2.10, 1.2, 0.9), "rdm": (2.20, 1.5, 0.6)}
DENSE_BPB: dict[str, float] = {"gpt-micro": 2.30, "gpt-micro-l6": 2.05}
NUMBA_SPEEDUP = 1.25  # numba tokens/s = torch tokens/s x this in the prefill cells
KERNEL_RATIOS: dict[str, float] = {"attention": 0.8, "rmsnorm": 0.5, "gemm": 1.6}


@dataclass
class RunSpec:
    dense: tuple[str, ...] = ("gpt-micro", "gpt-micro-l6")
    looped: tuple[str, ...] = ("parcae-micro", "rdm-micro")
    lrs: tuple[float, ...] = (4e-3,)
    diverge: dict[tuple[str, float], int] = field(default_factory=dict)  # (model, lr) -> step it diverges
    loops_test: tuple[int, ...] = (1, 2, 4, 8)
    overthink_model: str | None = None  # bpb at the largest T rises for this model
    workloads: tuple[str, ...] = ("train", "eval", "prefill", "decode", "kernels")
    backends: tuple[str, ...] = ("torch", "numba")
    energy: bool = True
    calibrated: bool = True
    evil_name: bool = False  # a model named with <script> and |
    failed_cell: bool = True  # one prefill cell errors with a reason containing <script> and |


def _cfg(name: str) -> dict[str, Any]:
    return preset(name).to_dict()


def _record(run_id: str, cell: Cell, rows: list[dict], samples: list[dict] | None = None,
            status: str = "ok", reason: str = "") -> dict[str, Any]:
    common = cell_columns(cell, run_id, "cpu")
    if not rows and status != "ok":
        rows = [unmeasured("cell_status", "", f"{status}: {reason}")]
    return {
        "cell_id": cell.cell_id, "label": cell.label, "cell": cell.to_dict(), "status": status, "reason": reason,
        "rows": [{**common, **r, "status": status, "reason": reason} for r in rows],
        "samples": [{"run_id": run_id, "cell_id": cell.cell_id, **s} for s in samples or []],
        "wall_s": 1.0, "startup_s": 0.5, "traceback": "", "stderr_tail": "", "finished": "2026-01-01T00:00:00+00:00",
    }


def _samples(metric: str, unit: str, values) -> list[dict]:
    return [{"metric": metric, "unit": unit, "index": i, "value": float(v)} for i, v in enumerate(values)]


def _bpb(model: str, family: str, T: int | None, spec: RunSpec, lr: float) -> float:
    lr_penalty = 0.05 * abs(math.log(lr / 4e-3))  # the middle lr is best
    if T is None:
        return DENSE_BPB.get(model, 2.3) + lr_penalty
    L_inf, Z, z = BPB_CURVE.get(family, (2.2, 1.0, 0.7))
    value = L_inf + Z * math.exp(-z * T) + lr_penalty
    if model == spec.overthink_model and T == max(spec.loops_test):
        value += 0.15
    return value


def _train(run_id: str, model: str, lr: float, spec: RunSpec, rng: np.random.Generator) -> dict[str, Any]:
    cell = Cell(model=model, model_config=_cfg(_preset_of(model)), workload="train", batch=8, seq_len=TRAIN_SEQ,
                lr=lr)
    family = cell.family
    steps = TRAIN_TOKENS // (8 * TRAIN_SEQ)
    curve = 2.2 + 3.3 * np.exp(-np.arange(steps) / 15) + rng.normal(0, 0.03, steps)
    div_step = spec.diverge.get((model, lr))
    if div_step is not None:
        curve = curve[:div_step]
        curve[-5:] *= np.linspace(1.2, 3.0, 5)  # blows up before the NaN
        rows = [metric_row("diverged_step", div_step, "step")]
        return _record(run_id, cell, rows, _samples("train_loss", "nats/token", curve), status="diverged",
                       reason=f"non-finite loss (nan) at step {div_step}")
    rows = [
        metric_row("train_loss", float(curve[-8:].mean()), "nats/token", source="mean of the last 8 steps"),
        metric_row("train_tokens", TRAIN_TOKENS, "tokens", source="budget"),
        metric_row("train_steps", steps, "steps", source="budget"),
        metric_row("loss_spikes", 0, "count"),
        metric_row("tokens_per_s", 9000.0 if family == "gpt" else 3000.0, "tokens/s", stat="mean"),
        metric_row("mfu", 0.12 if family == "gpt" else 0.06, "fraction") if spec.calibrated
        else unmeasured("mfu", "fraction", "unavailable: no calibration in this run"),
    ]
    if family != "gpt":
        loops = int(cell.model_config["mu_rec"])
        growth = 1.1 if family == "parcae" else 1.6
        rows += [metric_row("state_norm", 8.0 * growth ** i, "l2", stat=f"loop{i + 1}") for i in range(loops)]
        if family == "parcae":
            rows.append(metric_row("spectral_radius", 0.46, ""))
        else:
            rows.append(metric_row("adapter_spectral_norm", 1.35, ""))
    samples = _samples("train_loss", "nats/token", curve) + _samples("step_time_ms", "ms", np.full(steps - 1, 40.0))
    return _record(run_id, cell, rows, samples)


def _preset_of(model: str) -> str:
    return "gpt-micro" if model == EVIL else model


def _eval(run_id: str, model: str, lr: float, T: int | None, train: dict, spec: RunSpec) -> dict[str, Any]:
    cell = Cell(model=model, model_config=_cfg(_preset_of(model)), workload="eval", batch=16, seq_len=TRAIN_SEQ,
                loops_test=T, lr=lr, depends_on=train["cell_id"])
    if train["status"] != "ok":
        return _record(run_id, cell, [], status="skipped",
                       reason=f"its train cell {train['cell_id']} is {train['status']}")
    value = _bpb(model, cell.family, T, spec, lr)
    rows = [metric_row("bpb", value, "bits/byte", source="held-out split (disjoint windows of 64)"),
            metric_row("perplexity", 2 ** value, "per token")]
    if T is not None:
        rows.append(metric_row("bpb_std", 0.002, "bits/byte", source="std over 2 h0 seeds"))
    return _record(run_id, cell, rows)


def _energy_rows(spec: RunSpec, j_per_token: float) -> list[dict]:
    if not spec.energy:
        why = "unavailable: no powercap directory at /sys/class/powercap"
        return [unmeasured("energy_j_per_token", "J/token", why), unmeasured("avg_power_w", "W", why)]
    return [metric_row("energy_j_per_token", j_per_token, "J/token", source="rapl"),
            metric_row("avg_power_w", 35.0, "W", source="rapl")]


def _prefill(run_id: str, model: str, T: int | None, backend: str, spec: RunSpec) -> dict[str, Any]:
    cfg = ModelConfig.from_dict(_cfg(_preset_of(model)))
    cell = Cell(model=model, model_config=cfg.to_dict(), workload="prefill", backend=backend, batch=4,
                seq_len=64, loops_test=T)
    depth = cell_columns(cell, run_id, "cpu")["effective_depth"]
    tps = 24000.0 / depth * (NUMBA_SPEEDUP if backend == "numba" else 1.0)
    lat = 4 * 64 / tps * 1e3
    weights = param_counts(cfg).unique * 4
    rows = [
        metric_row("tokens_per_s", tps, "tokens/s", stat="median", ci_low=tps * 0.97, ci_high=tps * 1.03, n_samples=9),
        metric_row("tokens_per_s", tps * 0.99, "tokens/s", stat="mean", n_samples=9),
        *[metric_row("latency_ms", lat * f, "ms", stat=st, n_samples=9)
          for st, f in (("median", 1.0), ("p50", 1.0), ("p90", 1.1), ("p99", 1.2), ("iqr", 0.05))],
        metric_row("mfu", 0.1 / depth, "fraction") if spec.calibrated
        else unmeasured("mfu", "fraction", "unavailable: no calibration"),
        metric_row("peak_mem_bytes", 8e7 + weights, "bytes"),
        metric_row("weights_bytes", weights, "bytes", source="analytic (model accounting)"),
        metric_row("kv_cache_bytes", kv_bytes_per_token(cfg, T) * 4 * 64, "bytes", stat="analytic"),
        *_energy_rows(spec, 1e-3 * depth),
    ]
    return _record(run_id, cell, rows, _samples("latency_ms", "ms", np.full(9, lat)))


def _decode(run_id: str, model: str, T: int | None, policy: str | None, spec: RunSpec) -> dict[str, Any]:
    cfg = ModelConfig.from_dict(_cfg(_preset_of(model)))
    cell = Cell(model=model, model_config=cfg.to_dict(), workload="decode", batch=2, seq_len=96, loops_test=T,
                kv_policy=policy)
    weights = param_counts(cfg).unique * 4
    kv = kv_bytes_per_token(cfg, T, policy=policy or "per-loop") * 2 * 95
    rows = [
        metric_row("ttft_ms", 5.0, "ms", stat="median"),
        metric_row("latency_ms", 2.0, "ms", stat="median"),
        metric_row("latency_ms", 2.4, "ms", stat="p90"),
        metric_row("tokens_per_s", 1000.0 / (1 + (T or 1)), "tokens/s", stat="median", ci_low=900.0 / (1 + (T or 1)),
                   ci_high=1100.0 / (1 + (T or 1))),
        metric_row("kv_cache_bytes", kv, "bytes", stat="measured"),
        metric_row("kv_cache_bytes", kv, "bytes", stat="analytic"),
        metric_row("weights_bytes", weights, "bytes"),
        *_energy_rows(spec, 2e-3),
    ]
    return _record(run_id, cell, rows)


def _kernel_rows(kind: str, name: str, times_ms: dict[str, float]) -> list[dict]:
    """Rows as kernels/bench.py writes them: one time_ms per backend, with the ratio columns beside."""
    ref = times_ms["torch"]
    return [{"kind": kind, "name": name, "backend": b, "shape": "512x256", "metric": "time_ms", "unit": "ms",
             "value": t, "stat": "", "source": "round-robin", "speedup_vs_torch": ref / t,
             "time_ratio_vs_torch": t / ref} for b, t in times_ms.items()]


def _kernels(run_id: str) -> dict[str, Any]:
    cell = Cell(model="gpt-micro", model_config=_cfg("gpt-micro"), workload="kernels")
    rows = [r for op, ratio in KERNEL_RATIOS.items()
            for r in _kernel_rows("op", op, {"torch": 2.0, "numba": 2.0 * ratio})]
    rows += [{"kind": "compile", "name": "prefill d128", "backend": "torch.compile", "metric": "compile_s",
              "unit": "s", "value": 30.0, "stat": "", "source": "first call"},
             {"kind": "interference", "name": "matmul", "backend": "alone", "metric": "time_ms", "unit": "ms",
              "value": 1.0, "stat": "", "source": "round-robin"}]
    return _record(run_id, cell, rows)


def _failed(run_id: str) -> dict[str, Any]:
    cell = Cell(model="gpt-micro", model_config=_cfg("gpt-micro"), workload="prefill", batch=64, seq_len=256)
    return _record(run_id, cell, [], status="error",
                   reason=f"RuntimeError: shape {EVIL}\nsecond line of the traceback")


def write_run(out: Path, spec: RunSpec | None = None, *, run_id: str = "synthetic") -> Path:
    """Write a run directory for `spec` (defaults: every workload, every chart has data)."""
    spec = spec or RunSpec()
    rng = np.random.default_rng(0)
    store = RunStore(out)
    store.create()
    dense = (*spec.dense, EVIL) if spec.evil_name else spec.dense
    models = (*dense, *spec.looped)
    records: list[dict[str, Any]] = []
    for model in models:
        looped = model in spec.looped
        for lr in spec.lrs:
            train = _train(run_id, model, lr, spec, rng)
            if "train" in spec.workloads:
                records.append(train)
            if "eval" in spec.workloads:
                for T in (spec.loops_test if looped else (None,)):
                    records.append(_eval(run_id, model, lr, T, train, spec))
        if "prefill" in spec.workloads:
            for backend in spec.backends:
                for T in ((1, 4) if looped else (None,)):
                    records.append(_prefill(run_id, model, T, backend, spec))
    if "decode" in spec.workloads:
        records.append(_decode(run_id, "gpt-micro", None, None, spec))
        for policy in ("per-loop", "last-loop"):
            records.append(_decode(run_id, "parcae-micro", 4, policy, spec))
    if "kernels" in spec.workloads:
        records.append(_kernels(run_id))
    if spec.failed_cell:
        records.append(_failed(run_id))
    for record in records:
        store.write_cell(record)
    store.write_manifest(_manifest(run_id, spec))
    store.write_tables()
    return out


def _manifest(run_id: str, spec: RunSpec) -> dict[str, Any]:
    calibration = ({"device": "cpu", "gemm_fp32_flops": PEAK_FP32, "gemm_bf16_flops": 4 * PEAK_FP32,
                    "mem_bw_bytes_per_s": 1.2e10} if spec.calibrated else {})
    return {
        "run_id": run_id, "created": "2026-01-01T00:00:00+00:00",
        "profile": {"name": "synthetic", "path": "tests/report_factory.py", "hash": "abc123",
                    "settings": {"profile": {"description": f"synthetic run {EVIL}"}}},
        "fingerprint": {
            "cpu": {"model": "Synthetic CPU <b>bold</b>", "logical_cores": 2, "isa": ["avx2"]},
            "gpus": {"available": False, "reason": "no NVML", "devices": []},
            "memory": {"total_bytes": 8 * 2**30}, "device_class": "cpu",
            "versions": {"python": "3.11", "torch": "2.x"},
            "threads": {"torch_num_threads": 2, "blas_pools": []},
            "git": {"commit": "0123456789abcdef", "dirty": False},
        },
        "versions": {"python": "3.11", "torch": "2.x"},
        "git": {"commit": "0123456789abcdef", "dirty": False},
        "calibration": calibration,
        "corpus": {"name": "default", "train_bytes": 1000, "val_bytes": 100, "val_sha256": "f" * 64},
    }


# --- tests ------------------------------------------------------------------------------------------


def _charts(run) -> dict[str, Chart | Omitted]:
    return {fn.__name__: fn(run) for fn in CHARTS}


def _close(charts: dict) -> None:
    for c in charts.values():
        if isinstance(c, Chart):
            plt.close(c.figure)


@pytest.fixture(scope="module")
def full_report(tmp_path_factory):
    """Every workload, an lr sweep with one divergence, overthinking, a <script>|pipe model, one failed cell."""
    spec = RunSpec(lrs=(1e-3, 4e-3, 1.6e-2), diverge={("rdm-micro", 1.6e-2): 40}, overthink_model="rdm-micro",
                   evil_name=True)
    run_dir = write_run(tmp_path_factory.mktemp("full") / "run", spec)
    paths = write_report(run_dir)
    return run_dir, paths


# fits


def test_fit_saturation_recovers_known_parameters():
    T = np.array([1, 2, 3, 4, 6, 8, 12, 16], dtype=float)
    L = 2.5 + 1.4 * np.exp(-0.55 * T)
    fit = fit_saturation(T, L)
    assert fit.L_inf == pytest.approx(2.5, abs=1e-6)
    assert fit.Z == pytest.approx(1.4, rel=1e-4)
    assert fit.z == pytest.approx(0.55, rel=1e-4)
    assert fit.residual < 1e-8
    noisy = L + np.random.default_rng(1).normal(0, 0.002, T.size)
    fit = fit_saturation(T, noisy)
    assert fit.L_inf == pytest.approx(2.5, abs=0.01) and fit.z == pytest.approx(0.55, rel=0.1)
    assert 0.0005 < fit.residual < 0.005
    assert fit.predict(100.0) == pytest.approx(fit.L_inf, abs=1e-9)


def test_fit_saturation_needs_three_loop_counts():
    with pytest.raises(ValueError, match="at least 3 distinct"):
        fit_saturation([1, 2, 2], [3.0, 2.5, 2.5])
    with pytest.raises(ValueError, match="same length"):
        fit_saturation([1, 2, 3], [3.0, 2.5])


def test_overthinking_is_a_rise_beyond_the_training_loops():
    T = [1, 2, 4, 8, 16]
    assert overthinking(T, [3.0, 2.5, 2.3, 2.29, 2.28], loops_train=4) is None  # still falling
    rise = overthinking(T, [3.0, 2.5, 2.3, 2.35, 2.5], loops_train=4)
    assert rise is not None and (rise.best_T, rise.worst_T, rise.worst_L) == (4, 16, 2.5)
    assert overthinking(T, [3.0, 2.5, 2.3, 2.305, 2.302], loops_train=4, tolerance=0.01) is None  # within noise
    # a minimum before the training loops and a rise at the training loops is not "beyond training"
    assert overthinking([1, 2, 4], [2.0, 1.9, 2.1], loops_train=4) is None


def test_pareto_front_keeps_points_not_beaten_by_a_smaller_model():
    x = np.array([1.0, 2.0, 3.0, 4.0])
    y = np.array([3.0, 3.5, 2.0, 2.5])
    assert frames.pareto_front(x, y).tolist() == [0, 2]


# frames and tables


def test_frames_read_the_runner_format(tmp_path):
    run = load_run(write_run(tmp_path / "run", RunSpec()))
    q = frames.at_training_loops(frames.quality_frame(run))
    by_model = q.set_index("model")["value"]
    L_inf, Z, z = BPB_CURVE["parcae"]
    assert by_model["parcae-micro"] == pytest.approx(L_inf + Z * math.exp(-z * 4))  # T = mu_rec = 4
    assert by_model["gpt-micro"] == pytest.approx(DENSE_BPB["gpt-micro"])
    flops = frames.quality_vs_flops(run).set_index("model")["train_flops"]
    from loopscope.models import flops_per_token

    expected = flops_per_token(preset("parcae-micro"), TRAIN_SEQ, mode="train") * TRAIN_TOKENS
    assert flops["parcae-micro"] == pytest.approx(expected)
    ratios = frames.numba_ratio_frame(run)
    ops = ratios[ratios["kind"] == "op"].set_index("name")["ratio"]
    assert ops.to_dict() == pytest.approx(KERNEL_RATIOS)
    models = ratios[ratios["kind"] == "model"]["ratio"]
    assert len(models) == 6 and models.to_numpy() == pytest.approx(1 / NUMBA_SPEEDUP)


def test_numba_ratios_pair_kernel_times_of_the_same_benchmark(tmp_path):
    run_dir = write_run(tmp_path / "run", RunSpec(workloads=("prefill",), backends=("torch",), failed_cell=False))
    cell = Cell(model="gpt-micro", model_config=_cfg("gpt-micro"), workload="kernels")
    rows = _kernel_rows("op", "softmax", {"numba": 3.0, "numba-npdot": 1.0, "torch": 2.0, "torch.compile": 1.5})
    rows += _kernel_rows("decode", "decode d128 dense 8x1", {"numba": 5.0, "torch": 10.0})
    RunStore(run_dir).write_cell(_record("synthetic", cell, rows))
    r = frames.numba_ratio_frame(load_run(run_dir)).set_index(["kind", "name", "baseline"])["ratio"]
    assert r.to_dict() == pytest.approx({
        ("op", "softmax", "torch"): 1.5, ("op", "softmax [numba-npdot]", "torch"): 0.5,
        ("op", "softmax", "torch-compile"): 2.0, ("op", "softmax [numba-npdot]", "torch-compile"): 1 / 1.5,
        ("model", "decode d128 dense 8x1", "torch"): 0.5})


def test_matched_tables_pair_each_looped_model_with_the_closest_dense_model(tmp_path):
    from loopscope.models import flops_per_token

    run = load_run(write_run(tmp_path / "run", RunSpec()))
    iso_param = tables.iso_param_table(run).set_index("looped")
    assert iso_param.loc["parcae-micro", "dense"] == "gpt-micro"  # 3 stored layers each
    expected = param_counts(preset("parcae-micro")).unique / param_counts(preset("gpt-micro")).unique
    assert iso_param.loc["parcae-micro", "match ratio"] == pytest.approx(expected)
    assert iso_param.loc["parcae-micro", "bpb ratio"] == pytest.approx(
        iso_param.loc["parcae-micro", "looped bpb"] / DENSE_BPB["gpt-micro"])
    iso_flop = tables.iso_flop_table(run).set_index("looped")
    assert iso_flop.loc["parcae-micro", "dense"] == "gpt-micro-l6"  # 6 layers = 1 + 4x1 + 1 at mu_rec
    f = lambda name: flops_per_token(preset(name), TRAIN_SEQ, mode="train")  # noqa: E731
    assert iso_flop.loc["parcae-micro", "match ratio"] == pytest.approx(f("parcae-micro") / f("gpt-micro-l6"))
    iso_mem = tables.iso_memory_table(run)
    assert set(iso_mem["looped"]) == {"parcae-micro", "rdm-micro"} and (iso_mem["context"] == 96).all()
    assert "prefill tokens/s ratio" in iso_param.columns


def test_tables_say_why_they_are_empty(tmp_path):
    run = load_run(write_run(tmp_path / "run", RunSpec(dense=(), workloads=("prefill",), energy=False,
                                                      failed_cell=False)))
    assert tables.iso_param_table(run).attrs["why"] == "the run has no dense model to match against"
    assert tables.quality_table(run).attrs["why"] == "no eval cell finished"
    assert "unavailable: no powercap" in tables.energy_table(run).attrs["why"]
    assert tables.failed_table(run).attrs["why"] == "every cell finished"


def test_stability_and_failed_tables(full_report):
    run = load_run(full_report[0])
    st = tables.stability_table(run)
    diverged = st[st["outcome"] == "diverged"]
    assert diverged[["model", "lr", "diverged at step"]].values.tolist() == [["rdm-micro", 1.6e-2, 40]]
    assert (st["outcome"] == "converged").sum() == len(st) - 1
    gains = st.set_index(["model", "lr"])["state gain (rho or adapter norm)"]
    assert gains[("parcae-micro", 4e-3)] == pytest.approx(0.46) and gains[("rdm-micro", 4e-3)] == pytest.approx(1.35)
    failed = tables.failed_table(run)
    assert set(failed["status"]) == {"error", "diverged", "skipped"}
    err = failed[failed["status"] == "error"].iloc[0]
    assert err["reason"].startswith("RuntimeError: shape <script>") and "\n" not in err["reason"]
    loop_fits = tables.loop_fit_table(run).set_index("model")
    assert loop_fits.loc["parcae-micro", "L_inf (bpb)"] == pytest.approx(BPB_CURVE["parcae"][0], abs=1e-4)
    assert loop_fits.loc["parcae-micro", "overthinking"] == "no"
    assert loop_fits.loc["rdm-micro", "overthinking"].startswith("yes")


# charts


def test_every_chart_is_drawn_when_its_data_is_there(full_report):
    run_dir, paths = full_report
    names = [fn.__name__ for fn in CHARTS]
    for name in names:
        assert (run_dir / "charts" / f"{name}.png").stat().st_size > 5000, name
        assert (run_dir / "charts" / f"{name}.svg").read_bytes().startswith(b"<?xml")
    md = paths["md"].read_text()
    # the synthetic run has no probe corpus and no per-step samples: the two quality_charts may be left out
    quality_titles = ("Reasoning probe", "Stability diagnostics over training")
    md = "\n".join(line for line in md.splitlines() if not line.startswith(tuple(f"- _{t}" for t in quality_titles)))
    assert "not drawn" not in md and "could not be drawn" not in md
    assert md.count("](charts/") == len(names)


def test_readings_are_computed_from_the_data(tmp_path):
    run = load_run(write_run(tmp_path / "run", RunSpec(overthink_model="rdm-micro")))
    charts = _charts(run)
    try:
        best = min(DENSE_BPB.values())
        assert f"lowest: gpt-micro-l6 {best:.3f} bpb" in charts["bpb_vs_params"].reading
        loops = charts["bpb_vs_loops"].reading
        assert f"fit L_inf={BPB_CURVE['parcae'][0]:.3f}" in loops
        # one training seed: the planted rise beyond the training loops is reported, not called overthinking
        assert "rdm-micro" in loops and "overthinking" not in loops.lower() and "spread unknown" in loops
        assert "numba is faster on 2 of 3 ops (best rmsnorm 0.5x" in charts["numba_vs_torch"].reading
        assert "cuts parcae-micro T=4 from" in charts["memory_vs_context"].reading
        assert "(2.0x less)" in charts["memory_vs_context"].reading  # per-loop 4+2 vs last-loop 3 layers
        assert "rho(A_bar) = 0.46 < 1" in charts["stability_state_norm"].reading
        assert "(adapter) = 1.35 >= 1" in charts["stability_state_norm"].reading
        mfu_reading = charts["mfu"].reading
        assert mfu_reading.startswith("Highest: train gpt-micro") and "at 12% of the calibrated peak" in mfu_reading
        for chart in charts.values():
            assert isinstance(chart, Chart) or chart.name == "stability_grid"
            assert re.search(r"\d", chart.reading if isinstance(chart, Chart) else chart.why)
    finally:
        _close(charts)


def test_charts_without_data_are_left_out_with_the_reason(tmp_path):
    spec = RunSpec(workloads=("prefill",), backends=("torch",), energy=False, calibrated=False, failed_cell=False)
    run = load_run(write_run(tmp_path / "run", spec))
    charts = _charts(run)
    try:
        drawn = {name for name, c in charts.items() if isinstance(c, Chart)}
        assert drawn == {"throughput_vs_depth"}
        why = {name: c.why for name, c in charts.items() if isinstance(c, Omitted)}
        assert why["bpb_vs_params"] == "the run has no eval cells (bits per byte come from eval cells)"
        assert why["energy_per_token"].startswith("no cell measured energy: unavailable: no powercap")
        assert why["mfu"] == "MFU could not be computed: unavailable: no calibration"
        assert why["memory_vs_context"].startswith("the run has no decode cells")
        assert why["numba_vs_torch"].startswith("no kernels-workload ratios")
        assert why["stability_state_norm"].startswith("no looped train cell")
    finally:
        _close(charts)


def test_single_lr_leaves_out_the_grid_and_failed_evals_are_counted(tmp_path):
    spec = RunSpec(looped=("parcae-micro",), loops_test=(4,), diverge={("gpt-micro", 4e-3): 30},
                   workloads=("train", "eval"))
    run = load_run(write_run(tmp_path / "run", spec))
    charts = _charts(run)
    try:
        assert charts["stability_grid"].why == ("only one learning rate was trained (lr=0.004); "
                                                "the grid needs an lr sweep")
        assert charts["bpb_vs_loops"].why == "only one test-time loop count (T=4) was evaluated"
        assert isinstance(charts["bpb_vs_params"], Chart)  # gpt-micro-l6 and parcae-micro finished
        loss = charts["train_loss"].reading
        assert "not finished: gpt-micro (diverged after 30 steps)" in loss
    finally:
        _close(charts)
    spec = RunSpec(dense=("gpt-micro",), looped=(), diverge={("gpt-micro", 4e-3): 30}, workloads=("train", "eval"),
                   failed_cell=False)
    run = load_run(write_run(tmp_path / "run2", spec))
    omitted = charts_module.bpb_vs_params(run)
    assert omitted.why == ("no eval cell finished with data for it (1 skipped; bits per byte come from eval cells)")


def test_a_chart_that_raises_is_reported_not_fatal(tmp_path, monkeypatch):
    def broken(run):
        raise RuntimeError("boom <b>")

    monkeypatch.setattr(report_module, "CHARTS", (charts_module.bpb_vs_params, broken))
    run_dir = write_run(tmp_path / "run", RunSpec(workloads=("train", "eval"), failed_cell=False))
    paths = write_report(run_dir)
    assert "broken: not drawn (could not be drawn: RuntimeError: boom &lt;b&gt;)" in paths["md"].read_text()
    assert "could not be drawn: RuntimeError: boom &lt;b&gt;" in paths["html"].read_text()


# the documents


def test_strings_from_profiles_and_cells_are_escaped(full_report):
    _, paths = full_report
    page = paths["html"].read_text()
    assert "<script" not in page.lower() and "<b>" not in page
    assert "&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt;|pipe" in page
    md = paths["md"].read_text()
    assert "<script" not in md.lower() and "<b>" not in md
    assert "&lt;script&gt;alert('x')&lt;/script&gt;\\|pipe" in md
    # every Markdown table row has as many cells as its header: no stray | from the data
    for block in re.findall(r"(?:^\|.*\|$\n?)+", md, flags=re.M):
        widths = {len(re.split(r"(?<!\\)\|", line)) for line in block.strip().splitlines()}
        assert len(widths) == 1, block


def test_html_is_self_contained(full_report):
    _, paths = full_report
    page = paths["html"].read_text()
    images = re.findall(r"<img [^>]*src='([^']*)'", page)
    assert len(images) == len(CHARTS)
    assert all(src.startswith("data:image/svg+xml;base64,") for src in images)
    for src in images:
        svg = base64.b64decode(src.split(",", 1)[1]).decode()
        assert "<svg" in svg and not re.search(r"(?:href|src)=\"(?:https?:)?//", svg)
    assert not re.search(r"(?:href|src)=['\"](?:https?:)?//", page)
    assert "<link" not in page and "@import" not in page and "url(" not in page
    for key in ("Synthetic CPU &lt;b&gt;bold&lt;/b&gt;", "fp32 GEMM 60 GFLOP/s", "0123456789ab",
                "Iso-FLOP", "Stability: converged or diverged", "Cells that did not finish"):
        assert key in page, key


def test_markdown_matches_the_html_content(full_report):
    run_dir, paths = full_report
    md, page = paths["md"].read_text(), paths["html"].read_text()
    for fn in CHARTS:
        assert f"(charts/{fn.__name__}.png)" in md
    for spec in tables.TABLES:
        assert report_module.md_escape(spec.title) in md and report_module.html_escape(spec.title) in page
    assert md.count("## Findings") == page.count("<h2>Findings</h2>") == 1
    assert md.count("spread unknown") == page.count("spread unknown") >= 1


def test_report_of_a_run_read_from_parquet_only(tmp_path):
    run_dir = write_run(tmp_path / "run", RunSpec(workloads=("train", "eval", "prefill"), failed_cell=False))
    shutil.rmtree(run_dir / "cells")
    run = load_run(run_dir)
    assert len(run.cell_frame()) > 0 and run.cells == {}
    paths = write_report(run_dir)
    md = paths["md"].read_text()
    assert "### Bits per byte vs unique parameters" in md and "could not be drawn" not in md


def test_header_reads_gpus_and_tolerates_a_thin_manifest(tmp_path):
    run = load_run(write_run(tmp_path / "run", RunSpec(workloads=("prefill",), failed_cell=False)))
    run.manifest["fingerprint"]["gpus"] = {"available": True, "driver_version": "550.1", "devices": [
        {"name": "NVIDIA H100 80GB HBM3", "memory_total_bytes": 80 * 2**30}]}
    items = dict(report_module.header_items(run))
    assert items["gpu"] == "NVIDIA H100 80GB HBM3 (80 GiB), driver 550.1"
    assert items["calibration"] == "fp32 GEMM 60 GFLOP/s, bf16 GEMM 240 GFLOP/s, memory bandwidth 12 GB/s"
    run.manifest = {"run_id": "bare"}
    items = dict(report_module.header_items(run))
    assert items["gpu"] == "none" and items["calibration"].startswith("not calibrated")
    assert items["git"] == "not a git checkout"


def test_fmt_formats_by_column():
    fmt = report_module.fmt
    assert fmt(3 * 2**20 + 0.0, "peak memory") == "3 MiB"
    assert fmt(1.5e12, "training FLOPs/token") == "1.5T"
    assert fmt(23112.4, "tokens/s") == "23,112"
    assert fmt(0.01234, "MFU") == "0.01234" and fmt(4e-5, "rms residual") == "4e-05"
    assert fmt(float("nan"), "bpb") == "" and fmt(1.6e-2, "lr") == "0.016"


def test_a_finite_run_far_above_its_best_lr_is_degraded_and_state_growth_is_read(full_report):
    run = load_run(full_report[0])
    st = frames.stability_frame(run)
    worst = st[(st["model"] == "parcae-micro") & (st["lr"] == 1e-3)].iloc[0]
    best_loss = st[(st["model"] == "parcae-micro")]["train_loss"].min()
    res = run.results.copy()
    mask = (res["cell_id"] == worst["cell_id"]) & (res["metric"] == "train_loss")
    res.loc[mask, "value"] = best_loss * 1.3
    norms = pd.DataFrame({"cell_id": worst["cell_id"], "metric": "state_norm_last_loop", "unit": "l2",
                          "index": [0, 50, 99], "value": [2.0, 30.0, 500.0]})
    changed = dataclasses.replace(run, results=res, samples=pd.concat([run.samples, norms], ignore_index=True))
    st2 = frames.stability_frame(changed).set_index(["model", "lr"])
    assert st2.loc[("parcae-micro", 1e-3), "outcome"] == "degraded"
    assert st2.loc[("parcae-micro", 1e-3), "state_norm_growth"] == pytest.approx(250.0)
    assert st2.loc[("parcae-micro", 4e-3), "outcome"] == "converged"
    assert st2.loc[("rdm-micro", 1.6e-2), "outcome"] == "diverged"
