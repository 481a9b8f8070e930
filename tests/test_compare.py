"""compare: joining two runs, statistics per row, verdicts, fingerprints and the three output formats."""

from __future__ import annotations

import io
import json
import math
from dataclasses import replace

import numpy as np
import pandas as pd
import pytest

from loopscope.reports.compare import (
    MetricRule,
    compare,
    compare_runs,
    compare_table,
    hardware_differences,
    judge,
    load_rules,
    sample_ratio_ci,
)
from loopscope.reports.rundir import load_run
from tests.rundir_factory import FINGERPRINT_B, default_cells, write_synthetic_run


@pytest.fixture
def two_runs(tmp_path):
    base = write_synthetic_run(tmp_path / "a", run_id="a", seed=0)
    cand = write_synthetic_run(tmp_path / "b", run_id="b", seed=1, slowdown={1: 1.3})
    return base, cand


def test_rows_join_on_cell_id_with_ratio_ci_and_verdict(two_runs):
    result = compare_runs(*two_runs, all_metrics=False)
    table = result.table
    assert set(table["matched_by"]) == {"cell_id"}
    assert result.only_base.empty and result.only_cand.empty and result.fingerprint_note is None
    lat = table[(table["metric"] == "latency_ms") & (table["stat"] == "median")].set_index("cell")
    slow = lat.loc["gpt-tiny prefill numba/cpu b2 s64 r1/1 fp32 full"]
    assert slow["verdict"] == "worse" and slow["ci_low"] <= slow["ratio"] <= slow["ci_high"]
    assert math.isclose(slow["ratio"], slow["cand"] / slow["base"])
    # Throughput runs the other way: higher is better, so the same slowdown is "worse" below 1.
    tok = table[(table["metric"] == "tokens_per_s") & (table["cell"] == slow.name)].iloc[0]
    assert tok["verdict"] == "worse" and tok["ci_high"] < 0.9
    assert not lat.drop(index=slow.name)["verdict"].isin(["worse", "better"]).any()


def test_cells_join_on_axes_when_cell_ids_differ(tmp_path):
    base = write_synthetic_run(tmp_path / "a", run_id="a", seed=0)
    cand = write_synthetic_run(tmp_path / "b", run_id="b", seed=1)
    for name in ("results.parquet", "samples.parquet"):
        df = pd.read_parquet(cand / name)
        df["cell_id"] = "v2-" + df["cell_id"]
        df.to_parquet(cand / name)
    (cand / "results.csv").unlink()
    result = compare_runs(base, cand)
    assert set(result.table["matched_by"]) == {"axes"}
    assert result.only_base.empty and result.only_cand.empty
    assert any("matched on their axes" in n for n in result.notes)
    assert result.table["cand_cell_id"].str.startswith("v2-").all()


def test_cells_in_one_run_only_are_listed(tmp_path):
    cells = default_cells()
    extra = replace(cells[0], model="gpt-extra", batch=4)
    base = write_synthetic_run(tmp_path / "a", run_id="a", seed=0, cells=cells[:3])
    cand = write_synthetic_run(tmp_path / "b", run_id="b", seed=1, cells=[*cells[1:], extra])
    result = compare_runs(base, cand)
    assert list(result.only_base["model"]) == ["gpt-tiny"]
    assert sorted(result.only_cand["model"]) == ["gpt-extra", "parcae-tiny"]
    md = result.to_markdown()
    assert "**Only in base** (1)" in md and "**Only in candidate** (2)" in md
    full = compare_table(base, cand)
    assert (full["presence"] == "base_only").sum() == 1 and (full["presence"] == "cand_only").sum() == 2


def test_different_hardware_compares_only_normalised_and_deterministic(tmp_path):
    base = write_synthetic_run(tmp_path / "a", run_id="a", seed=0)
    cand = write_synthetic_run(tmp_path / "b", run_id="b", seed=1, fingerprint=FINGERPRINT_B)
    result = compare_runs(base, cand)
    assert result.hardware_differs and "cpu.model" in result.fingerprint_note
    kinds = set(result.table["kind"])
    assert kinds <= {"deterministic", "quality", "normalised", "status"}
    assert {"params_unique", "mfu", "bpb"} <= set(result.table["metric"])
    assert not result.table["metric"].isin(["latency_ms", "tokens_per_s"]).any()
    assert result.to_markdown().splitlines()[2].startswith("> **Fingerprints differ")
    everything = compare_runs(base, cand, all_metrics=True)
    assert everything.table["metric"].isin(["latency_ms", "tokens_per_s"]).any()


def test_hardware_differences_ignore_software_and_transient_fields():
    fp = {"cpu": {"model": "X", "logical_cores": 2, "governor": "performance"}, "device_class": "cpu",
          "device_class_reason": "no CUDA", "gpus": {"driver_version": "1", "devices": [{"name": "H200",
                                                                                           "uuid": "a"}]},
          "versions": {"torch": "2.13"}, "platform": {"hostname": "ci-1", "machine": "x86_64"}}
    same_hw = {**fp, "versions": {"torch": "2.14"}, "platform": {"hostname": "ci-2", "machine": "x86_64"},
               "device_class_reason": "other words",
               "gpus": {"driver_version": "2", "devices": [{"name": "H200", "uuid": "b"}]},
               "cpu": {**fp["cpu"], "governor": "powersave"}}
    assert hardware_differences(fp, same_hw) == []
    other = {**fp, "gpus": {"devices": [{"name": "A100", "uuid": "a"}]}}
    assert hardware_differences(fp, other) == ["gpus.devices.0.name: 'H200' -> 'A100'"]
    assert hardware_differences(fp, {**fp, "cpu": {**fp["cpu"], "logical_cores": 8}})


def test_in_run_ratio_rows_are_derived_per_run(two_runs):
    base = load_run(two_runs[0])
    table = compare_runs(*two_runs).table
    ratio = table[table["metric"] == "tokens_per_s/ref(backend=torch)"].set_index("cell")
    assert set(ratio.index) == {"gpt-tiny prefill numba/cpu b2 s64 r1/1 fp32 full",
                                "parcae-tiny prefill numba/cpu b2 s64 r2/4 fp32 full"}
    tok = base.results.query("metric == 'tokens_per_s' and stat == 'median'").set_index("model")
    by_backend = {(r.model, r.backend): r.value for r in base.results.query(
        "metric == 'tokens_per_s' and stat == 'median'").itertuples()}
    expected = by_backend[("gpt-tiny", "numba")] / by_backend[("gpt-tiny", "torch")]
    assert math.isclose(ratio.loc["gpt-tiny prefill numba/cpu b2 s64 r1/1 fp32 full", "base"], expected)
    assert len(tok) == 4
    # The planted 30% slowdown of gpt-tiny/numba shows in its ratio to gpt-tiny/torch.
    assert ratio.loc["gpt-tiny prefill numba/cpu b2 s64 r1/1 fp32 full", "verdict"] == "worse"


def test_markdown_csv_json_outputs(two_runs, tmp_path):
    md = compare(*two_runs, fmt="markdown")
    assert md.startswith("## loopscope compare: `a` → `b`")
    assert "| cell | metric | stat | unit | base | cand | ratio | 95% CI | p | verdict | note |" in md
    csv_text = compare(*two_runs, fmt="csv")
    df = pd.read_csv(io.StringIO(csv_text))
    assert {"cell", "metric", "stat", "base", "cand", "ratio", "ci_low", "ci_high", "verdict",
            "presence"} <= set(df.columns)
    assert set(df["verdict"]) <= {"better", "worse", "same", "unknown", "changed"}
    doc = json.loads(compare(*two_runs, fmt="json"))  # strict JSON: NaN became null
    assert doc["base_run_id"] == "a" and doc["counts"]["worse"] >= 2
    energy = next(r for r in doc["rows"] if r["metric"] == "energy_j_per_token")
    assert energy["base"] is None and energy["verdict"] == "unknown"
    with pytest.raises(ValueError, match="unknown compare format"):
        compare(*two_runs, fmt="xml")


def test_strings_from_files_are_escaped_in_markdown(tmp_path):
    evil = replace(default_cells()[0], model="gpt|<script>alert(1)</script>")
    base = write_synthetic_run(tmp_path / "a", run_id="a", seed=0, cells=[evil])
    cand = write_synthetic_run(tmp_path / "b", run_id="b", seed=1, cells=[evil])
    md = compare_runs(base, cand).to_markdown()
    assert "<script>" not in md and "&lt;script&gt;" in md and "gpt\\|" in md


def test_results_csv_is_read_when_parquet_is_absent(two_runs):
    base, cand = two_runs
    (cand / "results.parquet").unlink()
    from_csv = compare_runs(base, cand).table
    assert len(from_csv) > 0 and set(from_csv["matched_by"]) == {"cell_id"}
    assert set(from_csv["verdict"]) <= {"better", "worse", "same", "unknown", "changed"}
    # The empty stat of deterministic rows survives the CSV round trip (it is read back as NaN).
    assert (from_csv.query("metric == 'params_unique'")["stat"] == "").all()
    assert (from_csv.query("metric == 'params_unique'")["verdict"] == "same").all()


RULE = {d: MetricRule("m", "timing", d, 0.10) for d in ("lower", "higher")}


@pytest.mark.parametrize("direction, ci, p, verdict", [
    ("lower", (1.15, 1.30), 1e-6, "worse"),      # significant and wholly beyond +10%
    ("lower", (1.05, 1.30), 1e-6, "unknown"),    # significant but the CI reaches inside the tolerance
    ("lower", (1.15, 1.30), 0.2, "unknown"),     # beyond, but not significant
    ("lower", (0.95, 1.06), 0.5, "same"),
    ("lower", (0.70, 0.85), 1e-6, "better"),
    ("higher", (0.70, 0.85), 1e-6, "worse"),
    ("higher", (0.95, 1.30), 0.5, "same"),       # no loss beyond tolerance in the bad direction
])
def test_noise_aware_verdicts(direction, ci, p, verdict):
    assert judge(RULE[direction], 1.0, 1.0, ci[0], ci[1], p, alpha=0.01)[0] == verdict


@pytest.mark.parametrize("kind, direction, tol, base, cand, verdict", [
    ("deterministic", "none", 0.0, 100, 100, "same"),
    ("deterministic", "none", 0.0, 100, 101, "changed"),
    ("quality", "lower", 1e-3, 2.0, 2.0005, "same"),
    ("quality", "lower", 1e-3, 2.0, 2.01, "worse"),
    ("quality", "lower", 1e-3, 2.0, 1.9, "better"),
    ("timing", "lower", 0.1, 10.0, 15.0, "unknown"),   # no samples: cannot tell from noise
    ("timing", "lower", 0.1, 10.0, 10.5, "same"),
    ("deterministic", "none", 0.0, 0.0, 5.0, "changed"),
    ("quality", "lower", 0.0, math.nan, 1.0, "unknown"),
])
def test_value_verdicts(kind, direction, tol, base, cand, verdict):
    rule = MetricRule("m", kind, direction, tol)
    assert judge(rule, base, cand, math.nan, math.nan, math.nan, alpha=0.01)[0] == verdict


def test_sample_ratio_ci_covers_the_true_ratio_for_several_stats():
    rng = np.random.default_rng(3)
    a = rng.lognormal(0.0, 0.1, 400)
    b = 1.2 * rng.lognormal(0.0, 0.1, 400)
    for stat in ("median", "p50", "mean", "p90"):
        low, high = sample_ratio_ci(a, b, stat, level=0.95)
        assert low < 1.2 < high and high - low < 0.1, stat
    assert all(math.isnan(v) for v in sample_ratio_ci(a, b, "iqr", level=0.95))


def test_throughput_samples_are_derived_from_latency_samples(two_runs):
    # The factory, like the runner, keeps only latency samples; tokens/s still gets a CI and a p-value.
    table = compare_runs(*two_runs).table
    tok = table[(table["metric"] == "tokens_per_s") & (table["stat"] == "median")]
    assert tok["ci_low"].notna().all() and tok["p_value"].notna().all()
    assert tok["note"].str.contains("samples: 1/latency_ms").all()
    lat = table[(table["metric"] == "latency_ms") & (table["stat"] == "median")]
    # The rank test of k/latency is the rank test of latency.
    assert np.allclose(np.sort(tok["p_value"].to_numpy()), np.sort(lat["p_value"].to_numpy()), rtol=0.05)


def test_compare_uses_given_rules(two_runs, tmp_path):
    rules = tmp_path / "r.toml"
    rules.write_text("[metrics.latency_ms]\ntolerance = 0.9\n")
    table = compare_runs(*two_runs, rules=rules).table
    assert not (table.query("metric == 'latency_ms'")["verdict"] == "worse").any()
    assert load_rules(rules).rule_for("latency_ms").kind == "timing"  # merged over the defaults


def test_unfinished_run_is_read_from_its_cell_files(two_runs):
    """A run killed before it wrote results.parquet still compares, from the store's cells/*.json."""
    from loopscope.bench.store import RunStore

    base, cand = two_runs
    results, samples = pd.read_parquet(cand / "results.parquet"), pd.read_parquet(cand / "samples.parquet")
    store = RunStore(cand)
    for cell_id, rows in results.groupby("cell_id"):
        store.cells_dir.mkdir(exist_ok=True)
        store.write_cell({"cell_id": cell_id, "status": "ok", "rows": rows.to_dict("records"),
                          "samples": samples[samples["cell_id"] == cell_id].to_dict("records")})
    expected = compare_runs(base, cand).table
    for name in ("results.parquet", "results.csv", "samples.parquet"):
        (cand / name).unlink()
    result = compare_runs(base, cand)
    assert any("rebuilt from" in n for n in result.notes)
    key = ["cand_cell_id", "metric", "stat"]
    got = result.table.sort_values(key).reset_index(drop=True)
    want = expected.sort_values(key).reset_index(drop=True)
    assert got[key + ["verdict"]].equals(want[key + ["verdict"]])
    np.testing.assert_allclose(got["cand"], want["cand"])
