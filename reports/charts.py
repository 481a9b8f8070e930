"""Seaborn charts of a run. Each chart function returns a Chart, or an Omitted saying why.

A chart's `reading` is one sentence computed from the plotted data, printed under it in the report.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import seaborn as sns  # noqa: E402

from loopscope.reports.frames import RunData, at_training_loops, pareto_front, quality_frame  # noqa: E402


@dataclass
class Chart:
    name: str
    title: str
    figure: plt.Figure
    reading: str


@dataclass
class Omitted:
    name: str
    title: str
    why: str


def _fig(width: float = 6.4, height: float = 4.2) -> tuple[plt.Figure, plt.Axes]:
    sns.set_theme(style="whitegrid", context="notebook")
    fig, ax = plt.subplots(figsize=(width, height), dpi=110)
    return fig, ax


def bpb_vs_params(run: RunData) -> Chart | Omitted:
    title = "Bits per byte vs unique parameters"
    df = at_training_loops(quality_frame(run))
    if df.empty:
        return Omitted("bpb_vs_params", title, "no eval cell finished (the profile has no eval workload)")
    fig, ax = _fig()
    sns.scatterplot(data=df, x="params_unique", y="value", hue="family", style="family", s=90, ax=ax)
    for _, r in df.iterrows():
        ax.annotate(r["model"], (r["params_unique"], r["value"]), fontsize=7, xytext=(4, 3),
                    textcoords="offset points")
    front = pareto_front(df["params_unique"].to_numpy(float), df["value"].to_numpy(float))
    if len(front) > 1:
        pts = df.iloc[front]
        ax.plot(pts["params_unique"], pts["value"], "--", color="grey", lw=1, label="Pareto frontier")
    if df["params_unique"].max() > 10 * df["params_unique"].min():
        ax.set_xscale("log")
    ax.set_xlabel("unique parameters (shared weights counted once)")
    ax.set_ylabel("bits per byte (held-out, lower is better)")
    ax.legend(fontsize=8)
    best = df.loc[df["value"].idxmin()]
    reading = (f"Lowest bits per byte: {best['model']} ({best['family']}) at {best['value']:.3f} bpb "
               f"with {best['params_unique'] / 1e6:.2f}M unique parameters; points on the dashed line are "
               "not beaten by any smaller model.")
    return Chart("bpb_vs_params", title, fig, reading)


def bpb_vs_loops(run: RunData) -> Chart | Omitted:
    title = "Bits per byte vs test-time loops"
    df = quality_frame(run)
    df = df[df["loops_test"].notna()] if not df.empty else df
    if df.empty or df["loops_test"].nunique() < 2:
        return Omitted("bpb_vs_loops", title, "fewer than two test-time loop counts were evaluated")
    fig, ax = _fig()
    sns.lineplot(data=df, x="loops_test", y="value", hue="model", marker="o", ax=ax)
    for _, g in df.groupby("model"):
        if g["bpb_std"].notna().any():
            ax.errorbar(g["loops_test"], g["value"], yerr=g["bpb_std"], fmt="none", ecolor="grey",
                        capsize=2, lw=0.8)
        ax.axvline(g["loops_train"].iloc[0], color="grey", ls=":", lw=0.8)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("loops at test time T (dotted: training mean loops)")
    ax.set_ylabel("bits per byte")
    parts = []
    for model, g in df.sort_values("loops_test").groupby("model"):
        lo, hi = g.iloc[0], g.iloc[-1]
        parts.append(f"{model} goes from {lo['value']:.3f} at T={int(lo['loops_test'])} "
                     f"to {hi['value']:.3f} at T={int(hi['loops_test'])}")
    return Chart("bpb_vs_loops", title, fig, "; ".join(parts) + ".")


def train_loss_curves(run: RunData) -> Chart | Omitted:
    title = "Training loss"
    s = run.samples[run.samples["metric"] == "train_loss"]
    if s.empty:
        return Omitted("train_loss", title, "no train cell recorded a loss curve")
    labels = {cid: run.cells[cid]["cell"]["model"] + (
        f" lr={run.cells[cid]['cell']['lr']:g}" if _many_lrs(run) else "") for cid in s["cell_id"].unique()
        if cid in run.cells}
    s = s.assign(cell=s["cell_id"].map(labels))
    # Smooth with a rolling median so spikes show but noise does not hide the trend.
    s = s.sort_values(["cell", "index"])
    s["smoothed"] = s.groupby("cell")["value"].transform(lambda v: v.rolling(9, min_periods=1, center=True).median())
    fig, ax = _fig()
    sns.lineplot(data=s, x="index", y="smoothed", hue="cell", ax=ax, lw=1.2)
    ax.set_xlabel("step")
    ax.set_ylabel("train loss (nats/token, rolling median of 9)")
    final = s.groupby("cell")["value"].apply(lambda v: float(np.mean(v.to_numpy()[-max(len(v) // 10, 1):])))
    reading = "Final train loss (mean of the last 10% of steps): " + ", ".join(
        f"{k} {v:.3f}" for k, v in final.sort_values().items()) + "."
    return Chart("train_loss", title, fig, reading)


def _many_lrs(run: RunData) -> bool:
    lrs = {r["cell"].get("lr") for r in run.cells.values() if r["cell"]["workload"] == "train"}
    return len(lrs) > 1


def throughput_vs_depth(run: RunData) -> Chart | Omitted:
    title = "Prefill throughput vs effective depth"
    df = run.metric("tokens_per_s", stat="median")
    df = df[df["workload"] == "prefill"] if not df.empty else df
    if df.empty:
        return Omitted("throughput_vs_depth", title, "no prefill cell finished")
    df = df.assign(series=df["family"] + " / " + df["backend"])
    fig, ax = _fig()
    sns.scatterplot(data=df, x="effective_depth", y="value", hue="series", style="device", s=80, ax=ax)
    ax.errorbar(df["effective_depth"], df["value"],
                yerr=[df["value"] - df["ci_low"], df["ci_high"] - df["value"]], fmt="none", ecolor="grey", lw=0.8)
    ax.set_xlabel("effective depth P + T·R + C (layers run per token)")
    ax.set_ylabel("prefill tokens/s (median, 95% CI)")
    fastest = df.loc[df["value"].idxmax()]
    reading = (f"Throughput falls with effective depth: looped models pay for every loop. Fastest cell: "
               f"{fastest['model']} ({fastest['backend']}, depth {int(fastest['effective_depth'])}) "
               f"at {fastest['value']:,.0f} tokens/s.")
    return Chart("throughput_vs_depth", title, fig, reading)


CHARTS: tuple[Callable[[RunData], Chart | Omitted], ...] = (
    bpb_vs_params, bpb_vs_loops, train_loss_curves, throughput_vs_depth,
)
