"""`loopscope history DIR...`: many runs (one per commit or machine) in one table and a trend per gated metric.

Runs are ordered by their creation time. A cell is followed across runs by its cell_id (the same cell
has the same id in every run of one profile), so a trend line joins one cell's values only. The metrics
followed are the ones the gate rules judge (kind other than "info"), at the stats the gate looks at; rows
flagged invalid (reports/validity.py) are drawn hollow and marked in the table.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from loopscope.bench.errors import LoopscopeError
from loopscope.reports import validity
from loopscope.reports.compare import load_rules
from loopscope.reports.rundir import RunData, load_run

MAX_LINES = 12  # cells per trend chart; more are listed in the table only


@dataclass(frozen=True)
class History:
    table: pd.DataFrame  # one row per (run, cell, metric, stat): run_id, created, commit, label, value, unit, ...
    runs: pd.DataFrame  # one row per run, in order
    metrics: tuple[str, ...]

    def wide(self) -> pd.DataFrame:
        """metric x cell rows, one column per run (values; invalid ones suffixed with '!')."""
        if self.table.empty:
            return pd.DataFrame()
        t = self.table.assign(text=[_fmt(v) + ("" if ok == validity.OK else " !")
                                    for v, ok in zip(self.table["value"], self.table["validity"], strict=True)])
        wide = t.pivot_table(index=["metric", "stat", "unit", "cell"], columns="run", values="text",
                             aggfunc="first")
        return wide.reindex(columns=list(self.runs["run"])).reset_index()

    def to_markdown(self) -> str:
        if self.table.empty:
            return "(no gated metric in common)\n"
        runs = "\n".join(f"- {r['run']}: {r['run_id']}, created {r['created']}, commit {r['commit']}, "
                         f"{r['machine']}" for _, r in self.runs.iterrows())
        wide = self.wide()
        head = "| " + " | ".join(str(c) for c in wide.columns) + " |"
        lines = [head, "|" + "---|" * len(wide.columns)]
        for row in wide.itertuples(index=False):
            lines.append("| " + " | ".join("" if pd.isna(v) else str(v).replace("|", "\\|") for v in row) + " |")
        return (f"Runs, oldest first:\n{runs}\n\n" + "\n".join(lines)
                + "\n\n'!': flagged invalid in that run (see its report's validity column).\n")


def _fmt(value: float) -> str:
    if not math.isfinite(value):
        return "NaN"
    return f"{value:,.0f}" if abs(value) >= 1000 else f"{value:.4g}"


def gated_metrics() -> dict[str, tuple[str, ...] | None]:
    """metric -> the stats the gate judges (None: every stat), for every rule that is not informational."""
    rules = load_rules()
    return {name: rule.stats for name, rule in rules.metrics.items() if rule.kind != "info"}


def collect(paths: list[Path]) -> History:
    if len(paths) < 2:
        raise LoopscopeError(f"history needs at least two runs, got {len(paths)}")
    runs: list[RunData] = [load_run(p) for p in paths]
    info = []
    for i, run in enumerate(runs):
        m = run.manifest
        fp = m.get("fingerprint") or {}
        cpu = fp.get("cpu") or {}
        info.append({"run_id": run.run_id, "path": str(run.path), "created": str(m.get("created", "")),
                     "commit": str((m.get("git") or {}).get("commit") or "")[:12] or "?",
                     "machine": str(cpu.get("model", "?")) if isinstance(cpu, dict) else str(cpu), "_i": i})
    order = pd.DataFrame(info).sort_values(["created", "_i"]).reset_index(drop=True)
    order["run"] = [f"#{k + 1}" for k in range(len(order))]
    wanted = gated_metrics()
    parts = []
    for _, r in order.iterrows():
        run = runs[int(r["_i"])]
        res = validity.annotate(run.results, run.manifest)
        res = res[res["metric"].isin(list(wanted)) & (res["status"] == "ok")]
        keep = [wanted[m] is None or s in wanted[m] for m, s in zip(res["metric"], res["stat"], strict=True)]
        res = res[keep]
        labels = run.cells().set_index("cell_id")["label"]
        parts.append(pd.DataFrame({
            "run": r["run"], "run_id": r["run_id"], "created": r["created"], "commit": r["commit"],
            "cell_id": res["cell_id"].to_numpy(), "cell": res["cell_id"].map(labels).fillna(res["cell_id"]).to_numpy(),
            "metric": res["metric"].to_numpy(), "stat": res["stat"].to_numpy(), "unit": res["unit"].to_numpy(),
            "value": res["value"].to_numpy(float), "validity": res["validity"].to_numpy()}))
    table = pd.concat(parts, ignore_index=True) if parts else pd.DataFrame()
    if not table.empty:
        mfu = table["metric"] == "mfu"  # MFU reads as a percentage everywhere
        table.loc[mfu, "value"] = table.loc[mfu, "value"] * 100
        table.loc[mfu, "unit"] = "% of calibrated peak"
        measured = table.groupby("metric")["value"].transform(lambda v: v.notna().any())
        table = table[measured].reset_index(drop=True)
    metrics = tuple(sorted(table["metric"].unique())) if not table.empty else ()
    return History(table, order.drop(columns="_i"), metrics)


def trend_charts(history: History, out_dir: Path) -> list[Path]:
    """One PNG per gated metric: x = the runs in order, one line per cell (joined by cell_id only)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import seaborn as sns

    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    run_names = list(history.runs["run"])
    x_of = {name: k for k, name in enumerate(run_names)}
    for metric in history.metrics:
        m = history.table[history.table["metric"] == metric]
        series = list(m.groupby(["cell_id", "stat"], sort=True))
        with sns.axes_style("whitegrid"), sns.plotting_context("notebook", font_scale=0.8):
            fig, ax = plt.subplots(figsize=(7.6, 4.2), dpi=110)
            palette = sns.color_palette("tab10", min(len(series), MAX_LINES))
            for k, ((_cid, stat), g) in enumerate(series[:MAX_LINES]):
                g = g.assign(x=g["run"].map(x_of)).sort_values("x")
                label = str(g["cell"].iloc[0]) + (f" ({stat})" if stat else "")
                ax.plot(g["x"], g["value"], "-", color=palette[k], lw=1.2, label=label[:60])
                valid = g["validity"] == validity.OK
                ax.scatter(g.loc[valid, "x"], g.loc[valid, "value"], color=palette[k], s=22, zorder=3)
                ax.scatter(g.loc[~valid, "x"], g.loc[~valid, "value"], facecolor="white", edgecolor=palette[k],
                           s=30, zorder=3)
            values = m["value"][m["value"] > 0]
            if not values.empty and values.max() > 20 * values.min():
                ax.set_yscale("log")
            ax.set_xticks(range(len(run_names)), [f"{n}\n{c}" for n, c in zip(run_names, history.runs["commit"],
                                                                             strict=True)], fontsize=7)
            unit = str(m["unit"].iloc[0]) if not m.empty else ""
            ax.set_ylabel(f"{metric} ({unit})" if unit else metric)
            ax.set_xlabel("run (oldest first) and commit; hollow: flagged invalid")
            more = f" (first {MAX_LINES} of {len(series)} cells)" if len(series) > MAX_LINES else ""
            ax.set_title(f"History of {metric}{more}", fontsize=10, fontweight="bold")
            ax.legend(fontsize=6.5, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
            fig.tight_layout()
            path = out_dir / f"history_{re.sub(r'[^A-Za-z0-9_.-]+', '_', metric)}.png"
            fig.savefig(path, dpi=110, bbox_inches="tight")
            plt.close(fig)
        written.append(path)
    return written


def write_history(paths: list[Path], out_dir: Path) -> tuple[History, list[Path]]:
    """Collect the runs, write history.md, history.csv and the trend charts into out_dir."""
    history = collect(paths)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "history.md").write_text(history.to_markdown(), encoding="utf-8")
    history.table.to_csv(out_dir / "history.csv", index=False)
    return history, trend_charts(history, out_dir)
