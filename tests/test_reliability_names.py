"""Model names, labels and paths from users reach charts, tables, HTML and file names safely."""

from __future__ import annotations

import pandas as pd
import pytest

from loopscope.reports.report import write_report
from tests.rundir_factory import write_synthetic_run

NASTY = ["$x^{$", "a_b$c$d", "\\frac{1}{", "<b>x</b>|y", "%s {} \\n", "ünï cödé ✓", "../../etc/passwd", "a" * 300]


@pytest.mark.parametrize("run_name", ["nasty", "with space & $dollar"])
def test_a_report_draws_every_chart_whatever_the_model_names(tmp_path, run_name):
    run = write_synthetic_run(tmp_path / run_name, run_id=run_name, seed=1)
    results = pd.read_parquet(run / "results.parquet")
    ids = sorted(results["cell_id"].unique())
    results["model"] = results["cell_id"].map({c: NASTY[i % len(NASTY)] for i, c in enumerate(ids)})
    results.to_parquet(run / "results.parquet", index=False)
    (run / "results.csv").unlink()

    paths = write_report(run)
    md, html = paths["md"].read_text(), paths["html"].read_text()
    assert "could not be drawn" not in md
    assert "<b>x</b>" not in html and "&lt;b&gt;x&lt;/b&gt;" in html
    charts = sorted(p.name for p in (run / "charts").iterdir())
    assert charts and all(p.replace("_", "").replace(".", "").isalnum() for p in charts)
    assert not list(tmp_path.parent.glob("etc")) and not list(run.rglob("*.tmp"))
