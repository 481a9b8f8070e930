"""Compare two runs cell by cell: base value, candidate value, ratio, bootstrap CI, verdict.

Reading top to bottom:
  1. metric rules (gate_rules.toml): how to read each metric: kind, direction, tolerance;
  2. fingerprints: do the two runs come from different hardware?
  3. in-run ratios: cell / reference cell of the same run, which transfer across machines;
  4. cell matching: on cell_id, else on the cell's axes;
  5. one row per (cell, metric, stat): ratio, CI from raw samples, Mann-Whitney p, verdict;
  6. `CompareResult` with Markdown / CSV / JSON renderings.
The gate (gate.py) is this table plus a pass/fail decision per row.

Verdicts: better | worse | same | unknown, and `changed` for metrics without a direction
(a parameter count is neither better nor worse when it changes; it is just wrong).
"""

from __future__ import annotations

import dataclasses
import html
import io
import json
import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from loopscope.bench.stats import DEFAULT_RESAMPLES, mann_whitney_p, ratio_ci
from loopscope.reports.rundir import (
    AXES,
    RunData,
    UnusableRunError,
    axis_text,
    load_run,
    make_run_data,
)

try:  # Python 3.11+; the project still declares 3.10
    import tomllib
except ModuleNotFoundError:  # pragma: no cover - only on 3.10
    import tomli as tomllib  # type: ignore[no-redef]

KINDS = ("deterministic", "quality", "measured", "timing", "normalised", "info")
DIRECTIONS = ("higher", "lower", "none")
# Kinds whose values do not depend on the machine; the only ones compared across fingerprints.
HARDWARE_FREE_KINDS = ("deterministic", "quality", "normalised", "status")
# Kinds judged on raw samples (Mann-Whitney + bootstrap CI) when samples exist.
NOISE_TESTED_KINDS = ("timing", "normalised")
VERDICTS = ("better", "worse", "same", "unknown", "changed")
CHANGED_VERDICTS = ("better", "worse", "changed")
FORMATS = ("markdown", "csv", "json")


class RulesError(UnusableRunError):
    """A gate rules file that cannot be used: the message names the file and the key."""


# ---------------------------------------------------------------------------------------------------
# 1. Metric rules


@dataclass(frozen=True)
class MetricRule:
    metric: str
    kind: str
    direction: str
    tolerance: float
    stats: tuple[str, ...] | None = None  # stats the gate looks at; None = all
    samples_from: tuple[str, ...] = ()  # metrics whose samples stand in (inverted) when it has none
    known: bool = True  # False: no rule for this metric, the default (info) applies

    def gates_stat(self, stat: str) -> bool:
        return self.stats is None or stat in self.stats


@dataclass(frozen=True)
class RatioSpec:
    metric: str
    vary: tuple[str, ...]
    reference: tuple[tuple[str, str], ...]  # (axis, value) pairs, in `vary` order
    stat: str = "median"
    tolerance: float = 0.15

    @property
    def name(self) -> str:
        return f"{self.metric}/ref({','.join(f'{k}={v}' for k, v in self.reference)})"


@dataclass(frozen=True)
class Rules:
    metrics: Mapping[str, MetricRule]
    ratios: tuple[RatioSpec, ...]
    alpha: float
    confidence: float
    missing_cells: str
    failed_cells: str
    source: str

    def rule_for(self, metric: str) -> MetricRule:
        if metric in self.metrics:
            return self.metrics[metric]
        for spec in self.ratios:
            if spec.name == metric:
                base = self.metrics.get(spec.metric)
                direction = base.direction if base else "none"
                return MetricRule(metric, "normalised", direction, spec.tolerance, (spec.stat,))
        return MetricRule(metric, "info", "none", 0.0, known=False)


_GATE_KEYS: dict[str, type] = {"alpha": float, "confidence": float, "missing_cells": str,
                               "failed_cells": str}
_METRIC_KEYS: dict[str, type] = {"kind": str, "direction": str, "tolerance": float, "stats": list,
                                 "samples_from": list}
_RATIO_KEYS: dict[str, type] = {"metric": str, "vary": list, "reference": dict, "stat": str,
                                "tolerance": float}
_TOP_KEYS: dict[str, type] = {"gate": dict, "metrics": dict, "ratios": list}
_CHOICES: dict[str, tuple[str, ...]] = {
    "kind": KINDS, "direction": DIRECTIONS,
    "missing_cells": ("warn", "fail"), "failed_cells": ("warn", "fail"),
}


def default_rules_path() -> Path:
    return Path(str(resources.files("loopscope.reports") / "gate_rules.toml"))


def load_rules(path: str | Path | None = None) -> Rules:
    """The shipped defaults, with the file at `path` (if given) laid over them key by key."""
    default_path = default_rules_path()
    merged = _check_rules_file(_read_toml(default_path), default_path)
    source = str(default_path)
    if path is not None:
        user_path = Path(path)
        user = _check_rules_file(_read_toml(user_path), user_path)
        merged["gate"] = {**merged.get("gate", {}), **user.get("gate", {})}
        metrics = {name: dict(table) for name, table in merged.get("metrics", {}).items()}
        for name, table in user.get("metrics", {}).items():
            metrics[name] = {**metrics.get(name, {}), **table}
        merged["metrics"] = metrics
        if "ratios" in user:
            merged["ratios"] = user["ratios"]
        source = f"{default_path} + {user_path}"
        return _build_rules(merged, user_path, source)
    return _build_rules(merged, default_path, source)


def _read_toml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise RulesError(f"{path}: no such rules file")
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise RulesError(f"{path}: not valid TOML ({exc})") from exc


def _check_type(value: Any, expected: type, path: Path, key: str) -> Any:
    """Check one value's type; ints are accepted for floats, bools never for numbers."""
    if expected is float:
        ok = isinstance(value, int | float) and not isinstance(value, bool)
        name = "a number"
    else:
        ok = isinstance(value, expected)
        name = {str: "a string", list: "an array", dict: "a table"}[expected]
    if not ok:
        raise RulesError(f"{path}: key '{key}' must be {name}, got {type(value).__name__} {value!r}")
    if key.rsplit(".", 1)[-1] in _CHOICES and value not in _CHOICES[key.rsplit(".", 1)[-1]]:
        choices = ", ".join(_CHOICES[key.rsplit(".", 1)[-1]])
        raise RulesError(f"{path}: key '{key}' is {value!r}; expected one of {choices}")
    return float(value) if expected is float else value


def _check_keys(table: dict[str, Any], allowed: dict[str, type], path: Path, prefix: str) -> dict[str, Any]:
    out = {}
    for key, value in table.items():
        full = f"{prefix}{key}"
        if key not in allowed:
            raise RulesError(f"{path}: unknown key '{full}' (known: {', '.join(allowed)})")
        out[key] = _check_type(value, allowed[key], path, full)
    return out


def _check_rules_file(raw: dict[str, Any], path: Path) -> dict[str, Any]:
    """Unknown keys and wrong types, per file, so the error names the file that has them."""
    top = _check_keys(raw, _TOP_KEYS, path, "")
    checked: dict[str, Any] = {}
    if "gate" in top:
        gate = _check_keys(top["gate"], _GATE_KEYS, path, "gate.")
        for key in ("alpha", "confidence"):
            if key in gate and not 0.0 < gate[key] < 1.0:
                raise RulesError(f"{path}: key 'gate.{key}' is {gate[key]}; expected a number in (0, 1)")
        checked["gate"] = gate
    if "metrics" in top:
        checked["metrics"] = {}
        for name, table in top["metrics"].items():
            _check_type(table, dict, path, f"metrics.{name}")
            rule = _check_keys(table, _METRIC_KEYS, path, f"metrics.{name}.")
            _check_tolerance(rule, path, f"metrics.{name}")
            for key in ("stats", "samples_from"):
                if key in rule:
                    _check_str_list(rule[key], path, f"metrics.{name}.{key}")
            checked["metrics"][name] = rule
    if "ratios" in top:
        checked["ratios"] = []
        for i, table in enumerate(top["ratios"]):
            _check_type(table, dict, path, f"ratios[{i}]")
            spec = _check_keys(table, _RATIO_KEYS, path, f"ratios[{i}].")
            _check_tolerance(spec, path, f"ratios[{i}]")
            checked["ratios"].append(_check_ratio(spec, path, f"ratios[{i}]"))
    return checked


def _check_tolerance(table: dict[str, Any], path: Path, where: str) -> None:
    if "tolerance" in table and not (table["tolerance"] >= 0.0 and math.isfinite(table["tolerance"])):
        raise RulesError(f"{path}: key '{where}.tolerance' is {table['tolerance']}; expected >= 0")


def _check_str_list(values: list[Any], path: Path, key: str) -> None:
    for value in values:
        if not isinstance(value, str):
            raise RulesError(f"{path}: key '{key}' must hold strings, got {type(value).__name__} {value!r}")


def _check_ratio(spec: dict[str, Any], path: Path, where: str) -> dict[str, Any]:
    for key in ("metric", "vary", "reference"):
        if key not in spec:
            raise RulesError(f"{path}: key '{where}.{key}' is required")
    _check_str_list(spec["vary"], path, f"{where}.vary")
    for axis in spec["vary"]:
        if axis not in AXES:
            raise RulesError(f"{path}: key '{where}.vary' names {axis!r}, not an axis ({', '.join(AXES)})")
    for axis, value in spec["reference"].items():
        if axis not in spec["vary"]:
            raise RulesError(f"{path}: key '{where}.reference.{axis}' is not one of the `vary` axes")
        if not isinstance(value, str | int | float) or isinstance(value, bool):
            raise RulesError(f"{path}: key '{where}.reference.{axis}' must be a string or number, "
                             f"got {type(value).__name__} {value!r}")
    if not spec["reference"]:
        raise RulesError(f"{path}: key '{where}.reference' is empty; name the reference cell's axis values")
    return spec


def _build_rules(merged: dict[str, Any], path: Path, source: str) -> Rules:
    metrics = {}
    for name, table in merged.get("metrics", {}).items():
        for key in ("kind", "direction", "tolerance"):
            if key not in table:
                raise RulesError(f"{path}: key 'metrics.{name}.{key}' is required for a new metric")
        stats = tuple(table["stats"]) if "stats" in table else None
        metrics[name] = MetricRule(name, table["kind"], table["direction"], table["tolerance"], stats,
                                   tuple(table.get("samples_from", ())))
    ratios = tuple(
        RatioSpec(
            metric=spec["metric"],
            vary=tuple(spec["vary"]),
            reference=tuple((axis, axis_text(spec["reference"][axis])) for axis in spec["vary"]
                            if axis in spec["reference"]),
            stat=spec.get("stat", "median"),
            tolerance=spec.get("tolerance", 0.15),
        )
        for spec in merged.get("ratios", [])
    )
    gate = merged.get("gate", {})
    return Rules(metrics=metrics, ratios=ratios, alpha=gate.get("alpha", 0.01),
                 confidence=gate.get("confidence", 0.95), missing_cells=gate.get("missing_cells", "warn"),
                 failed_cells=gate.get("failed_cells", "fail"), source=source)


# ---------------------------------------------------------------------------------------------------
# 2. Fingerprints

# A fingerprint leaf names the hardware when its path mentions a device and its key names a model,
# a class or a count (not a driver version, a clock or a temperature, which vary on one machine).
_HARDWARE_PATH_WORDS = ("cpu", "gpu", "device", "processor", "accelerator", "machine")
_HARDWARE_LEAF_WORDS = ("model", "name", "brand", "class", "count", "cores", "machine", "arch")
_NOT_HARDWARE_WORDS = ("reason", "uuid", "version", "serial")


def hardware_differences(base: Mapping[str, Any], cand: Mapping[str, Any]) -> list[str]:
    """Fingerprint entries that identify the hardware and differ, as 'key: base -> cand' lines."""
    a, b = _hardware_leaves(base), _hardware_leaves(cand)
    return [f"{key}: {a.get(key)!r} -> {b.get(key)!r}" for key in sorted(set(a) | set(b))
            if a.get(key) != b.get(key)]


def _hardware_leaves(fingerprint: Mapping[str, Any]) -> dict[str, Any]:
    leaves = {}
    for key, value in _flatten(fingerprint).items():
        path = key.lower()
        leaf = path.rsplit(".", 1)[-1]
        if (any(w in path for w in _HARDWARE_PATH_WORDS) and any(w in leaf for w in _HARDWARE_LEAF_WORDS)
                and not any(w in leaf for w in _NOT_HARDWARE_WORDS)):
            leaves[key] = value
    return leaves


def _flatten(obj: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(obj, Mapping):
        out: dict[str, Any] = {}
        for key, value in obj.items():
            out.update(_flatten(value, f"{prefix}{key}."))
        return out
    if isinstance(obj, list | tuple):
        out = {}
        for i, value in enumerate(obj):
            out.update(_flatten(value, f"{prefix}{i}."))
        return out
    return {prefix.rstrip("."): obj}


# ---------------------------------------------------------------------------------------------------
# 3. In-run ratios


def add_in_run_ratios(run: RunData, rules: Rules) -> tuple[RunData, list[str]]:
    """Append each ratio rule's derived metric to the run (rows and samples); notes say what was skipped.

    A derived sample is a cell's raw sample divided by the median of its reference cell's samples:
    the test then sees the cell's noise; the reference's noise moves the ratio's point value only.
    """
    if not rules.ratios:
        return run, []
    ok = run.results[(run.results["status"] == "ok") & np.isfinite(run.results["value"])]
    index = rows_by_cell(run)
    new_rows: list[dict[str, Any]] = []
    new_samples: list[pd.DataFrame] = []
    notes = []
    for spec in rules.ratios:
        rows = ok[(ok["metric"] == spec.metric) & (ok["stat"] == spec.stat)]
        if rows.empty:
            continue
        fixed_axes = [a for a in AXES if a not in spec.vary]
        is_reference = np.ones(len(rows), dtype=bool)
        for axis, value in spec.reference:
            is_reference &= rows[axis].map(axis_text).to_numpy() == value
        references: dict[tuple[str, ...], list[dict[str, Any]]] = {}
        for row in rows[is_reference].to_dict("records"):
            references.setdefault(tuple(axis_text(row[a]) for a in fixed_axes), []).append(row)
        if not references:
            notes.append(f"run {run.run_id}: ratio {spec.name}: no reference cell, ratio not derived")
            continue
        ambiguous = 0
        for row in rows[~is_reference].to_dict("records"):
            refs = references.get(tuple(axis_text(row[a]) for a in fixed_axes), [])
            if len(refs) != 1:
                ambiguous += len(refs) > 1
                continue
            ref = refs[0]
            if not ref["value"]:
                continue
            derived = dict(row, metric=spec.name, value=row["value"] / ref["value"], unit="ratio",
                           source=f"in-run ratio to cell {ref['cell_id']}", ci_low=math.nan, ci_high=math.nan)
            metric_rule = rules.rule_for(spec.metric)
            cell_samples, _ = metric_samples(run, row["cell_id"], spec.metric, metric_rule,
                                             index[row["cell_id"]])
            ref_samples, _ = metric_samples(run, ref["cell_id"], spec.metric, metric_rule,
                                            index[ref["cell_id"]])
            derived["n_samples"] = int(cell_samples.size) if ref_samples.size else 0
            new_rows.append(derived)
            if cell_samples.size and ref_samples.size:
                new_samples.append(pd.DataFrame({
                    "run_id": run.run_id, "cell_id": row["cell_id"], "metric": spec.name, "unit": "ratio",
                    "index": np.arange(cell_samples.size), "value": cell_samples / np.median(ref_samples),
                }))
        if ambiguous:
            notes.append(f"run {run.run_id}: ratio {spec.name}: {ambiguous} cell(s) have several reference "
                         f"cells (add the differing axis to `vary`); skipped")
    if not new_rows:
        return run, notes
    results = pd.concat([run.results, pd.DataFrame(new_rows)], ignore_index=True)
    samples = pd.concat([run.samples, *new_samples], ignore_index=True) if new_samples else run.samples
    return make_run_data(run.path, run.manifest, results, samples, run.notes), notes


# ---------------------------------------------------------------------------------------------------
# 4. Cell matching


@dataclass(frozen=True)
class CellPairs:
    pairs: tuple[tuple[str, str, str], ...]  # (base cell_id, candidate cell_id, "cell_id" | "axes")
    only_base: pd.DataFrame  # cell tables (rundir.cell_table columns)
    only_cand: pd.DataFrame


def match_cells(base_cells: pd.DataFrame, cand_cells: pd.DataFrame) -> CellPairs:
    """Pair cells by cell_id; pair the rest by their axes when those are unique on both sides."""
    cand_ids = set(cand_cells["cell_id"])
    pairs = [(cid, cid, "cell_id") for cid in base_cells["cell_id"] if cid in cand_ids]
    paired = {cid for cid, _, _ in pairs}
    rest_base = base_cells[~base_cells["cell_id"].isin(paired)]
    rest_cand = cand_cells[~cand_cells["cell_id"].isin(paired)]

    def by_axes(cells: pd.DataFrame) -> dict[tuple[str, ...], str]:
        keys: dict[tuple[str, ...], list[str]] = {}
        for row in cells.to_dict("records"):
            keys.setdefault(tuple(axis_text(row[a]) for a in AXES), []).append(row["cell_id"])
        return {key: ids[0] for key, ids in keys.items() if len(ids) == 1}

    base_keys, cand_keys = by_axes(rest_base), by_axes(rest_cand)
    for key, base_id in base_keys.items():
        if key in cand_keys:
            pairs.append((base_id, cand_keys[key], "axes"))
    matched_base = {b for b, _, _ in pairs}
    matched_cand = {c for _, c, _ in pairs}
    only_base = base_cells[~base_cells["cell_id"].isin(matched_base)].reset_index(drop=True)
    only_cand = cand_cells[~cand_cells["cell_id"].isin(matched_cand)].reset_index(drop=True)
    return CellPairs(tuple(pairs), only_base, only_cand)


# ---------------------------------------------------------------------------------------------------
# 5. Rows: statistics and verdicts

TABLE_COLUMNS = (
    "cell", "base_cell_id", "cand_cell_id", "matched_by", "metric", "stat", "unit", "kind", "direction",
    "tolerance", "base", "cand", "ratio", "ci_low", "ci_high", "p_value", "n_base", "n_cand", "verdict",
    "note",
)
_MAX_BOOTSTRAP_ELEMENTS = 4_000_000  # resamples x sample size, to bound memory for very long samples


def relative_change(base: float, cand: float) -> float:
    """(cand - base) / |base|, with a change from 0 counted as infinitely large."""
    if base == 0:
        return 0.0 if cand == 0 else math.copysign(math.inf, cand - base)
    return (cand - base) / abs(base)


def stat_estimator(stat: str) -> Callable[..., np.ndarray] | None:
    """The numpy statistic (with an `axis` argument) that a `stat` name stands for, if any."""
    s = stat.lower()
    if s in ("median", "p50"):
        return np.median
    if s == "mean":
        return np.mean
    match = re.fullmatch(r"p(\d+(?:\.\d+)?)", s)
    if match and 0 < float(match.group(1)) < 100:
        q = float(match.group(1)) / 100.0
        return lambda x, axis=None: np.quantile(x, q, axis=axis)
    return None  # min, max, stddev, iqr: no bootstrap CI worth giving


def sample_ratio_ci(base: np.ndarray, cand: np.ndarray, stat: str, *, level: float,
                    seed: int = 0) -> tuple[float, float]:
    """Bootstrap CI of statistic(cand) / statistic(base); the median goes through bench.stats.ratio_ci."""
    estimator = stat_estimator(stat)
    if estimator is None or base.size < 2 or cand.size < 2:
        return math.nan, math.nan
    resamples = int(min(DEFAULT_RESAMPLES, max(200, _MAX_BOOTSTRAP_ELEMENTS // max(base.size, cand.size))))
    if estimator is np.median:
        _, low, high = ratio_ci(base, cand, level=level, seed=seed, resamples=resamples)
        return low, high
    rng = np.random.default_rng(seed)
    sb = estimator(base[rng.integers(0, base.size, size=(resamples, base.size))], axis=1)
    sc = estimator(cand[rng.integers(0, cand.size, size=(resamples, cand.size))], axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        boot = sc / sb
    alpha = (1.0 - level) / 2.0
    return float(np.quantile(boot, alpha)), float(np.quantile(boot, 1.0 - alpha))


def judge(rule: MetricRule, base: float, cand: float, ci_low: float, ci_high: float, p: float,
          alpha: float) -> tuple[str, str]:
    """Verdict and a short reason for one (cell, metric, stat)."""
    if not (math.isfinite(base) and math.isfinite(cand)):
        missing = [side for side, v in (("base", base), ("candidate", cand)) if not math.isfinite(v)]
        return "unknown", f"not measured in {' and '.join(missing)}"
    tol = rule.tolerance
    rel = relative_change(base, cand)
    if rule.kind in NOISE_TESTED_KINDS:
        if math.isfinite(ci_low) and math.isfinite(ci_high) and math.isfinite(p):
            return _judge_noisy(rule.direction, tol, ci_low, ci_high, p, alpha)
        if abs(rel) <= tol:
            return "same", "no raw samples; point values within tolerance"
        return "unknown", f"no raw samples: a {rel:+.1%} change cannot be told from noise"
    if abs(rel) <= tol:
        return "same", "within tolerance" if tol else "equal"
    if rule.direction == "none":
        return "changed", f"changed by {rel:+.3g} (relative), tolerance {tol:g}"
    worse = rel > tol if rule.direction == "lower" else rel < -tol
    return ("worse" if worse else "better"), f"{rel:+.2%} vs tolerance {tol:.2%}"


def _judge_noisy(direction: str, tol: float, ci_low: float, ci_high: float, p: float,
                 alpha: float) -> tuple[str, str]:
    low_band, high_band = 1.0 - tol, 1.0 + tol
    significant = p < alpha
    if direction == "lower":
        worse_beyond, better_beyond, fine = ci_low > high_band, ci_high < low_band, ci_high <= high_band
    elif direction == "higher":
        worse_beyond, better_beyond, fine = ci_high < low_band, ci_low > high_band, ci_low >= low_band
    else:
        worse_beyond = ci_low > high_band or ci_high < low_band
        better_beyond, fine = False, low_band <= ci_low and ci_high <= high_band
    ci_text = f"CI [{ci_low:.3f}, {ci_high:.3f}], p={p:.2g}"
    if significant and worse_beyond:
        return ("worse" if direction != "none" else "changed"), f"{ci_text}: wholly beyond ±{tol:.0%}"
    if significant and better_beyond:
        return "better", f"{ci_text}: wholly beyond ±{tol:.0%}"
    if fine:
        return "same", f"{ci_text}: no change beyond ±{tol:.0%} in the bad direction"
    why = "not significant" if not significant else "CI reaches inside the tolerance"
    return "unknown", f"{ci_text}: {why}"


CellRows = dict[tuple[str, str], dict[str, Any]]  # (metric, stat) -> result row of one cell


def rows_by_cell(run: RunData) -> dict[str, CellRows]:
    """cell_id -> its rows by (metric, stat); a duplicated row (a resumed run) keeps the last one."""
    out: dict[str, CellRows] = {}
    for row in run.results.to_dict("records"):
        out.setdefault(row["cell_id"], {})[(row["metric"], row["stat"])] = row
    return out


def metric_samples(run: RunData, cell_id: str, metric: str, rule: MetricRule,
                   rows: CellRows) -> tuple[np.ndarray, str]:
    """A cell's raw samples of `metric` and the metric they came from.

    Its own samples when the run kept them; otherwise, for a metric inversely proportional to a timed
    one (tokens/s, MFU), k / samples of the first `rule.samples_from` metric the cell has, with k set so
    that their median (or mean) reproduces the metric's median (or mean) row. The rank test is then
    the test of the timed samples, and the CI is that of the metric's own statistic.
    """
    own = run.samples_for(cell_id, metric)
    if own.size or not rule.samples_from:
        return own, metric if own.size else ""
    for source in rule.samples_from:
        timed = run.samples_for(cell_id, source)
        if timed.size == 0 or not np.all(timed > 0):
            continue
        for stat, centre in (("median", np.median), ("mean", np.mean)):
            row = rows.get((metric, stat))
            if row is not None and math.isfinite(row["value"]) and row["value"] > 0:
                return row["value"] * centre(timed) / timed, source
    return np.empty(0), ""


def compare_cells(base: RunData, cand: RunData, base_rows: CellRows, cand_rows: CellRows, matched_by: str,
                  label: str, rules: Rules, keep_kinds: tuple[str, ...] | None) -> list[dict[str, Any]]:
    """Rows for one pair of cells: every (metric, stat) in either run, judged by its rule."""
    base_id = next(iter(base_rows.values()))["cell_id"]
    cand_id = next(iter(cand_rows.values()))["cell_id"]
    out = []
    for metric, stat in sorted(set(base_rows) | set(cand_rows)):
        rule = rules.rule_for(metric)
        if keep_kinds is not None and rule.kind not in keep_kinds:
            continue
        b_row, c_row = base_rows.get((metric, stat)), cand_rows.get((metric, stat))
        b_value = b_row["value"] if b_row is not None else math.nan
        c_value = c_row["value"] if c_row is not None else math.nan
        b_samples, b_source = metric_samples(base, base_id, metric, rule, base_rows)
        c_samples, _ = metric_samples(cand, cand_id, metric, rule, cand_rows)
        ci_low = ci_high = p = math.nan
        if b_samples.size >= 2 and c_samples.size >= 2 and math.isfinite(b_value) and math.isfinite(c_value):
            ci_low, ci_high = sample_ratio_ci(b_samples, c_samples, stat, level=rules.confidence)
            p = mann_whitney_p(b_samples, c_samples) if math.isfinite(ci_low) else math.nan
        verdict, note = judge(rule, b_value, c_value, ci_low, ci_high, p, rules.alpha)
        for side, row in (("base", b_row), ("candidate", c_row)):
            if row is None:
                note = f"absent from the {side} run"
            elif row["status"] != "ok":
                verdict, note = "unknown", f"{side} status={row['status']} {row['reason']}".strip()
        if not rule.known:
            note = f"no rule for this metric (reported only); {note}"
        elif b_source and b_source != metric and math.isfinite(ci_low):
            note = f"{note} (samples: 1/{b_source})"
        with np.errstate(divide="ignore", invalid="ignore"):
            ratio = c_value / b_value if b_value != 0 else math.nan
        unit = (c_row if c_row is not None else b_row)["unit"]
        out.append(dict(cell=label, base_cell_id=base_id, cand_cell_id=cand_id, matched_by=matched_by,
                        metric=metric, stat=stat, unit=unit, kind=rule.kind, direction=rule.direction,
                        tolerance=rule.tolerance, base=b_value, cand=c_value, ratio=ratio, ci_low=ci_low,
                        ci_high=ci_high, p_value=p, n_base=int(b_samples.size), n_cand=int(c_samples.size),
                        verdict=verdict, note=note))
    return out


def _status_row(base_cell: Mapping[str, Any], cand_cell: Mapping[str, Any], matched_by: str) -> dict | None:
    """A row for a cell whose status changed between runs (a crash is a regression of its own)."""
    b, c = base_cell["status"], cand_cell["status"]
    if b == c == "ok":
        return None
    if b == "ok":
        verdict, note = "worse", f"candidate cell failed: status={c} {cand_cell['reason']}".strip()
    elif c == "ok":
        verdict, note = "better", f"base cell had status={b}; candidate ok"
    else:
        verdict, note = "unknown", f"not ok in either run: base status={b}, candidate status={c}"
    return dict(cell=cand_cell["label"], base_cell_id=base_cell["cell_id"], cand_cell_id=cand_cell["cell_id"],
                matched_by=matched_by, metric="status", stat="", unit="", kind="status", direction="none",
                tolerance=0.0, base=math.nan, cand=math.nan, ratio=math.nan, ci_low=math.nan,
                ci_high=math.nan, p_value=math.nan, n_base=0, n_cand=0, verdict=verdict, note=note)


# ---------------------------------------------------------------------------------------------------
# 6. The result and its renderings


@dataclass(frozen=True)
class CompareResult:
    base_run_id: str
    cand_run_id: str
    table: pd.DataFrame  # TABLE_COLUMNS, one row per (cell pair, metric, stat)
    only_base: pd.DataFrame  # cells only in the base run (cell_id, axes, label, status, reason)
    only_cand: pd.DataFrame
    fingerprint_note: str | None  # set when the hardware differs
    hardware_differs: bool
    n_pairs: int = 0  # cells found in both runs
    notes: tuple[str, ...] = ()
    rules: Rules | None = field(default=None, repr=False)

    def changed_only(self) -> CompareResult:
        """Only the rows whose verdict is better, worse or changed (`compare --changed`); counts stay whole
        in a note so the reader knows what was left out."""
        keep = self.table["verdict"].isin(CHANGED_VERDICTS)
        counts = self.counts()
        note = (f"--changed: {int(keep.sum())} of {len(self.table)} rows shown ("
                + ", ".join(f"{v}: {counts[v]}" for v in VERDICTS) + ")")
        return dataclasses.replace(self, table=self.table[keep].reset_index(drop=True), notes=(*self.notes, note))

    def counts(self) -> dict[str, int]:
        counts = self.table["verdict"].value_counts()
        return {v: int(counts.get(v, 0)) for v in VERDICTS}

    def full_table(self) -> pd.DataFrame:
        """The table plus one row per unmatched cell, with a `presence` column saying which."""
        both = self.table.assign(presence="both")
        extra = []
        for presence, cells, id_col in (("base_only", self.only_base, "base_cell_id"),
                                        ("cand_only", self.only_cand, "cand_cell_id")):
            for cell in cells.to_dict("records"):
                extra.append({"cell": cell["label"], id_col: cell["cell_id"], "presence": presence,
                              "verdict": "unknown", "note": f"cell only in the {presence.split('_')[0]} run"})
        if not extra:
            return both
        return pd.concat([both, pd.DataFrame(extra)], ignore_index=True).reindex(columns=both.columns)

    def to_csv(self) -> str:
        buffer = io.StringIO()
        self.full_table().to_csv(buffer, index=False)
        return buffer.getvalue()

    def to_json(self) -> str:
        doc = {
            "base_run_id": self.base_run_id,
            "cand_run_id": self.cand_run_id,
            "hardware_differs": self.hardware_differs,
            "fingerprint_note": self.fingerprint_note,
            "notes": list(self.notes),
            "counts": self.counts(),
            "rows": _records(self.table),
            "only_in_base": _records(self.only_base),
            "only_in_candidate": _records(self.only_cand),
        }
        return json.dumps(doc, indent=2, allow_nan=False, default=str) + "\n"

    def to_markdown(self) -> str:
        lines = [f"## loopscope compare: `{md(self.base_run_id)}` → `{md(self.cand_run_id)}`", ""]
        if self.fingerprint_note:
            lines += [f"> **{md(self.fingerprint_note)}**", ""]
        counts = self.counts()
        lines += [" · ".join(f"{v}: {counts[v]}" for v in VERDICTS), ""]
        for note in self.notes:
            lines.append(f"- {md(note)}")
        if self.notes:
            lines.append("")
        headers = ["cell", "metric", "stat", "unit", "base", "cand", "ratio", "95% CI", "p", "verdict", "note"]
        body = [[r["cell"], r["metric"], r["stat"], r["unit"], fmt_value(r["base"]), fmt_value(r["cand"]),
                 fmt_ratio(r["ratio"]), fmt_ci(r["ci_low"], r["ci_high"]), fmt_p(r["p_value"]),
                 r["verdict"], r["note"]] for r in self.table.to_dict("records")]
        lines += markdown_table(headers, body) if body else ["(no metrics in common)"]
        for title, cells in (("Only in base", self.only_base), ("Only in candidate", self.only_cand)):
            if len(cells):
                lines += ["", f"**{title}** ({len(cells)}):"]
                lines += [f"- {md(c['label'])} (`{md(c['cell_id'])}`, status {md(c['status'])})"
                          for c in cells.to_dict("records")]
        return "\n".join(lines) + "\n"

    def render(self, fmt: str = "markdown") -> str:
        if fmt not in FORMATS:
            raise ValueError(f"unknown compare format {fmt!r}; expected one of {', '.join(FORMATS)}")
        return {"markdown": self.to_markdown, "csv": self.to_csv, "json": self.to_json}[fmt]()


def md(text: Any) -> str:
    """Text from a profile or a file, made inert in Markdown (and the HTML GitHub allows in it)."""
    return html.escape(str(text), quote=False).replace("|", "\\|").replace("\n", " ").replace("`", "'")


def markdown_table(headers: list[str], rows: list[list[Any]]) -> list[str]:
    lines = ["| " + " | ".join(md(h) for h in headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(md(c) for c in row) + " |" for row in rows]
    return lines


def fmt_value(v: float) -> str:
    if not math.isfinite(v):
        return "—" if math.isnan(v) else str(v)
    if float(v).is_integer() and abs(v) < 1e15:
        return f"{int(v):,}"
    return f"{v:.4g}"


def fmt_ratio(v: float) -> str:
    return f"{v:.3f}" if math.isfinite(v) else "—"


def fmt_ci(low: float, high: float) -> str:
    return f"[{low:.3f}, {high:.3f}]" if math.isfinite(low) and math.isfinite(high) else "—"


def fmt_p(p: float) -> str:
    return f"{p:.2g}" if math.isfinite(p) else "—"


def _records(df: pd.DataFrame) -> list[dict[str, Any]]:
    """Rows as JSON-safe dicts: NaN and NA become null, numpy scalars plain numbers."""
    out = []
    for row in df.to_dict("records"):
        clean = {}
        for key, value in row.items():
            if value is None or value is pd.NA or (isinstance(value, float) and not math.isfinite(value)):
                clean[key] = None
            elif isinstance(value, np.generic):
                clean[key] = value.item()
            else:
                clean[key] = value
        out.append(clean)
    return out


# ---------------------------------------------------------------------------------------------------
# Entry points


def compare_run_data(base: RunData, cand: RunData, *, rules: Rules,
                     all_metrics: bool = False) -> CompareResult:
    """Compare two loaded runs (see `compare_runs` for the path-taking entry point)."""
    base, base_notes = add_in_run_ratios(base, rules)
    cand, cand_notes = add_in_run_ratios(cand, rules)
    notes = [*base.notes, *cand.notes, *base_notes, *cand_notes]

    differences = hardware_differences(base.fingerprint, cand.fingerprint)
    fingerprint_note = None
    keep_kinds: tuple[str, ...] | None = None
    if differences:
        shown = "; ".join(differences[:4])
        if len(differences) > 4:
            shown += f"; and {len(differences) - 4} more"
        if all_metrics:
            fingerprint_note = f"Fingerprints differ ({shown}): all metrics compared as asked."
        else:
            keep_kinds = HARDWARE_FREE_KINDS
            fingerprint_note = (f"Fingerprints differ ({shown}): only hardware-normalised and deterministic "
                                f"metrics are compared (ask for all metrics to include the others).")

    base_cells, cand_cells = base.cells(), cand.cells()
    base_index, cand_index = rows_by_cell(base), rows_by_cell(cand)
    pairing = match_cells(base_cells, cand_cells)
    base_by_id = base_cells.set_index("cell_id", drop=False)
    cand_by_id = cand_cells.set_index("cell_id", drop=False)
    rows: list[dict[str, Any]] = []
    by_axes = 0
    for base_id, cand_id, matched_by in pairing.pairs:
        base_cell, cand_cell = base_by_id.loc[base_id].to_dict(), cand_by_id.loc[cand_id].to_dict()
        by_axes += matched_by == "axes"
        status = _status_row(base_cell, cand_cell, matched_by)
        if status is not None:
            rows.append(status)
        rows += compare_cells(base, cand, base_index[base_id], cand_index[cand_id], matched_by,
                              cand_cell["label"], rules, keep_kinds)
    if by_axes:
        notes.append(f"{by_axes} cell(s) matched on their axes because their cell_id differs between runs")
    unknown_metrics = sorted({r["metric"] for r in rows
                              if r["kind"] != "status" and not rules.rule_for(r["metric"]).known})
    if unknown_metrics:
        notes.append(f"no rule for metric(s) {', '.join(unknown_metrics)}: reported, never gated "
                     f"(add them to the rules file)")
    if keep_kinds is not None:
        dropped = _count_dropped(base, pairing, keep_kinds, rules)
        if dropped:
            notes.append(f"{dropped} hardware-dependent metric row(s) of the base run left out")
    table = pd.DataFrame(rows, columns=list(TABLE_COLUMNS))
    return CompareResult(base.run_id, cand.run_id, table, pairing.only_base, pairing.only_cand,
                         fingerprint_note, bool(differences), len(pairing.pairs), tuple(notes), rules)


def _count_dropped(base: RunData, pairing: CellPairs, keep_kinds: tuple[str, ...], rules: Rules) -> int:
    paired = {b for b, _, _ in pairing.pairs}
    rows = base.results[base.results["cell_id"].isin(paired)]
    return int(sum(rules.rule_for(m).kind not in keep_kinds for m in rows["metric"]))


def compare_runs(base: Path, cand: Path, *, all_metrics: bool = False,
                 rules: Path | None = None) -> CompareResult:
    """Load two runs (directories or pytest-benchmark JSON files) and compare them."""
    return compare_run_data(load_run(base), load_run(cand), rules=load_rules(rules), all_metrics=all_metrics)


def compare_table(base_dir: Path, cand_dir: Path, *, all_metrics: bool = False,
                  rules_path: Path | None = None) -> pd.DataFrame:
    """The comparison as a DataFrame (TABLE_COLUMNS plus `presence`, unmatched cells included)."""
    return compare_runs(base_dir, cand_dir, all_metrics=all_metrics, rules=rules_path).full_table()


def compare(base_dir: Path, cand_dir: Path, *, fmt: str = "markdown", all_metrics: bool = False,
            rules_path: Path | None = None) -> str:
    """The comparison rendered as Markdown, CSV or JSON text."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown compare format {fmt!r}; expected one of {', '.join(FORMATS)}")
    return compare_runs(base_dir, cand_dir, all_metrics=all_metrics, rules=rules_path).render(fmt)
