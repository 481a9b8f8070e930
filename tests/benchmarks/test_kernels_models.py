"""Per-model benchmarks: prefill tokens/s of the numba engine vs torch eager vs torch.compile for d=256
(B8 T256) and d=512 (B4 T512), dense 8x1, looped 1x8 and 2x4; batch-1 decode tokens/s. Prints each target
of issue #6 as met or MISSED with the measured ratio. Run explicitly (many minutes; torch.compile included):

    .venv/bin/pytest tests/benchmarks/test_kernels_models.py --benchmark-only -p no:cacheprovider -s
"""

from __future__ import annotations

from loopscope.kernels.bench import FULL, format_table, model_benchmarks, target_rows


def test_model_ratios(benchmark) -> None:  # noqa: ANN001 - pytest-benchmark fixture
    rows = benchmark.pedantic(lambda: model_benchmarks(FULL), rounds=1, iterations=1)
    targets = target_rows(rows)
    print("\n" + format_table(rows + targets))
    benchmark.extra_info["targets"] = [{k: t[k] for k in ("name", "metric", "value", "bound", "met")} for t in targets]
    assert targets, "no target rows: the model benchmarks produced no numba rows"
    for r in rows:  # a numba engine 3x slower than eager is a bug, not noise
        if r["backend"] == "numba" and r["metric"] == "time_ms":
            assert r["time_ratio_vs_torch"] < 3.0, f"{r['name']}: numba takes {r['time_ratio_vs_torch']:.1f}x torch"
