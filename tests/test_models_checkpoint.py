"""Checkpoints: safetensors round trip, strict loading, official Parcae names, offline hub errors."""

import json
import math
import time

import pytest
import torch
import torch.nn.functional as F

from loopscope.models import build, preset
from loopscope.models.checkpoint import (
    CheckpointError,
    load_checkpoint,
    load_official_parcae,
    ours_state_to_official,
    save_checkpoint,
)


def _randomised(name: str, **changes) -> torch.nn.Module:
    """A model with every parameter random (zero-init and identity init would hide mapping mistakes)."""
    model = build(preset(name).replace(**changes), seed=0)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1 + (1.0 if p.dim() == 1 else 0.0))
    return model.eval()


@pytest.mark.parametrize("name", ["gpt-micro", "parcae-micro", "rdm-micro", "looped-micro", "ut-micro"])
def test_safetensors_round_trip(tmp_path, name):
    model = _randomised(name)
    path = save_checkpoint(model, tmp_path / f"{name}.safetensors")
    loaded = load_checkpoint(path).eval()
    assert loaded.config == model.config
    a, b = model.state_dict(), loaded.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    idx = torch.randint(0, 256, (1, 6))
    model.reseed(0)
    loaded.reseed(0)
    with torch.no_grad():
        torch.testing.assert_close(model(idx), loaded(idx), rtol=0, atol=0)


def test_loading_names_the_bad_tensor(tmp_path):
    from safetensors.torch import load_file, save_file

    path = save_checkpoint(build("parcae-micro", seed=0), tmp_path / "m.safetensors")
    meta = {"loopscope_config": json.dumps(preset("parcae-micro").to_dict())}
    state = load_file(str(path))
    del state["core.0.attn.q.weight"]
    save_file(state, str(tmp_path / "missing.safetensors"), metadata=meta)
    with pytest.raises(CheckpointError, match=r"missing tensor 'core\.0\.attn\.q\.weight'"):
        load_checkpoint(tmp_path / "missing.safetensors")
    state = load_file(str(path))
    state["injection.B"] = torch.zeros(3, 3)
    save_file(state, str(tmp_path / "shape.safetensors"), metadata=meta)
    with pytest.raises(CheckpointError, match=r"'injection\.B' has shape \(3, 3\)"):
        load_checkpoint(tmp_path / "shape.safetensors")
    save_file(load_file(str(path)), str(tmp_path / "nometa.safetensors"))
    with pytest.raises(CheckpointError, match="loopscope_config"):
        load_checkpoint(tmp_path / "nometa.safetensors")


# --- official checkpoints --------------------------------------------------------------------------
def _official_config(cfg) -> dict:
    """An official-style config.json (keys of the released parcae_lm configs)."""
    return {
        "name": "parcae-test", "block_size": cfg.max_seq_len, "n_embd": cfg.d_model,
        "intermediate_size": cfg.d_ff, "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.n_heads, "vocab_size": cfg.vocab_size, "padded_vocab_size": cfg.vocab_size,
        "rope_settings": {"use_rope": True, "rope_condense_ratio": 1, "rope_base": cfg.rope_theta},
        "norm_eps": cfg.norm_eps, "bias": False, "qk_bias": False, "qk_norm": True,
        "injection_type": "diagonal", "n_layers_in_prelude": cfg.n_prelude,
        "n_layers_in_recurrent_block": cfg.n_core, "n_layers_in_coda": cfg.n_coda,
        "state_init": "like-init", "recurrent_embedding_dimension": cfg.d_model, "prelude_norm": True,
        "sampling_scheme": "poisson-truncated-full", "mean_recurrence": cfg.mu_rec,
        "mean_backprop_depth": cfg.mu_bwd, "tie_embeddings": True, "model_class_name": "Parcae",
        "nonlin_name": "ReLU2", "norm_class_name": "RMSNorm", "mlp_class_name": "BaseMLP",
        "block_class_name": "TransformerPreNormBlock", "init_strategy": "scaled-zero",
    }


def _write_official(tmp_path, model, filename="pytorch_model.bin", drop=None, raw_changes=None):
    state = ours_state_to_official(model.state_dict(), model.config)
    if drop:
        del state[drop]
    raw = _official_config(model.config) | (raw_changes or {})
    (tmp_path / "config.json").write_text(json.dumps(raw))
    torch.save(state, tmp_path / filename)
    return state


def _official_reference_logits(w: dict, raw: dict, tokens: torch.Tensor, h0: torch.Tensor) -> torch.Tensor:
    """The Parcae equations written directly against official tensor names, with the official
    interleaved RoPE (adjacent channel pairs): an independent check of the name and layout mapping."""
    T, H = tokens.shape[0], raw["num_attention_heads"]
    hd = raw["n_embd"] // H
    eps = raw["norm_eps"]
    theta = raw["rope_settings"]["rope_base"]
    angle = torch.outer(torch.arange(T).float(), theta ** (-torch.arange(0, hd, 2).float() / hd))[:, None]

    def norm(x, name):
        return x * torch.rsqrt(x.square().mean(-1, keepdim=True) + eps) * w[name + ".weight"]

    def rope_qknorm(x):
        pairs = x.reshape(T, H, hd // 2, 2)
        re = pairs[..., 0] * angle.cos() - pairs[..., 1] * angle.sin()
        im = pairs[..., 1] * angle.cos() + pairs[..., 0] * angle.sin()
        y = torch.stack((re, im), -1).flatten(-2)
        return y * torch.rsqrt(y.square().mean(-1, keepdim=True) + torch.finfo(y.dtype).eps)

    def block(x, name, layer):
        src = norm(x, name + ".norm_1")
        q = rope_qknorm(src @ w[name + ".attn.c_q.weight"].T)
        k = rope_qknorm(src @ w[name + ".attn.c_k.weight"].T)
        v = (src @ w[name + ".attn.c_v.weight"].T).reshape(T, H, hd)
        if f"value_embeds.{layer}.weight" in w:
            gate = 2 * torch.sigmoid(src[:, :32] @ w[name + ".attn.ve_gate.weight"].T)
            v = v + gate[..., None] * w[f"value_embeds.{layer}.weight"][tokens].reshape(T, H, hd)
        scores = torch.einsum("thd,shd->hts", q, k) / math.sqrt(hd)
        scores = scores.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf"))
        y = torch.einsum("hts,shd->thd", scores.softmax(-1), v).reshape(T, -1)
        x = x + y @ w[name + ".attn.c_proj.weight"].T
        hidden = 0.5 * F.relu(norm(x, name + ".norm_2") @ w[name + ".mlp.fc.weight"].T).square()
        return x + hidden @ w[name + ".mlp.proj.weight"].T

    P, R, C = raw["n_layers_in_prelude"], raw["n_layers_in_recurrent_block"], raw["n_layers_in_coda"]
    e = w["transformer.wte.weight"][tokens]
    for i in range(P):
        e = block(e, f"transformer.prelude.{i}", i)
    e = norm(e, "transformer.ln_prelude")
    dt = F.softplus(w["transformer.adapter.dt_bias"])
    decay = torch.exp(-dt * w["transformer.adapter.A_log"].exp())
    h = h0
    for _ in range(raw["mean_recurrence"]):
        h = h * decay + dt * (e @ w["transformer.adapter.B"].T)
        for i in range(R):
            h = block(h, f"transformer.core_block.{i}", P + i)
    x = h @ w["transformer.C.weight"].T
    for i in range(C):
        x = block(x, f"transformer.coda.{i}", P + R + i)
    return norm(x, "transformer.ln_f") @ w["lm_head.weight"].T


@pytest.mark.parametrize("filename", ["pytorch_model.bin", "model.pt"])
def test_official_checkpoint_round_trips_and_matches_the_official_equations(tmp_path, filename):
    model = _randomised("parcae-micro", value_embeds=True, n_prelude=1, n_core=2, n_coda=1, mu_rec=3,
                        d_model=64, n_heads=2)
    official = _write_official(tmp_path, model, filename)
    assert "transformer.core_block.1.attn.c_q.weight" in official and "value_embeds.3.weight" in official
    loaded = load_official_parcae(tmp_path).eval()
    assert loaded.config == model.config
    a, b = model.state_dict(), loaded.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)

    tokens = torch.randint(0, 256, (9,), generator=torch.Generator().manual_seed(0))
    h0 = torch.randn(9, 64) * 0.05
    with torch.no_grad():
        ours = loaded(tokens[None], h0=h0[None])[0]
        reference = _official_reference_logits(official, _official_config(model.config), tokens, h0)
    torch.testing.assert_close(ours, reference, rtol=1e-4, atol=1e-4)


def test_official_errors_name_the_tensor_or_key(tmp_path):
    model = _randomised("parcae-micro")
    _write_official(tmp_path, model, drop="transformer.adapter.dt_bias")
    with pytest.raises(CheckpointError, match=r"missing tensor 'transformer\.adapter\.dt_bias'"):
        load_official_parcae(tmp_path)

    state = ours_state_to_official(model.state_dict(), model.config)
    state["transformer.core_block.0.attn.rotary.inv_freq"] = torch.ones(4)
    torch.save(state, tmp_path / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match=r"transformer\.core_block\.0\.attn\.rotary\.inv_freq"):
        load_official_parcae(tmp_path)

    _write_official(tmp_path, model, raw_changes={"intermediate_size": 128})
    with pytest.raises(CheckpointError, match=r"'transformer\.prelude\.0\.mlp\.fc\.weight' has shape"):
        load_official_parcae(tmp_path)

    _write_official(tmp_path, model, raw_changes={"injection_type": "linear"})
    with pytest.raises(CheckpointError, match="injection_type"):
        load_official_parcae(tmp_path)


def test_untied_official_head_is_refused(tmp_path):
    model = _randomised("parcae-micro")
    state = _write_official(tmp_path, model)
    state["lm_head.weight"] = state["lm_head.weight"] + 1
    torch.save(state, tmp_path / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="lm_head"):
        load_official_parcae(tmp_path)


def test_hub_without_network_fails_fast_and_clearly():
    t0 = time.perf_counter()
    with pytest.raises((RuntimeError, OSError)) as err:
        load_official_parcae("SandyResearch/parcae-140m", network_timeout_s=2.0)
    assert time.perf_counter() - t0 < 10
    assert "parcae-140m" in str(err.value) or "huggingface" in str(err.value).lower()
