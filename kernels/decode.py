"""A whole transformer block for a few decode rows (one new token per sequence) in one serial njit call.

Why: at batch 1 a block is ~10 small kernels. Each parallel numba kernel costs 15-30 us just to wake the
workers (measured: an empty 2-task prange call takes 16-28 us with the workqueue layer; a serial call with
7 arrays 0.7 us), which is more than the work of a d=256 GEMV. One serial call per block removes all of it.
A GEMV is bound by how fast the weights stream in: one core reached 23-28 GB/s here, and splitting the
panels over both cores was slower at every size measured (20 GB/s for a 4 MiB 512x2048 weight, 13 GB/s at
768 KiB), so the projections stay serial too.

Same math, layouts and caches as the parallel kernels (ops_cpu.py, attention.py, gemm.py).
"""

from __future__ import annotations

import numpy as np
from numba import njit

from .gemm import _rows_one_by_one
from .mathfn import fexp, fsigmoid, fsilu

F32 = np.float32
NEG_BIG = F32(-1e30)


@njit(inline="always", fastmath=True)
def _rmsnorm_row(x, i, weight, eps, out):
    d = x.shape[1]
    ss = F32(0.0)
    for j in range(d):
        ss += x[i, j] * x[i, j]
    inv = F32(1.0) / np.sqrt(ss / F32(d) + eps)
    for j in range(d):
        out[i, j] = x[i, j] * inv * weight[j]


@njit(inline="always", fastmath=True)
def _add_rmsnorm_row(x, i, delta, weight, eps):
    d = x.shape[1]
    ss = F32(0.0)
    for j in range(d):
        v = x[i, j] + delta[i, j]
        x[i, j] = v
        ss += v * v
    inv = F32(1.0) / np.sqrt(ss / F32(d) + eps)
    for j in range(d):
        x[i, j] = x[i, j] * inv * weight[j]


@njit(inline="always", fastmath=True)
def _gemm(x, panels, out, n_out, accumulate):
    _rows_one_by_one(x, panels, out, 0, x.shape[0], 0, panels.shape[0], n_out, accumulate)


@njit(fastmath=True, cache=True)
def decode_block(x, idx, pos, cos, sin, n_heads, head_dim, eps,
                 attn_norm, qkv_w, o_w, mlp_norm, fc_w, proj_w, d_ff, swiglu,
                 post_attn_norm, post_mlp_norm, sandwich, ve_gate, ve_table, has_ve,
                 k_panels, v_panels, xn, qkv, att, tmp, hid, act, scores):
    """x [rows, d] in place: one block applied to the token at position `pos` of each row's sequence.
    k_panels/v_panels are this block's cache entry; the new k, v are written at `pos`."""
    rows, d = x.shape
    half = head_dim // 2
    # attention sub-block
    for i in range(rows):
        _rmsnorm_row(x, i, attn_norm, eps, xn)
    _gemm(xn, qkv_w, qkv, 3 * d, False)
    if has_ve:
        for i in range(rows):
            t = idx[i]
            for h in range(n_heads):
                z = F32(0.0)
                for c in range(ve_gate.shape[1]):
                    z += ve_gate[h, c] * xn[i, c]
                gate = F32(2.0) * fsigmoid(z)
                for j in range(head_dim):
                    qkv[i, 2 * d + h * head_dim + j] += gate * ve_table[t, h * head_dim + j]
    scale = F32(1.0) / np.sqrt(F32(head_dim))
    p_new = pos // 32
    c_new = pos % 32
    n_keys = pos + 1
    for i in range(rows):
        for hh in range(2 * n_heads):  # RoPE + QK-norm on the q and k heads
            c0 = hh * head_dim
            ss = F32(0.0)
            for j in range(half):
                a = qkv[i, c0 + j]
                b = qkv[i, c0 + half + j]
                ra = a * cos[pos, j] - b * sin[pos, j]
                rb = a * sin[pos, j] + b * cos[pos, j]
                qkv[i, c0 + j] = ra
                qkv[i, c0 + half + j] = rb
                ss += ra * ra + rb * rb
            inv = F32(1.0) / np.sqrt(ss / F32(head_dim) + eps)
            for j in range(head_dim):
                qkv[i, c0 + j] *= inv
        for h in range(n_heads):
            for j in range(head_dim):
                k_panels[i, h, p_new, j, c_new] = qkv[i, d + h * head_dim + j]
            for blk in range(head_dim // 16):
                for j in range(16):
                    v_panels[i, h, blk, pos, j] = qkv[i, 2 * d + h * head_dim + blk * 16 + j]
            qc = h * head_dim
            for p in range((n_keys + 31) // 32):
                acc = np.zeros(32, np.float32)
                for j in range(head_dim):
                    qj = qkv[i, qc + j] * scale
                    for c in range(32):
                        acc[c] += qj * k_panels[i, h, p, j, c]
                for c in range(32):
                    scores[p * 32 + c] = acc[c]
            m = NEG_BIG
            for t in range(n_keys):
                m = max(m, scores[t])
            total = F32(0.0)
            for t in range(n_keys):
                e = fexp(scores[t] - m)
                scores[t] = e
                total += e
            inv_total = F32(1.0) / total
            for blk in range(head_dim // 16):
                acc2 = np.zeros(16, np.float32)
                for t in range(n_keys):
                    pt = scores[t]
                    for c in range(16):
                        acc2[c] += pt * v_panels[i, h, blk, t, c]
                for c in range(16):
                    att[i, qc + blk * 16 + c] = acc2[c] * inv_total
    if sandwich:
        _gemm(att, o_w, tmp, d, False)
        for i in range(rows):
            _add_rmsnorm_row(x, i, tmp, post_attn_norm, eps)
    else:
        _gemm(att, o_w, x, d, True)
    # MLP sub-block
    for i in range(rows):
        _rmsnorm_row(x, i, mlp_norm, eps, xn)
    _gemm(xn, fc_w, hid, hid.shape[1], False)
    for i in range(rows):
        if swiglu:
            for j in range(d_ff):
                act[i, j] = fsilu(hid[i, j]) * hid[i, d_ff + j]
        else:
            for j in range(d_ff):
                v = max(hid[i, j], F32(0.0))
                act[i, j] = F32(0.5) * v * v
    if sandwich:
        _gemm(act, proj_w, tmp, d, False)
        for i in range(rows):
            _add_rmsnorm_row(x, i, tmp, post_mlp_norm, eps)
    else:
        _gemm(act, proj_w, x, d, True)


@njit(fastmath=True, cache=True)
def decode_head(x, ln_f, eps, head_w, vocab, xn, logits):
    """Final RMSNorm and the tied LM head for a few decode rows in one call."""
    for i in range(x.shape[0]):
        _rmsnorm_row(x, i, ln_f, eps, xn)
    _gemm(xn, head_w, logits, vocab, False)
