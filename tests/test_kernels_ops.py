"""Each CPU kernel against a torch fp32 reference on small random shapes (tails and odd sizes included)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from numba import njit

from loopscope.kernels import attention, gemm, ops_cpu
from loopscope.kernels.mathfn import fexp
from loopscope.models.blocks import apply_rope, rope_tables

ATOL = 1e-4  # fastmath kernels; measured errors are ~1e-6
RNG = np.random.default_rng(1234)


def randn(*shape: int, scale: float = 1.0) -> np.ndarray:
    return (RNG.standard_normal(shape) * scale).astype(np.float32)


def t(a: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(a))


def assert_close(got: np.ndarray, want: torch.Tensor | np.ndarray, atol: float = ATOL) -> None:
    want = want.numpy() if isinstance(want, torch.Tensor) else want
    assert got.shape == want.shape, (got.shape, want.shape)
    err = float(np.abs(got - want).max())
    assert err <= atol, f"max abs error {err:.3g} > {atol}"


@pytest.mark.parametrize("m,k,n", [(1, 16, 32), (7, 40, 70), (8, 64, 64), (37, 96, 160), (130, 128, 33)])
def test_matmul_matches_torch(m: int, k: int, n: int) -> None:
    x, w = randn(m, k), randn(n, k, scale=0.2)
    packed = gemm.pack_weight(w)
    assert_close(gemm.matmul(x, packed), F.linear(t(x), t(w)))
    out = randn(m, n)
    want = t(out) + F.linear(t(x), t(w))
    assert_close(gemm.matmul_add(x, packed, out), want)
    np.testing.assert_array_equal(gemm.unpack_weight(packed), w)


def test_matmul_blas_baseline_matches() -> None:
    x, w = randn(20, 48), randn(24, 48)
    out = np.empty((20, 24), np.float32)
    assert_close(gemm.matmul_blas(x, np.ascontiguousarray(w.T), out), F.linear(t(x), t(w)))


def test_matmul_rejects_wrong_shapes() -> None:
    packed = gemm.pack_weight(randn(8, 4))
    with pytest.raises(ValueError, match="expected"):
        gemm.matmul(randn(3, 5), packed)


@njit(fastmath=True)
def _fexp_array(x: np.ndarray, out: np.ndarray) -> None:
    for i in range(x.shape[0]):
        out[i] = fexp(x[i])


def test_fexp_relative_error() -> None:
    x = np.linspace(-80, 80, 100_001).astype(np.float32)
    got = np.empty_like(x)
    _fexp_array(x, got)
    want = np.exp(x.astype(np.float64))
    assert float((np.abs(got - want) / want).max()) < 1e-6


@pytest.mark.parametrize("n,d", [(1, 8), (13, 64), (40, 100)])
def test_rmsnorm(n: int, d: int) -> None:
    x, w = randn(n, d, scale=3.0), randn(d)
    assert_close(ops_cpu.rmsnorm(x, w, 1e-5), F.rms_norm(t(x), (d,), t(w), 1e-5))


def test_add_rmsnorm_sandwich() -> None:
    x, delta, w = randn(9, 32), randn(9, 32), randn(32)
    want = F.rms_norm(t(x) + t(delta), (32,), t(w), 1e-5)
    ops_cpu.add_rmsnorm_rows(x, delta, w, np.float32(1e-5))
    assert_close(x, want)


@pytest.mark.parametrize("start", [0, 5])
def test_rope_matches_model(start: int) -> None:
    B, T, H, hd = 2, 11, 3, 16
    x = randn(B, T, H, hd)
    cos, sin = ops_cpu.rope_tables(start + T, hd, 50_000.0)
    tcos, tsin = rope_tables(start, T, hd, 50_000.0, torch.device("cpu"))
    assert_close(cos[start:], tcos, atol=1e-6)
    assert_close(ops_cpu.rope(x, cos, sin, start=start), apply_rope(t(x), tcos, tsin))


def test_qk_norm() -> None:
    x = randn(2, 5, 4, 32, scale=2.0)
    assert_close(ops_cpu.qk_norm(x, 1e-5), F.rms_norm(t(x), (32,), eps=1e-5))


def test_rope_then_qk_norm_fused() -> None:
    """The engine's fused pass over q|k columns equals RoPE followed by QK-norm."""
    B, T, H, hd = 1, 7, 2, 32
    q = randn(B, T, H, hd)
    cos, sin = ops_cpu.rope_tables(T, hd, 10_000.0)
    flat = q.reshape(B * T, H * hd).copy()
    ops_cpu.rope_qknorm_rows(flat, T, 0, cos, sin, H, hd, 0, np.float32(1e-5), True)
    tcos, tsin = rope_tables(0, T, hd, 10_000.0, torch.device("cpu"))
    want = F.rms_norm(apply_rope(t(q), tcos, tsin), (hd,), eps=1e-5)
    assert_close(flat.reshape(B, T, H, hd), want)


def test_relu2_and_swiglu() -> None:
    x, g, u = randn(6, 50), randn(6, 40, scale=4.0), randn(6, 40)
    assert_close(ops_cpu.relu2(x), 0.5 * F.relu(t(x)).square())
    assert_close(ops_cpu.swiglu(g, u), F.silu(t(g)) * t(u))


def test_parcae_injection() -> None:
    d = 24
    h, e, b = randn(10, d), randn(10, d), randn(d, d, scale=0.3)
    dt_bias, a_log = randn(d), randn(d, scale=0.5)
    dt = F.softplus(t(dt_bias))
    decay = torch.exp(-dt * torch.exp(t(a_log)))
    want = decay * t(h) + dt * (t(e) @ t(b).T)
    got = ops_cpu.parcae_injection(h, e, gemm.pack_weight(b), decay.numpy(), dt.numpy())
    assert_close(got, want)


def test_concat_adapter() -> None:
    d = 20
    h, e, w = randn(9, d), randn(9, d), randn(d, 2 * d, scale=0.3)
    want = F.linear(torch.cat([t(h), t(e)], dim=-1), t(w))
    got = ops_cpu.concat_adapter(h, e, gemm.pack_weight(w[:, :d]), gemm.pack_weight(w[:, d:]))
    assert_close(got, want)


@pytest.mark.parametrize("B,T,H,hd", [(1, 1, 1, 16), (2, 37, 2, 32), (1, 300, 1, 64), (2, 20, 3, 48)])
def test_causal_attention_matches_sdpa(B: int, T: int, H: int, hd: int) -> None:
    q, k, v = randn(B, T, H, hd), randn(B, T, H, hd), randn(B, T, H, hd)
    want = F.scaled_dot_product_attention(*(t(a).transpose(1, 2) for a in (q, k, v)), is_causal=True)
    assert_close(attention.causal_attention(q, k, v), want.transpose(1, 2))


def test_attention_has_no_txt_buffer() -> None:
    """The scratch per thread is one 8x128 score block (or one decode row), not T x T."""
    assert attention.scratch_for(4096).shape[1] == 4096
    assert attention.scratch_for(64).shape[1] == 8 * attention.KCHUNK


def test_decode_attention_matches_last_row() -> None:
    B, T, H, hd = 2, 45, 2, 32
    q, k, v = randn(B, T, H, hd), randn(B, T, H, hd), randn(B, T, H, hd)
    qkv = np.concatenate([a.reshape(B * T, H * hd) for a in (q, k, v)], axis=1)
    k_shape, v_shape = attention.kv_cache_shapes(B, H, T + 5, hd)
    k_panels, v_panels = np.zeros(k_shape, np.float32), np.zeros(v_shape, np.float32)
    attention.store_kv(qkv, T, 0, H, hd, k_panels, v_panels)
    last = np.ascontiguousarray(qkv.reshape(B, T, -1)[:, -1])
    out = np.empty((B, H * hd), np.float32)
    attention.attention_decode(last, T, H, hd, k_panels, v_panels, attention.scratch_for(T + 5), out)
    want = F.scaled_dot_product_attention(*(t(a).transpose(1, 2) for a in (q, k, v)), is_causal=True)
    assert_close(out.reshape(B, H, hd), want[:, :, -1])


def test_value_embed_gate() -> None:
    n, H, hd, V = 6, 2, 16, 11
    d = H * hd
    qkv, x = randn(n, 3 * d), randn(n, d)
    gate_w, table = randn(H, min(32, d)), randn(V, d)
    idx = RNG.integers(0, V, n).astype(np.int64)
    gate = 2.0 * torch.sigmoid(t(x)[:, :32] @ t(gate_w).T)
    want = t(qkv).clone()
    want[:, 2 * d:] += (gate.unsqueeze(-1) * t(table)[t(idx)].view(n, H, hd)).reshape(n, d)
    ops_cpu.add_value_embed_rows(qkv, x, gate_w, table, idx, H, hd, 2 * d)
    assert_close(qkv, want)


def test_exit_criteria() -> None:
    new, old = randn(5, 16), randn(5, 16)
    want = float(((t(new) - t(old)).norm(dim=-1) / t(new).norm(dim=-1)).max())
    assert abs(ops_cpu.max_relative_change(new, old) - want) < 1e-5
    logits, prev = randn(4, 30, scale=3.0), randn(4, 30, scale=3.0)
    logp, prev_logp = np.empty_like(logits), np.empty_like(prev)
    ops_cpu.log_softmax_rows(logits, logp)
    ops_cpu.log_softmax_rows(prev, prev_logp)
    assert_close(logp, F.log_softmax(t(logits), -1))
    tl, tp = F.log_softmax(t(logits), -1), F.log_softmax(t(prev), -1)
    want_kl = float((tl.exp() * (tl - tp)).sum(-1).max())
    assert abs(ops_cpu.max_kl_rows(logp, prev_logp) - want_kl) < 1e-4
