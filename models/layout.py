"""Which layer carries what, and Huginn's field overrides: pure functions of a ModelConfig, free of torch,
so accounting, presets and profile expansion can use them without importing the model code."""

from __future__ import annotations

import math
from typing import Any

from .config import ModelConfig

VE_GATE_CHANNELS = 32  # nanochat: the value-embedding gate reads the first 32 channels of the input


def has_value_embed(layer: int, n_layers: int) -> bool:
    """nanochat rule: alternating layers, the last layer always included."""
    return layer % 2 == (n_layers - 1) % 2


def ve_gate_layers(cfg: ModelConfig) -> list[int]:
    """Physical layers whose attention has a value-embedding gate (a value embedding is added where a
    layer has both a gate and a table). nanochat: the table rule. Parcae follows its official code: the
    gate rule counts R * mu_bwd layers, and coda layer ids are offset by R * mu_rec (the unrolled depth)."""
    if not cfg.value_embeds:
        return []
    n = cfg.n_physical_layers
    if cfg.family != "parcae":
        return [i for i in range(n) if has_value_embed(i, n)]
    P, R = cfg.n_prelude, cfg.n_core
    assert cfg.mu_bwd is not None
    official_id = [i if i < P + R else i + R * (cfg.mu_rec - 1) for i in range(n)]
    return [i for i in range(n) if has_value_embed(official_id[i], R * cfg.mu_bwd)]


def value_embed_layers(cfg: ModelConfig) -> list[int]:
    """Physical layers with a value-embedding table (nanochat's alternating rule, also Parcae's)."""
    n = cfg.n_physical_layers
    return [i for i in range(n) if has_value_embed(i, n)] if cfg.value_embeds else []


def huginn_d_ff(d: int) -> int:
    """SwiGLU width with the parameters of a 4d relu^2 MLP (3 d f = 8 d^2), rounded to a multiple of 8;
    Huginn's own 17920 / 5280 is about 3.4 d."""
    return max(8, int(round(8 * d / 3 / 8)) * 8)


def huginn_overrides(d: int) -> dict[str, Any]:
    """The ModelConfig fields that make `rdm` Huginn's architecture (besides sizes)."""
    return {"mlp": "swiglu", "d_ff": huginn_d_ff(d), "qk_norm": False, "qk_bias": True,
            "embed_scale": math.sqrt(d), "init": "takase", "norm_eps": 1e-6}
