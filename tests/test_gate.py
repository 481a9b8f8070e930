"""The regression gate: noise does not fail it, real regressions do, bad input is exit 2 (an error).

No test asserts on an absolute time: synthetic runs draw heavy-tailed samples from seeded generators,
and the one test with real timings compares two sleeps measured side by side.
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from loopscope.reports.compare import RulesError, load_rules
from loopscope.reports.gate import gate, gate_runs
from loopscope.reports.rundir import UnusableRunError
from tests.rundir_factory import FINGERPRINT_B, PEAK_FLOPS, Cell, default_cells, write_synthetic_run

SLOW_CELL = 3  # parcae-tiny on numba: not a reference cell of any in-run ratio


def _pair(tmp_path: Path, seed: int, **cand_kwargs) -> tuple[Path, Path]:
    base = write_synthetic_run(tmp_path / f"base{seed}", run_id=f"base{seed}", seed=2 * seed)
    cand = write_synthetic_run(tmp_path / f"cand{seed}", run_id=f"cand{seed}", seed=2 * seed + 1,
                               **cand_kwargs)
    return base, cand


def _runs(tmp_path: Path, side: str, seeds: range, **kwargs) -> list[Path]:
    """Several runs of one side: process-level replicates (each its own seeded draw of samples)."""
    return [write_synthetic_run(tmp_path / f"{side}{s}", run_id=f"{side}{s}", seed=s, **kwargs) for s in seeds]


def test_one_run_per_side_leaves_timing_unresolved_with_an_unknown_noise_floor(tmp_path):
    # Even a planted 25% slowdown: the samples inside one process are not replicates, so no p-value.
    for seed, slowdown in ((0, {}), (1, {SLOW_CELL: 1.25})):
        result = gate(*_pair(tmp_path, seed, slowdown=slowdown))
        assert result.exit_code == 0, result.render()
        timing = result.table[(result.table["kind"] == "timing") & result.table["gated"]]
        assert len(timing) >= 8
        assert (timing["outcome"] == "unresolved").all() and timing["p_value"].isna().all()
        assert timing["note"].str.contains("noise floor unknown: one run per side").all()
        text = result.render()
        assert "Unresolved" in text and "unknown" in text
        assert not re.search(r"\d(\.\d+)?e-\d", text)  # no p = 1e-12 out of within-process samples


def test_aa_runs_give_no_regression_across_replicates(tmp_path):
    for k in range(3):
        base = _runs(tmp_path, f"a{k}-", range(10 * k, 10 * k + 4))
        cand = _runs(tmp_path, f"b{k}-", range(10 * k + 4, 10 * k + 8))
        result = gate_runs(base, cand)
        assert result.exit_code == 0, result.render()
        timing = result.table[(result.table["kind"] == "timing") & result.table["gated"]]
        # Not vacuous: judged across runs, with a measured floor.
        assert len(timing) >= 8 and timing["noise_floor"].notna().all()
        assert (timing["outcome"] == "pass").mean() >= 0.75, timing[["cell", "metric", "outcome", "note"]]


def test_planted_25_percent_slowdown_is_caught_across_replicates(tmp_path):
    base = _runs(tmp_path, "a", range(0, 4))
    cand = _runs(tmp_path, "b", range(4, 8), slowdown={SLOW_CELL: 1.25})
    result = gate_runs(base, cand)
    assert result.exit_code == 1, result.render()
    assert list(result.regressions["cell"].unique()) == ["parcae-tiny prefill numba/cpu b2 s64 r2/4 fp32 full"]
    failed = set(zip(result.regressions["metric"], result.regressions["stat"], strict=True))
    assert {("latency_ms", "median"), ("tokens_per_s", "median")} <= failed
    latency = result.regressions.set_index("metric").loc["latency_ms"]
    assert latency["ci_low"] > 1.10 and latency["noise_floor"] < 0.10
    text = result.render()
    assert "FAIL" in text and "Regressions:" in text and "noise floor" in text
    line = next(x for x in text.splitlines() if "latency_ms" in x and "median" in x)
    change = float(line.split("%")[0].split()[-1])
    assert 15 < change < 35


def test_planted_slowdown_in_real_sleep_timings(tmp_path):
    """Real noisy timings: sleep 2 ms vs 4 ms, each run its own block, blocks interleaved."""
    def sleeps(seconds: float, n: int = 10) -> np.ndarray:
        out = []
        for _ in range(n):
            t0 = time.perf_counter()
            time.sleep(seconds)
            out.append((time.perf_counter() - t0) * 1e3)
        return np.array(out)

    cells = default_cells()[:2]
    runs: dict[str, list[Path]] = {"a": [], "a2": [], "b": []}
    for i in range(4):  # interleaved, so background load hits all three alike
        for side, seconds in (("a", 0.002), ("a2", 0.002), ("b", 0.004)):
            runs[side].append(write_synthetic_run(tmp_path / f"{side}{i}", run_id=f"{side}{i}", seed=i,
                                                  cells=cells, samples_override={0: sleeps(seconds)}))
    assert gate_runs(runs["a"], runs["a2"]).exit_code == 0
    caught = gate_runs(runs["a"], runs["b"])
    assert caught.exit_code == 1, caught.render()
    assert "latency_ms" in set(caught.regressions["metric"])


def test_timing_without_raw_samples_is_unresolved_and_passes(tmp_path):
    base = write_synthetic_run(tmp_path / "a", run_id="a", seed=0, with_samples=False)
    cand = write_synthetic_run(tmp_path / "b", run_id="b", seed=1, with_samples=False,
                               slowdown={SLOW_CELL: 1.25})
    result = gate(base, cand)
    assert result.exit_code == 0
    rows = result.table[(result.table["metric"] == "latency_ms") & (result.table["outcome"] == "unresolved")]
    assert len(rows) and "Unresolved" in result.render()


@pytest.mark.parametrize("metric, value, verdict", [
    ("params_unique", 1_000_001, "changed"),
    ("flops_per_token", 5_000_000, "changed"),
    ("bpb", 2.5 * 1.01, "worse"),
])
def test_changed_deterministic_metric_is_caught(tmp_path, metric, value, verdict):
    cells = default_cells()
    cells[0] = replace(cells[0], **{metric: value})
    base = write_synthetic_run(tmp_path / "a", run_id="a", seed=0)
    cand = write_synthetic_run(tmp_path / "b", run_id="b", seed=1, cells=cells)
    result = gate(base, cand)
    assert result.exit_code == 1
    row = result.regressions[result.regressions["metric"] == metric]
    assert len(row) == 1 and row["verdict"].iloc[0] == verdict


def test_better_quality_passes(tmp_path):
    cells = default_cells()
    cells[2] = replace(cells[2], bpb=2.0)
    result = gate(write_synthetic_run(tmp_path / "a", run_id="a", seed=0),
                  write_synthetic_run(tmp_path / "b", run_id="b", seed=1, cells=cells))
    assert result.exit_code == 0
    assert (result.table.query("metric == 'bpb'")["verdict"] == "better").any()


def test_missing_cells_are_listed_and_warned_or_failed_by_rule(tmp_path):
    base = write_synthetic_run(tmp_path / "a", run_id="a", seed=0)
    cand = write_synthetic_run(tmp_path / "b", run_id="b", seed=1, cells=default_cells()[:3])
    result = gate(base, cand)
    assert result.exit_code == 0
    assert list(result.comparison.only_base["model"]) == ["parcae-tiny"]
    assert any("missing from the candidate" in w for w in result.warnings)
    strict = tmp_path / "strict.toml"
    strict.write_text('[gate]\nmissing_cells = "fail"\n')
    assert gate(base, cand, rules_path=strict).exit_code == 1


def test_a_cell_that_now_fails_is_a_regression(tmp_path):
    base, cand = _pair(tmp_path, 0, status={1: "oom"})
    result = gate(base, cand)
    assert result.exit_code == 1
    row = result.regressions[result.regressions["metric"] == "status"]
    assert len(row) == 1 and "oom" in row["note"].iloc[0]


def test_mismatched_fingerprints_gate_only_hardware_free_metrics(tmp_path):
    # A slower machine: every latency 1.6x, its calibrated peak 1.6x lower. Timing is not gated;
    # MFU, in-run ratios and deterministic metrics are.
    base = write_synthetic_run(tmp_path / "a", run_id="a", seed=0)
    slower = {i: 1.6 for i in range(4)}
    machine_b = dict(fingerprint=FINGERPRINT_B, peak_flops=PEAK_FLOPS / 1.6)
    cand = write_synthetic_run(tmp_path / "b", run_id="b", seed=1, slowdown=slower, **machine_b)
    result = gate(base, cand)
    assert result.exit_code == 0, result.render()
    bases = [base, *_runs(tmp_path, "a", range(10, 13))]
    assert not result.table["kind"].isin(["timing", "measured"]).any()
    assert result.table["metric"].str.startswith("tokens_per_s/ref(").any()
    assert "Fingerprints differ" in result.render()

    # On that other machine, one cell 1.4x slower still than its reference shows in the in-run ratio.
    slower[SLOW_CELL] = 1.6 * 1.4
    cands = _runs(tmp_path, "c", range(20, 24), slowdown=slower, **machine_b)
    caught = gate_runs(bases, cands)
    assert caught.exit_code == 1
    assert set(caught.regressions["cell"]) == {"parcae-tiny prefill numba/cpu b2 s64 r2/4 fp32 full"}
    assert "tokens_per_s/ref(backend=torch)" in set(caught.regressions["metric"])


def test_unknown_metric_is_reported_not_gated(tmp_path):
    cell_id = default_cells()[0].cell_id()
    extra = [{"cell_id": cell_id, "metric": "frobnication_rate", "value": 1.0, "unit": "x"}]
    extra2 = [{**extra[0], "value": 5.0}]
    result = gate(write_synthetic_run(tmp_path / "a", run_id="a", seed=0, extra_rows=extra),
                  write_synthetic_run(tmp_path / "b", run_id="b", seed=1, extra_rows=extra2))
    assert result.exit_code == 0
    row = result.table[result.table["metric"] == "frobnication_rate"]
    assert row["outcome"].iloc[0] == "report" and "no rule" in row["note"].iloc[0]
    assert any("frobnication_rate" in w for w in result.warnings)


def test_user_rules_override_tolerance(tmp_path):
    base, cand = _pair(tmp_path, 0, slowdown={SLOW_CELL: 1.25})
    loose = tmp_path / "loose.toml"
    loose.write_text("ratios = []\n" + "".join(f"[metrics.{m}]\ntolerance = 0.5\n"
                                                for m in ("latency_ms", "tokens_per_s", "mfu")))
    result = gate(base, cand, rules_path=loose)
    assert result.exit_code == 0, result.render()


@pytest.mark.parametrize("text, key", [
    ("[metrics.latency_ms]\ntolerence = 0.1\n", "metrics.latency_ms.tolerence"),
    ("[metrics.latency_ms]\ntolerance = '10%'\n", "metrics.latency_ms.tolerance"),
    ("[metrics.latency_ms]\nkind = 'fast'\n", "metrics.latency_ms.kind"),
    ("[metrics.new_metric]\nkind = 'timing'\n", "metrics.new_metric.direction"),
    ("[gate]\nalpha = 2\n", "gate.alpha"),
    ("[gaet]\nalpha = 0.1\n", "gaet"),
    ("[[ratios]]\nmetric = 'tokens_per_s'\nvary = ['colour']\nreference = {colour = 'red'}\n",
     "ratios[0].vary"),
    ("[metrics.latency_ms]\nstats = 'median'\n", "metrics.latency_ms.stats"),
    ("not toml at all [", "not valid TOML"),
])
def test_bad_rules_file_names_file_and_key(tmp_path, text, key):
    path = tmp_path / "rules.toml"
    path.write_text(text)
    with pytest.raises(RulesError) as info:
        load_rules(path)
    message = str(info.value)
    assert str(path) in message and key in message and "\n" not in message
    assert isinstance(info.value, UnusableRunError)


def test_default_rules_load_and_cover_the_contract_metrics():
    rules = load_rules()
    for metric in ("tokens_per_s", "latency_ms", "ttft_ms", "peak_mem_bytes", "kv_cache_bytes",
                   "energy_j_per_token", "avg_power_w", "mfu", "bpb", "perplexity", "train_loss",
                   "compile_s", "loops_used", "state_norm", "spectral_radius", "params_unique",
                   "flops_per_token"):
        assert rules.rule_for(metric).known, metric
    assert rules.alpha == 0.01 and rules.rule_for("latency_ms").tolerance == 0.10
    assert rules.rule_for("params_unique").tolerance == 0.0


def _break(run: Path, what: str) -> None:
    if what == "no manifest":
        (run / "manifest.json").unlink()
    elif what == "bad manifest":
        (run / "manifest.json").write_text("{not json")
    elif what == "manifest without fingerprint":
        (run / "manifest.json").write_text(json.dumps({"run_id": "x"}))
    elif what == "no results":
        (run / "results.parquet").unlink()
        (run / "results.csv").unlink()
    elif what == "corrupt parquet":
        (run / "results.parquet").write_bytes(b"PAR1 this is not parquet")
    elif what == "corrupt samples":
        (run / "samples.parquet").write_bytes(b"garbage")
    elif what == "no value column":
        pd.read_parquet(run / "results.parquet").drop(columns="value").to_parquet(run / "results.parquet")


@pytest.mark.parametrize("what, where", [
    ("no manifest", "manifest.json"), ("bad manifest", "manifest.json"),
    ("manifest without fingerprint", "fingerprint"), ("no results", "results.parquet"),
    ("corrupt parquet", "results.parquet"), ("corrupt samples", "samples.parquet"),
    ("no value column", "value"),
])
def test_unusable_run_directory_is_an_error_naming_the_path(tmp_path, what, where):
    good = write_synthetic_run(tmp_path / "good", run_id="good", seed=0)
    bad = write_synthetic_run(tmp_path / "bad", run_id="bad", seed=1)
    _break(bad, what)
    for args in ((good, bad), (bad, good)):
        with pytest.raises(UnusableRunError) as info:
            gate(*args)
        assert str(bad) in str(info.value) and where in str(info.value)
        assert "\n" not in str(info.value)


def test_missing_directory_and_disjoint_runs_are_errors(tmp_path):
    good = write_synthetic_run(tmp_path / "good", run_id="good", seed=0)
    with pytest.raises(UnusableRunError, match="no such run directory"):
        gate(good, tmp_path / "nope")
    other = write_synthetic_run(tmp_path / "other", run_id="other", seed=1,
                                cells=[Cell(model="something-else", latency_ms=3.0)])
    with pytest.raises(UnusableRunError, match="no cell in common"):
        gate(good, other)


def test_gate_runs_is_the_cli_entry_point(tmp_path):
    base = _runs(tmp_path, "a", range(0, 3))
    cand = _runs(tmp_path, "b", range(3, 6), slowdown={SLOW_CELL: 1.25})
    assert gate_runs(base, cand, rules=None).exit_code == 1
    assert gate_runs(base, base, rules=None).exit_code == 0
