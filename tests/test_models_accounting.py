"""Exact accounting: paper parameter counts, FLOPs against FlopCounterMode, depth and KV bytes."""

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from loopscope.models import (
    PRESETS,
    ModelConfig,
    build,
    effective_depth,
    flops_per_token,
    kv_bytes_per_token,
    param_counts,
    preset,
)

PAPER_COUNTS = {
    "gpt-140m": 143_141_184,
    "parcae-140m": 144_323_136,
    "gpt-370m": 385_903_104,   # paper Table 18: 385.9M
    "parcae-370m": 388_003_328,  # 388.0M
    "gpt-770m": 773_375_040,   # 773.4M
    "parcae-770m": 776_655_680,  # 776.7M
    "gpt-1.3b": 1_333_868_544,
    "parcae-1.3b": 1_338_591_744,
}


def _model_counts(model: torch.nn.Module) -> tuple[int, int]:
    unique = sum(p.numel() for p in model.parameters())  # parameters() yields shared tensors once
    embedding = sum(p.numel() for n, p in model.named_parameters()
                    if n == "wte.weight" or n.startswith("value_embeds."))
    return unique, embedding


@pytest.mark.parametrize("name", list(PAPER_COUNTS))
def test_paper_parameter_counts_exact(name):
    cfg = preset(name)
    counts = param_counts(cfg)
    assert counts.unique == PAPER_COUNTS[name]
    unique, embedding = _model_counts(build(cfg, device="meta"))
    assert unique == PAPER_COUNTS[name]
    assert counts.embedding == embedding
    assert counts.non_embedding == unique - embedding


@pytest.mark.parametrize("name", [n for n, c in PRESETS.items() if c.vocab_size == 256])
def test_tiny_parameter_counts_match_model(name):
    cfg = preset(name)
    unique, embedding = _model_counts(build(cfg, device="meta"))
    assert param_counts(cfg) == (unique, unique - embedding, embedding)


def test_variants_parameter_counts_match_model():
    base = dict(vocab_size=97, d_model=32, n_heads=2, value_embeds=True)
    variants = [
        ModelConfig("gpt", n_layers=5, mlp="swiglu", d_ff=80, **base),
        ModelConfig("parcae", n_prelude=1, n_core=3, n_coda=2, prelude_norm=False, **base),
        ModelConfig("parcae", n_prelude=0, n_core=1, n_coda=0, **base),
        ModelConfig("rdm", n_prelude=1, n_core=2, n_coda=1, sandwich_norm=False, injection="add", **base),
        ModelConfig("rdm", n_prelude=2, n_core=1, n_coda=1, prelude_norm=True, mlp="swiglu", **base),
        ModelConfig("looped", n_prelude=1, n_core=2, n_coda=1, injection="add", **base),
        ModelConfig("ut", n_core=2, mu_rec=3, act_max_steps=5, **base),
    ]
    for cfg in variants:
        unique, embedding = _model_counts(build(cfg, device="meta"))
        assert param_counts(cfg) == (unique, unique - embedding, embedding), cfg


def test_shared_weights_count_once_whatever_the_loop_count():
    counts = set()
    for mu_rec in (1, 3, 8, 32):
        cfg = preset("parcae-micro").replace(mu_rec=mu_rec)
        model = build(cfg, seed=0)
        n_before = sum(p.numel() for p in model.parameters())
        model.eval()
        with torch.no_grad():
            model(torch.randint(0, 256, (1, 8)), loops=mu_rec)
        assert sum(p.numel() for p in model.parameters()) == n_before
        counts.add((n_before, param_counts(cfg).unique))
    assert len(counts) == 1


def _measured_flops(model, idx, loops, train: bool) -> float:
    # CPU flash attention is not registered with FlopCounterMode; the math backend is (as bmm).
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        out = model(idx, loops=loops)
        if train:
            out.float().sum().backward()
    return counter.get_total_flops() / idx.numel()


FLOP_VARIANTS = {
    "plain": {},
    # value-embedding gates, SwiGLU and a prelude norm add matmuls the formula must count
    "ve-swiglu": {"value_embeds": True, "mlp": "swiglu", "d_ff": 96},
}


@pytest.mark.parametrize("name", ["gpt-micro", "parcae-micro", "rdm-micro", "looped-micro", "ut-micro",
                                  "looped-tiny-k1"])
@pytest.mark.parametrize("variant", list(FLOP_VARIANTS))
@pytest.mark.parametrize("loops", [1, 3])
def test_flops_per_token_matches_flop_counter(name, variant, loops):
    cfg = preset(name).replace(**FLOP_VARIANTS[variant])
    if cfg.is_looped and variant != "plain":
        cfg = cfg.replace(prelude_norm=True)
    model = build(cfg, seed=0)
    model.train()
    idx = torch.randint(0, 256, (2, 16))
    assert _measured_flops(model, idx, loops, train=False) == flops_per_token(cfg, 16, loops, mode="forward")
    model.zero_grad()
    assert _measured_flops(model, idx, loops, train=True) == flops_per_token(cfg, 16, loops, mode="train")


def test_truncated_backprop_flops_match_flop_counter():
    cfg = preset("parcae-micro").replace(mu_rec=6)  # mu_bwd 3: loops 6 = 3 no-grad + 3 grad
    model = build(cfg, seed=0)
    model.train()
    idx = torch.randint(0, 256, (2, 16))
    measured = _measured_flops(model, idx, 6, train=True)
    assert measured == flops_per_token(cfg, 16, 6, mode="train", bwd_loops=3)
    assert measured < flops_per_token(cfg, 16, 6, mode="train", bwd_loops=6)


def test_flops_formula_shape():
    cfg = preset("parcae-140m")
    # training: no-grad loops cost 2N, grad loops 6N; more loops cost more
    assert flops_per_token(cfg, 2048, 8, "train") > flops_per_token(cfg, 2048, 4, "train")
    assert flops_per_token(cfg, 2048, 8, "train", bwd_loops=8) > flops_per_token(cfg, 2048, 8, "train")
    gpt = preset("gpt-140m")
    assert flops_per_token(gpt, 2048, loops=8) == flops_per_token(gpt, 2048)  # dense ignores loops
    with pytest.raises(ValueError, match="bwd_loops"):
        flops_per_token(cfg, 128, 2, bwd_loops=3)
    with pytest.raises(ValueError, match="mode"):
        flops_per_token(cfg, 128, mode="inference")


def test_effective_depth_and_kv_bytes():
    cfg = preset("parcae-tiny")
    assert effective_depth(cfg) == 2 + 4 * 2 + 2
    assert effective_depth(cfg, loops=1) == 6
    assert effective_depth(preset("gpt-tiny")) == 6
    assert kv_bytes_per_token(cfg, loops=8) == 2 * 128 * (2 + 16 + 2) * 4
    assert kv_bytes_per_token(cfg, loops=8, policy="last-loop", dtype_bytes=2) == 2 * 128 * 6 * 2
    assert kv_bytes_per_token(preset("gpt-tiny-l12")) == kv_bytes_per_token(cfg)  # iso-FLOP pair
    with pytest.raises(ValueError, match="policy"):
        kv_bytes_per_token(cfg, policy="ring")


def test_flop_convention_under_the_default_sdpa_backend():
    """The default CPU SDPA kernel has no FlopCounterMode formula (attention counts 0); registering the
    model-FLOP formula (4 d S forward, 8 d S backward: no recompute, as PaLM's MFU) gives the formula."""
    cfg = preset("parcae-micro")
    model = build(cfg, seed=0)
    model.train()
    B, S = 2, 16
    idx = torch.randint(0, 256, (B, S))
    aten = torch.ops.aten
    fwd_op = aten._scaled_dot_product_flash_attention_for_cpu  # FlopCounterMode keys ops by overload packet
    bwd_op = aten._scaled_dot_product_flash_attention_for_cpu_backward

    def attention_flops(q_shape, k_shape):
        b, h, s_q, hd = q_shape
        return 4 * b * h * s_q * k_shape[2] * hd  # QK^T and AV, 2 FLOPs per multiply-add each

    def fwd_formula(query, key, value, *args, **kwargs):  # FlopCounterMode passes shapes
        return attention_flops(query, key)

    def bwd_formula(grad_out, query, key, value, *args, **kwargs):
        return 2 * attention_flops(query, key)  # dQ, dK, dV, dP: no recompute of QK^T

    def count(mapping):
        model.zero_grad()
        with FlopCounterMode(display=False, custom_mapping=mapping) as counter:
            model(idx, loops=3).float().sum().backward()
        return counter.get_total_flops() / idx.numel(), counter.get_flop_counts()

    unregistered, counts = count({})
    assert not any(fwd_op in ops or bwd_op in ops for ops in counts.values()), "default backend not in use"
    k = min(3, cfg.mu_bwd)  # loops with gradient (truncated backprop)
    attention = cfg.d_model * S * (4 * (cfg.n_prelude + 3 * cfg.n_core + cfg.n_coda)
                                   + 8 * (cfg.n_prelude + k * cfg.n_core + cfg.n_coda))
    model_flops = flops_per_token(cfg, S, 3, mode="train")
    assert unregistered == model_flops - attention  # attention silently counted as 0
    registered, counts = count({fwd_op: fwd_formula, bwd_op: bwd_formula})
    assert any(fwd_op in ops for ops in counts.values())
    assert registered == model_flops


@pytest.mark.parametrize("name", ["rdm-huginn-micro", "looped-osu-micro"])
def test_accounting_of_the_official_variants(name):
    """q/k bias, LayerNorm and linear biases are stored parameters; SwiGLU and GELU are counted matmuls."""
    cfg = preset(name)
    model = build(cfg, seed=0)
    model.train()
    assert sum(p.numel() for p in model.parameters()) == param_counts(cfg).unique
    idx = torch.randint(0, 256, (2, 16))
    assert _measured_flops(model, idx, 3, train=True) == flops_per_token(cfg, 16, 3, mode="train")
