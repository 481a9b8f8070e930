"""Seaborn charts of a run. Each chart function returns a Chart, or an Omitted saying why.

A chart's `reading` is one sentence computed from the plotted data, printed under it in the report.
Colours are fixed per family (and per model, ordered by family) so a model looks the same everywhere.
"""

from __future__ import annotations

import functools
import json
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import seaborn as sns  # noqa: E402
from matplotlib.patches import Rectangle  # noqa: E402
from matplotlib.ticker import FuncFormatter, LogFormatter, LogLocator, NullFormatter, PercentFormatter  # noqa: E402

from loopscope.reports import frames, groups  # noqa: E402
from loopscope.reports.fits import fit_saturation  # noqa: E402
from loopscope.reports.frames import DENSE_FAMILY, FAMILY_ORDER, RunData, family_rank  # noqa: E402

DTYPE_BYTES: dict[str, int] = {"float32": 4, "bfloat16": 2, "float16": 2}
WIDE = 20.0  # a value range wider than this factor gets a log axis


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


ChartFn = Callable[[RunData], "Chart | Omitted"]


def _styled(fn: ChartFn) -> ChartFn:
    """Draw inside seaborn's style and font contexts, so no global theme is changed."""
    @functools.wraps(fn)
    def wrapper(run: RunData) -> Chart | Omitted:
        with sns.axes_style("whitegrid"), sns.plotting_context("notebook", font_scale=0.8):
            chart = fn(run)
        if isinstance(chart, Chart):
            _plain_log_ticks(chart.figure)
        return chart
    return wrapper


def _plain_log_ticks(fig: plt.Figure) -> None:
    """Plain-text labels on log axes that kept matplotlib's own: those are mathtext (`$\\mathdefault{10^{3}}$`),
    which the report draws as literal text because it turns mathtext off for user-given names."""
    for ax in fig.axes:
        for axis in (ax.xaxis, ax.yaxis):
            if axis.get_scale() != "log":
                continue
            if isinstance(axis.get_major_formatter(), LogFormatter):
                axis.set_major_formatter(FuncFormatter(lambda v, _pos: f"{v:g}"))
            if isinstance(axis.get_minor_formatter(), LogFormatter):
                axis.set_minor_formatter(NullFormatter())


# --- small helpers -------------------------------------------------------------------------------


def si(value: float, unit: str = "", digits: int = 3) -> str:
    """1234567 -> '1.23M'; with a unit, 5.9e10 FLOP/s -> '59.5 GFLOP/s'."""
    if not np.isfinite(value):
        return "NaN"
    mantissa, prefix = f"{value:.{digits}g}", ""
    steps = ((1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k"), (1.0, ""), (1e-3, "m"), (1e-6, "µ"))
    if value != 0:
        for factor, p in steps:
            if abs(value) >= factor:
                mantissa, prefix = f"{value / factor:.{digits}g}", p
                break
    return f"{mantissa} {prefix}{unit}" if unit else f"{mantissa}{prefix}"


def human_bytes(value: float) -> str:
    if not np.isfinite(value):
        return "NaN"
    for factor, unit in ((2**40, "TiB"), (2**30, "GiB"), (2**20, "MiB"), (2**10, "KiB")):
        if abs(value) >= factor:
            return f"{value / factor:.3g} {unit}"
    return f"{value:.0f} B"


def bytes_unit(largest: float) -> tuple[float, str]:
    """(divisor, name) of the largest binary unit not bigger than `largest`."""
    for factor, unit in ((2**40, "TiB"), (2**30, "GiB"), (2**20, "MiB"), (2**10, "KiB")):
        if largest >= factor:
            return float(factor), unit
    return 1.0, "bytes"


def _legend_below(fig: plt.Figure, axes: Iterable[plt.Axes], ncol: int = 3) -> None:
    """One legend for all panels, under them, so no legend covers data; duplicate labels merged."""
    handles: dict[str, object] = {}
    for ax in axes:
        for h, label in zip(*ax.get_legend_handles_labels(), strict=True):
            handles.setdefault(label, h)
    if not handles:
        fig.tight_layout()
        return
    rows = math.ceil(len(handles) / ncol)
    height = fig.get_figheight()
    fig.set_figheight(height + 0.22 * rows)
    fig.legend(list(handles.values()), list(handles), loc="lower center", ncol=ncol, fontsize=7, frameon=False)
    fig.tight_layout(rect=(0, (0.22 * rows + 0.1) / fig.get_figheight(), 1, 1))


def _legend_right(ax: plt.Axes) -> None:
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)


def _family_colors() -> dict[str, tuple]:
    palette = sns.color_palette("colorblind", len(FAMILY_ORDER) + 3)
    return {fam: palette[i] for i, fam in enumerate(FAMILY_ORDER)}


def _family_color(family: str) -> tuple:
    return _family_colors().get(family, (0.4, 0.4, 0.4))


def _model_colors(run: RunData) -> dict[str, tuple]:
    """Models ordered by family then name; models of one family get shades of the family colour."""
    cells = run.cell_frame()
    pairs = sorted({(f, m) for f, m in zip(cells["family"], cells["model"], strict=True)},
                   key=lambda fm: (family_rank(fm[0]), fm[1]))
    colors: dict[str, tuple] = {}
    for family in dict.fromkeys(f for f, _ in pairs):
        models = [m for f, m in pairs if f == family]
        base = _family_color(family)
        # Shades from dark to light around the family colour, far enough apart to tell models apart.
        dark, light = tuple(0.45 * c for c in base), tuple(c + 0.6 * (1 - c) for c in base)
        shades = [base] if len(models) == 1 else sns.blend_palette([dark, base, light], len(models))
        colors.update(zip(models, shades, strict=True))
    return colors


def _log_if_wide(ax: plt.Axes, axis: str, values: Iterable[float], base: float = 10) -> bool:
    v = np.asarray([x for x in values if np.isfinite(x) and x > 0], dtype=float)
    if v.size and v.max() > WIDE * v.min():
        (ax.set_xscale if axis == "x" else ax.set_yscale)("log", base=base)
        if base == 10 and v.max() < 1000 * v.min():  # few decades: label 1-2-5 steps, not only powers of 10
            (ax.xaxis if axis == "x" else ax.yaxis).set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
        return True
    return False


def _si_axis(ax: plt.Axes, axis: str, fmt: Callable[[float], str] = si) -> None:
    formatter = FuncFormatter(lambda v, _pos: fmt(v))
    target = ax.xaxis if axis == "x" else ax.yaxis
    target.set_major_formatter(formatter)
    target.set_minor_formatter(NullFormatter())


def _label_points(ax: plt.Axes, xs: Iterable[float], ys: Iterable[float], labels: Iterable[str],
                  fontsize: float = 7.0) -> None:
    """Name each point, trying four offsets so labels do not overlap each other (greedy)."""
    fig = ax.figure
    fig.canvas.draw()
    placed: list = []
    char_w, line_h = fontsize * 0.62 * fig.dpi / 72, fontsize * 1.3 * fig.dpi / 72
    for x, y, text in zip(xs, ys, labels, strict=True):
        px, py = ax.transData.transform((x, y))
        w = char_w * len(text)
        for dx, dy, ha in ((5, 4, "left"), (5, -11, "left"), (-5, 4, "right"), (-5, -11, "right"), (5, 14, "left")):
            x0 = px + dx if ha == "left" else px + dx - w
            box = (x0, py + dy, x0 + w, py + dy + line_h)
            if not any(box[0] < b[2] and b[0] < box[2] and box[1] < b[3] and b[1] < box[3] for b in placed):
                break
        placed.append(box)
        ax.annotate(text, (x, y), xytext=(dx, dy), textcoords="offset points", fontsize=fontsize, ha=ha,
                    color="#333333")


def _why_no(run: RunData, workloads: tuple[str, ...], what: str) -> str:
    """Why there are no finished cells of these workloads: none in the profile, or all failed."""
    cells = run.cell_frame()
    mine = cells[cells["workload"].isin(workloads)]
    if mine.empty:
        return f"the run has no {' or '.join(workloads)} cells ({what})"
    counts = mine["status"].value_counts()
    statuses = ", ".join(f"{n} {s}" for s, n in counts.items())
    return f"no {' or '.join(workloads)} cell finished with data for it ({statuses}; {what})"


def _series_label(model: str, lr: float, many_lrs: bool) -> str:
    return f"{model} lr={lr:g}" if many_lrs and np.isfinite(lr) else model


def _pct(a: float, b: float) -> str:
    """Signed relative difference of a against b, as text."""
    return f"{(a / b - 1) * 100:+.1f}%"


# --- 1, 2: quality per parameter and per training FLOP, one panel per recipe group -------------


def _quality_groups(run: RunData) -> pd.DataFrame:
    """Per (recipe group, model): bpb mean over training seeds at the training loops, with train FLOPs."""
    scores = groups.model_scores(groups.quality_groups(run))
    if scores.empty:
        return scores
    flops = []
    for ids in scores["cell_ids"]:
        values = np.asarray([frames.training_flops(run, c) for c in ids], dtype=float)
        flops.append(float(values[np.isfinite(values)].mean()) if np.isfinite(values).any() else np.nan)
    main = groups.main_group(scores)
    return scores.assign(train_flops=flops, _main=scores["group_key"] != main).sort_values(
        ["_main", "group_key"], kind="stable").drop(columns="_main").reset_index(drop=True)


def _error(g: pd.DataFrame) -> np.ndarray:
    """Bars: the 95% interval over training seeds; with one seed, the h0 std (evaluation noise only)."""
    return np.where(g["n_seeds"] > 1, g["bpb_ci95"], g["bpb_h0_std"]).astype(float)


def _quality_panels(df: pd.DataFrame, x: str, xlabel: str) -> tuple[plt.Figure, dict[str, np.ndarray]]:
    """One panel per recipe group (models are compared only within one), a Pareto frontier in each."""
    keys = list(dict.fromkeys(df["group_key"]))
    ncols = min(len(keys), 2)
    nrows = math.ceil(len(keys) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(5.4 * ncols + 0.6, 4.0 * nrows + 0.4), dpi=110, squeeze=False)
    fronts = {}
    for ax, key in zip(axes.flat, keys, strict=False):
        g = df[df["group_key"] == key].reset_index(drop=True)
        for family in sorted(g["family"].unique(), key=family_rank):
            f = g[g["family"] == family]
            ax.errorbar(f[x], f["bpb"], yerr=np.nan_to_num(_error(f)), fmt="o" if family == DENSE_FAMILY else "D",
                        ms=7, color=_family_color(family), ecolor="grey", elinewidth=0.9, capsize=3,
                        label=family, zorder=3, markeredgecolor="white")
        front = frames.pareto_front(g[x].to_numpy(float), g["bpb"].to_numpy(float))
        fronts[key] = front
        if len(front) > 1:
            pts = g.iloc[front]
            ax.plot(pts[x], pts["bpb"], drawstyle="steps-post", ls="--", color="grey", lw=1,
                    label="Pareto frontier (within this recipe)", zorder=1)
        narrow = False
        if not _log_if_wide(ax, "x", g[x]):
            span = g[x].max() - g[x].min()
            pad = 0.1 * span if span > 0 else 0.05 * g[x].max()
            ax.set_xlim(g[x].min() - pad, g[x].max() + pad * 3)
            narrow = g[x].max() < 1.2 * g[x].min()  # close values need more digits to tell the ticks apart
        _si_axis(ax, "x", lambda v, d=(4 if narrow else 3): si(v, digits=d))
        ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _p: f"{v:.3f}"))
        seeds = int(g["n_seeds"].max())
        bars = "bars: 95% interval of the mean" if seeds > 1 else "bars: std over h0 draws only"
        ax.set_title(f"recipe: {g['group'].iloc[0]}\n({seeds} training seed{'s' if seeds > 1 else ''} per model; "
                     f"{bars})", fontsize=8)
        ax.set_xlabel(xlabel)
        ax.set_ylabel("bits per byte (held-out; lower is better)")
        _label_points(ax, g[x], g["bpb"], g["model"])
    for ax in list(axes.flat)[len(keys):]:
        ax.set_axis_off()
    _legend_below(fig, list(axes.flat)[: len(keys)])
    return fig, fronts


def _group_reading(df: pd.DataFrame, x: str, fronts: dict[str, np.ndarray], what: str) -> str:
    """Per recipe group: the lowest bpb, the frontier, and each looped model against the dense model
    closest on `x`, called a difference only beyond the seed spread. Never across groups."""
    parts = []
    for key, front in fronts.items():
        g = df[df["group_key"] == key].reset_index(drop=True)
        best = g.loc[g["bpb"].idxmin()]
        text = (f"[{g['group'].iloc[0]}] lowest: {best['model']} {best['bpb']:.3f} bpb; frontier: "
                f"{', '.join(g.iloc[front]['model'])}")
        dense = g[g["family"] == DENSE_FAMILY]
        for _, lm in g[g["family"] != DENSE_FAMILY].iterrows():
            if dense.empty:
                break
            dm = dense.loc[(np.log(dense[x] / lm[x])).abs().idxmin()]
            d = groups.difference(lm["model"], lm["seed_values"], dm["model"], dm["seed_values"])
            text += f"; {lm['model']} vs {dm['model']} at {lm[x] / dm[x]:.2f}x its {what}: {d.text()}"
        parts.append(text)
    if len(fronts) > 1:
        parts.append("groups trained on different recipes are not compared with each other")
    return "; ".join(parts) + "."


@_styled
def bpb_vs_params(run: RunData) -> Chart | Omitted:
    name, title = "bpb_vs_params", "Bits per byte vs unique parameters, per training recipe"
    df = _quality_groups(run)
    if df.empty:
        return Omitted(name, title, _why_no(run, ("eval",), "bits per byte come from eval cells"))
    fig, fronts = _quality_panels(df, "params_unique", "unique parameters (shared weights counted once)")
    return Chart(name, title, fig, _group_reading(df, "params_unique", fronts, "parameters"))


@_styled
def bpb_vs_train_flops(run: RunData) -> Chart | Omitted:
    name, title = "bpb_vs_train_flops", "Bits per byte vs training FLOPs, per training recipe"
    df = _quality_groups(run)
    df = df[np.isfinite(df["train_flops"])] if not df.empty else df
    if df.empty:
        return Omitted(name, title, _why_no(run, ("eval",), "training FLOPs need an eval cell and its finished "
                                                            "train cell's train_tokens"))
    fig, fronts = _quality_panels(df, "train_flops", "training FLOPs (analytic FLOPs/token x tokens trained)")
    return Chart(name, title, fig, _group_reading(df, "train_flops", fronts, "training FLOPs"))


# --- 3: test-time loops with the saturation fit --------------------------------------------------


@_styled
def bpb_vs_loops(run: RunData) -> Chart | Omitted:
    name, title = "bpb_vs_loops", "Bits per byte vs test-time loops"
    q = groups.quality_groups(run)
    per_T = groups.model_scores(q, at_training_loops=False) if not q.empty else pd.DataFrame()
    looped = per_T[per_T["loops_test"].notna()] if not per_T.empty else per_T
    if not looped.empty:  # only models evaluated at two or more loop counts
        looped = looped[looped.groupby(["group_key", "model"])["loops_test"].transform("nunique") >= 2]
    if looped.empty:
        evaluated = per_T[per_T["loops_test"].notna()] if not per_T.empty else per_T
        why = (_why_no(run, ("eval",), "bits per byte") if q.empty else
               "no looped model was evaluated" if evaluated.empty else
               f"only one test-time loop count (T={int(evaluated['loops_test'].iloc[0])}) was evaluated"
               if evaluated["loops_test"].nunique() == 1 else
               "no looped model was evaluated at two or more test-time loop counts")
        return Omitted(name, title, why)
    colors = _model_colors(run)
    keys = list(dict.fromkeys(looped["group_key"]))
    fig, axes = plt.subplots(1, len(keys), figsize=(6.2 * len(keys) + 2.0, 4.3), dpi=110, squeeze=False)
    parts = []
    for ax, key in zip(axes[0], keys, strict=True):
        lg = looped[looped["group_key"] == key]
        for model, g in lg.sort_values("loops_test").groupby("model", sort=True):
            color = colors.get(model, "C0")
            T, L = g["loops_test"].to_numpy(float), g["bpb"].to_numpy(float)
            err = np.nan_to_num(_error(g))
            seeds = int(g["n_seeds"].max())
            ax.errorbar(T, L, yerr=err, fmt="o", color=color, ms=5, capsize=2, lw=0.8,
                        label=f"{model} ({seeds} seed{'s' if seeds > 1 else ''})", zorder=3)
            train_T = float(g["loops_train"].iloc[0])
            ax.axvline(train_T, color=color, ls=":", lw=1)
            text = f"{model} {L[0]:.3f} at T={T[0]:g} to {L[-1]:.3f} at T={T[-1]:g}"
            if np.unique(T).size >= 3:
                try:
                    fit = fit_saturation(T, L)
                except ValueError as err_:
                    text += f" (no saturation fit: {err_})"
                else:
                    grid = np.geomspace(T.min(), T.max(), 100)
                    ax.plot(grid, fit.predict(grid), color=color, lw=1.2, alpha=0.8)
                    text += f", fit L_inf={fit.L_inf:.3f}"
            else:
                ax.plot(T, L, color=color, lw=1, alpha=0.6)
            # Beyond the training loops: a rise is "overthinking" only when it exceeds the seed spread.
            at = g.iloc[int(np.abs(T - train_T).argmin())]
            worst = g[g["loops_test"] > at["loops_test"]]
            if not worst.empty:
                w = worst.loc[worst["bpb"].idxmax()]
                d = groups.difference("beyond", w["seed_values"], "at", at["seed_values"])
                if d.real and d.rel > 0:
                    text += (f", overthinking: {at['bpb']:.3f} at T={at['loops_test']:g} rises to {w['bpb']:.3f} at "
                             f"T={w['loops_test']:g} ({d.text()})")
                    ax.annotate("overthinking", (w["loops_test"], w["bpb"]), xytext=(0, 10),
                                textcoords="offset points", ha="center", fontsize=7, color=color)
                elif d.rel > 0:
                    text += f"; beyond T={at['loops_test']:g}: {d.text()}"
            parts.append(text)
        dense = per_T[(per_T["group_key"] == key) & (per_T["family"] == DENSE_FAMILY)]
        for _, r in dense.iterrows():
            ax.axhline(r["bpb"], color=colors.get(r["model"], "grey"), ls="--", lw=1, label=f"{r['model']} (dense)")
        Ts = sorted(lg["loops_test"].unique())
        ax.set_xscale("log", base=2)
        ax.set_xticks(Ts)
        ax.set_xlim(min(Ts) / 1.2, max(Ts) * 1.2)
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _p: f"{v:g}"))
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _p: f"{v:.3f}"))
        ax.set_xlabel("test-time loops T (dotted: training mean loops; line: fit L_inf + Z exp(-zT))")
        ax.set_ylabel("bits per byte (bars: 95% over seeds, or h0 std)")
        ax.set_title(f"recipe: {lg['group'].iloc[0]}", fontsize=8)
        _legend_right(ax)
    fig.tight_layout()
    return Chart(name, title, fig, "; ".join(parts) + ".")


# --- 4: throughput vs effective depth ------------------------------------------------------------


@_styled
def throughput_vs_depth(run: RunData) -> Chart | Omitted:
    name, title = "throughput_vs_depth", "Prefill and decode throughput vs effective depth"
    df = frames.speed_frame(run)
    if df.empty:
        return Omitted(name, title, _why_no(run, ("prefill", "decode"), "tokens/s"))
    colors = _model_colors(run)
    df = df.assign(engine=df["backend"] + " / " + df["device"], kv=df["kv_policy"].fillna(""))
    engines = sorted(df["engine"].unique())
    markers = dict(zip(engines, "osD^vP*X", strict=False))
    styles = dict(zip(engines, ["-", "--", ":", "-."] * 3, strict=False))
    # One panel per setting: a line only joins cells of one model, engine and KV policy at one batch,
    # context and dtype, so its slope is the cost of depth (loops) alone.
    panel_keys = ["workload", "batch", "seq_len", "dtype"]
    panels = [k for k, _ in df.groupby(panel_keys, sort=False)]
    panels.sort(key=lambda k: (k[0] != "prefill", k[1], k[2], str(k[3])))
    ncols = min(3, len(panels))
    nrows = math.ceil(len(panels) / ncols)
    fig, grid = plt.subplots(nrows, ncols, figsize=(4.6 * ncols + 0.6, 3.7 * nrows + 0.6), dpi=110, squeeze=False)
    readings = []
    for ax, key in zip(grid.flat, panels, strict=False):
        workload, batch, seq_len, dtype = key
        w = df[(df["workload"] == workload) & (df["batch"] == batch) & (df["seq_len"] == seq_len)
               & (df["dtype"] == dtype)]
        for (model, engine, kv), g in w.groupby(["model", "engine", "kv"], sort=True):
            g = g.sort_values("effective_depth")
            hollow = kv == "last-loop"
            ax.errorbar(g["effective_depth"], g["value"],
                        yerr=[(g["value"] - g["ci_low"]).clip(lower=0).fillna(0),
                              (g["ci_high"] - g["value"]).clip(lower=0).fillna(0)],
                        color=colors.get(model, "C0"), marker=markers[engine], ls=styles[engine], ms=6, lw=1.3,
                        mfc="white" if hollow else colors.get(model, "C0"), elinewidth=0.7, capsize=2)
        _log_if_wide(ax, "y", pd.concat([w["ci_low"], w["ci_high"], w["value"]]))
        _si_axis(ax, "y")
        depths = w["effective_depth"].dropna()
        ax.set_xlim(max(0, depths.min() - 0.12 * (depths.max() - depths.min() + 4)),
                    depths.max() + 0.12 * (depths.max() - depths.min() + 4))
        ax.set_xlabel("effective depth P + T·R + C (layers per token)")
        ax.set_ylabel(f"{workload} tokens/s (median, 95% CI)")
        ax.set_title(f"{workload} · batch {int(batch)} × {int(seq_len)} tokens · {dtype}", fontsize=8.5)
        ax.xaxis.get_major_locator().set_params(integer=True)
        first = w.sort_values("effective_depth").drop_duplicates(["model"])
        _label_points(ax, first["effective_depth"], first["value"], first["model"], fontsize=6.5)
        readings.append(_throughput_reading(f"{workload} (batch {int(batch)} x {int(seq_len)}, {dtype})", w))
    for ax in list(grid.flat)[len(panels):]:
        ax.set_axis_off()
    from matplotlib.lines import Line2D

    handles = [Line2D([], [], color=c, lw=2, label=m) for m, c in colors.items() if m in set(df["model"])]
    handles += [Line2D([], [], color="black", ls=styles[e], marker=markers[e], label=e) for e in engines]
    if (df["kv"] == "last-loop").any():
        handles += [Line2D([], [], color="black", marker="o", ls="", label="KV cache per loop"),
                    Line2D([], [], color="black", marker="o", mfc="white", ls="", label="KV cache of the last loop")]
    rows = math.ceil(len(handles) / 4)
    fig.set_figheight(fig.get_figheight() + 0.22 * rows)
    fig.legend(handles=handles, loc="lower center", ncol=4, fontsize=7, frameon=False)
    fig.tight_layout(rect=(0, (0.22 * rows + 0.1) / fig.get_figheight(), 1, 1))
    return Chart(name, title, fig, "; ".join(readings) + ".")


def _throughput_reading(workload: str, w: pd.DataFrame) -> str:
    fastest = w.loc[w["value"].idxmax()]
    text = (f"{workload}: fastest {fastest['model']} ({fastest['engine']}, depth {int(fastest['effective_depth'])}) "
            f"at {fastest['value']:,.0f} tokens/s")
    # The steepest fall within one looped series: what each extra loop costs.
    worst = None
    for _, g in w.groupby(["model", "engine", "batch", "seq_len"], dropna=False):
        if g["effective_depth"].nunique() < 2:
            continue
        g = g.sort_values("effective_depth")
        lo, hi = g.iloc[0], g.iloc[-1]
        depth_x, speed_x = hi["effective_depth"] / lo["effective_depth"], hi["value"] / lo["value"]
        if worst is None or speed_x < worst[0]:
            worst = (speed_x, depth_x, lo, hi)
    if worst is not None:
        speed_x, depth_x, lo, hi = worst
        text += (f"; {lo['model']} ({lo['engine']}) keeps {speed_x:.2f}x of its speed going from depth "
                 f"{int(lo['effective_depth'])} to {int(hi['effective_depth'])} ({depth_x:.1f}x the layers)")
    wide = w[(w["ci_high"] - w["ci_low"]) > 0.5 * w["value"]]
    if not wide.empty:
        text += f" ({len(wide)} cell(s) with a 95% CI wider than half the median: noisy timings)"
    return text


# --- 5: memory vs context ------------------------------------------------------------------------


@_styled
def memory_vs_context(run: RunData) -> Chart | Omitted:
    name, title = "memory_vs_context", "Weights and KV cache vs context length"
    df = frames.memory_frame(run)
    if df.empty:
        return Omitted(name, title, _why_no(run, ("decode",), "weights + KV bytes come from decode cells"))
    colors = _model_colors(run)
    batches = sorted(int(b) for b in df["batch"].unique())
    fig, axes = plt.subplots(1, len(batches), figsize=(5.0 * len(batches) + 1.4, 4.2), dpi=110, squeeze=False)
    max_ctx = float(df["seq_len"].max())
    grid = np.linspace(0, max_ctx * 1.5, 64)
    largest = float((df["weights_bytes"] + df["kv_cache_bytes"] * 1.5).max())
    div, unit = bytes_unit(largest)
    styles = {"full (dense)": "-", "per-loop": "-", "last-loop": "--"}
    from loopscope.models import kv_bytes_per_token

    for ax, batch in zip(axes[0], batches, strict=True):
        p = df[df["batch"] == batch]
        # Cells whose weights and KV growth are identical (same sizes, same policy) share one line and one label,
        # so models that overlap exactly are named together instead of hiding each other.
        curves: dict[tuple, dict] = {}
        for key, g in p.groupby(["model", "loops_test", "kv_policy", "dtype"], dropna=False, sort=True):
            model, loops, policy, dtype = key
            weights = float(g["weights_bytes"].iloc[0])
            cfg = run.model_config(g["cell_id"].iloc[0])
            # Bytes per token and sequence: from the model's accounting, else from the measured cache (a KV
            # cache grows linearly with the context).
            per_token = (kv_bytes_per_token(cfg, None if pd.isna(loops) else int(loops),
                                            dtype_bytes=DTYPE_BYTES.get(dtype, 4),
                                            policy="per-loop" if policy == "full (dense)" else policy)
                         if cfg is not None else float(g["kv_cache_bytes"].iloc[0]) / (batch * g["seq_len"].iloc[0]))
            label = f"{model}" + ("" if pd.isna(loops) else f" T={int(loops)}") + (
                "" if policy == "full (dense)" else f" ({policy})")
            ck = (round(weights), round(per_token) if np.isfinite(per_token) else label, policy)
            c = curves.setdefault(ck, {"labels": [], "model": model, "weights": weights, "per_token": per_token,
                                       "policy": policy, "points": []})
            c["labels"].append(label)
            c["points"] += list(zip(g["seq_len"], g["weights_bytes"] + g["kv_cache_bytes"], strict=True))
        for c in curves.values():
            color = colors.get(c["model"], "C0")
            label = " = ".join(c["labels"])
            if np.isfinite(c["per_token"]):
                total = c["weights"] + c["per_token"] * batch * grid
                ax.plot(grid, total / div, color=color, ls=styles.get(c["policy"], "-"), lw=1.4, label=label)
            ax.axhline(c["weights"] / div, color=color, ls=":", lw=0.9)
            xs, ys = zip(*c["points"], strict=True)
            ax.scatter(xs, np.asarray(ys, float) / div, color=color, zorder=3, s=30, edgecolor="black", linewidth=0.5,
                       label=None if np.isfinite(c["per_token"]) else label)
        ax.set_title(f"batch {batch}", fontsize=9)
        ax.set_xlabel("context length (tokens)")
        ax.set_xlim(0, grid[-1])
        ax.set_ylim(bottom=0)
        ax.set_ylabel(f"{unit} (dotted: weights; dots: measured)")
    fig.text(0.5, 0.0, "solid: KV cache per loop (dense: its only cache); dashed: KV cache of the last loop only",
             ha="center", va="top", fontsize=7, color="#444444")
    handles: dict[str, object] = {}
    for ax in axes[0]:
        for h, label in zip(*ax.get_legend_handles_labels(), strict=True):
            handles.setdefault(label, h)
    axes[0][-1].legend(list(handles.values()), list(handles), fontsize=7, loc="upper left",
                       bbox_to_anchor=(1.01, 1.0), frameon=False)
    fig.tight_layout()
    return Chart(name, title, fig, _memory_reading(df))


def _memory_reading(df: pd.DataFrame) -> str:
    """Per batch size (never across): the largest KV cache relative to its weights, and what caching only
    the last loop saves."""
    df = df.assign(kv_share=df["kv_cache_bytes"] / df["weights_bytes"])
    parts = []
    for batch, b in df.groupby("batch", sort=True):
        top = b.loc[b["kv_share"].idxmax()]
        loops = "" if pd.isna(top["loops_test"]) else f" T={int(top['loops_test'])}"
        text = (f"batch {int(batch)}, {int(top['seq_len'])} tokens: the {top['kv_policy']} KV cache of "
                f"{top['model']}{loops} is {human_bytes(top['kv_cache_bytes'])} ({top['kv_share']:.2f}x its "
                f"{human_bytes(top['weights_bytes'])} of weights, {top['kv_source']})")
        both = b.pivot_table(index=["model", "loops_test", "seq_len"], columns="kv_policy", values="kv_cache_bytes")
        if {"per-loop", "last-loop"} <= set(both.columns):
            pair = both.dropna(subset=["per-loop", "last-loop"])
            if not pair.empty:
                (model, loops_, _), r = next(iter(pair.iterrows()))
                text += (f"; caching only the last loop cuts {model} T={int(loops_)} from "
                         f"{human_bytes(r['per-loop'])} to {human_bytes(r['last-loop'])} "
                         f"({r['per-loop'] / r['last-loop']:.1f}x less)")
        parts.append(text)
    return ("; ".join(parts) + ".")[:1].upper() + ("; ".join(parts) + ".")[1:]


# --- 6: energy per token -------------------------------------------------------------------------


@_styled
def energy_per_token(run: RunData) -> Chart | Omitted:
    name, title = "energy_per_token", "Energy per token"
    df, why = frames.energy_frame(run)
    if df.empty:
        reason = ("no cell measured energy: " + "; ".join(why)) if why else \
            _why_no(run, ("prefill", "decode"), "energy is measured in prefill and decode cells")
        return Omitted(name, title, reason)
    df = df.assign(cell=[f"{m}" + ("" if pd.isna(t) else f" T={int(t)}") + ("" if pd.isna(kv) else f" KV {kv}")
                         for m, t, kv in zip(df["model"], df["loops_test"], df["kv_policy"], strict=True)],
                   where=[f"{w} · batch {int(b)} x {int(n)} · {dev} · {be}" for w, b, n, dev, be in
                          zip(df["workload"], df["batch"], df["seq_len"], df["device"], df["backend"], strict=True)])
    df = df.sort_values(["family", "model", "loops_test"], key=lambda s: s.map(family_rank) if s.name == "family"
                        else s)
    fig, ax = plt.subplots(figsize=(max(5.0, 0.8 * df["cell"].nunique() + 3), 4.4), dpi=110)
    sns.barplot(data=df, x="cell", y="value", hue="where", ax=ax, errorbar=None)
    if len(df) <= 8:  # more labels than that collide
        for container in ax.containers:
            ax.bar_label(container, labels=[si(v.get_height(), "J") for v in container], fontsize=6.5, padding=2)
    _log_if_wide(ax, "y", df["value"])
    _si_axis(ax, "y", lambda v: si(v, "J"))
    ax.set_xlabel("")
    ax.set_ylabel("energy per token (device counter over the window)")
    plt.setp(ax.get_xticklabels(), rotation=25, ha="right", rotation_mode="anchor")
    _legend_right(ax)
    low = df.loc[df["value"].idxmin()]
    high = df.loc[df["value"].idxmax()]
    reading = (f"Lowest: {low['cell']} ({low['where']}) at {si(low['value'], 'J')}/token; highest: {high['cell']} "
               f"({high['where']}) at {si(high['value'], 'J')}/token, {high['value'] / low['value']:.1f}x more")
    if why:
        reading += f"; {int(len(why))} kind(s) of cell had no reading ({why[0]})"
    fig.tight_layout()
    return Chart(name, title, fig, reading + ".")


# --- 7: stability --------------------------------------------------------------------------------


@_styled
def stability_state_norm(run: RunData) -> Chart | Omitted:
    name, title = "stability_state_norm", "State norm per loop and stability proxy"
    s = frames.state_norm_frame(run)
    if s.empty:
        return Omitted(name, title, "no looped train cell recorded per-loop state norms (dense models have none)")
    many_lrs = s["lr"].nunique() > 1
    s = s.assign(series=[_series_label(m, lr, many_lrs) for m, lr in zip(s["model"], s["lr"], strict=True)])
    # Training seeds of one model and lr are separate cells: each keeps its own line.
    nth = s.groupby("series")["cell_id"].transform(lambda ids: ids.map({c: i for i, c in enumerate(ids.unique())}))
    many = s.groupby("series")["cell_id"].transform("nunique") > 1
    res = run.results.drop_duplicates("cell_id").set_index("cell_id")
    seed = s["cell_id"].map(res["seed"]) if "seed" in res.columns else pd.Series(np.nan, index=s.index)
    tag = [f" seed {int(v)}" if pd.notna(v) else f" #{n + 1}" for v, n in zip(seed, nth, strict=True)]
    s["series"] = np.where(many, s["series"] + pd.Series(tag, index=s.index), s["series"])
    # One colour per model; with an lr sweep one colour per lr (as in the loss curves), a marker per model.
    model_colors, lrs = _model_colors(run), sorted(s["lr"].dropna().unique())
    lr_colors = dict(zip(lrs, sns.color_palette("viridis", len(lrs)), strict=True))
    markers = dict(zip(sorted(s["model"].unique()), "oDs^vP*X" * 4, strict=False))

    def color_of(g: pd.DataFrame) -> tuple:
        return lr_colors[g["lr"].iloc[0]] if many_lrs else model_colors.get(g["model"].iloc[0], "C0")

    series = list(dict.fromkeys(s.sort_values(["family", "model", "lr"])["series"]))
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(8.4, 4.2), dpi=110, gridspec_kw={"width_ratios": [2, 1]})
    texts = []
    for label in series:
        g = s[s["series"] == label].sort_values("loop")
        ax.plot(g["loop"], g["value"], marker=markers[g["model"].iloc[0]], ms=4, color=color_of(g), label=label)
        growth = g["value"].iloc[-1] / g["value"].iloc[0]
        text = f"{label} {g['value'].iloc[0]:.3g} to {g['value'].iloc[-1]:.3g} over {len(g)} loops ({growth:.2f}x)"
        proxy, proxy_name = g["proxy"].iloc[0], g["proxy_name"].iloc[0]
        if np.isfinite(proxy):
            text += f", {_proxy_symbol(proxy_name)} = {proxy:.3g}" + (" >= 1" if proxy >= 1 else " < 1")
        texts.append(text)
    _log_if_wide(ax, "y", s["value"])
    ax.set_xlabel("loop iteration (held-out batch, at the training mean loops)")
    ax.set_ylabel("state norm ||h|| (mean over tokens)")
    ax.xaxis.get_major_locator().set_params(integer=True)
    proxies = s.drop_duplicates("series").set_index("series").reindex(series)
    proxies = proxies[np.isfinite(proxies["proxy"])]
    if proxies.empty:
        bx.set_axis_off()
        bx.text(0.5, 0.5, "no stability proxy\nrecorded", ha="center", va="center", fontsize=8, color="grey")
    else:
        y = np.arange(len(proxies))
        bx.barh(y, proxies["proxy"], height=0.6 if len(proxies) > 1 else 0.4,
                color=[color_of(s[s["series"] == lbl]) for lbl in proxies.index])
        bx.set_yticks(y, [f"{lbl}\n{_proxy_symbol(n)}" for lbl, n in zip(proxies.index, proxies["proxy_name"],
                                                                            strict=True)], fontsize=6.5)
        bx.invert_yaxis()
        bx.axvline(1.0, color="red", ls="--", lw=1)
        bx.set_xlim(0, max(1.2, float(proxies["proxy"].max()) * 1.15))
        bx.set_xlabel("linear state gain (red: 1, growth above)")
        for yi, v in zip(y, proxies["proxy"], strict=True):
            bx.text(v, yi, f" {v:.2f}", va="center", fontsize=6.5)
    _legend_below(fig, [ax])
    return Chart(name, title, fig, _state_reading(s, texts))


def _state_reading(s: pd.DataFrame, texts: list[str]) -> str:
    if len(texts) <= 4:
        return "; ".join(texts) + "."
    growth = s.sort_values("loop").groupby("series")["value"].agg(lambda v: v.iloc[-1] / v.iloc[0])
    proxy = s.drop_duplicates("series").set_index("series")["proxy"]
    above = proxy[proxy >= 1]
    text = (f"{len(texts)} train cells: state norm grows at most {growth.max():.2f}x over the loops "
            f"({growth.idxmax()}) and least {growth.min():.2f}x ({growth.idxmin()})")
    text += (f"; linear state gain >= 1 in {len(above)}: {', '.join(above.index)}" if not above.empty
             else "; every recorded linear state gain is below 1")
    return text + "."


def _proxy_symbol(proxy_name: str) -> str:
    return {"spectral_radius": "rho(A_bar)", "adapter_spectral_norm": "||W_h||_2 (adapter)"}.get(proxy_name,
                                                                                                 proxy_name)


@_styled
def train_loss(run: RunData) -> Chart | Omitted:
    name, title = "train_loss", "Training loss"
    c = frames.loss_curves(run)
    if c.empty:
        return Omitted(name, title, _why_no(run, ("train",), "loss curves come from train cells"))
    # A rolling median shows the trend through step noise; spikes still show as bumps.
    c = c.assign(smoothed=c.groupby("cell_id")["value"].transform(
        lambda v: v.rolling(9, min_periods=1, center=True).median()))
    lrs = sorted(c["lr"].dropna().unique())
    colors = _model_colors(run)
    # The y range of the finished curves; a diverging curve is cut at its top, not allowed to squash them.
    finite = c[np.isfinite(c["smoothed"])]
    ref = finite[finite["status"] == "ok"] if (finite["status"] == "ok").any() else finite
    top = float(ref["smoothed"].max()) * 1.05 if not ref.empty else None
    bottom = float(finite["smoothed"].min()) * 0.95 if not finite.empty else None
    if len(lrs) <= 1:
        fig, ax = plt.subplots(figsize=(6.6, 4.2), dpi=110)
        seeds = c.groupby("model")["cell_id"].nunique()
        for (model, _cid), g in c.groupby(["model", "cell_id"], sort=True):  # one line per cell: seeds apart
            label = model + (f" ({seeds[model]} seeds)" if seeds[model] > 1 else "")
            ax.plot(g["index"], g["smoothed"], color=colors.get(model, "C0"), lw=1.1,
                    alpha=0.8 if seeds[model] > 1 else 1.0, label=label)
            _mark_unfinished(ax, g, top)
        axes = [ax]
        handles = dict(zip(*reversed(ax.get_legend_handles_labels()), strict=True))
        ax.legend(list(handles.values()), list(handles), fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0),
                  frameon=False)
        ax.set_ylabel("train loss (nats/token; rolling median of 9 steps)")
    else:
        # One panel per model and token budget: curves of two training recipes never share a panel.
        c = c.assign(recipe=c["cell_id"].map(_recipe_labels(run)).fillna(""))
        panels = sorted(c.groupby(["model", "recipe"]).groups,
                        key=lambda mr: (family_rank(c.loc[c["model"] == mr[0], "family"].iloc[0]), mr[0], mr[1]))
        ncols = min(3, len(panels))
        nrows = math.ceil(len(panels) / ncols)
        fig, grid = plt.subplots(nrows, ncols, figsize=(3.4 * ncols + 0.6, 3.0 * nrows + 0.4), dpi=110,
                                 squeeze=False, sharey=True)
        # Distinct hues: neighbouring learning rates (0.002, 0.003) must not share a shade.
        palette = dict(zip(lrs, sns.color_palette("Dark2", len(lrs)), strict=True))
        axes = list(grid.flat)
        for ax, (model, recipe) in zip(axes, panels, strict=False):
            for (lr, _cid), g in c[(c["model"] == model) & (c["recipe"] == recipe)].groupby(["lr", "cell_id"]):
                ax.plot(g["index"], g["smoothed"], color=palette[lr], lw=1.1, label=f"lr={lr:g}")
                _mark_unfinished(ax, g, top)
            ax.set_title(model + (f" · {recipe}" if recipe else ""), fontsize=9)
        for ax in axes[len(panels):]:
            ax.set_axis_off()
        axes = axes[: len(panels)]
        for ax in grid[:, 0]:
            ax.set_ylabel("train loss (rolling median 9)")
        for ax in axes:
            ax.set_xlabel("step")
        _legend_below(fig, axes, ncol=min(len(lrs), 6))  # every lr of every panel, outside the data
    for ax in axes:
        ax.set_xlabel("step")
        if top is not None and bottom is not None and top > bottom:
            ax.set_ylim(bottom, top)
    if len(lrs) <= 1:
        fig.tight_layout()
    return Chart(name, title, fig, _loss_reading(run, c, len(lrs) > 1, top))


def _recipe_labels(run: RunData) -> dict[str, str]:
    """train cell id -> what sets its training recipe apart from the run's other train cells ("" when all
    share one recipe), e.g. "600,000 tokens" or "batch 4x64"."""
    recipes = {cid: groups.train_recipe(rec["cell"]) for cid, rec in run.cells.items()
               if (rec.get("cell") or {}).get("workload") == "train"}
    keys = sorted({k for r in recipes.values() for k in r})
    differing = [k for k in keys if len({json.dumps(r.get(k), default=str) for r in recipes.values()}) > 1]
    return {cid: groups.recipe_text(r, differing) if differing else "" for cid, r in recipes.items()}


def _mark_unfinished(ax: plt.Axes, g: pd.DataFrame, top: float | None) -> None:
    """A red x where a curve stopped early (diverged, timed out), kept inside the plotted range."""
    if g.empty or (g["status"] == "ok").all():
        return
    last = g[np.isfinite(g["smoothed"])].iloc[-1] if np.isfinite(g["smoothed"]).any() else g.iloc[-1]
    y = last["smoothed"] if np.isfinite(last["smoothed"]) else (top or 0.0)
    ax.scatter([last["index"]], [min(y, top) if top else y], marker="x", s=50, color="red", zorder=4,
               linewidths=1.5)


def _loss_reading(run: RunData, c: pd.DataFrame, many_lrs: bool, top: float | None) -> str:
    final = c.groupby("cell_id").agg(model=("model", "first"), lr=("lr", "first"), status=("status", "first"),
                                     steps=("index", "max"),
                                     loss=("value", lambda v: float(np.mean(v.to_numpy()[-max(len(v) // 10, 1):]))))
    final["recipe"] = final.index.map(_recipe_labels(run)).fillna("")
    ok = final[final["status"] == "ok"].sort_values("loss")
    bad = final[final["status"] != "ok"]
    parts = []
    recipes = list(dict.fromkeys(ok["recipe"]))
    for recipe in recipes:  # losses after different training recipes are not put in one ranking
        group = ok[ok["recipe"] == recipe]
        best = group.drop_duplicates("model") if many_lrs else group  # with an lr sweep: each model's best lr
        prefix = f"[{recipe}] " if recipe else ""
        parts.append(prefix + ("best " if many_lrs else "") + "final train loss (mean of the last 10% of steps): " +
                     ", ".join(f"{_series_label(r['model'], r['lr'], many_lrs)} {r['loss']:.3f}"
                               for _, r in best.iterrows()))
    if not bad.empty:
        parts.append("marked x, not finished: " + ", ".join(
            f"{_series_label(r['model'], r['lr'], many_lrs)} ({r['status']} after {int(r['steps']) + 1} steps)"
            for _, r in bad.iterrows()))
    if top is not None and (c["smoothed"] > top).any():
        parts.append(f"values above {top:.2f} are cut off")
    text = "; ".join(parts)
    return text[:1].upper() + text[1:] + "."


@_styled
def stability_grid(run: RunData) -> Chart | Omitted:
    name, title = "stability_grid", "Converged or diverged, per model and learning rate"
    st = frames.stability_frame(run)
    if st.empty:
        return Omitted(name, title, _why_no(run, ("train",), "the grid is made of train cells"))
    lrs = sorted(st["lr"].dropna().unique())
    if len(lrs) < 2:
        only = f" (lr={lrs[0]:g})" if lrs else ""
        return Omitted(name, title, f"only one learning rate was trained{only}; the grid needs an lr sweep")
    swept = st.groupby("model")["lr"].transform("nunique") >= 2
    if swept.any():  # models trained at one lr only (the run's main comparison) would be rows of "not run"
        st = st[swept]
        lrs = sorted(st["lr"].dropna().unique())
    models = list(dict.fromkeys(st.sort_values(["family", "model"], key=lambda s: s.map(family_rank)
                                               if s.name == "family" else s)["model"]))
    loss = st.pivot_table(index="model", columns="lr", values="train_loss", aggfunc="first").reindex(
        index=models, columns=lrs)
    ok_loss = loss.where(st.pivot_table(index="model", columns="lr", values="status", aggfunc="first")
                         .reindex(index=models, columns=lrs) == "ok")
    fig, ax = plt.subplots(figsize=(1.3 * len(lrs) + 2.6, 0.55 * len(models) + 1.6), dpi=110)
    sns.heatmap(ok_loss, ax=ax, cmap="crest", annot=False, cbar_kws={"label": "final train loss (finished runs)"},
                linewidths=1, linecolor="white")
    for i, model in enumerate(models):
        for j, lr in enumerate(lrs):
            row = st[(st["model"] == model) & (st["lr"] == lr)]
            if row.empty:
                text, color = "not run", "grey"
            else:
                r = row.iloc[0]
                if r["status"] == "ok":
                    degraded = "\ndegraded" if r["outcome"] == "degraded" else ""
                    text, color = f"{r['train_loss']:.3f}{degraded}", "white"
                else:
                    step = "" if pd.isna(r["diverged_step"]) else f"\nstep {int(r['diverged_step'])}"
                    text, color = f"{r['status']}{step}", "white"
                    face = "#c0392b" if r["status"] == "diverged" else "#7f8c8d"
                    ax.add_patch(Rectangle((j, i), 1, 1, color=face, ec="white", lw=1))
            ax.text(j + 0.5, i + 0.5, text, ha="center", va="center", fontsize=7, color=color)
    ax.set_xticks(np.arange(len(lrs)) + 0.5, [f"{lr:g}" for lr in lrs])
    ax.set_yticks(np.arange(len(models)) + 0.5, models, rotation=0)
    ax.set_xlabel("peak learning rate")
    ax.set_ylabel("")
    fig.tight_layout()
    return Chart(name, title, fig, _grid_reading(st, models))


def _grid_reading(st: pd.DataFrame, models: list[str]) -> str:
    parts = []
    for model in models:
        g = st[st["model"] == model]
        div = sorted(g.loc[g["status"] == "diverged", "lr"])
        ok = g[g["status"] == "ok"]
        other = g[~g["status"].isin(("ok", "diverged"))]
        degraded = sorted(g.loc[g["outcome"] == "degraded", "lr"])
        text = f"{model}: {len(ok) - len(degraded)} of {len(g)} converged"
        if degraded:
            text += f", degraded at lr {', '.join(f'{x:g}' for x in degraded)}"
        if div:
            text += f", diverged at lr {', '.join(f'{x:g}' for x in div)}"
        if not other.empty:
            text += f", {len(other)} did not finish ({', '.join(sorted(set(other['status'])))})"
        if not ok.empty:
            best = ok.loc[ok["train_loss"].idxmin()]
            text += f", best loss {best['train_loss']:.3f} at lr {best['lr']:g}"
        parts.append(text)
    return "; ".join(parts) + "."


# --- 8: MFU --------------------------------------------------------------------------------------


@_styled
def mfu(run: RunData) -> Chart | Omitted:
    name, title = "mfu", "Model FLOPs utilisation against the calibrated peak"
    m = frames.mfu_frame(run)
    if m.empty:
        rows = run.results[run.results["metric"] == "mfu"]
        why = ("MFU could not be computed: " + "; ".join(sorted(set(rows["source"].astype(str)))) if not rows.empty
               else _why_no(run, ("train", "prefill"), "MFU comes from train and prefill cells"))
        return Omitted(name, title, why)
    m = m.sort_values("value", ascending=False)
    labels = m["label"].fillna(m["cell_id"]).astype(str)
    fig, ax = plt.subplots(figsize=(7.4, 0.32 * len(m) + 1.5), dpi=110)
    workloads = sorted(m["workload"].unique())
    palette = dict(zip(workloads, sns.color_palette("Set2", len(workloads)), strict=True))
    y = np.arange(len(m))
    invalid = (m["validity"] != "ok").to_numpy() if "validity" in m else np.zeros(len(m), dtype=bool)
    ax.barh(y, m["value"] * 100, color=[palette[w] for w in m["workload"]],
            hatch=["//" if bad else "" for bad in invalid], edgecolor=["#c0392b" if bad else "none" for bad in invalid])
    if invalid.any():
        ax.axvline(100, color="#c0392b", ls="--", lw=1)
    ax.set_yticks(y, labels, fontsize=6.5)
    ax.set_ylim(len(m) - 0.5, -0.5)
    for yi, v in zip(y, m["value"], strict=True):
        ax.text(v * 100, yi, f" {v * 100:.2g}%", va="center", fontsize=6.5)
    ax.set_xlim(0, float(m["value"].max()) * 100 * 1.18)
    ax.xaxis.set_major_formatter(PercentFormatter(decimals=0 if m["value"].max() > 0.05 else 1))
    peak = run.calibrated_peak("float32")
    ax.set_xlabel(f"analytic model FLOP/s / calibrated GEMM peak of the cell's dtype (fp32: {si(peak, 'FLOP/s')})")
    handles = [Rectangle((0, 0), 1, 1, color=palette[w]) for w in workloads]
    labels = list(workloads)
    if invalid.any():
        handles.append(Rectangle((0, 0), 1, 1, facecolor="white", hatch="//", edgecolor="#c0392b"))
        labels.append("flagged invalid")
    ax.legend(handles, labels, fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    hi, lo = m.iloc[0], m.iloc[-1]
    reading = (f"Highest: {hi['label']} at {hi['value'] * 100:.3g}% of the calibrated peak; lowest: {lo['label']} "
               f"at {lo['value'] * 100:.3g}%")
    if invalid.any():
        bad = m[invalid]
        reading += (f"; {len(bad)} bar(s) flagged invalid and not to be trusted: "
                    + ", ".join(f"{r['label']} ({r['validity']})" for _, r in bad.head(4).iterrows()))
    fig.tight_layout()
    return Chart(name, title, fig, reading + ".")


# --- 9: numba vs torch ---------------------------------------------------------------------------


@_styled
def numba_vs_torch(run: RunData) -> Chart | Omitted:
    name, title = "numba_vs_torch", "Numba time / torch time, per op and per model"
    r = frames.numba_ratio_frame(run)
    if r.empty:
        return Omitted(name, title, "no kernels-workload ratios and no prefill/decode cells measured with both the "
                                    "numba and a torch backend on the same model and shape")
    r = r.sort_values(["kind", "name", "baseline"], key=lambda s: s.map({"op": 0, "model": 1}) if s.name == "kind"
                      else s)
    r = r.assign(item=[f"{k}: {n}" for k, n in zip(r["kind"], r["name"], strict=True)])
    items = list(dict.fromkeys(r["item"]))
    baselines = sorted(r["baseline"].unique())
    fig, ax = plt.subplots(figsize=(7.0, 0.36 * len(items) * len(baselines) + 1.6), dpi=110)
    height = 0.8 / len(baselines)
    for b, baseline in enumerate(baselines):
        sub = r[r["baseline"] == baseline].set_index("item").reindex(items)
        y = np.arange(len(items)) + (b - (len(baselines) - 1) / 2) * height
        colors = ["#2e8b57" if v < 1 else "#c0392b" for v in sub["ratio"].fillna(1)]
        ax.barh(y, sub["ratio"] - 1, left=1, height=height * 0.9, color=colors, alpha=0.6 + 0.4 * (b == 0),
                hatch="" if b == 0 else "//", label=f"vs {baseline}")
        for yi, v in zip(y, sub["ratio"], strict=True):
            if np.isfinite(v):
                ax.text(v, yi, f" {v:.2g}x" if v >= 1 else f"{v:.2g}x ", va="center", fontsize=6.5,
                        ha="left" if v >= 1 else "right")
    ax.set_xscale("log", base=2)
    # Room for the value labels on both sides of 1, but no empty half when every ratio is on one side.
    ax.set_xlim(min(0.5, float(r["ratio"].min()) / 2.5), max(2.0, float(r["ratio"].max()) * 2.5))
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _p: f"{v:.2g}x"))
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.axvline(1.0, color="black", lw=1)
    ax.set_yticks(np.arange(len(items)), items, fontsize=7)
    ax.set_ylim(len(items) - 0.5, -0.5)
    ax.set_xlabel("numba time / torch time (green, left of 1: numba faster)")
    if len(baselines) > 1:
        ax.legend(fontsize=7, framealpha=0.9)
    fig.tight_layout()
    return Chart(name, title, fig, _ratio_reading(r))


def _ratio_reading(r: pd.DataFrame) -> str:
    parts = []
    for (kind, baseline), g in r.groupby(["kind", "baseline"], sort=False):
        faster = int((g["ratio"] < 1).sum())
        best, worst = g.loc[g["ratio"].idxmin()], g.loc[g["ratio"].idxmax()]
        noun = "ops" if kind == "op" else "model cells"
        text = (f"vs {baseline}, numba is faster on {faster} of {len(g)} {noun} (best {best['name']} "
                f"{best['ratio']:.2g}x the time")
        text += f", worst {worst['name']} {worst['ratio']:.2g}x)" if len(g) > 1 else ")"
        parts.append(text)
    text = "; ".join(parts)
    return text[:1].upper() + text[1:] + "."


CHARTS: tuple[ChartFn, ...] = (
    bpb_vs_params, bpb_vs_train_flops, bpb_vs_loops, throughput_vs_depth, memory_vs_context, energy_per_token,
    stability_state_norm, train_loss, stability_grid, mfu, numba_vs_torch,
)
