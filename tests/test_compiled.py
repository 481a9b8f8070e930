"""Compiled decode equals eager decode (fp32, tight tolerance) for every family and both KV policies, with the
same code path run eagerly and through inductor (no CUDA graphs on a CPU); training compiled per block has no
graph break and no recompilation whatever loop count the sampler draws."""

from __future__ import annotations

import pytest
import torch
import torch._dynamo
from torch._dynamo.utils import counters

from loopscope.models import KVCache, build
from loopscope.models.cache import StaticKVCache
from loopscope.models.compiled import Decoder, compile_blocks

FAMILIES = ["gpt-micro", "parcae-micro", "rdm-micro", "looped-micro", "ut-micro"]
CASES = [(m, p) for m in FAMILIES for p in (("per-loop",) if m.startswith("gpt") else ("per-loop", "last-loop"))]
TOL = dict(rtol=1e-5, atol=1e-5)


def _prompt(n: int = 10, batch: int = 1) -> torch.Tensor:
    return torch.randint(0, 256, (batch, n), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("name,policy", CASES)
def test_static_cache_decoding_equals_the_dynamic_cache(name, policy):
    """The static cache (fixed buffers, masked attention) gives the logits of the existing KVCache path."""
    model = build(name, seed=0).eval()
    loops = 2 if model.config.is_looped else None
    prompt = _prompt()
    dec = Decoder(model, batch=1, max_len=16, loops=loops, policy=policy, compile=False)
    model.reseed(3)
    static = [dec.prefill(prompt)]
    nxt = static[-1].argmax(-1)
    for _ in range(4):
        static.append(dec.step(nxt))
        nxt = static[-1].argmax(-1)
    model.reseed(3)
    cache = KVCache(16, policy)
    kwargs = {} if loops is None else {"loops": loops}
    with torch.inference_mode():
        dynamic = [model(prompt, cache=cache, **kwargs)[:, -1]]
        for logits in static[:-1]:
            dynamic.append(model(logits.argmax(-1)[:, None], cache=cache, **kwargs)[:, -1])
    for a, b in zip(static, dynamic, strict=True):
        torch.testing.assert_close(a, b, **TOL)


def compiled_vs_eager(name: str, policy: str, batch: int = 1) -> None:
    torch._dynamo.reset()
    model = build(name, seed=0).eval()
    loops = 2 if model.config.is_looped else None
    prompt = _prompt(batch=batch)
    eager = Decoder(model, batch=batch, max_len=16, loops=loops, policy=policy, compile=False)
    compiled = Decoder(model, batch=batch, max_len=16, loops=loops, policy=policy, compile=True)
    outs = {}
    for dec in (eager, compiled):
        model.reseed(5)  # the same h0 draws on both paths
        logits = [dec.prefill(prompt)]
        tok = torch.arange(batch) % 256
        for _ in range(3):
            logits.append(dec.step(tok))
        outs[dec.compiled] = logits
    assert compiled.engine.startswith("torch.compile(inductor"), compiled.engine
    assert compiled.graphs >= 2  # the prefill and the one-token step
    for a, b in zip(outs[True], outs[False], strict=True):
        torch.testing.assert_close(a, b, **TOL)


@pytest.mark.slow
def test_compiled_decode_equals_eager_parcae():
    compiled_vs_eager("parcae-micro", "per-loop")


def test_the_compiled_step_is_one_graph_with_the_loops_unrolled():
    """No graph break in the one-token step of a looped model at its fixed T (so a GPU captures it whole)."""
    model = build("parcae-micro", seed=0).eval()
    cache = StaticKVCache(16, "per-loop")
    with torch.inference_mode():
        model(_prompt(4), loops=3, cache=cache)
        explained = torch._dynamo.explain(lambda idx, h0: model(idx, loops=3, cache=cache, h0=h0))(
            torch.zeros(1, 1, dtype=torch.int64), torch.zeros(1, 1, model.config.d_model))
    assert explained.graph_break_count == 0 and explained.graph_count == 1, explained.break_reasons


@pytest.mark.parametrize("name", ["parcae-micro", "rdm-micro"])
def test_training_compiled_per_block_has_no_graph_break_for_sampled_loops(name):
    torch._dynamo.reset()
    counters.clear()
    model = build(name, seed=0).train()
    assert compile_blocks(model, backend="aot_eager") == model.config.n_physical_layers
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    seen_loops = set()
    x = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(1))
    for step in range(6):
        model.reseed(step)
        stats: dict = {}
        loss = model.compute_loss(x[:, :-1], x[:, 1:], stats=stats)
        seen_loops.update(stats["loops_per_sequence"])
        loss.backward()
        opt.step()
        opt.zero_grad()
        if step == 1:
            graphs_after_warmup = counters["stats"]["unique_graphs"]
    assert len(seen_loops) > 1, seen_loops  # the sampler really drew different loop counts
    assert sum(counters["graph_break"].values()) == 0, dict(counters["graph_break"])
    assert counters["stats"]["unique_graphs"] == graphs_after_warmup  # no recompilation for new loop counts
    assert counters["stats"]["unique_graphs"] > 0
