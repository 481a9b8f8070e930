"""The regression gate: a comparison (compare.py) plus a pass / warn / fail decision per row.

Exit code 1 when anything fails, 0 otherwise; unusable input raises `UnusableRunError` (the CLI's 2).
A row fails when its verdict is `worse` (or `changed`, for metrics without a direction) on a stat the
rule gates; `unknown` passes with a warning.

Timing and normalised rows are noisy, and the noise that matters varies between processes, not between
the calls inside one: each run (directory or pytest-benchmark file) is one process-level replicate. With
several runs per side, such a row is judged across them (abjudge: fail / unresolved / pass, with the
noise floor measured from the runs of each side); with one run per side the noise floor is unknown and
the row is `unresolved` (printed, never failing), however small a within-process p-value would be.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from loopscope.reports.compare import (
    NOISE_TESTED_KINDS,
    CompareResult,
    Rules,
    RulesError,
    compare_run_data,
    fmt_ci,
    fmt_p,
    fmt_value,
    load_rules,
)
from loopscope.reports.rundir import RunData, UnusableRunError, load_run

__all__ = ["GateResult", "Rules", "RulesError", "UnusableRunError", "gate", "gate_runs", "load_rules"]

OUTCOMES = ("fail", "warn", "unresolved", "pass", "report")


@dataclass(frozen=True)
class GateResult:
    table: pd.DataFrame  # compare.TABLE_COLUMNS + gated (bool) + outcome (fail | warn | pass | report)
    warnings: tuple[str, ...]  # run-level warnings (hardware differs, missing cells, metrics without rules)
    failures: tuple[str, ...]  # run-level failures (missing cells when the rules say so)
    comparison: CompareResult

    @property
    def exit_code(self) -> int:
        return 1 if self.failed else 0

    @property
    def failed(self) -> bool:
        return bool((self.table["outcome"] == "fail").any()) or bool(self.failures)

    @property
    def regressions(self) -> pd.DataFrame:
        return self.table[self.table["outcome"] == "fail"].reset_index(drop=True)

    @property
    def row_warnings(self) -> pd.DataFrame:
        return self.table[self.table["outcome"] == "warn"].reset_index(drop=True)

    def render(self) -> str:
        """Plain-text report: a headline, regressions with by how much, then the warnings."""
        counts = self.table["outcome"].value_counts()
        verdict = "FAIL" if self.failed else "PASS"
        lines = [
            f"loopscope gate: {self.comparison.base_run_id} -> {self.comparison.cand_run_id}: {verdict} "
            f"({int(counts.get('fail', 0))} regression(s), {int(counts.get('warn', 0))} warning(s), "
            f"{int(counts.get('unresolved', 0))} unresolved, "
            f"{int(counts.get('pass', 0))} passed, {int(counts.get('report', 0))} reported only)",
        ]
        if self.comparison.fingerprint_note:
            lines.append(f"note: {self.comparison.fingerprint_note}")
        if len(self.regressions):
            lines += ["", "Regressions:"]
            lines += text_table(_HEADERS, [_text_row(r) for r in self.regressions.to_dict("records")])
        unresolved = self.table[self.table["outcome"] == "unresolved"]
        if len(unresolved):
            lines += ["", "Unresolved (noise floor above the tolerance, or unknown: not failed, not cleared):"]
            lines += text_table(_HEADERS, [_text_row(r) for r in unresolved.to_dict("records")])
        if len(self.row_warnings):
            lines += ["", "Warnings (unknown: passed, but not clearly fine):"]
            lines += text_table(_HEADERS, [_text_row(r) for r in self.row_warnings.to_dict("records")])
        if self.failures or self.warnings:
            lines.append("")
        lines += [f"FAIL: {f}" for f in self.failures] + [f"warning: {w}" for w in self.warnings]
        return "\n".join(lines) + "\n"


def gate_run_data(base_run: RunData, cand_run: RunData, *, rules: Rules,
                  all_metrics: bool = False, base_more: tuple[RunData, ...] = (),
                  cand_more: tuple[RunData, ...] = ()) -> GateResult:
    """Gate two loaded runs (`rundir.RunData`); `base_more`/`cand_more` are further process-level
    replicates of each side, across which timing rows are judged."""
    comparison = compare_run_data(base_run, cand_run, rules=rules, all_metrics=all_metrics)
    if comparison.n_pairs == 0:
        raise UnusableRunError(
            f"{base_run.path} vs {cand_run.path}: no cell in common (by cell_id or axes), nothing to gate; "
            f"was the baseline made with another profile?")
    table = comparison.table.copy()
    gated, outcomes = [], []
    for row in table.to_dict("records"):
        is_gated, outcome = _decide(row, rules)
        gated.append(is_gated)
        outcomes.append(outcome)
    table["gated"] = gated
    table["outcome"] = outcomes
    table = _judge_noisy_rows(table, rules, (base_run, *base_more), (cand_run, *cand_more))
    table = _refuse_invalid_rows(table, (base_run, *base_more), (cand_run, *cand_more))

    warnings, failures = [], []
    if comparison.fingerprint_note:
        warnings.append(comparison.fingerprint_note)
    if len(comparison.only_base):
        labels = ", ".join(comparison.only_base["label"].head(5))
        more = f" and {len(comparison.only_base) - 5} more" if len(comparison.only_base) > 5 else ""
        missing = f"{len(comparison.only_base)} base cell(s) missing from the candidate: {labels}{more}"
        (failures if rules.missing_cells == "fail" else warnings).append(missing)
    cand_cells = cand_run.cells()
    if not (cand_cells["status"] == "ok").any():  # nothing measured is never a pass
        failures.append(f"no cell of the candidate {cand_run.path} is ok ({len(cand_cells)} cell(s), "
                        f"none measured)")
    if len(comparison.only_cand):
        warnings.append(f"{len(comparison.only_cand)} new cell(s) in the candidate, not gated")
    warnings += [n for n in comparison.notes if n.startswith("no rule for metric")]
    if not any(gated):
        warnings.append("nothing was gated: no metric of the common cells has a gating rule "
                        "that applies here")
    return GateResult(table, tuple(warnings), tuple(failures), comparison)


def _refuse_invalid_rows(table: pd.DataFrame, base_runs: tuple[RunData, ...],
                         cand_runs: tuple[RunData, ...]) -> pd.DataFrame:
    """A gated row measured while its machine was busy or throttled, or holding an impossible value (MFU
    above 1, more than the calibrated copy rate), is not judged: `unresolved`, with the flag as its note."""
    from loopscope.reports.validity import OK, validity

    flags: dict[tuple[str, str, str, str], str] = {}
    for side, runs in (("base", base_runs), ("cand", cand_runs)):
        for run in runs:
            if run.results.empty:
                continue
            results = run.results.assign(validity=validity(run.results, run.manifest))
            bad = results[results["validity"] != OK]
            for cid, metric, stat, why in zip(bad["cell_id"], bad["metric"], bad["stat"], bad["validity"],
                                              strict=True):
                flags.setdefault((side, str(cid), str(metric), str(stat)), f"{run.run_id}: {why}")
    if not flags:
        return table
    table = table.copy()
    for i in table.index[table["gated"] & (table["kind"] != "status")]:
        row = table.loc[i]
        metric = str(row["metric"]).split("/", 1)[0]  # an in-run ratio inherits its numerator's flag
        why = [flags.get((side, str(row[f"{side}_cell_id"]), metric, str(row["stat"]))) for side in ("base", "cand")]
        why = [w for w in why if w]
        if why:
            table.loc[i, "outcome"] = "unresolved"
            table.loc[i, "note"] = "not judged, flagged invalid: " + "; ".join(why)
    return table


def _judge_noisy_rows(table: pd.DataFrame, rules: Rules, base_runs: tuple[RunData, ...],
                      cand_runs: tuple[RunData, ...]) -> pd.DataFrame:
    """Timing and normalised rows judged across runs, one value per run (a process-level replicate)."""
    from loopscope.bench.stats import unpaired_change
    from loopscope.reports.abjudge import judge_change
    from loopscope.reports.compare import add_in_run_ratios

    table = table.copy()
    table["noise_floor"] = math.nan
    if rules.ratios:  # the derived in-run ratio metrics, per replicate
        base_runs = tuple(add_in_run_ratios(run, rules)[0] for run in base_runs)
        cand_runs = tuple(add_in_run_ratios(run, rules)[0] for run in cand_runs)
    noisy = table["kind"].isin(NOISE_TESTED_KINDS) & table["gated"] & table["outcome"].isin(("pass", "fail",
                                                                                              "warn"))
    level = max(rules.confidence, 1.0 - rules.alpha)
    for i in table.index[noisy]:
        row = table.loc[i]
        base = [_run_value(run, row["base_cell_id"], row["metric"], row["stat"]) for run in base_runs]
        cand = [_run_value(run, row["cand_cell_id"], row["metric"], row["stat"]) for run in cand_runs]
        change = unpaired_change(base, cand, level=level)
        direction = row["direction"] if row["direction"] in ("higher", "lower") else "lower"
        verdict = judge_change(change, direction, float(row["tolerance"]))
        why = verdict.why
        if len(base_runs) < 2 or len(cand_runs) < 2:
            why = ("noise floor unknown: one run per side (the samples inside one process are not "
                   "replicates); give several runs per side or use --against")
        table.loc[i, ["ci_low", "ci_high", "p_value", "noise_floor"]] = (
            change.ci_low, change.ci_high, change.p_value, change.noise_floor)
        table.loc[i, "outcome"] = verdict.verdict
        table.loc[i, "note"] = f"{why} ({len(base_runs)} vs {len(cand_runs)} runs)"
    return table


def _run_value(run: RunData, cell_id: str, metric: str, stat: str) -> float:
    rows = run.results[(run.results["cell_id"] == cell_id) & (run.results["metric"] == metric)
                       & (run.results["stat"] == stat)]
    if rows.empty or rows.iloc[-1]["status"] != "ok":
        return math.nan
    return float(rows.iloc[-1]["value"])


def _decide(row: dict[str, Any], rules: Rules) -> tuple[bool, str]:
    """(gated, outcome) of one comparison row."""
    verdict = row["verdict"]
    if row["kind"] == "status":
        if verdict == "worse":
            return True, "fail" if rules.failed_cells == "fail" else "warn"
        return True, "warn" if verdict == "unknown" else "pass"  # unknown: failing in both runs
    rule = rules.rule_for(row["metric"])
    if row["kind"] == "info" or not rule.gates_stat(row["stat"]):
        return False, "report"
    base_missing, cand_missing = not math.isfinite(row["base"]), not math.isfinite(row["cand"])
    if base_missing and cand_missing:
        return False, "report"  # measured in neither run (e.g. energy without a meter): nothing to gate
    if base_missing:
        return True, "pass"  # newly measured
    if verdict in ("worse", "changed"):
        return True, "fail"
    if verdict == "unknown":
        return True, "warn"
    return True, "pass"


_HEADERS = ["cell", "metric", "stat", "base", "cand", "change", "CI of ratio", "p", "noise floor", "tolerance",
            "why"]


def _text_row(row: dict[str, Any]) -> list[str]:
    if math.isfinite(row["base"]) and row["base"] != 0 and math.isfinite(row["cand"]):
        change = f"{row['cand'] / row['base'] - 1.0:+.1%}"
    else:
        change = "—"
    tolerance = "" if row["kind"] == "status" else fmt_tolerance(row["tolerance"])
    floor = row.get("noise_floor", math.nan)
    floor_text = "" if row["kind"] not in NOISE_TESTED_KINDS else (
        f"±{floor:.1%}" if isinstance(floor, float) and math.isfinite(floor) else "unknown")
    return [row["cell"], row["metric"], row["stat"], fmt_value(row["base"]), fmt_value(row["cand"]), change,
            fmt_ci(row["ci_low"], row["ci_high"]), fmt_p(row["p_value"]), floor_text, tolerance, row["note"]]


def fmt_tolerance(tolerance: float) -> str:
    return "exact" if tolerance == 0 else f"±{tolerance * 100:.3g}%"


def text_table(headers: list[str], rows: list[list[Any]]) -> list[str]:
    """Columns padded to their widest cell; one line per row."""
    cells = [[str(c) for c in headers]] + [[" ".join(str(c).split()) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return lines


def gate_runs(base: Path | list[Path], cand: Path | list[Path], *, rules: Path | None = None,
              all_metrics: bool = False) -> GateResult:
    """Load runs (directories or pytest-benchmark JSON files; a list per side = process-level replicates,
    the first of each side is the one compared row by row) and gate the candidate."""
    bases = [base] if isinstance(base, Path | str) else list(base)
    cands = [cand] if isinstance(cand, Path | str) else list(cand)
    b_runs, c_runs = [load_run(Path(p)) for p in bases], [load_run(Path(p)) for p in cands]
    return gate_run_data(b_runs[0], c_runs[0], rules=load_rules(rules), all_metrics=all_metrics,
                         base_more=tuple(b_runs[1:]), cand_more=tuple(c_runs[1:]))


def gate(base_dir: Path, cand_dir: Path, *, rules_path: Path | None = None) -> GateResult:
    return gate_runs(base_dir, cand_dir, rules=rules_path)
