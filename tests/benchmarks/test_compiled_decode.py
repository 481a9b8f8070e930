"""Compiled vs eager decode of the tiny presets at batch 1 on this machine's CPU (inductor, no CUDA graphs).

Both decoders live in one process and are measured interleaved (eager, compiled, compiled, eager, ...) on
the same prompt, so machine noise hits both alike; the ratio of medians is what is asserted. Run:

    .venv/bin/pytest tests/benchmarks/test_compiled_decode.py --benchmark-enable -p no:cacheprovider -s
"""

from __future__ import annotations

import statistics
import time

import pytest
import torch

from loopscope.models import build
from loopscope.models.compiled import Decoder

STEPS = 24
ROUNDS = 6


def tokens_per_s(dec: Decoder, prompt: torch.Tensor) -> float:
    dec.prefill(prompt)
    tok = torch.zeros(1, dtype=torch.int64)
    t0 = time.perf_counter()
    for _ in range(STEPS):
        tok = dec.step(tok).argmax(-1)
    return STEPS / (time.perf_counter() - t0)


def compare(name: str, loops: int | None = 4) -> dict[str, float]:
    """One intra-op thread: batch-1 decode of a tiny model has nothing to split, and on a shared machine extra
    threads only spin against each other (both decoders run under the same setting)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _compare(name, loops)
    finally:
        torch.set_num_threads(threads)


def _compare(name: str, loops: int | None) -> dict[str, float]:
    torch._dynamo.reset()
    model = build(name, seed=0).eval()
    prompt = torch.randint(0, 256, (1, 32), generator=torch.Generator().manual_seed(0))
    eager = Decoder(model, batch=1, max_len=64, loops=loops, compile=False)
    compiled = Decoder(model, batch=1, max_len=64, loops=loops, compile=True)
    t0 = time.perf_counter()
    tokens_per_s(compiled, prompt)  # compiles the prefill and the step
    compile_s = time.perf_counter() - t0
    rates: dict[bool, list[float]] = {False: [], True: []}
    for r in range(ROUNDS):
        order = (eager, compiled) if r % 2 == 0 else (compiled, eager)
        for dec in order:
            rates[dec.compiled].append(tokens_per_s(dec, prompt))
    eager_med, compiled_med = statistics.median(rates[False]), statistics.median(rates[True])
    return {"eager_tokens_per_s": eager_med, "compiled_tokens_per_s": compiled_med,
            "ratio": compiled_med / eager_med, "compile_s": compile_s, "engine": compiled.engine}


@pytest.mark.parametrize("name", ["gpt-tiny", "parcae-tiny", "looped-tiny", "rdm-tiny", "ut-tiny"])
def test_compiled_decode_is_at_least_1_5x_eager(benchmark, name) -> None:  # noqa: ANN001 - fixture
    result = benchmark.pedantic(compare, args=(name,), rounds=1, iterations=1)
    print(f"\n{name} batch 1: eager {result['eager_tokens_per_s']:.1f} tok/s, compiled "
          f"{result['compiled_tokens_per_s']:.1f} tok/s, ratio {result['ratio']:.2f}x, "
          f"compile {result['compile_s']:.0f} s ({result['engine']})")
    benchmark.extra_info.update(result)
    assert result["engine"].startswith("torch.compile(inductor")
    assert result["ratio"] >= 1.5, result
