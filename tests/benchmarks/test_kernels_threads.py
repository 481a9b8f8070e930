"""Do numba's pool and torch's OpenMP pool oversubscribe the 2 cores? A numba kernel is timed alone and
right after a torch matmul (no gap), and a torch matmul alone and right after a numba kernel. Run:

    .venv/bin/pytest tests/benchmarks/test_kernels_threads.py --benchmark-only -p no:cacheprovider -s
"""

from __future__ import annotations

from loopscope.kernels.bench import FULL, format_table, interference_benchmarks, threading_layer_benchmarks


def test_pools_do_not_oversubscribe(benchmark) -> None:  # noqa: ANN001 - pytest-benchmark fixture
    rows = benchmark.pedantic(lambda: interference_benchmarks(FULL), rounds=1, iterations=1)
    print("\n" + format_table(rows))
    ratios = {r["name"]: r for r in rows if r["metric"] == "slowdown_ratio"}
    benchmark.extra_info["slowdown"] = {k: (r["value"], r["ci_low"], r["ci_high"]) for k, r in ratios.items()}
    for name, r in ratios.items():  # oversubscription shows as whole scheduler ticks: 10x and more
        assert r["ci_low"] < 2.0, f"{name}: {r['value']:.1f}x slower right after the other pool"


def test_threading_layers_side_by_side(benchmark) -> None:  # noqa: ANN001 - pytest-benchmark fixture
    """Why loopscope.kernels picks numba's workqueue layer: omp vs workqueue, each in a fresh process."""
    rows = benchmark.pedantic(threading_layer_benchmarks, rounds=1, iterations=1)
    print("\n" + format_table(rows))
    benchmark.extra_info["layers"] = {f"{r['backend']} {r['metric']}": r["value"] for r in rows}
    assert {r["backend"] for r in rows} == {"layer=omp", "layer=workqueue"}
