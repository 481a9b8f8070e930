"""First-call JIT time of the engine, cold (empty numba cache, fresh process) and warm (a second fresh
process that finds the cache): with cache=True the second process must start warm. Run:

    .venv/bin/pytest tests/benchmarks/test_kernels_compile.py --benchmark-only -p no:cacheprovider -s
"""

from __future__ import annotations

from loopscope.kernels.bench import compile_benchmarks, format_table


def test_second_process_starts_warm(benchmark) -> None:  # noqa: ANN001 - pytest-benchmark fixture
    rows = benchmark.pedantic(compile_benchmarks, rounds=1, iterations=1)
    print("\n" + format_table(rows))
    cold = next(r["value"] for r in rows if "cold" in r["name"])
    warm = next(r["value"] for r in rows if "warm" in r["name"])
    benchmark.extra_info.update(cold_s=cold, warm_s=warm)
    assert warm < 0.25 * cold, f"warm start {warm:.1f} s is not much faster than cold {cold:.1f} s"
