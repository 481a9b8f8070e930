"""The ci profile end to end, as a user runs it: a real run directory with a real report."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from loopscope.bench.schema import RESULT_COLUMNS
from tests.conftest import run_cli


@pytest.fixture(scope="module")
def ci_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("ci") / "run"
    proc = run_cli("run", "--profile", "ci", "--out", str(out), timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out, proc


@pytest.mark.slow
def test_ci_run_writes_the_run_directory(ci_run):
    out, proc = ci_run
    for name in ("manifest.json", "results.parquet", "results.csv", "samples.parquet", "report.md",
                 "report.html", "charts/bpb_vs_params.png"):
        assert (out / name).is_file(), name
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["profile"]["name"] == "ci"
    assert manifest["corpus"]["val_sha256"] and manifest["calibration"]["gemm_fp32_flops"] > 0
    assert "done: 9 ok, 0 not ok" in proc.stdout


@pytest.mark.slow
def test_ci_results_are_tidy_and_real(ci_run):
    out, _ = ci_run
    df = pd.read_parquet(out / "results.parquet")
    assert list(df.columns[: len(RESULT_COLUMNS)]) == list(RESULT_COLUMNS)
    assert (df["status"] == "ok").all()
    bpb = df[df["metric"] == "bpb"]
    parcae = bpb[bpb["family"] == "parcae"].set_index("loops_test")["value"]
    assert sorted(parcae.index) == [1, 2, 4]
    gpt = bpb[bpb["family"] == "gpt"]["value"]
    assert len(gpt) == 1
    values = [*parcae.tolist(), *gpt.tolist()]
    # trained models beat a uniform byte model (8 bits) by far, and the two families differ
    assert all(0.5 < v < 6.0 for v in values)
    assert gpt.iloc[0] != parcae.loc[4]
    tps = df[(df["metric"] == "tokens_per_s") & (df["workload"] == "prefill") & (df["stat"] == "median")]
    assert len(tps) == 3 and (tps["value"] > 0).all()
    energy = df[df["metric"] == "energy_j_per_token"]
    assert (energy["value"].isna() == energy["source"].str.startswith(("unavailable", "window"))).all()


@pytest.mark.slow
def test_ci_rerun_does_nothing_and_says_so(ci_run):
    out, _ = ci_run
    again = run_cli("run", "--profile", "ci", "--out", str(out))
    assert again.returncode == 0 and "nothing to do" in again.stdout


@pytest.mark.slow
def test_ci_report_reads_the_data(ci_run):
    out, _ = ci_run
    md = (out / "report.md").read_text()
    assert "Bits per byte vs unique parameters" in md and "parcae-micro" in md
    html = (out / "report.html").read_text()
    assert html.count("data:image/svg+xml;base64,") >= 3 and "http://" not in html.replace("http://www.w3.org", "")
