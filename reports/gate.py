"""The regression gate: a comparison (compare.py) plus a pass / warn / fail decision per row.

Exit code 1 when anything fails, 0 otherwise; unusable input raises `UnusableRunError` (the CLI's 2).
A row fails when its verdict is `worse` (or `changed`, for metrics without a direction) on a stat the
rule gates; `unknown` passes with a warning. Timing rows reach `worse` only through the noise test
in compare.judge (Mann-Whitney p < alpha AND the bootstrap CI of the ratio wholly beyond tolerance).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from loopscope.reports.compare import (
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

OUTCOMES = ("fail", "warn", "pass", "report")


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
            f"{int(counts.get('pass', 0))} passed, {int(counts.get('report', 0))} reported only)",
        ]
        if self.comparison.fingerprint_note:
            lines.append(f"note: {self.comparison.fingerprint_note}")
        if len(self.regressions):
            lines += ["", "Regressions:"]
            lines += text_table(_HEADERS, [_text_row(r) for r in self.regressions.to_dict("records")])
        if len(self.row_warnings):
            lines += ["", "Warnings (unknown: passed, but not clearly fine):"]
            lines += text_table(_HEADERS, [_text_row(r) for r in self.row_warnings.to_dict("records")])
        if self.failures or self.warnings:
            lines.append("")
        lines += [f"FAIL: {f}" for f in self.failures] + [f"warning: {w}" for w in self.warnings]
        return "\n".join(lines) + "\n"


def gate_run_data(base_run: RunData, cand_run: RunData, *, rules: Rules,
                  all_metrics: bool = False) -> GateResult:
    """Gate two loaded runs (`rundir.RunData`)."""
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


_HEADERS = ["cell", "metric", "stat", "base", "cand", "change", "95% CI of ratio", "p", "tolerance", "why"]


def _text_row(row: dict[str, Any]) -> list[str]:
    if math.isfinite(row["base"]) and row["base"] != 0 and math.isfinite(row["cand"]):
        change = f"{row['cand'] / row['base'] - 1.0:+.1%}"
    else:
        change = "—"
    tolerance = "" if row["kind"] == "status" else fmt_tolerance(row["tolerance"])
    return [row["cell"], row["metric"], row["stat"], fmt_value(row["base"]), fmt_value(row["cand"]), change,
            fmt_ci(row["ci_low"], row["ci_high"]), fmt_p(row["p_value"]), tolerance, row["note"]]


def fmt_tolerance(tolerance: float) -> str:
    return "exact" if tolerance == 0 else f"±{tolerance * 100:.3g}%"


def text_table(headers: list[str], rows: list[list[Any]]) -> list[str]:
    """Columns padded to their widest cell; one line per row."""
    cells = [[str(c) for c in headers]] + [[" ".join(str(c).split()) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return lines


def gate_runs(base: Path, cand: Path, *, rules: Path | None = None, all_metrics: bool = False) -> GateResult:
    """Load two runs (directories or pytest-benchmark JSON files) and gate the candidate."""
    return gate_run_data(load_run(base), load_run(cand), rules=load_rules(rules), all_metrics=all_metrics)


def gate(base_dir: Path, cand_dir: Path, *, rules_path: Path | None = None) -> GateResult:
    return gate_runs(base_dir, cand_dir, rules=rules_path)
