"""The report's "Where the time goes" section: charts of the profiled passes (`loopscope run --trace`).

Each chart is `RunData -> Chart | Omitted`, as in charts.py. The rows they read are written by
bench/profiling.py (region_time_ms, loop_time_ms, ...) and bench/roofline.py (arithmetic_intensity, ...).
The section is only added to runs that were traced (`traced(run)`).
"""

from __future__ import annotations

import math

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import seaborn as sns

from loopscope.reports.charts import Chart, ChartFn, Omitted, _label_points, _legend_below, _styled, human_bytes, si
from loopscope.reports.frames import RunData

SECTION = "Where the time goes"
# Top-level regions, in forward order; a gpt's "blocks" takes the place of prelude + loops + coda.
SEGMENTS: tuple[str, ...] = ("embed", "blocks", "prelude", "injection", "loops", "readout", "coda", "head",
                             "unlabelled")
PROFILE_METRICS: tuple[str, ...] = ("region_time_ms", "loop_time_ms", "arithmetic_intensity",
                                    "kv_cache_bytes_vs_loops", "train_activation_bytes")


def traced(run: RunData) -> bool:
    """Whether the run has any profiling rows (the section is left out of untraced runs)."""
    return bool(run.results["metric"].isin(PROFILE_METRICS).any())


def profile_frame(run: RunData, metric: str) -> pd.DataFrame:
    """Rows of one profiling metric from finished cells, with each cell's label."""
    df = run.results[(run.results["metric"] == metric) & (run.results["status"] == "ok")].copy()
    cells = run.cell_frame().set_index("cell_id")
    labels = df["cell_id"].map(cells["label"]) if not cells.empty else pd.Series(np.nan, index=df.index)
    df["label"] = labels.fillna(df["cell_id"]).astype(str)
    return df


def segment_frame(run: RunData) -> pd.DataFrame:
    """ms per call of each top-level segment (loop[i] summed into "loops"), one row per cell x segment."""
    df = profile_frame(run, "region_time_ms")
    df = df[~df["stat"].str.contains("/", regex=False)]
    if df.empty:
        return df
    df = df.assign(segment=df["stat"].where(~df["stat"].str.match(r"^loop\[\d+\]$"), "loops"))
    return (df.groupby(["cell_id", "label", "model", "family", "workload", "backend", "segment"], dropna=False)
              ["value"].sum().reset_index())


def _segment_colors() -> dict[str, tuple]:
    palette = sns.color_palette("tab10", 10)
    colors = dict(zip(SEGMENTS[:-1], palette, strict=False))
    colors["unlabelled"] = (0.8, 0.8, 0.8)
    return colors


@_styled
def time_breakdown(run: RunData) -> Chart | Omitted:
    name, title = "time_breakdown", f"{SECTION}: time per region"
    seg = segment_frame(run)
    if seg.empty:
        return Omitted(name, title, "no cell recorded region times (run with --trace; prefill and decode cells)")
    table = seg.pivot_table(index="label", columns="segment", values="value", aggfunc="sum").fillna(0.0)
    table = table[[s for s in SEGMENTS if s in table.columns]]
    totals = table.sum(axis=1)
    table, totals = table.loc[totals.sort_values().index], totals.sort_values()
    colors = _segment_colors()
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(10.5, 0.42 * len(table) + 1.8), dpi=110, sharey=True)
    y = np.arange(len(table))
    left_ms, left_pct = np.zeros(len(table)), np.zeros(len(table))
    shares = table.div(totals.replace(0, np.nan), axis=0).fillna(0.0)
    for segment in table.columns:
        ax.barh(y, table[segment], left=left_ms, color=colors[segment], label=segment, height=0.65)
        bx.barh(y, shares[segment] * 100, left=left_pct, color=colors[segment], height=0.65)
        left_ms += table[segment].to_numpy()
        left_pct += shares[segment].to_numpy() * 100
    for yi, total in zip(y, totals, strict=True):
        ax.text(total, yi, f" {total:.3g} ms", va="center", fontsize=6.5)
    ax.set_yticks(y, table.index, fontsize=6.5)
    ax.set_xlim(0, float(totals.max()) * 1.22)
    ax.set_xlabel("ms per call (regions-only profiled pass; decode: per step)")
    bx.set_xlim(0, 100)
    bx.set_xlabel("share of the call (%)")
    _legend_below(fig, [ax], ncol=min(len(table.columns), 9))
    return Chart(name, title, fig, _breakdown_reading(shares, totals))


def _breakdown_reading(shares: pd.DataFrame, totals: pd.Series) -> str:
    parts = []
    for label in shares.index[::-1][:6]:  # the slowest cells first
        row = shares.loc[label]
        top = row.sort_values(ascending=False)
        main = ", ".join(f"{seg} {share * 100:.0f}%" for seg, share in top.items() if share >= 0.05)
        parts.append(f"{label}: {main} of {totals[label]:.3g} ms")
    text = "; ".join(parts)
    if len(shares) > 6:
        text += f"; and {len(shares) - 6} faster cell(s)"
    if "loops" in shares:
        looped = shares["loops"][shares["loops"] > 0]
        if not looped.empty:
            text += (f". The loops take {looped.min() * 100:.0f}% ({looped.idxmin()}) to {looped.max() * 100:.0f}% "
                     f"({looped.idxmax()}) of a looped model's call")
    return text + "."


@_styled
def loop_time_curve(run: RunData) -> Chart | Omitted:
    name, title = "loop_time_curve", f"{SECTION}: time of each loop"
    df = profile_frame(run, "loop_time_ms")
    if df.empty:
        return Omitted(name, title, "no looped cell recorded per-loop times (run with --trace)")
    df = df.assign(loop=df["stat"].str.removeprefix("loop").astype(int))
    fig, ax = plt.subplots(figsize=(7.4, 4.2), dpi=110)
    labels = sorted(df["label"].unique())
    palette = dict(zip(labels, sns.color_palette("colorblind", len(labels)), strict=True))
    parts = []
    for label in labels:
        g = df[df["label"] == label].sort_values("loop")
        ax.plot(g["loop"], g["value"], marker="o", ms=4, lw=1.2, color=palette[label], label=label)
        if len(g) >= 2:
            first, rest = float(g["value"].iloc[0]), g["value"].iloc[1:]
            parts.append(f"{label}: loop 1 {first:.3g} ms, later loops {rest.min():.3g}-{rest.max():.3g} ms "
                         f"(first/median later {first / float(rest.median()):.2f}x)")
        else:
            parts.append(f"{label}: one loop, {float(g['value'].iloc[0]):.3g} ms")
    ax.set_xlabel("loop (1 = first)")
    ax.set_ylabel("ms per loop (mean over profiled calls)")
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.set_ylim(bottom=0)
    _legend_below(fig, [ax], ncol=2)
    return Chart(name, title, fig, "; ".join(parts) + ".")


def roofline_frame(run: RunData) -> pd.DataFrame:
    """Per cell: arithmetic intensity, achieved FLOP/s, the bound class, the fraction of the roof, dtype."""
    ai = profile_frame(run, "arithmetic_intensity")
    if ai.empty:
        return ai
    res = run.results[run.results["status"] == "ok"]
    achieved = res[res["metric"] == "achieved_flops"].drop_duplicates("cell_id").set_index("cell_id")["value"]
    bound = res[res["metric"] == "roofline_bound"].drop_duplicates("cell_id").set_index("cell_id")["value"]
    frac = res[res["metric"] == "roofline_fraction"].drop_duplicates("cell_id").set_index("cell_id")["value"]
    out = ai.drop_duplicates("cell_id").rename(columns={"value": "intensity"})
    out["achieved"] = out["cell_id"].map(achieved)
    out["bound"] = out["cell_id"].map(bound)
    out["fraction"] = out["cell_id"].map(frac)
    return out[np.isfinite(out["intensity"]) & np.isfinite(out["achieved"])]


@_styled
def roofline(run: RunData) -> Chart | Omitted:
    name, title = "roofline", f"{SECTION}: roofline"
    df = roofline_frame(run)
    if df.empty:
        return Omitted(name, title, "no cell recorded an arithmetic intensity and an achieved FLOP/s "
                                    "(run with --trace)")
    bw = float(run.manifest.get("calibration", {}).get("mem_bw_bytes_per_s", math.nan))
    dtypes = sorted(df["dtype"].fillna("float32").unique())
    fig, ax = plt.subplots(figsize=(7.4, 4.6), dpi=110)
    lo = min(float(df["intensity"].min()) / 4, 0.1)
    hi = max(float(df["intensity"].max()) * 4, 100.0)
    grid = np.geomspace(lo, hi, 200)
    roofs = []
    for dtype, style in zip(dtypes, ["-", "--", ":"], strict=False):
        peak = run.calibrated_peak(dtype)
        if math.isfinite(peak) and math.isfinite(bw) and peak > 0 and bw > 0:
            ax.plot(grid, np.minimum(peak, grid * bw), color="black", ls=style, lw=1.3,
                    label=f"roof {dtype}: {si(peak, 'FLOP/s')}, {bw / 1e9:.3g} GB/s")
            ax.axvline(peak / bw, color="grey", ls=style, lw=0.7)
            roofs.append(f"{dtype} ridge at {peak / bw:.3g} FLOP/byte")
    workloads = sorted(df["workload"].unique())
    markers = dict(zip(workloads, "oDs^v", strict=False))
    palette = dict(zip(sorted(df["model"].unique()), sns.color_palette("colorblind", df["model"].nunique()),
                       strict=True))
    for _, r in df.iterrows():
        ax.scatter(r["intensity"], r["achieved"], marker=markers[r["workload"]], color=palette[r["model"]], s=45,
                   zorder=3, edgecolor="white", linewidth=0.5)
    for w in workloads:
        ax.scatter([], [], marker=markers[w], color="grey", label=w)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlim(lo, hi)
    ax.set_xlabel("arithmetic intensity (analytic FLOPs / compulsory bytes, FLOP/byte)")
    ax.set_ylabel("achieved FLOP/s (analytic FLOPs / median time)")
    _label_points(ax, df["intensity"], df["achieved"], [f"{m} {b}" for m, b in zip(df["model"], df["backend"],
                                                                                   strict=True)], fontsize=6)
    ax.legend(fontsize=7, loc="lower right", framealpha=0.9)
    fig.tight_layout()
    return Chart(name, title, fig, _roofline_reading(df, roofs))


def _roofline_reading(df: pd.DataFrame, roofs: list[str]) -> str:
    if not roofs:
        return (f"{len(df)} cell(s) placed by intensity and achieved FLOP/s; no roof drawn: the run has no "
                "calibration (GEMM FLOP/s and memory bandwidth).")
    memory = df[df["bound"] == 0]
    compute = df[df["bound"] == 1]
    text = f"{'; '.join(roofs)}: {len(compute)} cell(s) compute-bound, {len(memory)} memory-bound"
    for kind, part in (("compute", compute), ("memory", memory)):
        if not part.empty and part["fraction"].notna().any():
            best = part.loc[part["fraction"].idxmax()]
            text += (f"; best {kind}-bound cell {best['label']} at {best['fraction'] * 100:.3g}% of its roof "
                     f"(intensity {best['intensity']:.3g})")
    return text + "."


@_styled
def per_loop_memory(run: RunData) -> Chart | Omitted:
    name, title = "per_loop_memory", f"{SECTION}: memory per loop (KV cache in decode, activations in training)"
    kv = profile_frame(run, "kv_cache_bytes_vs_loops")
    act = profile_frame(run, "train_activation_bytes")
    act = act[act["stat"].str.startswith("T=")]
    if kv.empty and act.empty:
        return Omitted(name, title, "no KV-cache-vs-loops (decode) or activation-vs-loops (train) rows "
                                    "(run with --trace)")
    panels = [p for p, d in (("kv", kv), ("act", act)) if not d.empty]
    fig, axes = plt.subplots(1, len(panels), figsize=(5.4 * len(panels) + 0.6, 4.2), dpi=110, squeeze=False)
    readings = []
    for ax, panel in zip(axes[0], panels, strict=True):
        readings.append(_kv_panel(ax, kv) if panel == "kv" else _activation_panel(ax, act, run))
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.set_ylim(bottom=0)
    _legend_below(fig, axes[0], ncol=2)
    return Chart(name, title, fig, "; ".join(readings) + ".")


def _kv_panel(ax: plt.Axes, kv: pd.DataFrame) -> str:
    parts = kv["stat"].str.extract(r"^(?P<policy>\S+) T=(?P<loops>\d+)$")
    kv = kv.assign(policy=parts["policy"], loops=parts["loops"].astype(float))
    kv = kv.drop_duplicates(["model", "policy", "loops"])
    texts = []
    for (model, policy), g in kv.groupby(["model", "policy"]):
        g = g.sort_values("loops")
        ax.plot(g["loops"], g["value"], marker="o", ms=4, ls="-" if policy == "per-loop" else "--",
                label=f"{model} KV {policy}")
        texts.append(f"{model} {policy}: {human_bytes(g['value'].iloc[0])} at T={int(g['loops'].iloc[0])} to "
                     f"{human_bytes(g['value'].iloc[-1])} at T={int(g['loops'].iloc[-1])}")
    ax.set_xlabel("loops T")
    ax.set_ylabel("KV-cache bytes after the prompt")
    ax.yaxis.set_major_formatter(plt.FuncFormatter(lambda v, _p: human_bytes(v)))
    ax.set_title("KV cache vs loops, per policy", fontsize=9)
    return "KV cache: " + ", ".join(texts)


def _activation_panel(ax: plt.Axes, act: pd.DataFrame, run: RunData) -> str:
    act = act.assign(estimate=act["stat"].str.endswith("estimate"),
                     loops=act["stat"].str.extract(r"^T=(\d+)")[0].astype(float))
    texts = []
    for model, g in act.groupby("model"):
        measured = g[~g["estimate"]].sort_values("loops")
        estimate = g[g["estimate"]].sort_values("loops")
        line, = ax.plot(measured["loops"], measured["value"], marker="o", ms=4, label=f"{model} measured")
        ax.plot(estimate["loops"], estimate["value"], ls=":", color=line.get_color(), label=f"{model} estimate")
        cfg = run.model_config(measured["cell_id"].iloc[0])
        if cfg is not None and cfg.mu_bwd and cfg.family != "ut":
            ax.axvline(cfg.mu_bwd, color=line.get_color(), lw=0.7, ls="--")
        ratio = (measured.set_index("loops")["value"] / estimate.set_index("loops")["value"]).dropna()
        worst = ratio.sub(1).abs().idxmax() if not ratio.empty else math.nan
        text = (f"{model} activations {human_bytes(measured['value'].iloc[0])} at T=1 to "
                f"{human_bytes(measured['value'].iloc[-1])} at T={int(measured['loops'].iloc[-1])}")
        if not ratio.empty:
            text += f" (measured/estimate {ratio.min():.2f}-{ratio.max():.2f}, furthest at T={int(worst)})"
        texts.append(text)
    ax.set_xlabel("loops T (dashed: mu_bwd, the loops with gradient)")
    ax.set_ylabel("bytes saved for backward")
    ax.yaxis.set_major_formatter(plt.FuncFormatter(lambda v, _p: human_bytes(v)))
    ax.set_title("training activations vs loops", fontsize=9)
    return "; ".join(texts)


PROFILE_CHARTS: tuple[ChartFn, ...] = (time_breakdown, loop_time_curve, roofline, per_loop_memory)
