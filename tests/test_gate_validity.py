"""The gate does not judge rows flagged invalid (machine busy, throttled, impossible values)."""

from __future__ import annotations

import json
from pathlib import Path

from loopscope.reports.gate import gate_runs
from tests.rundir_factory import write_synthetic_run

SLOW_CELL = 3


def _runs(tmp_path: Path, side: str, seeds: range, **kwargs) -> list[Path]:
    return [write_synthetic_run(tmp_path / f"{side}{s}", run_id=f"{side}{s}", seed=s, **kwargs) for s in seeds]


def _mark_busy(run: Path, cell_index: int) -> None:
    from tests.rundir_factory import default_cells

    manifest_path = run / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    cell_id = default_cells()[cell_index].cell_id()
    manifest["cell_conditions"] = {cell_id: {"load_1m": 9.0, "cores": 2}}
    manifest_path.write_text(json.dumps(manifest))


def test_a_regression_measured_on_a_busy_machine_is_not_judged(tmp_path):
    base = _runs(tmp_path, "a", range(0, 4))
    cand = _runs(tmp_path, "b", range(4, 8), slowdown={SLOW_CELL: 2.0})
    caught = gate_runs(base, cand)
    assert caught.exit_code == 1, caught.render()  # not vacuous: without the flag it fails

    for run in cand:
        _mark_busy(run, SLOW_CELL)
    refused = gate_runs(base, cand)
    assert refused.exit_code == 0, refused.render()
    rows = refused.table[(refused.table["cand_cell_id"] == caught.regressions["cand_cell_id"].iloc[0])
                         & refused.table["gated"] & (refused.table["kind"] != "status")]
    timed = rows[rows["metric"].isin(["latency_ms", "tokens_per_s"])]
    assert len(timed) and (timed["outcome"] == "unresolved").all()
    assert timed["note"].str.contains("flagged invalid: .*machine busy: load 9.0").all()
    assert "machine busy" in refused.render()
