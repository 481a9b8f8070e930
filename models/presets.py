"""Named configs, `<family>-<size>`.

Paper sizes reproduce the Parcae paper's exact parameter counts (vocab 32,768, value embeddings on,
P/R/C = a third of the dense depth each, mu_rec 8). Tiny CPU presets use a byte vocabulary (256) and come
in matched pairs:
- iso-param: gpt-micro / parcae-micro / rdm-micro / looped-micro / ut-micro (3 stored layers, d 64) and
  gpt-tiny / parcae-tiny / rdm-tiny / looped-tiny / ut-tiny (6 stored layers, d 128);
- iso-FLOP (dense depth = the looped model's effective depth at mu_rec): gpt-micro-l6 vs parcae-micro,
  rdm-micro, looped-micro (1+4+1, 3x2); gpt-tiny-l12 vs parcae-tiny, rdm-tiny (2+4*2+2), looped-tiny (6x2)
  and looped-tiny-k1 (one layer looped 12 times).
"""

from __future__ import annotations

from .config import ModelConfig
from .layout import huginn_overrides

_PAPER = dict(vocab_size=32_768, value_embeds=True, max_seq_len=2048)
_TINY = dict(vocab_size=256, max_seq_len=512)
_MICRO = dict(_TINY, d_model=64, n_heads=2)
_SMALL = dict(_TINY, d_model=128, n_heads=4)
# GPT-2 blocks as the Ohio State code builds them (HF GPT2Block: LayerNorm, biases, tanh-GELU 4d, no RoPE)
_OSU = dict(norm="layernorm", linear_bias=True, mlp="gelu-tanh", positional="none", qk_norm=False, init="gpt2",
            loop_sampler="poisson", loops_min=2, loops_max=8, loop_scope="batch")

# size name -> (d_model, n_heads, dense layers)
_PAPER_SIZES: dict[str, tuple[int, int, int]] = {
    "140m": (768, 6, 6),
    "370m": (1024, 8, 12),
    "770m": (1280, 10, 18),
    "1.3b": (1536, 12, 24),
}


def _paper_presets() -> dict[str, ModelConfig]:
    out: dict[str, ModelConfig] = {}
    for size, (d, h, layers) in _PAPER_SIZES.items():
        third = layers // 3
        out[f"gpt-{size}"] = ModelConfig("gpt", d_model=d, n_heads=h, n_layers=layers, **_PAPER)
        out[f"parcae-{size}"] = ModelConfig("parcae", d_model=d, n_heads=h, n_prelude=third, n_core=third,
                                            n_coda=third, mu_rec=8, mu_bwd=4, **_PAPER)
    return out


def _tiny_presets() -> dict[str, ModelConfig]:
    return {
        # ~ 3 stored layers, d 64: the <2-minute CI profile
        "gpt-micro": ModelConfig("gpt", n_layers=3, **_MICRO),
        "gpt-micro-l6": ModelConfig("gpt", n_layers=6, **_MICRO),
        "parcae-micro": ModelConfig("parcae", n_prelude=1, n_core=1, n_coda=1, mu_rec=4, **_MICRO),
        "rdm-micro": ModelConfig("rdm", n_prelude=1, n_core=1, n_coda=1, mu_rec=4, **_MICRO),
        "looped-micro": ModelConfig("looped", n_core=3, mu_rec=2, **_MICRO),
        "ut-micro": ModelConfig("ut", n_core=3, mu_rec=2, **_MICRO),
        # ~ 6 stored layers, d 128
        "gpt-tiny": ModelConfig("gpt", n_layers=6, **_SMALL),
        "gpt-tiny-l12": ModelConfig("gpt", n_layers=12, **_SMALL),
        "parcae-tiny": ModelConfig("parcae", n_prelude=2, n_core=2, n_coda=2, mu_rec=4, **_SMALL),
        "rdm-tiny": ModelConfig("rdm", n_prelude=2, n_core=2, n_coda=2, mu_rec=4, **_SMALL),
        "looped-tiny": ModelConfig("looped", n_core=6, mu_rec=2, **_SMALL),
        "looped-tiny-k1": ModelConfig("looped", n_core=1, mu_rec=12, injection="add", **_SMALL),
        "ut-tiny": ModelConfig("ut", n_core=6, mu_rec=2, **_SMALL),
        # Huginn's architecture (rdm.huginn_overrides): embedding scale sqrt(d), q/k bias and no QK-norm,
        # SwiGLU at the relu^2 MLP's parameter count, Takase init
        "rdm-huginn-micro": ModelConfig("rdm", n_prelude=1, n_core=1, n_coda=1, mu_rec=4, **_MICRO,
                                        **huginn_overrides(64)),
        "rdm-huginn-tiny": ModelConfig("rdm", n_prelude=2, n_core=2, n_coda=2, mu_rec=4, **_SMALL,
                                       **huginn_overrides(128)),
        # Ohio State "Loop, Think, & Generalize": GPT-2 blocks, 4 layers looped, R ~ Poisson(4) clipped to
        # [2, 8] per batch with backprop through all of them, additive input injection, no positions;
        # d 64 and 128 here (768 in the paper)
        "looped-osu-micro": ModelConfig("looped", n_core=4, mu_rec=4, mu_bwd=8, injection="add", **_OSU, **_MICRO),
        "looped-osu-tiny": ModelConfig("looped", n_core=4, mu_rec=4, mu_bwd=8, injection="add", **_OSU, **_SMALL),
    }


PRESETS: dict[str, ModelConfig] = {**_tiny_presets(), **_paper_presets()}


def preset(name: str) -> ModelConfig:
    try:
        return PRESETS[name]
    except KeyError:
        raise KeyError(f"unknown model preset {name!r}; known presets: {', '.join(PRESETS)}") from None


def list_presets(family: str | None = None) -> list[str]:
    return [name for name, cfg in PRESETS.items() if family is None or cfg.family == family]
