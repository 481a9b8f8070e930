"""The report's "Where the time goes" tables: the top ops of each profiled cell and the trace files.

Same contract as tables.py: readable columns with units, an empty table carries the reason in attrs["why"].
"""

from __future__ import annotations

import re

import numpy as np
import pandas as pd

from loopscope.reports.frames import RunData
from loopscope.reports.profile_charts import SECTION, profile_frame
from loopscope.reports.tables import TableSpec

TOP_N = 10
_CALLS = re.compile(r"^([\d.eE+-]+) calls per '([^']+)'; input shapes (.*?); ")


def _empty(why: str) -> pd.DataFrame:
    df = pd.DataFrame()
    df.attrs["why"] = why
    return df


def top_ops_table(run: RunData) -> pd.DataFrame:
    """Per profiled cell, its TOP_N ops by self time per call, with their share of the call and FLOPs."""
    ops = profile_frame(run, "op_self_time_ms")
    if ops.empty:
        return _empty("no torch cell was profiled (run with --trace; the numba engine has region timers, not ops)")
    flops = profile_frame(run, "op_flops").set_index(["cell_id", "stat"])["value"]
    call = profile_frame(run, "profiled_call_ms").drop_duplicates("cell_id").set_index("cell_id")["value"]
    trace_call = _trace_call_ms(run)
    rows = []
    for cell_id, g in ops.groupby("cell_id", sort=False):
        for _, r in g.sort_values("value", ascending=False).head(TOP_N).iterrows():
            m = _CALLS.match(r["source"])
            whole = trace_call.get(cell_id, call.get(cell_id, np.nan))
            rows.append({
                "cell": r["label"], "op": r["stat"], "self ms per call": r["value"],
                "share of the profiled call": r["value"] / whole if whole else np.nan,
                "calls per call": float(m.group(1)) if m else np.nan,
                "FLOPs per call": flops.get((cell_id, r["stat"]), np.nan),
                "input shapes": m.group(3) if m else "",
            })
    return pd.DataFrame(rows)


def _trace_call_ms(run: RunData) -> dict[str, float]:
    """Wall ms of one call in the full (trace) pass, from the profile_overhead row's source."""
    rows = profile_frame(run, "profile_overhead")
    out = {}
    for _, r in rows[rows["stat"] == "trace"].iterrows():
        m = re.search(r"profiled call ([\d.eE+-]+) ms", r["source"])
        if m:
            out[r["cell_id"]] = float(m.group(1))
    return out


def traces_table(run: RunData) -> pd.DataFrame:
    """The Chrome traces written for this run, as paths relative to the report, with the profiler's cost."""
    traces = sorted((run.run_dir / "traces").glob("*.json.gz")) if (run.run_dir / "traces").is_dir() else []
    if not traces:
        return _empty("no traces/ in this run directory (run with --trace)")
    cells = run.cell_frame().set_index("cell_id")
    overhead = profile_frame(run, "profile_overhead").set_index(["cell_id", "stat"])["value"]
    coverage = profile_frame(run, "region_coverage").set_index(["cell_id", "stat"])["value"]
    rows = []
    for path in traces:
        cell_id = path.name.removesuffix(".json.gz")
        rows.append({
            "cell": cells["label"].get(cell_id, cell_id) if not cells.empty else cell_id,
            "trace (open in ui.perfetto.dev or chrome://tracing)": f"traces/{path.name}",
            "trace bytes": float(path.stat().st_size),
            "regions / call": coverage.get((cell_id, "call"), np.nan),
            "regions / timed median": coverage.get((cell_id, "timed"), np.nan),
            "profiler overhead (trace pass)": overhead.get((cell_id, "trace"), np.nan),
            "profiler overhead (regions pass)": overhead.get((cell_id, "regions"), np.nan),
        })
    return pd.DataFrame(rows)


PROFILE_TABLES: tuple[TableSpec, ...] = (
    TableSpec(f"{SECTION}: top {TOP_N} ops per profiled cell", top_ops_table,
              "Self time per call from the full torch.profiler pass (which is slower than the timed pass: "
              "see the traces table); FLOPs where torch counts them."),
    TableSpec(f"{SECTION}: traces", traces_table,
              "Paths are relative to this report. Region sums / timed median above 1 are the labels' own cost "
              "and run-to-run noise."),
)
