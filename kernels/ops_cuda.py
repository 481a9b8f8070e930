"""CUDA versions of the engine's ops, written with numba.cuda (the `numba-cuda` backend).

Same math and layouts as the CPU kernels, except that the KV cache is plain [B, H, T_max, hd] (coalesced
row loads into shared memory replace the CPU's register-tile panels). Kernels are launched asynchronously;
the host wrappers at the bottom copy in, launch, synchronise and copy out, for tests and op benchmarks.

Tests run them under the CUDA simulator (NUMBA_ENABLE_CUDASIM=1, set before numba.cuda is imported), on tiny
shapes because the simulator runs every GPU thread as a Python thread.
"""

from __future__ import annotations

import math

import numpy as np
from numba import cuda, float32

F32 = np.float32
TILE = 16          # GEMM tile (16x16 threads)
ROW_THREADS = 128  # threads per row for row-wise kernels
ATT_Q = 32         # queries per attention block (one thread each)
ATT_K = 32         # keys per shared-memory tile
HD_MAX = 128       # largest head_dim the attention kernel holds in registers
NEG_BIG = -1e30


# --------------------------------------------------------------------------------------- GEMM
@cuda.jit
def matmul_kernel(x, w, out, accumulate):
    """out[M, N] (=|+=) x[M, K] @ w[N, K].T with 16x16 shared-memory tiles (w is torch's Linear layout)."""
    xs = cuda.shared.array((TILE, TILE + 1), float32)
    ws = cuda.shared.array((TILE, TILE + 1), float32)
    tx = cuda.threadIdx.x
    ty = cuda.threadIdx.y
    row = cuda.blockIdx.y * TILE + ty
    col = cuda.blockIdx.x * TILE + tx
    w_row = cuda.blockIdx.x * TILE + ty  # the weight row (output column) this thread loads
    m_dim, k_dim = x.shape
    n_dim = w.shape[0]
    acc = float32(0.0)
    for k0 in range(0, k_dim, TILE):
        xs[ty, tx] = x[row, k0 + tx] if row < m_dim and k0 + tx < k_dim else float32(0.0)
        ws[ty, tx] = w[w_row, k0 + tx] if w_row < n_dim and k0 + tx < k_dim else float32(0.0)
        cuda.syncthreads()
        for kk in range(TILE):
            acc += xs[ty, kk] * ws[tx, kk]
        cuda.syncthreads()
    if row < m_dim and col < n_dim:
        if accumulate:
            out[row, col] += acc
        else:
            out[row, col] = acc


@cuda.jit
def matvec_kernel(x, w, out, accumulate):
    """out[M, N] (=|+=) x @ w.T with one thread per output and no shared memory: for a few rows (decode),
    where the tiled kernel's 16-row tiles would be mostly empty."""
    row, col = cuda.grid(2)
    if row < x.shape[0] and col < w.shape[0]:
        acc = float32(0.0)
        for k in range(x.shape[1]):
            acc += x[row, k] * w[col, k]
        if accumulate:
            out[row, col] += acc
        else:
            out[row, col] = acc


MATVEC_MAX_ROWS = 8


def launch_matmul(x, w, out, accumulate: bool = False, stream=0) -> None:  # noqa: ANN001 - device arrays
    if x.shape[0] <= MATVEC_MAX_ROWS:
        grid = (math.ceil(x.shape[0] / 4), math.ceil(w.shape[0] / 32))
        matvec_kernel[grid, (4, 32), stream](x, w, out, accumulate)
        return
    grid = (math.ceil(w.shape[0] / TILE), math.ceil(x.shape[0] / TILE))
    matmul_kernel[grid, (TILE, TILE), stream](x, w, out, accumulate)


# ----------------------------------------------------------------------------------- row-wise
@cuda.jit(device=True)
def _block_sum(value, shared):
    """Sum `value` over the block's threads (a power of two <= ROW_THREADS; tree reduction in shared memory)."""
    t = cuda.threadIdx.x
    shared[t] = value
    cuda.syncthreads()
    step = cuda.blockDim.x // 2
    while step > 0:
        if t < step:
            shared[t] += shared[t + step]
        cuda.syncthreads()
        step //= 2
    total = shared[0]
    cuda.syncthreads()
    return total


@cuda.jit
def rmsnorm_kernel(x, weight, eps, out):
    """One block per row: out = x / sqrt(mean(x^2) + eps) * weight."""
    partial = cuda.shared.array(ROW_THREADS, float32)
    i = cuda.blockIdx.x
    d = x.shape[1]
    ss = float32(0.0)
    for j in range(cuda.threadIdx.x, d, cuda.blockDim.x):
        ss += x[i, j] * x[i, j]
    inv = float32(1.0) / math.sqrt(_block_sum(ss, partial) / d + eps)
    for j in range(cuda.threadIdx.x, d, cuda.blockDim.x):
        out[i, j] = x[i, j] * inv * weight[j]


@cuda.jit
def add_rmsnorm_kernel(x, delta, weight, eps):
    """x = rmsnorm(x + delta) * weight in place (sandwich norm)."""
    partial = cuda.shared.array(ROW_THREADS, float32)
    i = cuda.blockIdx.x
    d = x.shape[1]
    ss = float32(0.0)
    for j in range(cuda.threadIdx.x, d, cuda.blockDim.x):
        v = x[i, j] + delta[i, j]
        x[i, j] = v
        ss += v * v
    inv = float32(1.0) / math.sqrt(_block_sum(ss, partial) / d + eps)
    for j in range(cuda.threadIdx.x, d, cuda.blockDim.x):
        x[i, j] = x[i, j] * inv * weight[j]


@cuda.jit
def rope_qknorm_kernel(x, seq, start, cos, sin, n_heads, head_dim, col0, eps, normalise):
    """One thread per (row, head): RoPE on (first half, second half) pairs at position start + row % seq,
    then (if normalise) the parameter-free RMSNorm of the head, in place."""
    r, h = cuda.grid(2)
    if r >= x.shape[0] or h >= n_heads:
        return
    pos = start + r % seq
    half = head_dim // 2
    c0 = col0 + h * head_dim
    ss = float32(0.0)
    for j in range(half):
        a = x[r, c0 + j]
        b = x[r, c0 + half + j]
        ra = a * cos[pos, j] - b * sin[pos, j]
        rb = a * sin[pos, j] + b * cos[pos, j]
        x[r, c0 + j] = ra
        x[r, c0 + half + j] = rb
        ss += ra * ra + rb * rb
    if normalise:
        inv = float32(1.0) / math.sqrt(ss / head_dim + eps)
        for j in range(head_dim):
            x[r, c0 + j] *= inv


@cuda.jit
def head_rmsnorm_kernel(x, n_heads, head_dim, eps):
    r, h = cuda.grid(2)
    if r >= x.shape[0] or h >= n_heads:
        return
    c0 = h * head_dim
    ss = float32(0.0)
    for j in range(head_dim):
        ss += x[r, c0 + j] * x[r, c0 + j]
    inv = float32(1.0) / math.sqrt(ss / head_dim + eps)
    for j in range(head_dim):
        x[r, c0 + j] *= inv


# -------------------------------------------------------------------------------- elementwise
@cuda.jit
def relu2_kernel(x, out):
    i, j = cuda.grid(2)
    if i < x.shape[0] and j < x.shape[1]:
        v = max(x[i, j], float32(0.0))
        out[i, j] = float32(0.5) * v * v


@cuda.jit
def swiglu_kernel(gate_up, d_ff, out):
    """out = silu(gate_up[:, :d_ff]) * gate_up[:, d_ff:]."""
    i, j = cuda.grid(2)
    if i < gate_up.shape[0] and j < d_ff:
        g = gate_up[i, j]
        out[i, j] = g / (float32(1.0) + math.exp(-g)) * gate_up[i, d_ff + j]


@cuda.jit
def diagonal_injection_kernel(h, e_in, decay, out):
    """Parcae: out = decay * h + e_in, e_in = dt * (e @ B.T) computed once per forward."""
    i, j = cuda.grid(2)
    if i < h.shape[0] and j < h.shape[1]:
        out[i, j] = decay[j] * h[i, j] + e_in[i, j]


@cuda.jit
def scale_columns_kernel(x, scale):
    i, j = cuda.grid(2)
    if i < x.shape[0] and j < x.shape[1]:
        x[i, j] *= scale[j]


@cuda.jit
def gather_rows_kernel(table, idx, out):
    i, j = cuda.grid(2)
    if i < idx.shape[0] and j < table.shape[1]:
        out[i, j] = table[idx[i], j]


@cuda.jit
def add_value_embed_kernel(qkv, x, gate_w, table, idx, n_heads, head_dim, v_col0):
    """One thread per (row, head): v += 2*sigmoid(x[:, :G] @ gate_w[h]) * table[idx]."""
    i, h = cuda.grid(2)
    if i >= qkv.shape[0] or h >= n_heads:
        return
    z = float32(0.0)
    for c in range(gate_w.shape[1]):
        z += gate_w[h, c] * x[i, c]
    gate = float32(2.0) / (float32(1.0) + math.exp(-z))
    t = idx[i]
    for j in range(head_dim):
        qkv[i, v_col0 + h * head_dim + j] += gate * table[t, h * head_dim + j]


@cuda.jit
def add_rows_kernel(x, y, out):
    i, j = cuda.grid(2)
    if i < x.shape[0] and j < x.shape[1]:
        out[i, j] = x[i, j] + y[i, j]


@cuda.jit
def add_vector_kernel(x, vec, out):
    i, j = cuda.grid(2)
    if i < x.shape[0] and j < x.shape[1]:
        out[i, j] = x[i, j] + vec[j]


@cuda.jit
def add_scaled_kernel(out, weight, x):
    i, j = cuda.grid(2)
    if i < x.shape[0] and j < x.shape[1]:
        out[i, j] += weight[i] * x[i, j]


def row_threads(d: int) -> int:
    """Threads per block for the row-wise kernels: a power of two, at most ROW_THREADS, no more than d needs."""
    return min(ROW_THREADS, 1 << max(5, (d - 1).bit_length()))


def grid_2d(rows: int, cols: int, block: tuple[int, int] = (16, 16)) -> tuple[tuple[int, int], tuple[int, int]]:
    return (math.ceil(rows / block[0]), math.ceil(cols / block[1])), block


# ---------------------------------------------------------------------------------- attention
@cuda.jit
def store_kv_kernel(qkv, seq, start, n_heads, head_dim, k_cache, v_cache):
    """k, v of rows b*seq + t into the caches [B, H, T_max, hd] at position start + t."""
    r, h = cuda.grid(2)
    if r >= qkv.shape[0] or h >= n_heads:
        return
    b = r // seq
    pos = start + r % seq
    d = n_heads * head_dim
    for j in range(head_dim):
        k_cache[b, h, pos, j] = qkv[r, d + h * head_dim + j]
        v_cache[b, h, pos, j] = qkv[r, 2 * d + h * head_dim + j]


@cuda.jit
def copy_positions_kernel(src_k, src_v, dst_k, dst_v, lo, hi):
    """Cache positions [lo, hi) of one entry into another ([B, H, T_max, hd]); one thread per (b*H+h, pos)."""
    bh, t = cuda.grid(2)
    n_heads = src_k.shape[1]
    if bh >= src_k.shape[0] * n_heads or t >= hi - lo:
        return
    b = bh // n_heads
    h = bh % n_heads
    for j in range(src_k.shape[3]):
        dst_k[b, h, lo + t, j] = src_k[b, h, lo + t, j]
        dst_v[b, h, lo + t, j] = src_v[b, h, lo + t, j]


@cuda.jit
def attention_kernel(qkv, seq, start, n_heads, head_dim, k_cache, v_cache, out):
    """Causal attention, flash style: block = (b*H + h, tile of 32 queries), one thread per query. K/V tiles
    of 32 keys go through shared memory; each tile updates the running max, sum and output (online softmax).
    Query row b*seq + t sits at position start + t and sees keys 0..start+t (prefill: start=0; decode: seq=1).
    """
    ks = cuda.shared.array((ATT_K, HD_MAX), float32)
    vs = cuda.shared.array((ATT_K, HD_MAX), float32)
    q = cuda.local.array(HD_MAX, float32)
    o = cuda.local.array(HD_MAX, float32)
    s = cuda.local.array(ATT_K, float32)
    bh = cuda.blockIdx.x
    b = bh // n_heads
    h = bh % n_heads
    tid = cuda.threadIdx.x
    t = cuda.blockIdx.y * ATT_Q + tid
    active = t < seq
    row = b * seq + min(t, seq - 1)
    qpos = start + min(t, seq - 1)
    scale = float32(1.0) / math.sqrt(float32(head_dim))
    for j in range(head_dim):
        q[j] = qkv[row, h * head_dim + j] * scale
        o[j] = float32(0.0)
    m = float32(NEG_BIG)
    l = float32(0.0)
    last_q = start + min(cuda.blockIdx.y * ATT_Q + ATT_Q, seq) - 1  # the block's last query position
    for k0 in range(0, last_q + 1, ATT_K):
        key = k0 + tid  # ATT_Q == ATT_K: each thread loads one key row
        for j in range(head_dim):
            ks[tid, j] = k_cache[b, h, key, j] if key <= last_q else float32(0.0)
            vs[tid, j] = v_cache[b, h, key, j] if key <= last_q else float32(0.0)
        cuda.syncthreads()
        n_valid = min(ATT_K, qpos + 1 - k0)
        tile_max = float32(NEG_BIG)
        for jj in range(n_valid):
            z = float32(0.0)
            for j in range(head_dim):
                z += q[j] * ks[jj, j]
            s[jj] = z
            tile_max = max(tile_max, z)
        if n_valid > 0:
            m_new = max(m, tile_max)
            alpha = math.exp(m - m_new)
            l *= alpha
            for j in range(head_dim):
                o[j] *= alpha
            for jj in range(n_valid):
                p = math.exp(s[jj] - m_new)
                l += p
                for j in range(head_dim):
                    o[j] += p * vs[jj, j]
            m = m_new
        cuda.syncthreads()
    if active:
        inv = float32(1.0) / l
        for j in range(head_dim):
            out[row, h * head_dim + j] = o[j] * inv


def launch_attention(qkv, seq: int, start: int, n_heads: int, head_dim: int, k_cache, v_cache, out,  # noqa: ANN001
                     stream=0) -> None:
    if head_dim > HD_MAX:
        raise ValueError(f"attention_kernel: head_dim={head_dim} exceeds HD_MAX={HD_MAX}")
    batch = qkv.shape[0] // seq
    grid = (batch * n_heads, math.ceil(seq / ATT_Q))
    attention_kernel[grid, ATT_Q, stream](qkv, seq, start, n_heads, head_dim, k_cache, v_cache, out)


# ------------------------------------------------------------------------ host-side op wrappers
def _run(kernel_launch, *host_inputs: np.ndarray, outputs: tuple[np.ndarray, ...]) -> tuple[np.ndarray, ...]:  # noqa: ANN001
    """Copy inputs and outputs to the device, launch, synchronise, copy outputs back."""
    dev_in = [cuda.to_device(np.ascontiguousarray(a)) for a in host_inputs]
    dev_out = [cuda.to_device(np.ascontiguousarray(a)) for a in outputs]
    kernel_launch(*dev_in, *dev_out)
    cuda.synchronize()
    return tuple(d.copy_to_host() for d in dev_out)


def rmsnorm(x: np.ndarray, weight: np.ndarray, eps: float) -> np.ndarray:
    return _run(lambda dx, dw, do: rmsnorm_kernel[x.shape[0], row_threads(x.shape[1])](dx, dw, F32(eps), do),
                x.astype(F32), weight.astype(F32), outputs=(np.empty_like(x, F32),))[0]


def matmul(x: np.ndarray, w: np.ndarray) -> np.ndarray:
    """x[M, K] @ w[N, K].T."""
    return _run(lambda dx, dw, do: launch_matmul(dx, dw, do), x.astype(F32), w.astype(F32),
                outputs=(np.empty((x.shape[0], w.shape[0]), F32),))[0]


def rope(x: np.ndarray, cos: np.ndarray, sin: np.ndarray, start: int = 0) -> np.ndarray:
    """RoPE on x [B, T, H, hd]."""
    B, T, H, hd = x.shape
    flat = x.reshape(B * T, H * hd).astype(F32)
    grid, block = grid_2d(B * T, H)
    out = _run(lambda dc, ds, dx: rope_qknorm_kernel[grid, block](dx, T, start, dc, ds, H, hd, 0, F32(0), False),
               cos, sin, outputs=(flat,))[0]
    return out.reshape(B, T, H, hd)


def qk_norm(x: np.ndarray, eps: float) -> np.ndarray:
    B, T, H, hd = x.shape
    grid, block = grid_2d(B * T, H)
    out = _run(lambda dx: head_rmsnorm_kernel[grid, block](dx, H, hd, F32(eps)),
               outputs=(x.reshape(B * T, H * hd).astype(F32),))[0]
    return out.reshape(B, T, H, hd)


def relu2(x: np.ndarray) -> np.ndarray:
    grid, block = grid_2d(*x.shape)
    return _run(lambda dx, do: relu2_kernel[grid, block](dx, do), x.astype(F32),
                outputs=(np.empty_like(x, F32),))[0]


def swiglu(gate: np.ndarray, up: np.ndarray) -> np.ndarray:
    d_ff = gate.shape[1]
    grid, block = grid_2d(gate.shape[0], d_ff)
    return _run(lambda dgu, do: swiglu_kernel[grid, block](dgu, d_ff, do),
                np.concatenate([gate, up], axis=1).astype(F32), outputs=(np.empty_like(gate, F32),))[0]


def parcae_injection(h: np.ndarray, e: np.ndarray, b_weight: np.ndarray, decay: np.ndarray,
                     dt: np.ndarray) -> np.ndarray:
    """decay*h + dt*(e @ B.T)."""
    grid, block = grid_2d(*h.shape)

    def launch(dh, de, db, ddecay, ddt, drive, dout):  # noqa: ANN001
        launch_matmul(de, db, drive)
        scale_columns_kernel[grid, block](drive, ddt)
        diagonal_injection_kernel[grid, block](dh, drive, ddecay, dout)

    return _run(launch, h.astype(F32), e.astype(F32), b_weight.astype(F32), decay.astype(F32), dt.astype(F32),
                outputs=(np.empty_like(h, F32), np.empty_like(h, F32)))[1]


def concat_adapter(h: np.ndarray, e: np.ndarray, weight: np.ndarray) -> np.ndarray:
    """Linear(2d -> d)([h; e]) with weight [d, 2d]: the e half (loop-invariant), then += the h half."""
    d = h.shape[1]

    def launch(dh, de, dwh, dwe, dout):  # noqa: ANN001
        launch_matmul(de, dwe, dout)
        launch_matmul(dh, dwh, dout, accumulate=True)

    return _run(launch, h.astype(F32), e.astype(F32), np.ascontiguousarray(weight[:, :d]),
                np.ascontiguousarray(weight[:, d:]), outputs=(np.empty_like(h, F32),))[0]


def causal_attention(q: np.ndarray, k: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Causal attention for q, k, v [B, T, H, hd] -> [B, T, H, hd]."""
    B, T, H, hd = q.shape
    qkv = np.concatenate([a.reshape(B * T, H * hd) for a in (q, k, v)], axis=1).astype(F32)
    grid, block = grid_2d(B * T, H)

    def launch(dqkv, dk, dv, dout):  # noqa: ANN001
        store_kv_kernel[grid, block](dqkv, T, 0, H, hd, dk, dv)
        launch_attention(dqkv, T, 0, H, hd, dk, dv, dout)

    cache = np.zeros((B, H, T, hd), F32)
    out = _run(launch, qkv, outputs=(cache, cache.copy(), np.empty((B * T, H * hd), F32)))[2]
    return out.reshape(B, T, H, hd)


def decode_attention(q: np.ndarray, k_cache: np.ndarray, v_cache: np.ndarray, n_keys: int) -> np.ndarray:
    """One query per (b, h) at position n_keys-1 against caches [B, H, T_max, hd]; q [B, H, hd]."""
    B, H, hd = q.shape
    qkv = np.zeros((B, 3 * H * hd), F32)
    qkv[:, : H * hd] = q.reshape(B, H * hd)
    out = _run(lambda dqkv, dk, dv, do: launch_attention(dqkv, 1, n_keys - 1, H, hd, dk, dv, do),
               qkv, k_cache.astype(F32), v_cache.astype(F32), outputs=(np.empty((B, H * hd), F32),))[0]
    return out.reshape(B, H, hd)
