"""Valid numbers or a flag: which result rows cannot be taken at face value, and why.

A row is flagged when its value is impossible (a fraction of a calibrated peak above 1, a bandwidth
above the calibrated copy rate) or when it was measured while the machine was visibly busy (the
1-minute load average well above the usable cores) or throttled (the GPU's clock-event reasons).
The flag is a `validity` column: "ok" or the reasons, joined by "; ". The report shows it and the
regression gate refuses to judge a metric on a flagged row (`gate_refusals`).

MFU rows are first re-expressed against the run's best calibration probe (the worker divided by the
peak known when its cell started; a later probe may have found the machine faster).
"""

from __future__ import annotations

import math
import re
from typing import Any

import numpy as np
import pandas as pd

FRACTION_OF_PEAK: tuple[str, ...] = ("mfu", "roofline_fraction", "bandwidth_fraction")
BUSY_FACTOR = 1.5  # load above 1.5x the usable cores: other work was competing with the cell
_PEAK_IN_SOURCE = re.compile(r"calibrated (fp32|bf16|fp16) GEMM peak ([0-9.eE+-]+) FLOP/s")
OK = "ok"
# Units of what a busy or throttled machine distorts (bytes, counts and losses it does not).
TIMED_UNITS: frozenset[str] = frozenset({"tokens/s", "ms", "s", "FLOP/s", "bytes/s", "J/token", "W", "steps/s"})


def _peak(calibration: dict[str, Any], key: str) -> float:
    value = calibration.get(f"gemm_{key}_flops")
    return float(value) if isinstance(value, (int, float)) and math.isfinite(value) and value > 0 else math.nan


_DTYPE_KEY = {"bfloat16": "bf16", "float16": "fp16"}


def rescale_mfu(results: pd.DataFrame, calibration: dict[str, Any],
                first: dict[str, Any] | None = None) -> pd.DataFrame:
    """MFU against the run's best calibrated peak. The peak a worker divided by is named in the row's
    source; where it is not, it was the run's first calibration (`first`), which workers are given."""
    if results.empty or not calibration:
        return results
    out = results.copy()
    rows = out.index[(out["metric"] == "mfu") & out["value"].notna()]
    for i in rows:
        match = _PEAK_IN_SOURCE.search(str(out.at[i, "source"]))
        if match:
            key, used = match.group(1), float(match.group(2))
        elif first:
            key = _DTYPE_KEY.get(str(out.at[i, "dtype"]) if "dtype" in out.columns else "", "fp32")
            used = _peak(first, key)
        else:
            continue
        best = _peak(calibration, key)
        if math.isfinite(best) and math.isfinite(used) and best > used * 1.001:
            out.at[i, "value"] = float(out.at[i, "value"]) * used / best
            out.at[i, "source"] = (f"model FLOP/s / best calibrated {key} GEMM peak {best:.3g} FLOP/s "
                                   f"(the cell ran with {used:.3g})")
    return out


def _throttle_reasons(results: pd.DataFrame) -> dict[str, str]:
    t = results[(results["metric"] == "gpu_throttled") & (results["value"] == 1)]
    return {cid: f"throttled: {src}" if src else "throttled" for cid, src in zip(t["cell_id"], t["source"],
                                                                                   strict=True)}


def _busy(conditions: dict[str, dict[str, Any]]) -> dict[str, str]:
    out = {}
    for cid, c in conditions.items():
        load, cores = c.get("load_1m"), c.get("cores")
        if isinstance(load, (int, float)) and isinstance(cores, (int, float)) and cores > 0 \
                and load > BUSY_FACTOR * cores:
            out[cid] = f"machine busy: load {load:.1f} > {BUSY_FACTOR:g} x {int(cores)} cores"
    return out


def validity(results: pd.DataFrame, manifest: dict[str, Any]) -> pd.Series:
    """"ok" or the reasons each row cannot be taken at face value (aligned with `results`)."""
    if results.empty:
        return pd.Series([], dtype=object, index=results.index)
    calibration = manifest.get("calibration") or {}
    bandwidth = calibration.get("mem_bw_bytes_per_s")
    bandwidth = float(bandwidth) if isinstance(bandwidth, (int, float)) and math.isfinite(bandwidth) else math.nan
    per_cell: dict[str, list[str]] = {}
    for source in (_busy(manifest.get("cell_conditions") or {}), _throttle_reasons(results)):
        for cid, why in source.items():
            per_cell.setdefault(cid, []).append(why)
    flags = []
    values = pd.to_numeric(results["value"], errors="coerce").to_numpy(float)
    for metric, unit, value, cid in zip(results["metric"], results["unit"], values, results["cell_id"],
                                        strict=True):
        reasons = []
        if metric in FRACTION_OF_PEAK and np.isfinite(value) and value > 1:
            reasons.append(f"{metric}>1")
        if unit == "bytes/s" and not str(metric).startswith("calib") and np.isfinite(value) \
                and np.isfinite(bandwidth) and value > bandwidth:
            reasons.append("above calibrated copy rate")
        if unit in TIMED_UNITS or metric in FRACTION_OF_PEAK:  # a busy or throttled machine slows timings only
            reasons += per_cell.get(cid, [])
        flags.append("; ".join(reasons) if reasons else OK)
    return pd.Series(flags, index=results.index, dtype=object)


def annotate(results: pd.DataFrame, manifest: dict[str, Any]) -> pd.DataFrame:
    """Results with MFU against the best probe and a `validity` column."""
    out = rescale_mfu(results, manifest.get("calibration") or {}, manifest.get("calibration_first"))
    return out.assign(validity=validity(out, manifest))


def cell_flags(results: pd.DataFrame) -> dict[str, str]:
    """cell_id -> its distinct flags joined (cells whose rows are all ok are absent)."""
    if "validity" not in results.columns:
        return {}
    bad = results[results["validity"] != OK]
    return {cid: "; ".join(dict.fromkeys("; ".join(g).split("; "))) for cid, g in bad.groupby("cell_id")["validity"]}


def gate_refusals(results: pd.DataFrame, manifest: dict[str, Any], metrics: set[str] | None = None) -> list[str]:
    """One line per flagged row of the given metrics (all when None): the gate refuses to judge on these.

    Hook for a gate: `refused = gate_refusals(run.results, run.manifest, gated_metrics)`; a non-empty list
    means exit 2 (unusable input) naming the rows, or those rows judged `unresolved`."""
    flagged = annotate(results, manifest)
    flagged = flagged[flagged["validity"] != OK]
    if metrics is not None:
        flagged = flagged[flagged["metric"].isin(metrics)]
    run_id = manifest.get("run_id", "?")
    return [f"{run_id}: cell {r['cell_id']} {r['metric']}"
            + (f" ({r['stat']})" if r.get("stat") else "") + f" = {r['value']:.4g}: {r['validity']}"
            for _, r in flagged.iterrows()]
