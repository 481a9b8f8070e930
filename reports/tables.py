"""pandas tables of a run, ready to print: summary, matched comparisons, speed, energy, stability, failures.

Each function returns a DataFrame with readable column names (units in the name). An empty table
carries the reason in `df.attrs["why"]`, which the report prints instead of the table.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pandas as pd

from loopscope.reports import frames, groups, validity
from loopscope.reports.fits import fit_saturation, overthinking
from loopscope.reports.frames import DENSE_FAMILY, RunData

REASON_CHARS = 160
SUMMARY_COLUMNS: tuple[str, ...] = (
    "family", "model", "params (unique)", "params (non-embedding)", "training loops", "effective depth",
    "train loss (nats)", "bpb", "bpb seed std", "seeds", "bpb at T", "recipe group", "best prefill tokens/s",
    "best decode tokens/s", "peak memory (prefill)", "cells ok",
)


def _empty(why: str) -> pd.DataFrame:
    df = pd.DataFrame()
    df.attrs["why"] = why
    return df


def _loops(value: float) -> str:
    return "" if pd.isna(value) else str(int(value))


def summary_table(run: RunData) -> pd.DataFrame:
    """One row per model, by family and size: accounting, quality at training loops, speed."""
    cells = run.cell_frame()
    if cells.empty:
        return _empty("the run has no cells")
    res = run.results
    first = res.drop_duplicates("model").set_index("model") if not res.empty else pd.DataFrame()
    scores = groups.model_scores(groups.quality_groups(run)) if not run.metric("bpb").empty else pd.DataFrame()
    if not scores.empty:  # a model in several recipe groups: its main group's score
        main = groups.main_group(scores)
        scores = scores.assign(_m=scores["group_key"] != main).sort_values("_m", kind="stable")
    quality = scores.drop_duplicates("model").set_index("model") if not scores.empty else pd.DataFrame()
    speed = frames.speed_frame(run)
    rows = []
    for model, g in cells.groupby("model", sort=False):
        family = g["family"].iloc[0]
        row: dict = {"family": family, "model": model}
        cfg = run.model_config(g["cell_id"].iloc[0])
        if cfg is not None:
            from loopscope.models import effective_depth, param_counts

            counts = param_counts(cfg)
            row["params (unique)"] = counts.unique
            row["params (non-embedding)"] = counts.non_embedding
            row["training loops"] = "" if family == DENSE_FAMILY else str(cfg.mu_rec)
            row["effective depth"] = effective_depth(cfg)
        elif model in first.index:
            row["params (unique)"] = first.loc[model, "params_unique"]
            row["training loops"] = _loops(first.loc[model, "loops_train"])
        train = run.metric("train_loss")
        train = train[train["model"] == model] if not train.empty else train
        if not train.empty:
            row["train loss (nats)"] = float(train["value"].min())
        if model in quality.index:
            q = quality.loc[model]
            row["bpb"] = float(q["bpb"])
            row["bpb seed std"] = float(q["bpb_seed_std"])
            row["seeds"] = int(q["n_seeds"])
            row["bpb at T"] = _loops(q["loops_test"])
            row["recipe group"] = q["group"]
        if not speed.empty:
            for workload in ("prefill", "decode"):
                s = speed[(speed["model"] == model) & (speed["workload"] == workload)]
                if not s.empty:
                    row[f"best {workload} tokens/s"] = float(s["value"].max())
            peak = speed.loc[speed["model"] == model, "peak_mem_bytes"]
            if peak.notna().any():
                row["peak memory (prefill)"] = float(peak.max())
        row["cells ok"] = f"{int((g['status'] == 'ok').sum())}/{len(g)}"
        rows.append(row)
    out = pd.DataFrame(rows)
    out = out[[c for c in SUMMARY_COLUMNS if c in out.columns]]
    out = out.assign(_r=out["family"].map(frames.family_rank))
    sort = ["_r", "params (unique)"] if "params (unique)" in out else ["_r", "model"]
    return out.sort_values(sort).drop(columns="_r").reset_index(drop=True)


def quality_table(run: RunData) -> pd.DataFrame:
    """Held-out bits per byte of every eval cell."""
    q = groups.quality_groups(run)
    if q.empty:
        return _empty("no eval cell finished")
    q = q.sort_values(["group", "model", "loops_test", "lr", "seed"])
    out = pd.DataFrame({
        "recipe group": q["group"], "model": q["model"], "family": q["family"], "lr": q["lr"],
        "training seed": q["seed"], "training loops": q["loops_train"].map(_loops),
        "test loops T": q["loops_test"].map(_loops), "bpb": q["value"], "bpb std (h0 draws)": q["bpb_std"],
        "how": q["source"],
    })
    if out["lr"].nunique() <= 1:
        out = out.drop(columns="lr")
    if out["bpb std (h0 draws)"].isna().all():
        out = out.drop(columns="bpb std (h0 draws)")
    if out["recipe group"].nunique() <= 1:
        out = out.drop(columns="recipe group")
    return out.reset_index(drop=True)


def seed_table(run: RunData) -> pd.DataFrame:
    """Per recipe group and model: bpb mean, std and 95% interval over training seeds, at the training loops."""
    scores = groups.model_scores(groups.quality_groups(run))
    if scores.empty:
        return _empty("no eval cell finished")
    return pd.DataFrame({
        "recipe group": scores["group"], "model": scores["model"], "family": scores["family"],
        "params (unique)": scores["params_unique"], "T": scores["loops_test"].map(_loops),
        "training seeds": scores["n_seeds"], "bpb mean": scores["bpb"], "bpb std (seeds)": scores["bpb_seed_std"],
        "95% CI ±": scores["bpb_ci95"], "bpb std (h0 draws)": scores["bpb_h0_std"],
        "per seed": [", ".join(f"{v:.4f}" for v in vals) for vals in scores["seed_values"]],
    })


def validity_table(run: RunData) -> pd.DataFrame:
    """Rows that cannot be taken at face value: impossible values, a busy or throttled machine."""
    if "validity" not in run.results.columns:
        return _empty("validity was not checked")
    bad = run.results[run.results["validity"] != validity.OK]
    if bad.empty:
        return _empty("every row is valid: no MFU above 100%, no bandwidth above the calibrated copy rate, no "
                      "busy or throttled cell recorded")
    cells = run.cell_frame()
    labels = cells.set_index("cell_id")["label"] if not cells.empty else pd.Series(dtype=str)
    rows = []
    for (cid, flag), g in bad.groupby(["cell_id", "validity"], sort=False):
        label = labels.get(cid, cid)
        rows.append({"cell": frames.row_label(g.iloc[0]) if label == cid else label, "flag": flag,
                     "metrics": ", ".join(dict.fromkeys(f"{m}" + (f" ({st})" if st else "") + (
                         f" = {v * 100:.3g}%" if m == "mfu" else "") for m, st, v in
                         zip(g["metric"], g["stat"], g["value"], strict=True)))})
    return pd.DataFrame(rows)


def loop_fit_table(run: RunData) -> pd.DataFrame:
    """Per looped model: the saturation fit L(T) = L_inf + Z exp(-zT) of bpb, and any overthinking."""
    q = frames.quality_frame(run)
    looped = q[q["loops_test"].notna()] if not q.empty else q
    if looped.empty:
        return _empty("no looped model was evaluated")
    best_lr = frames.at_training_loops(q).set_index("model")["lr"]
    looped = looped[(looped["lr"] == looped["model"].map(best_lr)) | looped["lr"].isna()]
    rows = []
    for model, g in looped.sort_values("loops_test").groupby("model"):
        T, L = g["loops_test"].to_numpy(float), g["value"].to_numpy(float)
        train_T = float(g["loops_train"].iloc[0])
        row: dict = {"model": model, "test loops": ", ".join(f"{t:g}" for t in T), "training loops": f"{train_T:g}"}
        try:
            fit = fit_saturation(T, L)
        except ValueError as err:
            row["fit"] = str(err).removeprefix("fit_saturation: ")
        else:
            row.update({"L_inf (bpb)": fit.L_inf, "Z": fit.Z, "z (per loop)": fit.z, "rms residual": fit.residual,
                        "T to within 1% of L_inf": fit.loops_to_within(0.01)})
        noise = 2 * float(np.nanmax(g["bpb_std"])) if g["bpb_std"].notna().any() else 0.0
        over = overthinking(T, L, train_T, tolerance=noise)
        row["overthinking"] = (f"yes: {over.best_L:.4g} at T={over.best_T:g} -> {over.worst_L:.4g} at "
                               f"T={over.worst_T:g}" if over else "no")
        rows.append(row)
    return pd.DataFrame(rows)


def matched_table(run: RunData, kind: str) -> pd.DataFrame:
    """Looped models against the run's dense model closest on `kind` (iso-param | iso-FLOP | iso-memory)."""
    pairs = frames.matched_pairs(run, kind)
    if pairs.empty:
        facts = frames.model_facts(run)
        has_dense = any(f.family == DENSE_FAMILY for f in facts)
        return _empty("the run has no dense model to match against" if not has_dense
                      else "the run has no looped model")
    return pairs


def iso_param_table(run: RunData) -> pd.DataFrame:
    return matched_table(run, "iso-param")


def iso_flop_table(run: RunData) -> pd.DataFrame:
    return matched_table(run, "iso-FLOP")


def iso_memory_table(run: RunData) -> pd.DataFrame:
    return matched_table(run, "iso-memory")


def throughput_table(run: RunData) -> pd.DataFrame:
    """Per device: prefill and decode tokens/s (median and 95% CI), latency percentiles, TTFT, MFU, memory."""
    s = frames.speed_frame(run)
    if s.empty:
        return _empty("no prefill or decode cell finished")
    flags = validity.cell_flags(run.results)
    out = pd.DataFrame({
        "device": s["device"], "workload": s["workload"], "model": s["model"], "backend": s["backend"],
        "dtype": s["dtype"], "batch": s["batch"], "seq len": s["seq_len"], "T": s["loops_test"].map(_loops),
        "kv policy": s["kv_policy"].fillna(""), "effective depth": s["effective_depth"],
        "tokens/s": s["value"], "CI low": s["ci_low"], "CI high": s["ci_high"],
        "latency p50 ms": s["latency_median_ms"], "latency p90 ms": s["latency_p90_ms"],
        "latency p99 ms": s["latency_p99_ms"], "TTFT ms": s["ttft_median_ms"], "MFU %": s["mfu"] * 100,
        "peak memory": s["peak_mem_bytes"],
        "validity": [flags.get(c, validity.OK) for c in s["cell_id"]],
    })
    out = out.loc[:, [c for c in out.columns if not (out[c].isna().all() or (out[c] == "").all())]]
    return out.sort_values(["device", "workload", "model", "backend", "effective depth"]).reset_index(drop=True)


def energy_table(run: RunData) -> pd.DataFrame:
    """Joules per token and average power of the cells where energy was measured."""
    e, why = frames.energy_frame(run)
    if e.empty:
        return _empty("no cell measured energy" + (": " + "; ".join(why) if why else ""))
    return pd.DataFrame({
        "device": e["device"], "workload": e["workload"], "model": e["model"], "backend": e["backend"],
        "T": e["loops_test"].map(_loops), "batch": e["batch"], "seq len": e["seq_len"],
        "J/token": e["value"], "avg power W": e["avg_power_w"], "source": e["source"],
    }).sort_values(["device", "workload", "J/token"]).reset_index(drop=True)


def stability_table(run: RunData) -> pd.DataFrame:
    """Converged or diverged per family, model and learning rate (from the train cells)."""
    st = frames.stability_frame(run)
    if st.empty:
        return _empty("the run has no train cells")
    proxy = st["spectral_radius"].combine_first(st["adapter_spectral_norm"])
    out = pd.DataFrame({
        "family": st["family"], "model": st["model"], "lr": st["lr"],
        "training seed": st["seed"] if st["seed"].nunique() > 1 else np.nan, "outcome": st["outcome"],
        "diverged at step": st["diverged_step"], "final train loss": st["train_loss"],
        "loss spikes": st["loss_spikes"], "state gain (rho or adapter norm)": proxy,
        "state norm growth (x)": st["state_norm_growth"],
    })
    return out.loc[:, [c for c in out.columns if not out[c].isna().all()]]


def numba_table(run: RunData) -> pd.DataFrame:
    """numba time / torch time per op and per model (< 1: numba faster)."""
    r = frames.numba_ratio_frame(run)
    if r.empty:
        return _empty("no numba measurement paired with torch in this run")
    return r.rename(columns={"ratio": "numba time / torch time"})


def numba_targets_table(run: RunData) -> pd.DataFrame:
    """The numba performance targets of the kernels workload: measured ratio, bound, met, and why if missed."""
    res = run.results
    if "kind" not in res.columns:
        return _empty("no kernels workload at the full shapes in this run")
    t = res[(res["workload"] == "kernels") & (res["kind"] == "target")]
    if t.empty:
        return _empty("no kernels workload at the full shapes in this run")
    arrow = {"min": ">=", "max": "<="}
    return pd.DataFrame({
        "target": [f"{name} ({m.replace('_vs_torch', '').replace('_', ' ')} {arrow.get(d, '?')} {b:g})"
                   for name, m, d, b in zip(t["name"], t["metric"], t["direction"], t["bound"], strict=True)],
        "measured": t["value"].to_numpy(),
        "met": ["met" if bool(x) else f"MISSED by {abs(1 - m):.0%}" for x, m in zip(t["met"], t["margin"],
                                                                                   strict=True)],
        "shape": t["shape"].to_numpy(),
        "load (1 min)": t["loadavg_1m"].to_numpy(),
        "why (measured in this run)": t["why"].fillna("").to_numpy() if "why" in t.columns else "",
    }).reset_index(drop=True)


def failed_table(run: RunData) -> pd.DataFrame:
    """Cells that did not finish, with their status and the first line of the reason."""
    cells = run.cell_frame()
    bad = cells[cells["status"] != "ok"] if not cells.empty else cells
    if bad.empty:
        return _empty("every cell finished")
    bad = bad.sort_values(["status", "label"])
    reasons = [_short(r) for r in bad["reason"]]
    return pd.DataFrame({"cell": bad["label"], "cell id": bad["cell_id"], "status": bad["status"],
                         "reason": reasons}).reset_index(drop=True)


def _short(reason: object) -> str:
    text = " ".join(str(reason or "").split())
    return text if len(text) <= REASON_CHARS else text[: REASON_CHARS - 1] + "…"


@dataclass(frozen=True)
class TableSpec:
    title: str
    make: Callable[[RunData], pd.DataFrame]
    note: str = ""  # one line under the title: what the table compares


TABLES: tuple[TableSpec, ...] = (
    TableSpec("Summary per family and size", summary_table,
              "bpb at the training mean loops (best learning rate when swept); speeds are the best cell."),
    TableSpec("Iso-parameter: looped vs the dense model closest in unique parameters", iso_param_table,
              "Ratios are looped / dense; the match ratio says how close the pairing is."),
    TableSpec("Iso-FLOP: looped vs the dense model closest in training FLOPs per token", iso_flop_table,
              "Training FLOPs/token are analytic, at the training mean loops and backward loops."),
    TableSpec("Iso-memory: looped vs the dense model closest in weights + KV cache", iso_memory_table,
              "Inference memory = weights + per-loop KV cache of one sequence at the stated context."),
    TableSpec("Quality over training seeds, per recipe group", seed_table,
              "Models are compared only within one recipe group; a gap is a difference when it exceeds the "
              "95% interval over training seeds."),
    TableSpec("Quality (held-out bits per byte), every eval cell", quality_table),
    TableSpec("Test-time loop fits", loop_fit_table,
              "L(T) = L_inf + Z exp(-zT) fitted to bpb; overthinking = bpb rising beyond the training loops."),
    TableSpec("Throughput and latency per device", throughput_table),
    TableSpec("Energy per token", energy_table),
    TableSpec("Stability: converged or diverged per learning rate", stability_table,
              "diverged: non-finite loss; degraded: finite but the final loss > 1.2x the same model's best lr; "
              "state norm growth: last-loop state norm at the end of training / at the start."),
    TableSpec("Numba vs torch", numba_table),
    TableSpec("Numba performance targets", numba_targets_table,
              "Ratios measured side by side in one process; a missed target carries its measured breakdown."),
    TableSpec("Validity flags", validity_table,
              "A flagged row is shown but not trusted, and the regression gate refuses to judge on it."),
    TableSpec("Cells that did not finish", failed_table),
)

