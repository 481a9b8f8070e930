"""KV-cache decoding, cache policies, test-time loop override and adaptive exit."""

import pytest
import torch

from loopscope.models import ExitRule, KVCache, build, preset
from loopscope.models.generation import decode_deviation, generate

FAMILY_PRESETS = ["gpt-micro", "parcae-micro", "rdm-micro", "looped-micro", "ut-micro", "looped-tiny-k1"]


def _nontrivial(name: str, **changes) -> torch.nn.Module:
    """A built model whose zero-initialised projections are perturbed, so every layer matters."""
    model = build(preset(name).replace(**changes) if changes else name, seed=0)
    with torch.no_grad():
        g = torch.Generator().manual_seed(1)
        for p in model.parameters():
            if p.dim() == 2 and not p.any():
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return model.eval()


@pytest.mark.parametrize("name", FAMILY_PRESETS)
def test_per_loop_decoding_reproduces_the_full_forward(name):
    model = _nontrivial(name)
    idx = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(0))
    loops = 3 if name.startswith("ut") else None  # ut: fixed steps (ACT halting is batch-dependent)
    dev = decode_deviation(model, idx, loops=loops, policy="per-loop", prefill=4)
    assert dev["max_abs"] < 1e-5, dev
    assert dev["argmax_mismatch"] == 0.0


def test_value_embeddings_and_chunked_prefill_decode_exactly():
    model = _nontrivial("parcae-micro", value_embeds=True)
    idx = torch.randint(0, 256, (1, 10))
    h0 = torch.randn(1, 10, 64) * 0.05
    with torch.no_grad():
        full = model(idx, h0=h0)
        cache = KVCache(16, "per-loop")
        parts = [model(idx[:, a:b], cache=cache, h0=h0[:, a:b]) for a, b in ((0, 3), (3, 7), (7, 10))]
    torch.testing.assert_close(torch.cat(parts, 1), full, rtol=0, atol=1e-5)
    assert cache.pos == 10


def test_last_loop_policy_is_cheaper_and_its_deviation_is_measured():
    model = _nontrivial("looped-micro")
    idx = torch.randint(0, 256, (1, 12), generator=torch.Generator().manual_seed(0))
    per_loop = decode_deviation(model, idx, policy="per-loop")
    last_loop = decode_deviation(model, idx, policy="last-loop")
    assert last_loop["cache_bytes"] < per_loop["cache_bytes"]
    assert last_loop["max_abs"] > 1e-3  # not exact, and reported as such
    assert last_loop["kl_mean"] > per_loop["kl_mean"]
    # a dense model has no loops: both policies are the same cache
    gpt = _nontrivial("gpt-micro")
    assert decode_deviation(gpt, idx, policy="last-loop")["max_abs"] < 1e-5


def test_cache_entries_per_policy():
    model = _nontrivial("parcae-micro")  # P/R/C 1/1/1, mu_rec 4
    for policy, entries in (("per-loop", 1 + 4 + 1), ("last-loop", 3)):
        cache = KVCache(8, policy)
        with torch.no_grad():
            model(torch.randint(0, 256, (1, 5)), cache=cache)
        assert cache.n_entries == entries
        assert cache.used_bytes() == 5 * entries * 2 * 64 * 4


def test_cache_errors_name_the_problem():
    with pytest.raises(ValueError, match="policy"):
        KVCache(8, "ring")
    cache = KVCache(4)
    with pytest.raises(ValueError, match="max_len"):
        build("gpt-micro", seed=0).eval()(torch.zeros(1, 5, dtype=torch.long), cache=cache)


def test_tokens_that_ran_fewer_loops_reuse_their_latest_entry():
    model = _nontrivial("parcae-micro")
    cache = KVCache(4, "per-loop")
    with torch.no_grad():
        model(torch.tensor([[5]]), loops=2, cache=cache)
        model(torch.tensor([[7]]), loops=3, cache=cache)
    key2, key1 = ("core", 2, 1), ("core", 1, 1)
    assert torch.equal(cache._k[key2][:, :, 0], cache._k[key1][:, :, 0])
    assert torch.equal(cache._v[key2][:, :, 0], cache._v[key1][:, :, 0])


def test_loop_override_changes_the_output():
    model = _nontrivial("parcae-micro", state_init="zero")
    idx = torch.randint(0, 256, (1, 8))
    with torch.no_grad():
        outs = [model(idx, loops=t) for t in (1, 2, 8)]
        assert torch.equal(model(idx), model(idx, loops=4))  # eval default is mu_rec
    assert not torch.allclose(outs[0], outs[1]) and not torch.allclose(outs[1], outs[2])


def _count_core_calls(model, fn) -> int:
    calls = []
    hook = model.core[0].register_forward_hook(lambda *_: calls.append(1))
    try:
        with torch.no_grad():
            fn()
    finally:
        hook.remove()
    return len(calls)


@pytest.mark.parametrize("name", ["parcae-micro", "looped-tiny-k1"])  # contract at init (rdm need not)
@pytest.mark.parametrize("kind,threshold", [("state", 0.05), ("kl", 1e-4)])
def test_adaptive_exit_really_skips_core_calls(name, kind, threshold):
    model = build(preset(name).replace(state_init="zero"), seed=0).eval()
    idx = torch.randint(0, 256, (2, 8))
    stats: dict = {}
    rule = ExitRule(kind, threshold)
    n_calls = _count_core_calls(model, lambda: model(idx, loops=48, exit=rule, stats=stats))
    assert stats["exited_early"], stats["exit_measure"]
    assert n_calls == stats["loops_used"] < 48
    assert stats["exit_measure"][-1] < threshold <= min(stats["exit_measure"][:-1])
    assert _count_core_calls(model, lambda: model(idx, loops=48)) == 48
    # an unreachable threshold runs every loop
    never = ExitRule("state", 1e-30)
    assert _count_core_calls(model, lambda: model(idx, loops=12, exit=never)) == 12


@pytest.mark.parametrize("name", ["parcae-micro", "rdm-micro", "looped-micro"])
def test_exit_respects_min_loops(name):
    model = build(name, seed=0).eval()
    stats: dict = {}
    rule = ExitRule("state", threshold=1e9, min_loops=3)
    n = _count_core_calls(model, lambda: model(torch.randint(0, 256, (1, 6)), loops=10, exit=rule, stats=stats))
    assert n == 3 and stats["loops_used"] == 3.0


def test_generate_reports_mean_loops_used():
    model = build(preset("parcae-micro").replace(state_init="zero"), seed=0)
    prompt = torch.randint(0, 256, (1, 4))
    fixed = generate(model, prompt, 5, loops=16)
    early = generate(model, prompt, 5, loops=16, exit=ExitRule("state", 0.05))
    assert fixed.tokens.shape == early.tokens.shape == (1, 9)
    assert fixed.mean_loops == 16.0
    assert 1 <= early.mean_loops < 16 and len(early.loops_per_step) == 4
    assert early.prefill_loops == 16.0  # no exit in prefill by default


def test_generate_with_cache_matches_greedy_without_cache():
    model = _nontrivial("rdm-micro", state_init="zero")
    prompt = torch.randint(0, 256, (1, 4))
    out = generate(model, prompt, 6).tokens
    seq = prompt
    with torch.no_grad():
        for _ in range(6):
            seq = torch.cat((seq, model(seq)[:, -1:].argmax(-1)), dim=1)
    assert torch.equal(out, seq)
