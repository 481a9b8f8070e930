"""Findings a reader can trust: recipe groups, training seeds, validity flags, findings first, the CLI surface.

Runs are written in the runner's own format (real Cells, real model configs, the executor's row columns),
with bpb planted per (model, recipe, seed) so every claim the report makes can be checked against the plan.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from loopscope.bench.cli import main
from loopscope.bench.errors import ConfigError
from loopscope.bench.matrix import DEFAULTS, Cell, expand
from loopscope.bench.schema import metric_row
from loopscope.bench.store import RunStore
from loopscope.profiles.loader import load_profile
from loopscope.reports import charts as charts_module
from loopscope.reports import findings as findings_module
from loopscope.reports import frames, groups, tables, validity
from loopscope.reports.report import load_checked, write_report
from tests.test_report import RunSpec, _cfg, _manifest, _record, _samples

# Recipe A: the main comparison, three seeds each. Recipe B: a small-batch lr sweep whose models look far
# better only because they took 4x the optimizer steps: it must never be compared with recipe A.
RECIPE_A = {"tokens": 40_960, "batch": 16, "seq_len": 64, "lrs": (4e-3,)}
RECIPE_B = {"tokens": 40_960, "batch": 4, "seq_len": 64, "lrs": (1e-3, 1e-2)}
PLAN_A = {"gpt-micro": 2.300, "parcae-micro": 2.200}  # a real gap: 4.3%, seed noise 0.005
PLAN_B = {"rdm-micro": 1.900, "looped-micro": 1.950}
SEED_NOISE = 0.005


def _train(run_id: str, model: str, recipe: dict, lr: float, seed: int) -> dict:
    train = {**DEFAULTS["train"], "tokens": recipe["tokens"]}
    cell = Cell(model=model, model_config=_cfg(model), workload="train", batch=recipe["batch"],
                seq_len=recipe["seq_len"], lr=lr, seed=seed, settings={"train": train, "data": DEFAULTS["data"]})
    rows = [metric_row("train_loss", 2.5, "nats/token"), metric_row("train_tokens", recipe["tokens"], "tokens")]
    curve = 2.5 + 3.0 * np.exp(-np.arange(40) / 8.0) - (1.0 if recipe is RECIPE_B else 0.0)
    return _record(run_id, cell, rows, _samples("train_loss", "nats/token", curve))


def _eval(run_id: str, model: str, lr: float, seed: int, T: int | None, train: dict, bpb: float) -> dict:
    cell = Cell(model=model, model_config=_cfg(model), workload="eval", batch=16, seq_len=64, loops_test=T, lr=lr,
                seed=seed, depends_on=train["cell_id"])
    rows = [metric_row("bpb", bpb, "bits/byte", source="held-out split")]
    if T is not None:
        rows.append(metric_row("bpb_std", 0.001, "bits/byte", source="std over 2 h0 seeds"))
    return _record(run_id, cell, rows)


def write_two_recipe_run(out: Path, *, seeds: tuple[int, ...] = (0, 1, 2), gap: float = 0.100,
                         overthink: float = 0.0) -> Path:
    """Recipe A (gpt-micro vs parcae-micro over `seeds`, parcae lower by `gap`) and recipe B (an lr sweep of
    rdm-micro and looped-micro, one seed). parcae-micro is evaluated at T = 1, 4 (its training loops), 8."""
    rng = np.random.default_rng(0)
    store = RunStore(out)
    store.create()
    records = []
    plan_a = {"gpt-micro": PLAN_A["gpt-micro"], "parcae-micro": PLAN_A["gpt-micro"] - gap}
    for model, bpb in plan_a.items():
        for seed in seeds:
            train = _train("trust", model, RECIPE_A, 4e-3, seed)
            records.append(train)
            noise = float(rng.normal(0, SEED_NOISE))
            if model == "gpt-micro":
                records.append(_eval("trust", model, 4e-3, seed, None, train, bpb + noise))
                continue
            for T, extra in ((1, 0.3), (4, 0.0), (8, overthink)):
                records.append(_eval("trust", model, 4e-3, seed, T, train, bpb + extra + noise))
    for model, bpb in PLAN_B.items():
        for lr in RECIPE_B["lrs"]:
            train = _train("trust", model, RECIPE_B, lr, 0)
            records.append(train)
            records.append(_eval("trust", model, lr, 0, 4, train, bpb + (0.0 if lr == 1e-2 else 0.1)))
    for record in records:
        store.write_cell(record)
    store.write_manifest(_manifest("trust", RunSpec()))
    store.write_tables()
    return out


@pytest.fixture(scope="module")
def trust_run(tmp_path_factory):
    return write_two_recipe_run(tmp_path_factory.mktemp("trust") / "run")


def _group_of(q: pd.DataFrame) -> dict[str, str]:
    sel = q[q["selected"]]
    return dict(zip(sel["model"], sel["group_key"], strict=True))


def _named(text: str, models: set[str]) -> set[str]:
    return {m for m in models if re.search(rf"(?<![\w-]){re.escape(m)}(?![\w-])", text)}


def test_recipes_make_groups_and_the_lr_sweep_is_read_at_its_best_lr(trust_run):
    run = load_checked(trust_run)
    q = groups.quality_groups(run)
    group_of = _group_of(q)
    assert group_of["gpt-micro"] == group_of["parcae-micro"]
    assert group_of["rdm-micro"] == group_of["looped-micro"] != group_of["gpt-micro"]
    labels = dict(zip(q["group_key"], q["group"], strict=True))
    assert "batch 4x64" in labels[group_of["rdm-micro"]] and "best of lr 0.001/0.01" in labels[group_of["rdm-micro"]]
    scores = groups.model_scores(q)
    rdm = scores[scores["model"] == "rdm-micro"].iloc[0]
    assert rdm["lr"] == 1e-2 and rdm["n_seeds"] == 1
    parcae = scores[scores["model"] == "parcae-micro"].iloc[0]
    assert parcae["n_seeds"] == 3 and parcae["loops_test"] == 4


def test_no_sentence_or_frontier_crosses_recipes(trust_run):
    run = load_checked(trust_run)
    group_of = _group_of(groups.quality_groups(run))
    models = set(group_of)
    sentences = [f.text for f in findings_module.all_findings(run)]
    for fn in (charts_module.bpb_vs_params, charts_module.bpb_vs_train_flops, charts_module.bpb_vs_loops):
        chart = fn(run)
        assert isinstance(chart, charts_module.Chart), chart
        sentences += re.split(r"; |\. ", chart.reading)
    compared = 0
    for sentence in sentences:
        if sentence.startswith("Not compared"):
            continue  # the sentence that lists the other groups, saying they are not compared
        for clause in re.split(r"; ", sentence):
            named = _named(clause, models)
            if " vs " in clause or "frontier" in clause or "lowest" in clause:
                assert len({group_of[m] for m in named}) <= 1, clause
                compared += bool(named)
    assert compared >= 3
    # The frontier of each panel holds only that recipe's models.
    df = charts_module._quality_groups(run)
    fig, fronts = charts_module._quality_panels(df, "params_unique", "params")
    for key, front in fronts.items():
        members = df[df["group_key"] == key].reset_index(drop=True)
        assert {group_of[m] for m in members.iloc[front]["model"]} == {key}
    # The iso-parameter table never divides a bpb across recipes.
    iso = frames.matched_pairs(run, "iso-param").set_index("looped")
    assert np.isfinite(iso.loc["parcae-micro", "bpb ratio"])
    assert np.isnan(iso.loc["rdm-micro", "bpb ratio"]) and "different recipes" in iso.loc["rdm-micro", "bpb compared"]


def test_a_gap_beyond_the_seed_spread_is_a_difference_and_one_inside_is_noise(tmp_path):
    real = load_checked(write_two_recipe_run(tmp_path / "real", gap=0.100))
    noise = load_checked(write_two_recipe_run(tmp_path / "noise", gap=0.002))
    one_seed = load_checked(write_two_recipe_run(tmp_path / "one", seeds=(0,), gap=0.100))
    text = {name: next(f.text for f in findings_module.all_findings(r) if f.topic.startswith("quality at equal unique"))
            for name, r in (("real", real), ("noise", noise), ("one", one_seed))}
    assert "95% CI" in text["real"] and "within seed noise" not in text["real"] and "± " in text["real"]
    assert "within seed noise" in text["noise"]
    assert "spread unknown" in text["one"]
    d = groups.difference("a", np.array([1.0, 1.01, 0.99]), "b", np.array([1.1, 1.11, 1.09]))
    assert d.real and d.rel_high < 0
    assert not groups.difference("a", np.array([1.0, 1.05, 0.95]), "b", np.array([1.01, 1.06, 0.96])).real


def test_overthinking_only_when_the_rise_beats_the_seed_spread(tmp_path):
    flat = load_checked(write_two_recipe_run(tmp_path / "flat", overthink=0.001))
    rise = load_checked(write_two_recipe_run(tmp_path / "rise", overthink=0.08))
    flat_text = charts_module.bpb_vs_loops(flat).reading
    rise_text = charts_module.bpb_vs_loops(rise).reading
    assert "overthinking" not in flat_text.lower() and "OVERTHINKING" not in rise_text
    assert "overthinking" in rise_text
    loops = [f.text for f in findings_module.loop_findings(rise)]
    assert any("overthinking" in t for t in loops)
    assert any("saturated" in t for t in (f.text for f in findings_module.loop_findings(flat)))


def test_findings_open_the_report_and_json_gives_them_to_machines(trust_run, capsys):
    paths = write_report(trust_run)
    md = paths["md"].read_text()
    assert md.index("## Findings") < md.index("## Run") < md.index("## Charts")
    html = paths["html"].read_text()
    assert html.index("Findings") < html.index("<dl class='header'>")
    assert main(["report", str(trust_run), "--format", "json"]) == 0
    doc = json.loads(capsys.readouterr().out, parse_constant=lambda c: pytest.fail(f"not strict JSON: {c}"))
    topics = {f["topic"] for f in doc["findings"]}
    assert {"quality at equal unique parameters", "other recipes", "seed spread"} <= topics
    pair = next(f for f in doc["findings"] if f["topic"] == "quality at equal unique parameters")["numbers"]["pairs"][0]
    assert pair["n_seeds"] == [3, 3] and pair["verdict"] == "lower"


def test_every_png_has_a_title(trust_run):
    from PIL import Image

    write_report(trust_run)
    for chart in ("bpb_vs_params", "bpb_vs_loops"):
        assert "Title" not in Image.open(trust_run / "charts" / f"{chart}.png").info  # drawn, not metadata
        svg = (trust_run / "charts" / f"{chart}.svg").read_text()
        assert "Bits per byte" in svg or "Bits" in svg


# --- validity -------------------------------------------------------------------------------------------------


def _rows(**kw) -> pd.DataFrame:
    base = {"cell_id": "c1", "metric": "mfu", "stat": "", "unit": "fraction", "value": 0.5,
            "source": "model FLOP/s / calibrated fp32 GEMM peak 4.52e+10 FLOP/s", "status": "ok"}
    return pd.DataFrame([{**base, **kw}])


def test_mfu_is_reexpressed_against_the_best_probe_and_flagged_above_one():
    manifest = {"calibration": {"gemm_fp32_flops": 2.0e11, "mem_bw_bytes_per_s": 2e10}}
    out = validity.annotate(_rows(value=1.49), manifest)
    assert out["value"].iloc[0] == pytest.approx(1.49 * 4.52e10 / 2.0e11)
    assert out["validity"].iloc[0] == validity.OK
    still = validity.annotate(_rows(value=1.49), {"calibration": {"gemm_fp32_flops": 4.52e10}})
    assert still["validity"].iloc[0] == "mfu>1"
    # a row that does not name its peak was divided by the run's first calibration
    unnamed = validity.annotate(_rows(value=1.2, source="analytic FLOPs / calibrated GEMM peak", dtype="float32"),
                                {**manifest, "calibration_first": {"gemm_fp32_flops": 5e10}})
    assert unnamed["value"].iloc[0] == pytest.approx(1.2 * 5e10 / 2e11) and unnamed["validity"].iloc[0] == "ok"


def test_bandwidth_above_the_copy_rate_busy_machines_and_throttling_are_flagged():
    manifest = {"calibration": {"mem_bw_bytes_per_s": 1e10},
                "cell_conditions": {"c2": {"load_1m": 3.2, "cores": 2}, "c1": {"load_1m": 1.1, "cores": 2}}}
    rows = pd.concat([_rows(metric="achieved_bw", unit="bytes/s", value=2e10),
                      _rows(cell_id="c2", metric="tokens_per_s", unit="tokens/s", value=100.0),
                      _rows(cell_id="c3", metric="gpu_throttled", unit="flag", value=1.0, source="sw_power_cap"),
                      _rows(cell_id="c3", metric="tokens_per_s", unit="tokens/s", value=100.0)], ignore_index=True)
    flags = validity.validity(rows, manifest).tolist()
    assert flags[0] == "above calibrated copy rate"
    assert flags[1] == "machine busy: load 3.2 > 1.5 x 2 cores"
    assert flags[3] == "throttled: sw_power_cap"
    refused = validity.gate_refusals(rows, {**manifest, "run_id": "r"}, {"tokens_per_s"})
    assert len(refused) == 2 and all("tokens_per_s" in line for line in refused)
    assert validity.gate_refusals(rows.iloc[[0]], manifest, {"tokens_per_s"}) == []


def test_report_shows_mfu_as_percent_and_the_flag(tmp_path):
    from tests.test_report import write_run

    run = frames.load_run(write_run(tmp_path / "run", RunSpec(failed_cell=False)))
    mfu = run.results["metric"] == "mfu"
    run.results.loc[mfu, "value"] = run.results.loc[mfu, "value"] * 60  # impossible: above 100%
    run.results = validity.annotate(run.results, run.manifest)
    table = tables.throughput_table(run)
    assert "MFU %" in table.columns and "MFU" not in table.columns and "validity" in table.columns
    flagged = tables.validity_table(run)
    assert not flagged.empty and (flagged["flag"] == "mfu>1").any()


# --- seeds axis -----------------------------------------------------------------------------------------------


def test_seeds_axis_trains_and_evaluates_once_per_seed_and_keeps_old_ids(tmp_path):
    text = """
[profile]
seed = 0
[train]
tokens = 1000
[[sweep]]
model = ["gpt-micro"]
workload = ["train", "eval"]
seeds = [0, 1, 2]
"""
    path = tmp_path / "p.toml"
    path.write_text(text)
    cells = expand(load_profile(str(path)))
    train = [c for c in cells if c.workload == "train"]
    evals = [c for c in cells if c.workload == "eval"]
    assert sorted(c.seed for c in train) == [0, 1, 2] and len(evals) == 3
    by_id = {c.cell_id: c for c in train}
    assert all(by_id[e.depends_on].seed == e.seed for e in evals)
    path.write_text(text.replace("seeds = [0, 1, 2]\n", ""))
    plain = expand(load_profile(str(path)))
    assert {c.cell_id for c in plain} <= {c.cell_id for c in cells}  # seed 0 keeps the id it had


def test_tokens_axis_gives_a_sweep_its_own_budget_and_links_each_eval_to_its_budget(tmp_path):
    text = """
[train]
tokens = 1000
tokens_per_param = 3.0
[[sweep]]
model = "gpt-micro"
workload = ["train", "eval"]
loops_test = 1
[[sweep]]
model = "gpt-micro"
workload = ["train", "eval"]
tokens = [4000, 8000]
"""
    path = tmp_path / "p.toml"
    path.write_text(text)
    cells = expand(load_profile(str(path)))
    train = {c.cell_id: c for c in cells if c.workload == "train"}
    budgets = sorted((c.settings["train"].get("tokens"), c.settings["train"].get("tokens_per_param"))
                     for c in train.values())
    assert budgets == [(1000, 3.0), (4000, None), (8000, None)]  # the axis replaces every budget key
    evals = [c for c in cells if c.workload == "eval"]
    assert len(evals) == 3
    for e in evals:
        assert train[e.depends_on].settings["train"]["tokens"] == e.settings["eval"].get("train_tokens", 1000)
    path.write_text(text.replace("tokens = [4000, 8000]", "tokens = 0"))
    with pytest.raises(ConfigError, match=r"sweep\[1\]\.tokens"):
        expand(load_profile(str(path)))


def test_cpu_profile_main_pair_trains_longer_than_its_stability_sweep():
    cells = expand(load_profile("cpu"))
    tokens = {(c.model, c.lr): c.settings["train"]["tokens"] for c in cells if c.workload == "train"}
    assert tokens[("gpt-micro", 3e-3)] == 600_000 and tokens[("parcae-micro", 2e-3)] == 150_000


def test_committed_baseline_cell_ids_still_match():
    manifest = json.loads(Path("runs/baseline/ci/manifest.json").read_text())
    assert {c.cell_id for c in expand(load_profile("ci"))} == set(manifest["cell_ids"])


def test_cpu_profile_trains_its_main_pair_over_seeds():
    cells = expand(load_profile("cpu"))
    seeds = {}
    for c in cells:
        if c.workload == "train":
            seeds.setdefault(c.model, set()).add(c.seed)
    assert len(seeds["gpt-micro"]) >= 2 and len(seeds["parcae-micro"]) >= 2


# --- CLI surface ----------------------------------------------------------------------------------------------


def test_version_and_help_explain_arguments_and_exit_codes(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0 and capsys.readouterr().out.startswith("loopscope ")
    with pytest.raises(SystemExit):
        main(["compare", "--help"])
    out = capsys.readouterr().out
    assert "pytest-benchmark JSON" in out and "exit codes" in out and "--changed" in out


def test_compare_changed_shows_only_changed_rows_with_units(tmp_path, capsys):
    from tests.rundir_factory import write_synthetic_run

    base = write_synthetic_run(tmp_path / "a", run_id="a", seed=1)
    cand = write_synthetic_run(tmp_path / "b", run_id="b", seed=2, slowdown={0: 2.0})
    assert main(["compare", str(base), str(cand)]) == 0
    full = capsys.readouterr().out
    assert "| unit |" in full.replace("| unit |", "| unit |") and "| ms |" in full
    assert main(["compare", "--changed", str(base), str(cand)]) == 0
    changed = capsys.readouterr().out
    rows = [line for line in changed.splitlines() if line.startswith("| ") and "---" not in line][1:]
    assert rows and all(("worse" in r) or ("better" in r) or ("changed" in r) for r in rows)
    assert len(rows) < len([line for line in full.splitlines() if line.startswith("| ")]) - 2
    assert "--changed:" in changed


def test_export_and_history_commands(tmp_path, capsys):
    from tests.rundir_factory import write_synthetic_run

    runs = [write_synthetic_run(tmp_path / f"r{i}", run_id=f"r{i}", seed=i, slowdown={0: 1 + 0.3 * i})
            for i in range(3)]
    out = tmp_path / "bench.json"
    assert main(["export", "--format", "pytest-benchmark", str(runs[0]), "--out", str(out)]) == 0
    doc = json.loads(out.read_text())
    assert doc["benchmarks"] and "stats" in doc["benchmarks"][0]
    assert main(["history", *map(str, runs), "--out", str(tmp_path / "hist")]) == 0
    printed = capsys.readouterr().out
    assert "#1" in printed and "#3" in printed and "latency_ms" in printed
    pngs = sorted(p.name for p in (tmp_path / "hist").glob("history_*.png"))
    assert "history_latency_ms.png" in pngs and "history_tokens_per_s.png" in pngs
    table = pd.read_csv(tmp_path / "hist" / "history.csv")
    assert set(table["run_id"]) == {"r0", "r1", "r2"}
    assert main(["history", str(runs[0])]) == 2  # one run is not a history


def test_run_header_names_every_training_budget_its_sweeps_set():
    from types import SimpleNamespace

    import pandas as pd

    from loopscope.reports.report import _train_budgets, _training_text

    def record(workload, train):
        return {"cell": {"workload": workload, "settings": {"train": train}}}

    run = SimpleNamespace(cells={"a": record("train", {"tokens": 600_000}),
                                 "b": record("train", {"tokens": 150_000}),
                                 "c": record("train", {"tokens": 150_000, "tokens_per_param": 2.0}),
                                 "d": record("eval", {"tokens": 999})})
    budgets = _train_budgets(run)
    assert budgets == ["600,000 tokens", "150,000 tokens", "2 tokens/param"]
    cells = pd.DataFrame({"workload": ["train", "eval"]})
    assert _training_text({"train": {"tokens": 150_000}}, cells, budgets).startswith(
        "600,000 tokens or 150,000 tokens or 2 tokens/param (by sweep")
    assert _training_text({"train": {"tokens": 150_000}}, cells, ["600,000 tokens"]).startswith("600,000 tokens per")


def test_training_loss_keeps_recipes_in_their_own_panels_and_rankings(trust_run):
    run = load_checked(trust_run)
    chart = charts_module.train_loss(run)
    assert isinstance(chart, charts_module.Chart), chart
    titles = [ax.get_title() for ax in chart.figure.axes if ax.get_title()]
    assert sorted(titles) == sorted([f"{m} · batch 16x64" for m in PLAN_A] + [f"{m} · batch 4x64" for m in PLAN_B])
    clauses = chart.reading.rstrip(".").split("; ")
    assert [c.split("]")[0] for c in clauses] == ["[batch 4x64", "[batch 16x64"]  # recipe B's loss is lower
    for clause in clauses:
        named = _named(clause, set(PLAN_A) | set(PLAN_B))
        assert named in (set(PLAN_A), set(PLAN_B)), clause


def test_log_axes_are_labelled_in_plain_text_since_the_report_turns_mathtext_off():
    import matplotlib.pyplot as plt

    @charts_module._styled
    def log_chart(_run):
        fig, ax = plt.subplots()
        ax.plot([1, 2, 3], [1.0, 1e4, 1e16])
        ax.set_yscale("log")
        return charts_module.Chart("log", "log", fig, "")

    with plt.rc_context({"text.parse_math": False}):
        chart = log_chart(None)
        chart.figure.canvas.draw()
        labels = [t.get_text() for t in chart.figure.axes[0].get_yticklabels() if t.get_text()]
    plt.close(chart.figure)
    assert labels and not any("$" in label or "mathdefault" in label for label in labels), labels
    assert "1e+16" in labels
