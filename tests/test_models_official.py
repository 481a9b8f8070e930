"""Official checkpoints: a directory shaped like parcae_lm's save_pretrained output loads and gives the official
logits, with every official setting that changes the math reproduced or refused in one line; Huginn's weights
copied into `rdm` give Huginn's logits."""

import json
import math

import pytest
import torch

from loopscope.models import build
from loopscope.models.checkpoint import (
    CheckpointError,
    huginn_state_to_rdm,
    load_official_parcae,
    load_state_strict,
    rdm_config_from_huginn,
)
from tests.official_shapes import (
    huginn_config,
    huginn_logits,
    huginn_state,
    parcae_config,
    parcae_logits,
    parcae_state,
)


def _save_pretrained(tmp_path, raw: dict, state: dict) -> None:
    (tmp_path / "config.json").write_text(json.dumps(raw, indent=2))
    torch.save(state, tmp_path / "model.pt")


SETTINGS = {
    "released": {},
    "takase-scaled": {"init_strategy": "takase-scaled"},
    "scaled-and-logit-scale": {"init_strategy": "scaled-and-logit-scale"},
    "logit_softcap": {"logit_softcap": 2.0},
    "GELU": {"nonlin_name": "GELU"},
    "rope_condense_ratio": {"rope_settings": {"use_rope": True, "rope_condense_ratio": 2, "rope_base": 50000}},
    "clip_qkv": {"clip_qkv": 0.3},
    "state_init embed": {"state_init": "embed"},
    "qk_bias, no qk_norm": {"qk_bias": True, "qk_norm": False},
}


@pytest.mark.parametrize("setting", list(SETTINGS))
def test_save_pretrained_directory_loads_and_matches_the_official_math(tmp_path, setting):
    raw = parcae_config(**SETTINGS[setting])
    state = parcae_state(raw)
    assert "freqs_cis" in state and "lm_head.weight" in state
    _save_pretrained(tmp_path, raw, state)
    model = load_official_parcae(tmp_path).eval()
    tokens = torch.randint(0, 256, (11,), generator=torch.Generator().manual_seed(1))
    for loops in (1, 2, 4):
        h0 = torch.randn(11, 64, generator=torch.Generator().manual_seed(loops)) * 0.3
        with torch.no_grad():
            ours = model(tokens[None], loops=loops, h0=h0[None])[0]
            want = parcae_logits(state, raw, tokens, h0, loops)
        torch.testing.assert_close(ours, want, rtol=1e-5, atol=1e-5)


def test_official_value_embedding_gate_rule_where_it_differs_from_nanochat(tmp_path):
    # P/R/C = 1/2/2, mu_rec 3, mu_bwd 2: official gates on layers 1 and 3 (ids 1 and 7 of n_layer 4), tables
    # on 0, 2, 4; nanochat's rule would put gates on 0, 2, 4
    raw = parcae_config()
    state = parcae_state(raw)
    gates = sorted(k for k in state if k.endswith("ve_gate.weight"))
    assert gates == ["transformer.coda.0.attn.ve_gate.weight", "transformer.core_block.0.attn.ve_gate.weight"]
    _save_pretrained(tmp_path, raw, state)
    model = load_official_parcae(tmp_path)
    assert model.config.value_embeds


def test_state_init_embed_is_a_scaled_random_draw(tmp_path):
    raw = parcae_config(state_init="embed")
    _save_pretrained(tmp_path, raw, parcae_state(raw))
    model = load_official_parcae(tmp_path, seed=0).eval()
    assert model.config.state_init == "scaled-normal"
    from loopscope.models.recurrence import initial_state

    h0 = initial_state(model.config, torch.zeros(8, 32, 64), torch.Generator().manual_seed(0))
    assert abs(float(h0.std()) - 1 / math.sqrt(64)) < 0.01  # N(0, 1/d), not h0 = e


@pytest.mark.parametrize("change, key", [
    ({"nonlin_name": "SiLU"}, "nonlin_name"),
    ({"state_init": "unit"}, "state_init"),
    ({"mup_model_scaling_factor": 2}, "mup_model_scaling_factor"),
    ({"mlp_class_name": "GatedMLP"}, "mlp_class_name"),
    ({"bias": True}, "bias"),
    ({"norm_class_name": "LayerNorm"}, "norm_class_name"),
    ({"init_strategy": "wang"}, "init_strategy"),
])
def test_unsupported_official_settings_are_refused_in_one_line(tmp_path, change, key):
    raw = parcae_config(**change)
    _save_pretrained(tmp_path, raw, parcae_state(parcae_config()))
    with pytest.raises(CheckpointError) as err:
        load_official_parcae(tmp_path)
    message = str(err.value)
    assert "\n" not in message and f"{key}=" in message and "config.json" in message


def test_freqs_cis_is_checked_against_our_rope_table(tmp_path):
    raw = parcae_config()
    state = parcae_state(parcae_config(rope_settings={"use_rope": True, "rope_condense_ratio": 1,
                                                      "rope_base": 10000}))
    _save_pretrained(tmp_path, raw, state)
    with pytest.raises(CheckpointError, match="freqs_cis.*rope_base=50000"):
        load_official_parcae(tmp_path)


def test_rdm_with_huginn_weights_matches_huginn():
    raw = huginn_config()
    state = huginn_state(raw)
    cfg = rdm_config_from_huginn(raw)
    model = build(cfg, seed=0).eval()
    load_state_strict(model, huginn_state_to_rdm(state, cfg), source="huginn")
    tokens = torch.randint(0, 256, (12,), generator=torch.Generator().manual_seed(2))
    for loops in (1, 2, 4, 8):
        h0 = torch.randn(12, 64, generator=torch.Generator().manual_seed(loops)) * 0.6
        with torch.no_grad():
            ours = model(tokens[None], loops=loops, h0=h0[None])[0]
            want = huginn_logits(state, raw, tokens, h0, loops)
        torch.testing.assert_close(ours, want, rtol=1e-5, atol=1e-5)


def test_rdm_huginn_preset_has_huginn_scales():
    from loopscope.models import preset
    from loopscope.models.recurrence import initial_state

    cfg = preset("rdm-huginn-micro")
    assert (cfg.embed_scale, cfg.qk_norm, cfg.qk_bias, cfg.mlp, cfg.init) == (8.0, False, True, "swiglu", "takase")
    h0 = initial_state(cfg, torch.zeros(8, 32, 64), torch.Generator().manual_seed(0))
    # Huginn: trunc-normal(std sqrt(2/(5d))) times sqrt(d), about 0.62 at d = 64 (trunc at 3 std: x0.986)
    assert abs(float(h0.std()) - math.sqrt(2 / 5) * 0.986) < 0.02
