"""ModelConfig schema, presets and build()."""

import time

import pytest
import torch

from loopscope.models import FAMILIES, PRESETS, ModelConfig, build, list_presets, param_counts, preset


def test_to_dict_round_trip_for_every_preset():
    for name, cfg in PRESETS.items():
        assert ModelConfig.from_dict(cfg.to_dict()) == cfg, name


def test_from_dict_unknown_key_names_the_key():
    d = preset("gpt-tiny").to_dict() | {"n_layerz": 3}
    with pytest.raises(ValueError, match="n_layerz"):
        ModelConfig.from_dict(d)


def test_invalid_values_name_the_field():
    with pytest.raises(ValueError, match="d_model"):
        ModelConfig("gpt", d_model=130, n_heads=4)
    with pytest.raises(ValueError, match="injection"):
        ModelConfig("parcae", n_core=1, injection="concat")
    with pytest.raises(ValueError, match="n_core"):
        ModelConfig("parcae")
    with pytest.raises(ValueError, match="family"):
        ModelConfig("mamba")


def test_family_defaults_are_resolved():
    cfg = ModelConfig("parcae", n_prelude=1, n_core=2, n_coda=1, mu_rec=7)
    assert (cfg.mu_bwd, cfg.injection, cfg.state_init, cfg.d_ff, cfg.n_layers) == (4, "diagonal", "like-init", 512, 0)
    # derived defaults follow their source on replace, explicit values stay
    assert cfg.replace(mu_rec=9).mu_bwd == 5
    assert cfg.replace(mu_bwd=1).replace(mu_rec=9).mu_bwd == 1


def test_unknown_preset_lists_known_names():
    with pytest.raises(KeyError, match="gpt-tiny"):
        preset("gpt-huge")


def test_every_family_has_tiny_presets():
    for family in FAMILIES:
        names = list_presets(family)
        assert any(n.endswith(("-tiny", "-micro")) for n in names), family
        for n in names:
            assert n.startswith(family + "-")


def test_tiny_pairs_are_parameter_matched():
    gpt, parcae = param_counts(preset("gpt-tiny")), param_counts(preset("parcae-tiny"))
    d = 128
    assert parcae.unique - gpt.unique == 2 * d * d + 3 * d
    gpt, parcae = param_counts(preset("gpt-micro")), param_counts(preset("parcae-micro"))
    assert parcae.unique - gpt.unique == 2 * 64 * 64 + 3 * 64


def test_build_accepts_name_config_and_dict():
    cfg = preset("gpt-micro")
    for arg in ("gpt-micro", cfg, cfg.to_dict()):
        model = build(arg, seed=0)
        assert model.config == cfg


def test_meta_build_of_paper_sizes_is_instant_and_allocates_nothing():
    t0 = time.perf_counter()
    model = build("parcae-1.3b", device="meta")
    assert time.perf_counter() - t0 < 2.0
    assert all(p.device.type == "meta" for p in model.parameters())


def test_build_dtype_and_seed():
    a = build("parcae-micro", seed=1, dtype=torch.bfloat16)
    b = build("parcae-micro", seed=1, dtype=torch.bfloat16)
    c = build("parcae-micro", seed=2, dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in a.parameters())
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not torch.equal(sa["wte.weight"], sc["wte.weight"])


@pytest.mark.parametrize("name", ["gpt-micro", "parcae-micro", "rdm-micro", "looped-micro", "ut-micro"])
def test_small_models_built_in_place_get_the_weights_of_the_meta_path(name, monkeypatch):
    from loopscope.models import factory

    if name not in PRESETS:
        pytest.skip(f"no preset {name}")
    torch.manual_seed(11)
    direct = build(name, seed=5)
    after_direct = torch.rand(3)
    monkeypatch.setattr(factory, "DIRECT_BUILD_MAX_PARAMS", -1)  # force meta -> to_empty -> init
    torch.manual_seed(11)
    via_meta = build(name, seed=5)
    assert torch.equal(after_direct, torch.rand(3))  # neither path draws from the global generator
    a, b = direct.state_dict(), via_meta.state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), [k for k in a if not torch.equal(a[k], b[k])]
    bufs = dict(via_meta.named_buffers())
    assert all(torch.equal(v, bufs[k]) for k, v in direct.named_buffers())


def test_parcae_init_matches_the_paper():
    model = build("parcae-micro", seed=0)
    inj = model.injection
    assert torch.allclose(torch.nn.functional.softplus(inj.dt_bias), torch.full((64,), 0.8047), atol=1e-4)
    assert torch.equal(inj.A_log, torch.zeros(64))
    assert torch.equal(inj.B, torch.eye(64))
    assert torch.allclose(inj.decay(), torch.full((64,), 5 ** -0.5), atol=1e-6)
    for block in (*model.prelude, *model.core, *model.coda):
        assert not block.attn.o.weight.any() and not block.mlp.proj.weight.any()
    std = model.wte.weight.std().item()
    assert abs(std - (2 / (5 * 64)) ** 0.5) < 0.2 * std


def test_fields_added_later_are_written_only_when_set():
    """Cell ids hash the config dict: fields added after them must not change the dict of configs that
    leave them at their default."""
    from loopscope.models.config import SPARSE_FIELDS

    cfg = preset("parcae-micro")
    assert not set(SPARSE_FIELDS) & set(cfg.to_dict())
    huginn = preset("rdm-huginn-micro")
    data = huginn.to_dict()
    assert data["qk_norm"] is False and data["embed_scale"] == 8.0 and "clip_qkv" not in data
    assert ModelConfig.from_dict(data) == huginn
    with pytest.raises(ValueError, match="norm="):
        ModelConfig("gpt", n_layers=2, norm="batchnorm")
    with pytest.raises(ValueError, match="loops_min"):
        ModelConfig("looped", n_core=1, loops_min=3, loops_max=2)
