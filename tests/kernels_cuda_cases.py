"""CUDA kernel cases, run by tests/test_kernels_cuda.py in a subprocess with NUMBA_ENABLE_CUDASIM=1 (the
simulator must be chosen before numba.cuda is imported, so these cannot share the CPU tests' process).
Also runnable as is on a machine with a GPU: `pytest tests/kernels_cuda_cases.py`. Shapes are tiny because
the simulator runs each GPU thread as a Python thread."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from loopscope.kernels import ops_cuda
from loopscope.kernels.ops_cpu import rope_tables
from loopscope.models.blocks import apply_rope
from loopscope.models.blocks import rope_tables as torch_rope_tables

ATOL = 1e-4  # plain fp32 kernels (no fastmath on the GPU path); logits here are O(1)
RNG = np.random.default_rng(7)


def randn(*shape: int, scale: float = 1.0) -> np.ndarray:
    return (RNG.standard_normal(shape) * scale).astype(np.float32)


def t(a: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(a))


def close(got: np.ndarray, want: torch.Tensor) -> None:
    err = float(np.abs(got - want.numpy()).max())
    assert got.shape == tuple(want.shape) and err <= ATOL, f"max abs error {err:.3g}"


def test_matmul() -> None:
    x, w = randn(19, 40), randn(21, 40, scale=0.3)
    close(ops_cuda.matmul(x, w), F.linear(t(x), t(w)))


def test_rmsnorm() -> None:
    x, w = randn(3, 150, scale=2.0), randn(150)
    close(ops_cuda.rmsnorm(x, w, 1e-5), F.rms_norm(t(x), (150,), t(w), 1e-5))


def test_rope_and_qk_norm() -> None:
    B, T, H, hd = 1, 6, 2, 16
    x = randn(B, T, H, hd)
    cos, sin = rope_tables(T, hd, 50_000.0)
    tcos, tsin = torch_rope_tables(0, T, hd, 50_000.0, torch.device("cpu"))
    close(ops_cuda.rope(x, cos, sin), apply_rope(t(x), tcos, tsin))
    close(ops_cuda.qk_norm(x, 1e-5), F.rms_norm(t(x), (hd,), eps=1e-5))


def test_activations() -> None:
    x, g, u = randn(4, 20), randn(4, 12, scale=3.0), randn(4, 12)
    close(ops_cuda.relu2(x), 0.5 * F.relu(t(x)).square())
    close(ops_cuda.swiglu(g, u), F.silu(t(g)) * t(u))


def test_injections() -> None:
    d = 16
    h, e, b = randn(5, d), randn(5, d), randn(d, d, scale=0.3)
    dt = F.softplus(t(randn(d)))
    decay = torch.exp(-dt * torch.exp(t(randn(d, scale=0.3))))
    close(ops_cuda.parcae_injection(h, e, b, decay.numpy(), dt.numpy()), decay * t(h) + dt * (t(e) @ t(b).T))
    w = randn(d, 2 * d, scale=0.3)
    close(ops_cuda.concat_adapter(h, e, w), F.linear(torch.cat([t(h), t(e)], -1), t(w)))


def test_causal_attention_and_decode() -> None:
    B, T, H, hd = 1, 37, 2, 16  # two key tiles, a partial query tile
    q, k, v = randn(B, T, H, hd), randn(B, T, H, hd), randn(B, T, H, hd)
    want = F.scaled_dot_product_attention(*(t(a).transpose(1, 2) for a in (q, k, v)), is_causal=True)
    close(ops_cuda.causal_attention(q, k, v), want.transpose(1, 2))
    k_cache, v_cache = (np.ascontiguousarray(a.transpose(0, 2, 1, 3)) for a in (k, v))
    close(ops_cuda.decode_attention(q[:, -1], k_cache, v_cache, T), want[:, :, -1])


def test_matvec_path_for_few_rows() -> None:
    x, w = randn(3, 40), randn(21, 40, scale=0.3)  # <= MATVEC_MAX_ROWS rows: one thread per output
    close(ops_cuda.matmul(x, w), F.linear(t(x), t(w)))


# ------------------------------------------------------------------------------- the CUDA engine
ENGINE_CASES = {  # tiny on purpose: the simulator runs every GPU thread as a Python thread
    "gpt": dict(n_layers=1, value_embeds=True, mlp="swiglu"),
    "parcae": dict(n_prelude=0, n_core=1, n_coda=0, mu_rec=2, state_init="zero"),
    "rdm": dict(n_prelude=0, n_core=1, n_coda=0, mu_rec=2, state_init="zero"),  # sandwich norms
    "ut": dict(n_core=1, mu_rec=1, act_max_steps=2),
}


@pytest.mark.parametrize("family", list(ENGINE_CASES))
def test_cuda_engine_prefill_and_decode(family: str) -> None:
    from loopscope.kernels.engine_cuda import CudaEngine
    from loopscope.models import KVCache, build, preset

    cfg = preset(f"{family}-micro").replace(d_model=32, n_heads=2, vocab_size=32, **ENGINE_CASES[family])
    model = build(cfg, seed=0).eval()
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():  # random non-zero weights everywhere (the preset init zeroes output projections)
        for name, p in model.named_parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * (0.5 if p.dim() < 2 else 1.0 / p.shape[1] ** 0.5)
                    + (1.0 if ("norm" in name or name.startswith("ln_")) else 0.0))
    engine = CudaEngine.from_model(model)
    idx = torch.randint(0, 32, (1, 4), generator=gen)
    ref_cache, cache = KVCache(6), engine.new_cache(1, 6)
    with torch.no_grad():
        want = model(idx, cache=ref_cache)
    close(engine.prefill(idx.numpy(), cache=cache), want)
    token = want[:, -1].argmax(-1)
    for _ in range(1 if cfg.is_looped else 2):
        with torch.no_grad():
            want = model(token[:, None], cache=ref_cache)[:, -1]
        close(engine.decode_step(token.numpy(), cache), want)
        token = want.argmax(-1)
