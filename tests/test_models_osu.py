"""The Ohio State looped model ("Loop, Think, & Generalize"): GPT-2 blocks looped with additive injection and
no positions, R ~ Poisson(4) clipped to [2, 8] per batch, KL + entropy halting at inference."""

import torch
import torch.nn.functional as F

from loopscope.models import ExitRule, build, preset
from loopscope.models.recurrence import plan_loops


def test_gpt2_blocks_without_positions():
    cfg = preset("looped-osu-micro")
    model = build(cfg, seed=0)
    names = dict(model.named_parameters())
    assert "core.0.norm1.bias" in names and "core.0.attn.q.bias" in names and "core.0.mlp.fc.bias" in names
    assert isinstance(model.ln_f, torch.nn.LayerNorm) and len(model.core) == 4 and cfg.positional == "none"
    # no positions: a causal model without them sees a permuted prefix's last token the same way
    model.eval()
    idx = torch.tensor([[5, 9, 17, 3]])
    with torch.no_grad():
        a = model(idx, loops=3)[0, -1]
        b = model(idx[:, [1, 0, 2, 3]], loops=3)[0, -1]
    torch.testing.assert_close(a, b)


def test_loop_counts_are_poisson_clipped_per_batch():
    cfg = preset("looped-osu-micro")
    gen = torch.Generator().manual_seed(0)
    draws = [plan_loops(cfg, 4, None, True, gen) for _ in range(400)]
    totals = torch.stack([d.total for d in draws])
    assert (totals == totals[:, :1]).all()  # one draw per batch
    assert int(totals.min()) == 2 and int(totals.max()) == 8
    assert abs(float(totals[:, 0].float().mean()) - 4.2) < 0.3  # E[clip(Poisson(4), 2, 8)] = 4.2
    assert all(int(d.nograd.max()) == 0 for d in draws)  # backprop through every loop


def test_trains_and_evaluates_at_several_loop_counts():
    model = build("looped-osu-micro", seed=0)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    idx = torch.randint(0, 16, (4, 12), generator=g)
    losses = []
    for _ in range(12):
        loss = model.compute_loss(idx[:, :-1], idx[:, 1:])
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(float(loss))
    assert losses[-1] < 0.5 * losses[0]
    model.eval()
    with torch.no_grad():
        outs = {T: model(idx[:, :-1], loops=T) for T in (2, 4, 8)}
    assert all(torch.isfinite(o).all() for o in outs.values())
    assert not torch.allclose(outs[2], outs[8])


def _official_halting(model, idx, max_loops, eps_kl, entropy):
    """The Ohio State rule from fixed-loop logits: the first loop t >= 2 with KL(p_t || p_{t-1}) < eps and
    entropy(p_t) < H at the last token, else max_loops."""
    logp = [F.log_softmax(model(idx, loops=t)[:, -1].float(), -1) for t in range(1, max_loops + 1)]
    used = []
    for b in range(idx.shape[0]):
        stop = max_loops
        for t in range(1, max_loops):
            p = logp[t][b].exp()
            kl = float((p * (logp[t][b] - logp[t - 1][b])).sum())
            ent = float(-(p * logp[t][b]).sum())
            if kl < eps_kl and ent < entropy:
                stop = t + 1
                break
        used.append(stop)
    return used


def test_halts_per_sequence_by_the_official_kl_entropy_rule():
    model = build("looped-osu-micro", seed=1)
    with torch.no_grad():  # sharpen the outputs so that some sequences settle early
        for block in model.core:
            block.attn.o.weight.normal_(0, 0.02)
            block.mlp.proj.weight.normal_(0, 0.02)
    model.eval()
    idx = torch.randint(0, 256, (6, 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        for eps in (1e-3, 3e-2, 1.0):
            want = _official_halting(model, idx, 8, eps, 6.0)
            stats: dict = {}
            logits = model(idx, loops=8, exit=ExitRule.ohio_state(eps, 6.0), stats=stats)
            assert stats["loops_per_sequence"] == want
            assert stats["loops_computed"] == max(want)
            for b, t in enumerate(want):  # each sequence's logits are those of its own loop count
                torch.testing.assert_close(logits[b], model(idx[b:b + 1], loops=t)[0], rtol=1e-5, atol=1e-5)
    assert min(want) < 8  # the loose threshold does halt early


def test_huginn_exit_rules_are_per_sequence():
    model = build("rdm-huginn-micro", seed=0).eval()
    idx = torch.randint(0, 256, (3, 8), generator=torch.Generator().manual_seed(0))
    for rule in (ExitRule.huginn("huginn-kl"), ExitRule.huginn("latent-diff"), ExitRule("latent-diff", 0.5)):
        stats: dict = {}
        with torch.no_grad():
            model(idx, loops=16, exit=rule, stats=stats, h0=torch.zeros(3, 8, 64))
        assert len(stats["loops_per_sequence"]) == 3 and stats["loops_computed"] == max(stats["loops_per_sequence"])
