"""Per-op benchmarks: numba vs torch eager vs torch.compile, side by side in one run, with the GEMM
decision (hand-tiled packed kernel vs np.dot inside njit) kept as a measurement. Run explicitly:

    .venv/bin/pytest tests/benchmarks/test_kernels_ops.py --benchmark-only -p no:cacheprovider -s

Nothing here asserts an absolute time. The assertions catch the silent 3x losses the probe warned about
(a code-layout change that drops a register tile to memory), as ratios measured in the same rounds.
"""

from __future__ import annotations

from loopscope.kernels.bench import FULL, format_table, op_benchmarks, target_rows


def _by(rows: list[dict], name: str, backend: str, metric: str = "time_ms") -> dict:
    return next(r for r in rows if r["name"] == name and r["backend"] == backend and r["metric"] == metric)


def test_op_ratios(benchmark) -> None:  # noqa: ANN001 - pytest-benchmark fixture
    rows = benchmark.pedantic(lambda: op_benchmarks(FULL), rounds=1, iterations=1)
    print("\n" + format_table(rows + target_rows(rows)))
    benchmark.extra_info["rows"] = [{k: r[k] for k in ("name", "backend", "metric", "value", "time_ratio_vs_torch")}
                                    for r in rows]
    for name in {r["name"] for r in rows if r["name"].startswith("matmul")}:
        packed = _by(rows, name, "numba", "gflop_per_s")["value"]
        blas = _by(rows, name, "numba-npdot", "gflop_per_s")["value"]
        assert packed >= 0.5 * blas, f"{name}: packed GEMM {packed:.0f} GFLOP/s < half of np.dot's {blas:.0f}"
    for r in rows:
        if r["backend"] == "numba" and r["metric"] == "time_ms":
            assert r["time_ratio_vs_torch"] < 3.0, f"{r['name']}: numba takes {r['time_ratio_vs_torch']:.1f}x torch"
