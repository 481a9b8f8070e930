"""Probe-accuracy and stability-over-training charts: drawn from their data, omitted without it."""

from __future__ import annotations

from pathlib import Path

import matplotlib.pyplot as plt
import pandas as pd

from loopscope.bench.schema import RESULT_COLUMNS, SAMPLE_COLUMNS
from loopscope.reports.charts import Chart, Omitted
from loopscope.reports.frames import RunData
from loopscope.reports.quality_charts import probe_accuracy, stability_over_training


def _run(results: list[dict], samples: list[dict], cells: dict) -> RunData:
    res = pd.DataFrame([{c: None for c in RESULT_COLUMNS} | r for r in results], columns=list(RESULT_COLUMNS))
    for col in ("stat", "source", "reason"):
        res[col] = res[col].fillna("").astype(str)
    return RunData(Path("."), {}, res, pd.DataFrame(samples, columns=list(SAMPLE_COLUMNS)), cells)


def _acc(cell, model, family, depth, value):
    return {"cell_id": cell, "model": model, "family": family, "effective_depth": depth, "metric": "probe_accuracy",
            "stat": "", "value": value, "status": "ok", "workload": "eval"}


def test_probe_accuracy_chart_reads_its_numbers():
    run = _run([_acc("a", "gpt-micro", "gpt", 3, 0.31), _acc("b", "gpt-micro-l6", "gpt", 6, 0.42),
                _acc("c", "parcae-micro", "parcae", 3, 0.35), _acc("d", "parcae-micro", "parcae", 6, 0.55),
                {**_acc("e", "parcae-micro", "parcae", 6, 0.9), "stat": "hops=1"}], [], {})
    chart = probe_accuracy(run)
    assert isinstance(chart, Chart)
    assert "parcae-micro at depth 6 with 55.0%" in chart.reading  # the per-hop row is not the overall accuracy
    assert "Without chasing" not in chart.reading
    plt.close(chart.figure)


def test_probe_chart_draws_the_shortcut_baselines_and_says_when_nobody_beats_them():
    base = [{"cell_id": c, "model": "gpt-micro", "family": "gpt", "metric": "probe_baseline", "stat": name,
             "value": v, "status": "ok", "workload": "eval"} for c in ("a", "b") for name, v in
            (("echo start", 0.33), ("chance", 0.2))]
    run = _run([_acc("a", "gpt-micro", "gpt", 3, 0.331), _acc("b", "gpt-micro-l6", "gpt", 6, 0.328), *base], [], {})
    chart = probe_accuracy(run)
    assert "Without chasing any pointer a model scores 33.0% (echo start) and 20.0% (chance): no model here" \
        in chart.reading
    assert {line.get_label() for line in chart.figure.axes[0].lines} >= {"baseline: echo start", "baseline: chance"}
    plt.close(chart.figure)


def test_charts_are_omitted_without_data():
    empty = _run([], [], {})
    assert isinstance(probe_accuracy(empty), Omitted)
    assert isinstance(stability_over_training(empty), Omitted)


def test_stability_over_training_reads_first_and_last_values():
    samples = [{"run_id": "r", "cell_id": "t", "metric": "spectral_radius", "unit": "", "index": i, "value": v}
               for i, v in ((0, 0.45), (10, 0.5), (20, 0.62))]
    run = _run([], samples, {"t": {"label": "train parcae-micro"}})
    chart = stability_over_training(run)
    assert isinstance(chart, Chart)
    assert "train parcae-micro spectral_radius 0.45 -> 0.62" in chart.reading
    plt.close(chart.figure)


def test_a_loss_that_does_not_level_off_has_no_saturation_fit():
    import pytest

    from loopscope.reports.fits import fit_saturation

    # the looped-tiny curve of the cpu run: worse with every loop past training, no plateau
    with pytest.raises(ValueError, match="does not level off"):
        fit_saturation([1, 2, 4, 8], [3.872, 3.807, 3.95, 4.136])
    fit = fit_saturation([1, 2, 4, 8, 16], [4.0 + 1.5 * 2.718281828 ** (-0.7 * t) for t in (1, 2, 4, 8, 16)])
    assert abs(fit.L_inf - 4.0) < 1e-3
