"""Dense projections y = x @ W.T with weights packed once into 32-column panels.

Why hand-tiled: measured on this CPU (tests/benchmarks/test_kernels_gemm.py), the packed 8x32 register tile
below runs at parity with torch's MKL/oneDNN GEMM and faster than `np.dot` inside njit (scipy's OpenBLAS),
and it lets the residual add live in the epilogue.

Layout: `W[N, K]` (torch's Linear layout) becomes `panels[ceil(N/32), K, 32]`, zero-padded, so the k loop
streams 32 contiguous floats (two zmm loads) per step. The micro-kernel keeps an 8x32 accumulator that LLVM
holds in 16 zmm registers. Its code layout matters (research note, pitfalls P1-P5): the hot loop is
straight-line code in the prange body, and row tails and the partial last panel run in separate functions.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numba import njit, prange

F32 = np.float32
PANEL = 32      # output columns per packed panel (NR)
ROWS = 8        # rows per register tile (MR)
ROW_BLOCK = 64  # rows per parallel task
PANELS_PER_TASK = 2


@dataclass(frozen=True)
class PackedWeight:
    """A Linear weight W[n_out, n_in] packed for `matmul`."""

    panels: np.ndarray  # [ceil(n_out/32), n_in, 32] float32, zero-padded columns
    n_out: int
    n_in: int

    @property
    def nbytes(self) -> int:
        return int(self.panels.nbytes)


def pack_weight(weight: np.ndarray) -> PackedWeight:
    """Pack a [n_out, n_in] weight (any float dtype) into contiguous float32 panels."""
    if weight.ndim != 2:
        raise ValueError(f"pack_weight: weight must be 2-D [n_out, n_in], got shape {weight.shape}")
    n_out, n_in = weight.shape
    n_panels = -(-n_out // PANEL)
    padded = np.zeros((n_panels * PANEL, n_in), F32)
    padded[:n_out] = weight
    panels = np.ascontiguousarray(padded.reshape(n_panels, PANEL, n_in).transpose(0, 2, 1))
    return PackedWeight(panels, n_out, n_in)


def unpack_weight(packed: PackedWeight) -> np.ndarray:
    """The [n_out, n_in] weight back (for tests and exporters)."""
    full = packed.panels.transpose(0, 2, 1).reshape(-1, packed.n_in)
    return np.ascontiguousarray(full[: packed.n_out])


@njit(fastmath=True, cache=True)
def _rows_one_by_one(x, panels, out, row0, row1, panel0, panel1, n_out, accumulate):
    """Rows [row0, row1) x panels [panel0, panel1), one row at a time, columns clipped to n_out: the row tails
    of the tiled kernel, and decode's few rows (a GEMV). Four accumulator rows over k break the FMA
    dependency chain: measured 3.4 -> 13-16 GFLOP/s for a 1x256 @ 256x768 GEMV (one accumulator waited on
    the previous k's FMA)."""
    k_dim = x.shape[1]
    k_main = k_dim - k_dim % 4
    for p in range(panel0, panel1):
        col0 = p * 32
        width = min(32, n_out - col0)
        for i in range(row0, row1):
            acc = np.zeros((4, 32), np.float32)
            for k in range(0, k_main, 4):
                a0 = x[i, k]
                a1 = x[i, k + 1]
                a2 = x[i, k + 2]
                a3 = x[i, k + 3]
                for c in range(32):
                    acc[0, c] += a0 * panels[p, k, c]
                    acc[1, c] += a1 * panels[p, k + 1, c]
                    acc[2, c] += a2 * panels[p, k + 2, c]
                    acc[3, c] += a3 * panels[p, k + 3, c]
            for k in range(k_main, k_dim):
                a = x[i, k]
                for c in range(32):
                    acc[0, c] += a * panels[p, k, c]
            if accumulate:
                for c in range(width):
                    out[i, col0 + c] += acc[0, c] + acc[1, c] + acc[2, c] + acc[3, c]
            else:
                for c in range(width):
                    out[i, col0 + c] = acc[0, c] + acc[1, c] + acc[2, c] + acc[3, c]


@njit(parallel=True, fastmath=True, cache=True)
def _matmul_packed(x, panels, out, n_out, accumulate):
    """out[M, n_out] (=|+=) x[M, K] @ W.T, W given as packed panels."""
    m_dim, k_dim = x.shape
    full_panels = n_out // 32
    row_tasks = (m_dim + 63) // 64
    col_tasks = (full_panels + 1) // 2
    for task in prange(row_tasks * col_tasks):
        r0 = (task // col_tasks) * 64
        r1 = min(m_dim, r0 + 64)
        p0 = (task % col_tasks) * 2
        for p in range(p0, min(full_panels, p0 + 2)):
            col0 = p * 32
            i = r0
            while i + 8 <= r1:
                acc = np.zeros((8, 32), np.float32)
                for k in range(k_dim):
                    a0 = x[i, k]
                    a1 = x[i + 1, k]
                    a2 = x[i + 2, k]
                    a3 = x[i + 3, k]
                    a4 = x[i + 4, k]
                    a5 = x[i + 5, k]
                    a6 = x[i + 6, k]
                    a7 = x[i + 7, k]
                    for c in range(32):
                        b = panels[p, k, c]
                        acc[0, c] += a0 * b
                        acc[1, c] += a1 * b
                        acc[2, c] += a2 * b
                        acc[3, c] += a3 * b
                        acc[4, c] += a4 * b
                        acc[5, c] += a5 * b
                        acc[6, c] += a6 * b
                        acc[7, c] += a7 * b
                if accumulate:
                    for r in range(8):
                        for c in range(32):
                            out[i + r, col0 + c] += acc[r, c]
                else:
                    for r in range(8):
                        for c in range(32):
                            out[i + r, col0 + c] = acc[r, c]
                i += 8
            if i < r1:
                _rows_one_by_one(x, panels, out, i, r1, p, p + 1, n_out, accumulate)
    if full_panels * 32 < n_out:  # the zero-padded last panel
        _rows_one_by_one(x, panels, out, 0, m_dim, full_panels, full_panels + 1, n_out, accumulate)


def _check(x: np.ndarray, w: PackedWeight, out: np.ndarray, where: str) -> None:
    if x.ndim != 2 or x.shape[1] != w.n_in:
        raise ValueError(f"{where}: x has shape {x.shape}, expected [M, {w.n_in}]")
    if out.shape != (x.shape[0], w.n_out):
        raise ValueError(f"{where}: out has shape {out.shape}, expected {(x.shape[0], w.n_out)}")
    if x.dtype != F32 or out.dtype != F32:
        raise ValueError(f"{where}: x and out must be float32, got {x.dtype} and {out.dtype}")


def matmul(x: np.ndarray, w: PackedWeight, out: np.ndarray | None = None) -> np.ndarray:
    """out = x @ W.T for x[M, n_in] float32."""
    if out is None:
        out = np.empty((x.shape[0], w.n_out), F32)
    _check(x, w, out, "matmul")
    _matmul_packed(x, w.panels, out, w.n_out, False)
    return out


def matmul_add(x: np.ndarray, w: PackedWeight, out: np.ndarray) -> np.ndarray:
    """out += x @ W.T (the residual add, fused into the GEMM's epilogue)."""
    _check(x, w, out, "matmul_add")
    _matmul_packed(x, w.panels, out, w.n_out, True)
    return out


@njit(fastmath=True, cache=True)
def _matmul_npdot(x, weight_t, out):
    out[:] = np.dot(x, weight_t)


def matmul_blas(x: np.ndarray, weight_t: np.ndarray, out: np.ndarray) -> np.ndarray:
    """The alternative we measured against: np.dot inside njit (scipy's BLAS). weight_t is W.T, contiguous."""
    _matmul_npdot(x, weight_t, out)
    return out
