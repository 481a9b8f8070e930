"""Region labels must leave an unprofiled forward unchanged: the forward as shipped (every `region(...)`
checks the profiler state and returns a shared no-op) against the same forward with the checks patched out,
side by side in one run.

The model is parcae-micro at 2 x 32 tokens with 4 loops: 18 labels on a forward of 2-3 ms, the worst case for
the labels' share. torch runs on one thread, so the thread's CPU time is the forward's cost; blocks of the two
variants alternate within each round. Two checks:
- the CPU-time and wall-time ratios (shipped / patched) are not above 1.02 with 95% confidence (the lower end
  of their bootstrap CIs; on a busy shared machine both drift by several percent between blocks);
- the whole cost of the labels when off, `with region(name): pass` timed on its own (the flag checks and the
  `with` on the shared no-op), times the labels per forward (counted under a profiler), is under 1% of the
  forward: the precise bound, which machine noise cannot blur.
Run explicitly:

    .venv/bin/pytest tests/benchmarks/test_profiling_overhead.py --benchmark-only -p no:cacheprovider -s
"""

from __future__ import annotations

import importlib
import time
import timeit
from contextlib import nullcontext

import numpy as np
import pytest
import torch

from loopscope.bench.stats import ratio_ci
from loopscope.models import build
from loopscope.models.regions import is_region, region

LABELLED_MODULES = ("gpt", "parcae", "rdm", "looped", "ut", "recurrence")
CALLS = 20  # forwards per block
ROUNDS = 25
_OFF = nullcontext()


@pytest.fixture(scope="module")
def forward():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    model = build("parcae-micro", seed=0).eval()
    idx = torch.randint(0, 256, (2, 32), generator=torch.Generator().manual_seed(0))

    def call() -> None:
        with torch.inference_mode():
            model(idx, loops=4)
    for _ in range(5):
        call()
    yield call
    torch.set_num_threads(before)


@pytest.fixture
def no_checks(monkeypatch):
    """Patch the families' `region` to return the shared no-op without checking the profiler."""
    def patch() -> None:
        for name in LABELLED_MODULES:
            monkeypatch.setattr(importlib.import_module(f"loopscope.models.{name}"), "region", lambda _name: _OFF)
    return patch


def _block(call) -> None:
    for _ in range(CALLS):
        call()


@pytest.mark.benchmark(group="profiling off: a block of 20 parcae-micro forwards")
@pytest.mark.parametrize("variant", ["shipped", "checks-patched-out"])
def test_forward_block(benchmark, forward, no_checks, variant):
    if variant != "shipped":
        no_checks()
    benchmark.pedantic(_block, args=(forward,), rounds=ROUNDS, iterations=1, warmup_rounds=1)


@pytest.mark.benchmark(group="profiling off: interleaved ratio")
def test_labels_leave_the_forward_unchanged(benchmark, forward, monkeypatch):
    modules = [importlib.import_module(f"loopscope.models.{name}") for name in LABELLED_MODULES]
    cpu: dict[str, list[float]] = {"shipped": [], "patched": []}
    wall: dict[str, list[float]] = {"shipped": [], "patched": []}

    def one_round() -> None:
        order = ("shipped", "patched") if len(cpu["shipped"]) % 2 == 0 else ("patched", "shipped")
        for variant in order:
            for module in modules:
                monkeypatch.setattr(module, "region", region if variant == "shipped" else (lambda _name: _OFF))
            w0, c0 = time.perf_counter(), time.thread_time()
            _block(forward)
            cpu[variant].append((time.thread_time() - c0) / CALLS)
            wall[variant].append((time.perf_counter() - w0) / CALLS)

    benchmark.pedantic(one_round, rounds=ROUNDS, iterations=1, warmup_rounds=0)
    for module in modules:
        monkeypatch.setattr(module, "region", region)
    cpu_ratio, cpu_lo, cpu_hi = ratio_ci(cpu["patched"], cpu["shipped"])
    wall_ratio, wall_lo, wall_hi = ratio_ci(wall["patched"], wall["shipped"])

    # The labels' whole cost when off, per label, times the labels per forward.
    with torch.profiler.profile() as prof:
        forward()
    labels = sum(1 for e in prof.events() if is_region(e.name))
    with_cost_s = min(timeit.repeat("with region('loop[3]'): pass", globals={"region": region}, number=100_000,
                                    repeat=5)) / 100_000
    residual = labels * with_cost_s / float(np.median(cpu["patched"]))

    benchmark.extra_info.update({"cpu_ratio": cpu_ratio, "cpu_ratio_ci95": [cpu_lo, cpu_hi],
                                 "wall_ratio": wall_ratio, "wall_ratio_ci95": [wall_lo, wall_hi],
                                 "labels_per_forward": labels, "labels_off_fraction": residual,
                                 "forward_cpu_ms": float(np.median(cpu["patched"])) * 1e3})
    print(f"\nforward {np.median(cpu['patched']) * 1e3:.3f} ms CPU, {labels} labels: CPU ratio {cpu_ratio:.4f} "
          f"(95% CI {cpu_lo:.4f}-{cpu_hi:.4f}), wall ratio {wall_ratio:.4f} (95% CI {wall_lo:.4f}-{wall_hi:.4f}); "
          f"a label when off: {with_cost_s * 1e9:.0f} ns x {labels} = {residual * 100:.3f}% of the forward")
    assert labels >= 15
    assert cpu_lo < 1.02, f"the label checks add more than 2% CPU with 95% confidence ({cpu_lo:.4f}-{cpu_hi:.4f})"
    assert wall_lo < 1.02, f"wall-clock cost above 2% with 95% confidence ({wall_lo:.4f}-{wall_hi:.4f})"
    assert residual < 0.01
