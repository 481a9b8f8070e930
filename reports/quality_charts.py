"""Two quality charts: reasoning-probe accuracy against depth, and stability diagnostics over training."""

from __future__ import annotations

import matplotlib.pyplot as plt

from loopscope.reports.charts import Chart, Omitted, _styled
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
    """rho(A_bar) (parcae), the adapter's spectral norm (rdm) and the last loop's state norm, per step."""
    title = "Stability diagnostics over training"
    keys = ("spectral_radius", "adapter_spectral_norm", "state_norm_last_loop")
    s = run.samples[run.samples["metric"].isin(keys)]
    if s.empty:
        return Omitted("stability_over_training", title, "no looped model was trained in this run")
    labels = {cid: r.get("label", cid) for cid, r in run.cells.items()}
    s = s.assign(cell=s["cell_id"].map(labels).fillna(s["cell_id"]))
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4), dpi=110)
    gains = s[s["metric"] != "state_norm_last_loop"]
    for (cell, metric), g in gains.groupby(["cell", "metric"]):
        left.plot(g["index"], g["value"], "-", label=f"{cell} ({'rho' if metric == 'spectral_radius' else '||W_h||'})")
    left.axhline(1.0, color="red", ls="--", lw=0.8)
    left.set_xlabel("training step")
    left.set_ylabel("linear state gain (red: 1)")
    if not gains.empty:
        left.legend(fontsize=6)
    norms = s[s["metric"] == "state_norm_last_loop"]
    for cell, g in norms.groupby("cell"):
        right.plot(g["index"], g["value"], "-", label=cell)
    right.set_xlabel("training step")
    right.set_ylabel("state norm after the last loop")
    if not norms.empty:
        right.legend(fontsize=6)
    parts = []
    for (cell, metric), g in s.groupby(["cell", "metric"]):
        g = g.sort_values("index")
        parts.append(f"{cell} {metric} {g['value'].iloc[0]:.3g} -> {g['value'].iloc[-1]:.3g}")
    return Chart("stability_over_training", title, fig, "Over training: " + "; ".join(parts) + ".")


QUALITY_CHARTS = (probe_accuracy, stability_over_training)
