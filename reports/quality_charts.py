"""Two quality charts: reasoning-probe accuracy against depth, and stability diagnostics over training."""

from __future__ import annotations

import matplotlib.pyplot as plt
import pandas as pd

from loopscope.reports.charts import WIDE, Chart, Omitted, _legend_below, _model_colors, _series_label, _styled
from loopscope.reports.frames import RunData


@_styled
def probe_accuracy(run: RunData) -> Chart | Omitted:
    """k-hop probe accuracy against effective depth: loops for looped models, layers for dense ones."""
    title = "Reasoning probe: accuracy vs effective depth"
    df = run.metric("probe_accuracy", stat="")
    if df.empty:
        return Omitted("probe_accuracy", title, "no eval cell ran on a probe corpus (see profiles/probe.toml)")
    df = df.sort_values(["model", "effective_depth"])
    fig, ax = plt.subplots(figsize=(6.6, 4.3), dpi=110)
    for (model, family), g in df.groupby(["model", "family"], sort=False):
        style = "o--" if family == "gpt" else "o-"
        ax.plot(g["effective_depth"], g["value"], style, label=f"{model} ({family})")
    res = run.results
    base = res[(res["metric"] == "probe_baseline") & (res["status"] == "ok")]
    levels = {}
    for name, style in (("echo start", "--"), ("chance", ":")):
        values = base.loc[base["stat"] == name, "value"]
        if not values.empty:
            levels[name] = float(values.median())
            ax.axhline(levels[name], color="grey", ls=style, lw=1, label=f"baseline: {name}")
    ax.set_xlabel("effective depth (layers run per token: P + T*R + C, or dense layers)")
    ax.set_ylabel("answer accuracy (held-out k-hop examples)")
    ax.set_ylim(0, 1.02)
    ax.legend(fontsize=7)
    best = df.loc[df["value"].idxmax()]
    reading = (f"Best: {best['model']} at depth {int(best['effective_depth'])} with {best['value']:.1%}; "
               + "; ".join(f"{m} {g['value'].min():.1%} to {g['value'].max():.1%}"
                           for m, g in df.groupby("model")) + ".")
    if levels:
        reading += (" Without chasing any pointer a model scores "
                    + " and ".join(f"{v:.1%} ({k})" for k, v in levels.items())
                    + (": no model here is above that." if best["value"] <= max(levels.values()) + 0.02 else "."))
    return Chart("probe_accuracy", title, fig, reading)


@_styled
def stability_over_training(run: RunData) -> Chart | Omitted:
    """rho(A_bar) (parcae), the adapter's spectral norm (rdm) and the last loop's state norm, per step.

    One colour per model (the report's palette), one line style per learning rate; training seeds of one
    model and lr share both. Axes go logarithmic when the values span decades, so a diverging run does not
    flatten every other line onto zero."""
    title = "Stability diagnostics over training"
    keys = ("spectral_radius", "adapter_spectral_norm", "state_norm_last_loop")
    s = run.samples[run.samples["metric"].isin(keys)]
    if s.empty:
        return Omitted("stability_over_training", title, "no looped model was trained in this run")
    cells = run.cell_frame().set_index("cell_id")
    res = run.results.drop_duplicates("cell_id").set_index("cell_id")
    info = cells if not cells.empty else res
    names = info["model"].where(info["model"].astype(str) != "", info.get("label", info.index.to_series()))
    s = s.assign(model=s["cell_id"].map(names).fillna(s["cell_id"]),
                 lr=pd.to_numeric(s["cell_id"].map(info["lr"]), errors="coerce"))
    colors = _model_colors(run)
    lrs = sorted(s["lr"].dropna().unique())
    styles = dict(zip(lrs, ["-", "--", ":", "-."] * 4, strict=False))
    many_lrs = len(lrs) > 1
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4.2), dpi=110)
    for ax, metrics in ((left, ("spectral_radius", "adapter_spectral_norm")), (right, ("state_norm_last_loop",))):
        part = s[s["metric"].isin(metrics)]
        for (model, lr, _cid, metric), g in part.groupby(["model", "lr", "cell_id", "metric"], dropna=False,
                                                        sort=True):
            g = g.sort_values("index")
            label = _series_label(str(model), lr, many_lrs)
            if ax is left:
                label += " (rho)" if metric == "spectral_radius" else " (||W_h||, adapter)"
            ax.plot(g["index"], g["value"], color=colors.get(model, "grey"), ls=styles.get(lr, "-"), lw=1.2,
                    alpha=0.85, label=label)
        ax.set_xlabel("training step")
        values = part["value"][part["value"] > 0]
        if not values.empty and values.max() > WIDE * values.min():
            ax.set_yscale("log")
    left.axhline(1.0, color="red", ls="--", lw=0.8)
    left.set_ylabel("linear state gain (red: 1, growth above)")
    right.set_ylabel("state norm after the last loop" + (" (log)" if right.get_yscale() == "log" else ""))
    _legend_below(fig, [left, right], ncol=3)
    parts = []
    for (model, lr, metric), g in s.groupby(["model", "lr", "metric"], dropna=False, sort=True):
        first = g[g["index"] == g["index"].min()]["value"].mean()
        last = g[g["index"] == g["index"].max()]["value"].mean()
        n = g["cell_id"].nunique()
        parts.append(f"{_series_label(str(model), lr, many_lrs)} {metric} {first:.3g} -> {last:.3g}"
                     + (f" (mean of {n} seeds)" if n > 1 else ""))
    return Chart("stability_over_training", title, fig, "Over training: " + "; ".join(parts) + ".")


QUALITY_CHARTS = (probe_accuracy, stability_over_training)
