"""Family-specific behaviour: rdm, looped, ut (gpt and parcae are covered in the other model tests)."""

import pytest
import torch

from loopscope.models import PRESETS, build, preset
from loopscope.models.recurrence import plan_loops

TINY = [n for n, c in PRESETS.items() if c.vocab_size == 256 and "micro" in n] + ["looped-tiny-k1"]


@pytest.mark.parametrize("name", TINY)
def test_every_tiny_preset_runs_in_train_and_eval(name):
    model = build(name, seed=0)
    idx = torch.randint(0, 256, (2, 10))
    for training in (True, False):
        model.train(training)
        stats: dict = {}
        with torch.set_grad_enabled(training):
            logits = model(idx, stats=stats)
        assert logits.shape == (2, 10, 256) and torch.isfinite(logits).all()
        assert stats["loops_used"] >= 1


@pytest.mark.parametrize("name", ["rdm-micro", "looped-micro", "ut-micro"])
def test_training_lowers_the_loss(name):
    model = build(name, seed=0)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    text = torch.tensor(list(b"abcabdabeabf" * 12))
    x, y = text[:-1].view(1, -1)[:, :96].repeat(4, 1), text[1:].view(1, -1)[:, :96].repeat(4, 1)
    model.eval()
    with torch.no_grad():
        before = model.compute_loss(x, y).item()
    model.train()
    for _ in range(25):
        loss = model.compute_loss(x, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        after = model.compute_loss(x, y).item()
    assert after < 0.7 * before, (before, after)


def test_rdm_samples_lognormal_poisson_once_per_batch_by_default():
    cfg = preset("rdm-micro")  # mu_rec 4, mu_bwd 2
    gen = torch.Generator().manual_seed(0)
    plans = [plan_loops(cfg, 8, None, training=True, gen=gen) for _ in range(400)]
    assert all(len(set(p.total.tolist())) == 1 for p in plans)
    totals = torch.tensor([int(p.total[0]) for p in plans], dtype=torch.float)
    assert totals.min() >= 1 and abs(totals.mean().item() - 5.0) < 0.5  # E[Poisson(e^tau)] + 1 = mu_rec + 1
    assert totals.max() >= 9  # log-normal right tail
    per_seq = plan_loops(cfg.replace(loop_scope="sequence"), 64, None, training=True, gen=gen)
    assert len(set(per_seq.total.tolist())) > 1


def test_rdm_reports_the_adapter_spectral_norm():
    model = build("rdm-micro", seed=0).eval()
    stats: dict = {}
    with torch.no_grad():
        model(torch.randint(0, 256, (1, 6)), stats=stats)
    w_h = model.adapter.weight[:, :64]
    assert stats["adapter_spectral_norm"] == pytest.approx(torch.linalg.matrix_norm(w_h, ord=2).item(), rel=1e-5)
    assert stats["adapter_spectral_norm"] > 0 and len(stats["state_norm"]) == 4


def test_rdm_sandwich_norm_keeps_the_state_bounded():
    model = build("rdm-micro", seed=0).eval()
    stats: dict = {}
    with torch.no_grad():
        model(torch.randint(0, 256, (1, 6)), loops=32, stats=stats)
    # the sandwich's final RMSNorm pins each token's state to norm ~ sqrt(d)
    assert max(stats["state_norm"]) < 2 * 64 ** 0.5


def test_looped_injection_modes():
    none = build("looped-micro", seed=0)
    assert none.config.state_init == "embed"  # h0 = e, no re-injection (Saunshi/Ouro)
    add = build(preset("looped-micro").replace(injection="add", state_init="zero"), seed=0).eval()
    idx = torch.randint(0, 256, (1, 6))
    with torch.no_grad():
        # core layers start as identity (zero-init output projections): h_t = t * e exactly
        h = {}
        hook = add.core[-1].register_forward_hook(lambda m, i, o: h.setdefault(len(h), o))
        add(idx, loops=3)
        hook.remove()
    e = add.wte(idx)
    torch.testing.assert_close(h[2], 3 * e)


def _core_calls(model, idx, **kwargs) -> int:
    calls = []
    hook = model.core[0].register_forward_hook(lambda *_: calls.append(1))
    with torch.no_grad():
        model(idx, **kwargs)
    hook.remove()
    return len(calls)


def test_ut_act_halts_and_skips_the_remaining_steps():
    model = build("ut-micro", seed=0).eval()  # act_max_steps 4
    idx = torch.randint(0, 256, (2, 8))
    stats: dict = {}
    with torch.no_grad():
        model(idx, stats=stats)
    # halting bias 1: p ~ 0.73, so the running sum crosses 0.99 on the 2nd step for every position
    assert stats["steps_computed"] == 2 == _core_calls(model, idx)
    assert stats["loops_used"] == 2.0 and 2.0 < stats["ponder"] < 3.0
    with torch.no_grad():
        model.halting.proj.bias.fill_(-20.0)  # never halts by itself: runs to the cap
    assert _core_calls(model, idx) == 4
    assert _core_calls(model, idx, loops=3) == 3


def test_ut_ponder_cost_trains_the_halting_unit():
    model = build("ut-micro", seed=0).train()
    x = torch.randint(0, 256, (2, 8))
    loss = model.compute_loss(x, x)
    loss.backward()
    assert model.halting.proj.weight.grad.abs().sum() > 0
    plain = torch.nn.functional.cross_entropy(model(x).flatten(0, 1), x.flatten())
    assert loss.item() > plain.item()  # ponder term added
    with pytest.raises(ValueError, match="act_max_steps"):
        model(x, loops=9)
