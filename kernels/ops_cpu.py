"""Elementwise and row-wise CPU kernels: RMSNorm, RoPE, QK-norm, MLP activations, the loop injections,
embedding gathers and the value-embedding gate.

Rows are tokens: activations are 2-D [tokens, channels] float32, C-contiguous, with token row = b*T + t.
Every kernel is one parallel pass over memory (torch eager needs 3-4 ops for RMSNorm or silu*mul), uses
float32 literals (NEP 50 would otherwise promote to float64) and `fexp` instead of np.exp (vectorisable).
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from .gemm import PackedWeight, matmul, matmul_add
from .mathfn import fexp, fsigmoid, fsilu

F32 = np.float32


# ----------------------------------------------------------------------------------------- norms
@njit(parallel=True, fastmath=True, cache=True)
def rmsnorm_rows(x, weight, eps, out):
    """out[i] = x[i] / sqrt(mean(x[i]^2) + eps) * weight (out may be x)."""
    n, d = x.shape
    for i in prange(n):
        ss = F32(0.0)
        for j in range(d):
            ss += x[i, j] * x[i, j]
        inv = F32(1.0) / np.sqrt(ss / F32(d) + eps)
        for j in range(d):
            out[i, j] = x[i, j] * inv * weight[j]


@njit(parallel=True, fastmath=True, cache=True)
def add_rmsnorm_rows(x, delta, weight, eps):
    """x[i] = rmsnorm(x[i] + delta[i]) * weight, in place (Huginn's sandwich: x = norm(x + f(x)))."""
    n, d = x.shape
    for i in prange(n):
        ss = F32(0.0)
        for j in range(d):
            v = x[i, j] + delta[i, j]
            x[i, j] = v
            ss += v * v
        inv = F32(1.0) / np.sqrt(ss / F32(d) + eps)
        for j in range(d):
            x[i, j] = x[i, j] * inv * weight[j]


def rmsnorm(x: np.ndarray, weight: np.ndarray, eps: float, out: np.ndarray | None = None) -> np.ndarray:
    """RMSNorm over the last axis of x [N, d] with gain `weight` [d]."""
    if out is None:
        out = np.empty_like(x)
    rmsnorm_rows(x, weight, F32(eps), out)
    return out


# ---------------------------------------------------------------------------- RoPE and QK-norm
def rope_tables(length: int, head_dim: int, theta: float, start: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """cos, sin [length, head_dim/2] float32 for positions start.. (same fp32 arithmetic as the models)."""
    inv_freq = F32(theta) ** (-(np.arange(0, head_dim, 2, dtype=F32) / F32(head_dim)))
    pos = np.arange(start, start + length, dtype=F32)
    angles = np.outer(pos, inv_freq).astype(F32)
    return np.cos(angles).astype(F32), np.sin(angles).astype(F32)


@njit(inline="always", fastmath=True)
def _rope_norm_head(x, row, col0, half, cos, sin, pos, eps, normalise):
    """Rotate (first half, second half) channel pairs of one head in place, then RMSNorm it (no gain)."""
    ss = F32(0.0)
    for j in range(half):
        a = x[row, col0 + j]
        b = x[row, col0 + half + j]
        c = cos[pos, j]
        s = sin[pos, j]
        ra = a * c - b * s
        rb = a * s + b * c
        x[row, col0 + j] = ra
        x[row, col0 + half + j] = rb
        ss += ra * ra + rb * rb
    if normalise:
        inv = F32(1.0) / np.sqrt(ss / F32(2 * half) + eps)
        for j in range(2 * half):
            x[row, col0 + j] *= inv


@njit(parallel=True, fastmath=True, cache=True)
def rope_qknorm_rows(x, seq, start, cos, sin, n_heads, head_dim, col0, eps, normalise):
    """In place on columns [col0, col0 + n_heads*head_dim) of x [B*seq, *]: RoPE at position start + t,
    then (if normalise) the parameter-free QK-norm. Row r is token t = r % seq."""
    half = head_dim // 2
    for r in prange(x.shape[0]):
        pos = start + r % seq
        for h in range(n_heads):
            _rope_norm_head(x, r, col0 + h * head_dim, half, cos, sin, pos, eps, normalise)


def rope(x: np.ndarray, cos: np.ndarray, sin: np.ndarray, start: int = 0) -> np.ndarray:
    """RoPE on x [B, T, H, hd] (a copy), positions start..start+T-1 read from the tables."""
    B, T, H, hd = x.shape
    flat = np.ascontiguousarray(x, F32).reshape(B * T, H * hd).copy()
    rope_qknorm_rows(flat, T, start, cos, sin, H, hd, 0, F32(0.0), False)
    return flat.reshape(B, T, H, hd)


@njit(parallel=True, fastmath=True, cache=True)
def head_rmsnorm_rows(x, n_heads, head_dim, eps):
    """Parameter-free RMSNorm of each head's slice of x [N, n_heads*head_dim], in place."""
    for r in prange(x.shape[0]):
        for h in range(n_heads):
            c0 = h * head_dim
            ss = F32(0.0)
            for j in range(head_dim):
                ss += x[r, c0 + j] * x[r, c0 + j]
            inv = F32(1.0) / np.sqrt(ss / F32(head_dim) + eps)
            for j in range(head_dim):
                x[r, c0 + j] *= inv


def qk_norm(x: np.ndarray, eps: float) -> np.ndarray:
    """QK-norm of x [B, T, H, hd]: RMSNorm over hd without a gain (a copy)."""
    B, T, H, hd = x.shape
    flat = np.ascontiguousarray(x, F32).reshape(B * T, H * hd).copy()
    head_rmsnorm_rows(flat, H, hd, F32(eps))
    return flat.reshape(B, T, H, hd)


# ----------------------------------------------------------------------------------- activations
@njit(parallel=True, fastmath=True, cache=True)
def relu2_rows(x, out):
    """out = 0.5 * relu(x)^2 (out may be x)."""
    n, d = x.shape
    for i in prange(n):
        for j in range(d):
            v = max(x[i, j], F32(0.0))
            out[i, j] = F32(0.5) * v * v


@njit(parallel=True, fastmath=True, cache=True)
def swiglu_rows(gate_up, d_ff, out):
    """out[:, :d_ff] = silu(gate_up[:, :d_ff]) * gate_up[:, d_ff:2*d_ff] (the fused fc|up GEMM output)."""
    for i in prange(gate_up.shape[0]):
        for j in range(d_ff):
            out[i, j] = fsilu(gate_up[i, j]) * gate_up[i, d_ff + j]


def relu2(x: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    if out is None:
        out = np.empty_like(x)
    relu2_rows(x, out)
    return out


def swiglu(gate: np.ndarray, up: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """silu(gate) * up for gate, up [N, d_ff]."""
    d_ff = gate.shape[1]
    gate_up = np.concatenate([gate, up], axis=1)
    if out is None:
        out = np.empty_like(gate)
    swiglu_rows(gate_up, d_ff, out)
    return out


# ------------------------------------------------------------------------------------ injections
@njit(parallel=True, fastmath=True, cache=True)
def diagonal_injection_rows(h, e_in, decay, out):
    """Parcae: out = decay * h + e_in, where e_in = dt * (e @ B.T) is loop-invariant (computed once)."""
    n, d = h.shape
    for i in prange(n):
        for j in range(d):
            out[i, j] = decay[j] * h[i, j] + e_in[i, j]


@njit(parallel=True, fastmath=True, cache=True)
def scale_columns_rows(x, scale):
    """x[i, j] *= scale[j] in place."""
    n, d = x.shape
    for i in prange(n):
        for j in range(d):
            x[i, j] *= scale[j]


@njit(parallel=True, fastmath=True, cache=True)
def add_rows(x, y, out):
    """out = x + y."""
    n, d = x.shape
    for i in prange(n):
        for j in range(d):
            out[i, j] = x[i, j] + y[i, j]


def parcae_injection(h: np.ndarray, e: np.ndarray, b_weight: PackedWeight, decay: np.ndarray,
                     dt: np.ndarray) -> np.ndarray:
    """decay*h + dt*(e @ B.T) for h, e [N, d]; decay = exp(-dt*exp(A_log)), dt = softplus(dt_bias)."""
    e_in = matmul(e, b_weight)
    scale_columns_rows(e_in, dt)
    out = np.empty_like(h)
    diagonal_injection_rows(h, e_in, decay, out)
    return out


def concat_adapter(h: np.ndarray, e: np.ndarray, w_h: PackedWeight, w_e: PackedWeight) -> np.ndarray:
    """RDM's Linear(2d -> d)([h; e]) = h @ W[:, :d].T + e @ W[:, d:].T; the e half is loop-invariant, so the
    engine computes it once per forward and only the h half per loop."""
    out = matmul(e, w_e)
    return matmul_add(h, w_h, out)


# --------------------------------------------------------------------------- embeddings, heads
@njit(parallel=True, cache=True)
def gather_rows(table, idx, out):
    """out[i] = table[idx[i]] for a flat int64 idx."""
    d = table.shape[1]
    for i in prange(idx.shape[0]):
        t = idx[i]
        for j in range(d):
            out[i, j] = table[t, j]


@njit(parallel=True, fastmath=True, cache=True)
def add_value_embed_rows(qkv, x, gate_w, table, idx, n_heads, head_dim, v_col0):
    """v += 2*sigmoid(x[:, :G] @ gate_w.T)[head] * table[idx] on the v columns of qkv (nanochat value
    embeddings; gate_w [n_heads, G])."""
    g_in = gate_w.shape[1]
    for i in prange(qkv.shape[0]):
        t = idx[i]
        for h in range(n_heads):
            z = F32(0.0)
            for c in range(g_in):
                z += gate_w[h, c] * x[i, c]
            gate = F32(2.0) * fsigmoid(z)
            c0 = h * head_dim
            for j in range(head_dim):
                qkv[i, v_col0 + c0 + j] += gate * table[t, c0 + j]


@njit(parallel=True, fastmath=True, cache=True)
def softmax_rows(x, out):
    """Numerically stable softmax over the last axis (for exit criteria on logits)."""
    n, d = x.shape
    for i in prange(n):
        m = x[i, 0]
        for j in range(d):
            m = max(m, x[i, j])
        s = F32(0.0)
        for j in range(d):
            p = fexp(x[i, j] - m)
            out[i, j] = p
            s += p
        inv = F32(1.0) / s
        for j in range(d):
            out[i, j] *= inv


# ------------------------------------------------------------------------------ exit criteria
@njit(fastmath=True, cache=True)
def max_relative_change(new, old):
    """max over rows of ||new - old|| / max(||new||, 1e-12) (the "state" exit criterion)."""
    worst = F32(0.0)
    for i in range(new.shape[0]):
        dd = F32(0.0)
        nn = F32(0.0)
        for j in range(new.shape[1]):
            diff = new[i, j] - old[i, j]
            dd += diff * diff
            nn += new[i, j] * new[i, j]
        worst = max(worst, np.sqrt(dd) / max(np.sqrt(nn), F32(1e-12)))
    return worst


@njit(parallel=True, fastmath=True, cache=True)
def log_softmax_rows(x, out):
    n, d = x.shape
    for i in prange(n):
        m = x[i, 0]
        for j in range(d):
            m = max(m, x[i, j])
        s = F32(0.0)
        for j in range(d):
            s += fexp(x[i, j] - m)
        lse = m + np.log(s)
        for j in range(d):
            out[i, j] = x[i, j] - lse


@njit(fastmath=True, cache=True)
def max_kl_rows(logp, prev_logp):
    """max over rows of KL(p || p_prev) = sum p (log p - log p_prev) (the "kl" exit criterion)."""
    worst = F32(-1e30)
    for i in range(logp.shape[0]):
        kl = F32(0.0)
        for j in range(logp.shape[1]):
            kl += fexp(logp[i, j]) * (logp[i, j] - prev_logp[i, j])
        worst = max(worst, kl)
    return worst


# ------------------------------------------------------------------- Universal Transformer (ACT)
@njit(cache=True)
def act_halting_step(h, halt_w, halt_b, halt_sum, remainder, n_updates, weight, threshold, last):
    """One ACT bookkeeping step per position (models/ut.py): p = sigmoid(h . w + b) from the state entering
    the step; positions still running either halt (their sum would cross `threshold`, or `last`) and take
    the remainder as weight, or keep running and take p. Returns how many positions are still running.
    Plain libm exp here: halting is a threshold decision, so p is computed as exactly as torch does."""
    n, d = h.shape
    running_after = 0
    for i in range(n):
        z = F32(0.0)
        for j in range(d):
            z += h[i, j] * halt_w[j]
        p = F32(1.0) / (F32(1.0) + np.exp(-(z + halt_b[0])))
        w = F32(0.0)
        if halt_sum[i] < threshold:
            if last or halt_sum[i] + p > threshold:  # halts now
                remainder[i] += F32(1.0) - halt_sum[i]
                halt_sum[i] = F32(1.0)
                w = remainder[i]
            else:
                halt_sum[i] += p
                w = p
            n_updates[i] += F32(1.0)
        weight[i] = w
        if halt_sum[i] < threshold:
            running_after += 1
    return running_after


@njit(parallel=True, fastmath=True, cache=True)
def add_scaled_rows(out, weight, x):
    """out[i] += weight[i] * x[i]."""
    n, d = x.shape
    for i in prange(n):
        w = weight[i]
        for j in range(d):
            out[i, j] += w * x[i, j]


@njit(parallel=True, fastmath=True, cache=True)
def add_vector_rows(x, vec, out):
    """out[i] = x[i] + vec."""
    n, d = x.shape
    for i in prange(n):
        for j in range(d):
            out[i, j] = x[i, j] + vec[j]
