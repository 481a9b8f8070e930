"""Exact cost accounting as pure functions of a ModelConfig (no modules built).

Parameters count shared weights once. FLOPs count matrix multiplies (2 per multiply-add), as
torch.utils.flop_counter does, following Parcae's cost script:

    train   = 6 N_noncore + 2 N_core T + 4 N_core k + attention,  k = min(T, mu_bwd)
    forward = 2 N_noncore + 2 N_core T + attention

N excludes embedding lookups (token and value-embedding tables; they are gathers, not matmuls) and
includes the tied unembedding. Attention per layer application and token is 4 d S forward (QK^T and AV
over the full S x S matrix, no causal halving) and 8 d S backward.

These are *model* FLOPs as PaLM defines them (the work the model needs, without recomputation), and MFU
is computed from them. torch's FlopCounterMode agrees only under some SDPA backends, so a measured count
must say which one ran:
- the math backend: SDPA decomposes into bmm, counted 4 d S forward and 8 d S backward: equal;
- the default CPU backend (`_scaled_dot_product_flash_attention_for_cpu`): FlopCounterMode has no
  formula for it and counts attention as 0, unless one is registered (tests/test_models_accounting.py
  registers 4 d S / 8 d S through `custom_mapping` and gets exactly these numbers);
- CUDA's flash and memory-efficient backends: 4 d S forward but 10 d S backward, because their backward
  recomputes QK^T; that recompute is hardware FLOPs, not model FLOPs, and MFU leaves it out.
"""

from __future__ import annotations

from typing import NamedTuple

from .config import ModelConfig
from .layout import VE_GATE_CHANNELS, value_embed_layers, ve_gate_layers

KV_ACCOUNTING_POLICIES: tuple[str, ...] = ("per-loop", "last-loop")


class ParamCounts(NamedTuple):
    unique: int         # every stored parameter once
    non_embedding: int  # unique minus token and value-embedding tables
    embedding: int      # token table (tied with the head) + value-embedding tables


class _Parts(NamedTuple):
    """Matmul parameters run once per token (noncore) and once per loop (core), plus stored extras."""
    noncore_mm: int
    core_mm: int
    other: int  # stored, not multiplied per token: norm gains, Parcae's A_log/dt_bias, step tables...


def _block_mm(cfg: ModelConfig, layer: int) -> int:
    assert cfg.d_ff is not None
    d = cfg.d_model
    mlp = (3 if cfg.mlp == "swiglu" else 2) * d * cfg.d_ff
    used = layer in ve_gate_layers(cfg) and layer in value_embed_layers(cfg)  # a gate multiplies with a table
    gate = min(VE_GATE_CHANNELS, d) * cfg.n_heads if used else 0
    return 4 * d * d + mlp + gate


def _block_extras(cfg: ModelConfig) -> int:
    """Per-block parameters that are not matmuls: LayerNorm biases, linear biases, Huginn's q/k bias."""
    assert cfg.d_ff is not None
    d, n_norms = cfg.d_model, (4 if cfg.sandwich_norm else 2)
    extras = n_norms * d if cfg.norm == "layernorm" else 0
    if cfg.linear_bias:
        extras += 4 * d + (2 if cfg.mlp == "swiglu" else 1) * cfg.d_ff + d
    return extras + (2 * d if cfg.qk_bias else 0)


def _idle_gates(cfg: ModelConfig) -> int:
    """Value-embedding gates stored on layers without a table (the official Parcae rule allows it): never run."""
    idle = set(ve_gate_layers(cfg)) - set(value_embed_layers(cfg))
    return len(idle) * min(VE_GATE_CHANNELS, cfg.d_model) * cfg.n_heads


def _parts(cfg: ModelConfig) -> _Parts:
    d, V = cfg.d_model, cfg.vocab_size
    norms_per_block = (4 if cfg.sandwich_norm else 2) * d
    head = V * d  # tied unembedding: stored in the embedding table, multiplied once per token
    if cfg.family == "gpt":
        blocks = sum(_block_mm(cfg, i) for i in range(cfg.n_layers))
        other = cfg.n_layers * (norms_per_block + _block_extras(cfg)) + d * (2 if cfg.norm == "layernorm" else 1)
        return _Parts(blocks + head, 0, other + _idle_gates(cfg))
    P, R, C = cfg.n_prelude, cfg.n_core, cfg.n_coda
    outer = sum(_block_mm(cfg, i) for i in (*range(P), *range(P + R, P + R + C)))
    core = sum(_block_mm(cfg, i) for i in range(P, P + R))
    other = (P + R + C) * (norms_per_block + _block_extras(cfg)) + d + (d if cfg.prelude_norm else 0)
    other += _idle_gates(cfg) + (d if cfg.norm == "layernorm" else 0) * (2 if cfg.prelude_norm else 1)  # biases
    if cfg.family == "parcae":  # B (drive, once per forward) and C (readout) are d x d; A_log, dt_bias
        return _Parts(outer + head + 2 * d * d, core, other + 2 * d)
    if cfg.family == "rdm":  # concat adapter Linear(2d -> d) runs on every loop
        return _Parts(outer + head, core + (2 * d * d if cfg.injection == "concat" else 0), other)
    if cfg.family == "ut":  # halting unit Linear(d -> 1) each step; learned step table (+ halting bias)
        assert cfg.act_max_steps is not None
        return _Parts(outer + head, core + d, other + 1 + cfg.act_max_steps * d)
    return _Parts(outer + head, core, other)  # looped


def param_counts(cfg: ModelConfig) -> ParamCounts:
    parts = _parts(cfg)
    embedding = cfg.vocab_size * cfg.d_model * (1 + len(value_embed_layers(cfg)))
    head = cfg.vocab_size * cfg.d_model  # counted in noncore_mm but stored as the (tied) token table
    unique = parts.noncore_mm - head + parts.core_mm + parts.other + embedding
    return ParamCounts(unique=unique, non_embedding=unique - embedding, embedding=embedding)


def _loops(cfg: ModelConfig, loops: int | None) -> int:
    if not cfg.is_looped:
        return 1
    T = cfg.mu_rec if loops is None else loops
    if T < 1:
        raise ValueError(f"{cfg.family}: loops={T} must be >= 1")
    return T


def effective_depth(cfg: ModelConfig, loops: int | None = None) -> int:
    """Layer applications per token: P + loops*R + C (dense: n_layers). loops defaults to mu_rec."""
    if not cfg.is_looped:
        return cfg.n_layers
    return cfg.n_prelude + _loops(cfg, loops) * cfg.n_core + cfg.n_coda


def flops_per_token(cfg: ModelConfig, seq_len: int, loops: int | None = None, mode: str = "train",
                    bwd_loops: int | None = None) -> float:
    """FLOPs per token at sequence length `seq_len` (mode "train": forward + backward; "forward").
    loops defaults to mu_rec; bwd_loops (loops with gradient) to min(loops, mu_bwd)."""
    if mode not in ("train", "forward"):
        raise ValueError(f"flops_per_token: mode={mode!r} must be 'train' or 'forward'")
    parts = _parts(cfg)
    T = _loops(cfg, loops)
    attn = 4 * cfg.d_model * seq_len  # forward, per layer application
    L_eff = effective_depth(cfg, T)
    forward = 2 * parts.noncore_mm + 2 * parts.core_mm * T + attn * L_eff
    if mode == "forward":
        return float(forward)
    if cfg.is_looped:
        k = min(T, cfg.mu_bwd or T) if bwd_loops is None else bwd_loops
        if not 1 <= k <= T:
            raise ValueError(f"flops_per_token: bwd_loops={k} must be in [1, loops={T}]")
        grad_depth = cfg.n_prelude + k * cfg.n_core + cfg.n_coda
    else:
        k, grad_depth = 1, cfg.n_layers
    backward = 4 * parts.noncore_mm + 4 * parts.core_mm * k + 2 * attn * grad_depth
    return float(forward + backward)


def kv_bytes_per_token(cfg: ModelConfig, loops: int | None = None, dtype_bytes: int = 4,
                       policy: str = "per-loop") -> int:
    """KV-cache bytes per token: keys and values (2 d) per cached layer application.
    per-loop caches every application (P + loops*R + C); last-loop one entry per physical layer."""
    if policy not in KV_ACCOUNTING_POLICIES:
        raise ValueError(f"kv_bytes_per_token: policy={policy!r} is not one of {KV_ACCOUNTING_POLICIES}")
    layers = effective_depth(cfg, loops) if policy == "per-loop" else cfg.n_physical_layers
    return 2 * cfg.d_model * layers * dtype_bytes


def memory_bytes(cfg: ModelConfig, context: int, loops: int | None = None, dtype_bytes: int = 4,
                 policy: str = "per-loop", batch: int = 1) -> int:
    """Inference memory for iso-memory matching: weights + KV cache at `context` tokens."""
    weights = param_counts(cfg).unique * dtype_bytes
    return weights + batch * context * kv_bytes_per_token(cfg, loops, dtype_bytes, policy)
