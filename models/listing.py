"""Tables of the model zoo for `loopscope models [--matched]`: pure accounting, no model is built."""

from __future__ import annotations

import pandas as pd

from .accounting import effective_depth, flops_per_token, kv_bytes_per_token, memory_bytes, param_counts
from .config import ModelConfig
from .presets import PRESETS

MATCH_KINDS: tuple[str, ...] = ("iso-param", "iso-FLOP", "iso-memory", "iso-memory (last-loop)")
# Depth-Recurrent Attention Mixtures (arXiv 2601.21582) has no public code and no loopscope family: nothing
# named after it is listed here.


def _ohio_state(cfg: ModelConfig) -> bool:
    return cfg.family == "looped" and cfg.norm == "layernorm" and cfg.positional == "none"


def fidelity_flags(cfg: ModelConfig) -> list[str]:
    """Each way a config differs from the official model of its family (the official code's defaults for
    that model), checked as far as loopscope reproduces it: Huginn for rdm, the released Parcae presets
    for parcae, the Ohio State code for looped models with GPT-2 blocks."""
    flags: list[str] = []
    if cfg.family == "rdm":
        from .layout import huginn_overrides

        huginn = huginn_overrides(cfg.d_model)
        checks = [
            ("embed_scale", "no sqrt(d) embedding scale"), ("qk_norm", "QK-norm on (Huginn: off)"),
            ("qk_bias", "no q/k bias (Huginn: on)"), ("mlp", f"{cfg.mlp} MLP (Huginn: SwiGLU)"),
            ("init", f"{cfg.init} init (Huginn: Takase)"), ("norm_eps", f"norm eps {cfg.norm_eps:g} (Huginn: 1e-6)"),
        ]
        flags += [why for key, why in checks if getattr(cfg, key) != huginn[key]]
        if cfg.mlp == "swiglu" and cfg.d_ff != huginn["d_ff"]:
            flags.append(f"SwiGLU width {cfg.d_ff}")
        if cfg.injection != "concat":
            flags.append(f"{cfg.injection} injection (Huginn: concat)")
        if not cfg.sandwich_norm:
            flags.append("no sandwich norms (Huginn: on)")
        if cfg.value_embeds or cfg.prelude_norm:
            flags.append("value embeddings / prelude norm (Huginn: none)")
    elif cfg.family == "parcae":
        released = {"mlp": "relu2", "qk_norm": True, "prelude_norm": True, "qk_bias": False}
        flags += [f"{key}={getattr(cfg, key)} (released: {want})" for key, want in released.items()
                  if getattr(cfg, key) != want]
        if not cfg.value_embeds:
            flags.append("no value embeddings (released: on)")
        flags.append("trunc-normal init (released: orthogonal)")
    elif _ohio_state(cfg):
        flags.append("loss on every token (official: the answer token only)")
        if cfg.loops_min != 2 or cfg.loops_max != 8 or cfg.loop_scope != "batch":
            flags.append("loop sampler differs from Poisson(4) in [2, 8] per batch")
    elif cfg.family == "ut":
        flags.append("pre-RMSNorm RoPE blocks (UT: post-LN, sinusoidal timing signal)")
    return flags


def _layout(cfg: ModelConfig) -> str:
    if not cfg.is_looped:
        return f"{cfg.n_layers}"
    return f"{cfg.n_prelude}/{cfg.n_core}x{cfg.mu_rec}/{cfg.n_coda}"


def models_table(presets: dict[str, ModelConfig] | None = None, *, seq_len: int | None = None,
                 dtype_bytes: int = 2) -> pd.DataFrame:
    """One row per preset. FLOPs/token at `seq_len` (default: the preset's max_seq_len) and mu_rec
    loops; KV bytes/token at `dtype_bytes` per element (2 = bf16/fp16)."""
    rows = []
    for name, cfg in (presets or PRESETS).items():
        counts = param_counts(cfg)
        S = seq_len or cfg.max_seq_len
        rows.append({
            "preset": name,
            "family": cfg.family,
            "d_model": cfg.d_model,
            "n_heads": cfg.n_heads,
            "layers": _layout(cfg),  # dense depth, or prelude/core x mu_rec/coda
            "vocab_size": cfg.vocab_size,
            "params_unique": counts.unique,
            "params_non_embedding": counts.non_embedding,
            "params_embedding": counts.embedding,
            "effective_depth": effective_depth(cfg),
            "seq_len": S,
            "flops_per_token_train": flops_per_token(cfg, S, mode="train"),
            "flops_per_token_forward": flops_per_token(cfg, S, mode="forward"),
            "kv_bytes_per_token": kv_bytes_per_token(cfg, dtype_bytes=dtype_bytes, policy="per-loop"),
            "kv_bytes_per_token_last_loop": kv_bytes_per_token(cfg, dtype_bytes=dtype_bytes, policy="last-loop"),
            "fidelity": "; ".join(fidelity_flags(cfg)) or "-",  # differences from the official model kept
        })
    return pd.DataFrame(rows)


def matched_table(context: int = 2048, *, dtype_bytes: int = 2, tolerance: float = 0.10,
                  presets: dict[str, ModelConfig] | None = None) -> pd.DataFrame:
    """Looped/dense preset pairs (same vocabulary) that match within `tolerance` on parameters
    (iso-param), forward FLOPs/token at `context` and mu_rec (iso-FLOP), or weights + KV cache at
    `context` tokens (iso-memory, per-loop cache; and with the last-loop cache). One row per match;
    ratios are looped / dense."""
    presets = presets or PRESETS
    looped = {n: c for n, c in presets.items() if c.is_looped}
    dense = {n: c for n, c in presets.items() if not c.is_looped}
    rows = []
    for ln, lc in looped.items():
        for dn, dc in dense.items():
            if lc.vocab_size != dc.vocab_size:
                continue
            ratios = {
                "iso-param": param_counts(lc).unique / param_counts(dc).unique,
                "iso-FLOP": (flops_per_token(lc, context, mode="forward")
                             / flops_per_token(dc, context, mode="forward")),
                "iso-memory": (memory_bytes(lc, context, dtype_bytes=dtype_bytes)
                               / memory_bytes(dc, context, dtype_bytes=dtype_bytes)),
                "iso-memory (last-loop)": (memory_bytes(lc, context, dtype_bytes=dtype_bytes, policy="last-loop")
                                           / memory_bytes(dc, context, dtype_bytes=dtype_bytes)),
            }
            for kind in MATCH_KINDS:
                if abs(ratios[kind] - 1.0) <= tolerance:
                    rows.append({
                        "match": kind,
                        "looped": ln,
                        "dense": dn,
                        "params_ratio": ratios["iso-param"],
                        "flops_ratio_forward": ratios["iso-FLOP"],
                        "flops_ratio_train": (flops_per_token(lc, context, mode="train")
                                              / flops_per_token(dc, context, mode="train")),
                        "memory_ratio": ratios["iso-memory"],
                        "memory_ratio_last_loop": ratios["iso-memory (last-loop)"],
                        "effective_depth_looped": effective_depth(lc),
                        "effective_depth_dense": effective_depth(dc),
                        "context": context,
                    })
    columns = ["match", "looped", "dense", "params_ratio", "flops_ratio_forward", "flops_ratio_train",
               "memory_ratio", "memory_ratio_last_loop", "effective_depth_looped", "effective_depth_dense",
               "context"]
    return pd.DataFrame(rows, columns=columns)
