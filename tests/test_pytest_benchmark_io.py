"""pytest-benchmark JSON: our export is read by pytest-benchmark itself; its files gate in loopscope."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from loopscope.reports.gate import gate, gate_runs
from loopscope.reports.pytest_benchmark import (
    benchmark_stats,
    export_pytest_benchmark,
    import_pytest_benchmark,
    read_pytest_benchmark,
)
from loopscope.reports.rundir import UnusableRunError, load_run
from tests.rundir_factory import write_synthetic_run

pytest_benchmark = pytest.importorskip("pytest_benchmark")


@pytest.mark.parametrize("n", [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 31, 60])
def test_stats_match_pytest_benchmark_definitions(n):
    from pytest_benchmark.stats import Stats

    rng = np.random.default_rng(n)
    data = rng.lognormal(-6.0, 0.3, n)
    data[rng.random(n) < 0.1] *= 5.0  # a few outliers, so the outlier counts are exercised
    reference = Stats()
    for value in data:
        reference.update(float(value))
    ours = benchmark_stats(data)
    for field in Stats.fields:
        theirs = getattr(reference, field)
        if isinstance(theirs, str):
            assert ours[field] == theirs, field
        else:
            assert ours[field] == pytest.approx(theirs, rel=1e-12, abs=1e-15), field


def _exported(tmp_path: Path, name: str, **kwargs) -> Path:
    run = write_synthetic_run(tmp_path / name, run_id=name, **kwargs)
    out = tmp_path / f"{name}.json"
    export = export_pytest_benchmark(run, out)
    assert len(export.document["benchmarks"]) == 4 and not export.skipped
    return out


def test_export_is_read_by_pytest_benchmark_compare(tmp_path):
    a = _exported(tmp_path, "a", seed=0)
    b = _exported(tmp_path, "b", seed=1, slowdown={3: 1.25})
    # pytest-benchmark's own loader (the one its `compare` command uses) takes the files whole...
    from pytest_benchmark.logger import Logger
    from pytest_benchmark.storage.file import FileStorage

    storage = FileStorage(tmp_path / "storage", logger=Logger(Logger.QUIET))
    loaded = list(storage.load_benchmarks(str(a), str(b)))
    assert len(loaded) == 8 and all(bench["rounds"] == 60 for bench in loaded)
    # ...and its command line prints them, with no "Failed to load" warning.
    proc = subprocess.run([sys.executable, "-m", "pytest_benchmark", "compare", str(a), str(b)],
                          cwd=tmp_path, capture_output=True, text=True, timeout=120)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output
    assert "Failed to load" not in output
    assert "latency_ms[parcae-tiny prefill numba/cpu b2 s64 r2/4 fp32 full]" in output
    assert output.count("latency_ms[") == 8


def test_export_then_import_gives_back_the_run(tmp_path):
    run_dir = write_synthetic_run(tmp_path / "a", run_id="a", seed=0)
    out = tmp_path / "a.json"
    export_pytest_benchmark(run_dir, out)
    original, restored = load_run(run_dir), read_pytest_benchmark(out)
    assert restored.run_id == "a" and restored.fingerprint == original.fingerprint
    key = ["cell_id", "metric", "stat"]
    left = original.results.sort_values(key).reset_index(drop=True)
    right = restored.results.sort_values(key).reset_index(drop=True)
    assert left[key].equals(right[key])
    np.testing.assert_allclose(left["value"], right["value"], rtol=1e-12)
    for cell_id, metric in original.sample_keys():
        np.testing.assert_allclose(restored.samples_for(cell_id, metric),
                                   original.samples_for(cell_id, metric), rtol=1e-12)
    # Written as a run directory, it loads like any other run.
    imported = import_pytest_benchmark(out, tmp_path / "imported")
    assert len(load_run(imported).results) == len(original.results)


def test_gate_on_exported_files_judges_several_per_side_and_one_per_side_as_unresolved(tmp_path):
    a = [_exported(tmp_path, f"a{i}", seed=i) for i in range(3)]
    a2 = [_exported(tmp_path, f"a2{i}", seed=10 + i) for i in range(3)]
    slow = [_exported(tmp_path, f"slow{i}", seed=20 + i, slowdown={3: 1.25}) for i in range(3)]
    assert gate_runs(a, a2).exit_code == 0
    result = gate_runs(a, slow)
    assert result.exit_code == 1 and "latency_ms" in set(result.regressions["metric"])
    single = gate(a[0], slow[0])  # one file per side: the noise floor is unknown, not p = 1e-12
    assert single.exit_code == 0
    assert "noise floor unknown" in single.render()


def test_export_skips_timing_metrics_without_samples(tmp_path):
    run = write_synthetic_run(tmp_path / "a", run_id="a", seed=0, with_samples=False)
    export = export_pytest_benchmark(run)
    assert export.document["benchmarks"] == []
    assert len(export.skipped) == 4 and all("no raw samples" in s for s in export.skipped)


BENCH_FILE = """
import os
import time


def test_sleep(benchmark):
    benchmark(time.sleep, float(os.environ["SLEEP_S"]))
"""


def _pytest_benchmark_json(tmp_path: Path, name: str, sleep_s: float) -> Path:
    test_file = tmp_path / "test_sleepy.py"
    test_file.write_text(textwrap.dedent(BENCH_FILE))
    out = tmp_path / f"{name}.json"
    cmd = [sys.executable, "-m", "pytest", str(test_file), "-q", "-p", "no:cacheprovider", "-o", "addopts=",
           "--rootdir", str(tmp_path), f"--benchmark-json={out}", "--benchmark-min-rounds=30",
           "--benchmark-max-time=0.05", "--benchmark-disable-gc"]
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "SLEEP_S": str(sleep_s)})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return out


def test_files_written_by_pytest_benchmark_gate_in_loopscope(tmp_path):
    # Each file is one pytest process: a process-level replicate. Written interleaved (A B A B ...), so a
    # change in the machine's load lands on both sides; judged across the files of each side.
    a, a2, slow = [], [], []
    for i in range(3):
        a.append(_pytest_benchmark_json(tmp_path, f"a{i}", 0.001))
        a2.append(_pytest_benchmark_json(tmp_path, f"aa{i}", 0.001))
        slow.append(_pytest_benchmark_json(tmp_path, f"slow{i}", 0.005))
    run = read_pytest_benchmark(a[0])
    assert run.fingerprint["source"] == "pytest-benchmark machine_info"
    row = run.results.query("metric == 'latency_ms' and stat == 'median'")
    assert len(row) == 1 and row["model"].iloc[0].endswith("test_sleepy.py::test_sleep")
    assert run.samples_for(row["cell_id"].iloc[0], "latency_ms").size >= 30
    assert gate_runs(a, a2).exit_code == 0, gate_runs(a, a2).render()
    result = gate_runs(a, slow)
    assert result.exit_code == 1, result.render()
    assert list(result.regressions["metric"]) == ["latency_ms"]


@pytest.mark.parametrize("content, where", [
    ("{not json", "unreadable"),
    (json.dumps({"machine_info": {}}), "'benchmarks'"),
    (json.dumps({"benchmarks": [{"name": "x"}]}), "benchmarks[0]"),
    (json.dumps({"benchmarks": [{"name": "x", "stats": {"mean": 1.0}}]}), "stats.median"),
    (json.dumps({"benchmarks": [{"name": "x", "stats": {"median": "fast"}}]}), "stats.median"),
])
def test_malformed_pytest_benchmark_files_are_unusable(tmp_path, content, where):
    path = tmp_path / "bad.json"
    path.write_text(content)
    with pytest.raises(UnusableRunError) as info:
        load_run(path)
    assert str(path) in str(info.value) and where in str(info.value)
