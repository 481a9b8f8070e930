"""CudaEngine: the numba engine on a GPU (the `numba-cuda` backend). Same driver as NumbaEngine (engine.py:
families, loops, exit rules, KV policies); activations, caches and weights live in device memory and every
op is a numba.cuda kernel (ops_cuda.py). Only small per-position bookkeeping runs on the host: the exit
criteria and UT's ACT halting (a [rows]-sized decision per loop), which copy the state back.

Kernels are asynchronous: outputs are synchronised when they are copied back, and region timers synchronise
before they read the clock. Tested under the CUDA simulator (tests/kernels_cuda_cases.py).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from numba import cuda

from . import ops_cpu, ops_cuda
from .engine import NumbaEngine
from .export import ModelWeights, export_model
from .gemm import PackedWeight, unpack_weight

F32 = np.float32


class CudaMemory:
    """Device arrays with the HostMemory interface (engine.py)."""

    def empty(self, shape: tuple[int, ...]) -> Any:
        return cuda.device_array(shape, np.float32)

    def zeros(self, shape: tuple[int, ...]) -> Any:
        return cuda.to_device(np.zeros(shape, F32))

    def copy(self, dst: Any, src: Any) -> None:
        dst.copy_to_device(np.ascontiguousarray(src, F32) if isinstance(src, np.ndarray) else src)

    def fill(self, dst: Any, value: float) -> None:
        dst.copy_to_device(np.full(dst.shape, value, F32))

    def to_host(self, arr: Any) -> np.ndarray:
        return arr.copy_to_host()

    def kv_shapes(self, batch: int, n_heads: int, max_len: int, head_dim: int) -> tuple[tuple[int, ...], ...]:
        if head_dim > ops_cuda.HD_MAX:
            raise ValueError(f"CudaEngine: head_dim={head_dim} exceeds the attention kernel's {ops_cuda.HD_MAX}")
        shape = (batch, n_heads, max_len, head_dim)
        return shape, shape

    def scratch(self, max_len: int) -> Any:
        return None  # the CUDA attention kernel keeps its scores in registers/shared memory


class CudaKernels:
    """The engine's kernel names (kernel_set.CpuKernels), launched on the GPU. Host arrays given as
    arguments (weights, RoPE tables) are uploaded once and kept; token ids are uploaded per call."""

    def __init__(self) -> None:
        self._uploaded: dict[int, tuple[np.ndarray, Any]] = {}

    def dev(self, a: Any) -> Any:
        """The device copy of a persistent host array (kept with a reference, so its id stays unique)."""
        if not isinstance(a, np.ndarray):
            return a
        hit = self._uploaded.get(id(a))
        if hit is None or hit[0] is not a:
            hit = (a, cuda.to_device(np.ascontiguousarray(a)))
            self._uploaded[id(a)] = hit
        return hit[1]

    @staticmethod
    def _grid(rows: int, cols: int) -> tuple[tuple[int, int], tuple[int, int]]:
        return ops_cuda.grid_2d(rows, cols)

    def gather_rows(self, table: np.ndarray, idx: np.ndarray, out: Any) -> None:
        grid, block = self._grid(out.shape[0], out.shape[1])
        ops_cuda.gather_rows_kernel[grid, block](self.dev(table), cuda.to_device(idx), out)

    def rmsnorm_rows(self, x: Any, weight: np.ndarray, eps: np.float32, out: Any) -> None:
        ops_cuda.rmsnorm_kernel[x.shape[0], ops_cuda.row_threads(x.shape[1])](x, self.dev(weight), eps, out)

    def add_rmsnorm_rows(self, x: Any, delta: Any, weight: np.ndarray, eps: np.float32) -> None:
        ops_cuda.add_rmsnorm_kernel[x.shape[0], ops_cuda.row_threads(x.shape[1])](x, delta, self.dev(weight), eps)

    def rope_qknorm_rows(self, x: Any, seq: int, start: int, cos: np.ndarray, sin: np.ndarray, n_heads: int,
                         head_dim: int, col0: int, eps: np.float32, normalise: bool) -> None:
        grid, block = self._grid(x.shape[0], n_heads)
        ops_cuda.rope_qknorm_kernel[grid, block](x, seq, start, self.dev(cos), self.dev(sin), n_heads, head_dim,
                                                 col0, eps, normalise)

    def add_value_embed_rows(self, qkv: Any, x: Any, gate_w: np.ndarray, table: np.ndarray, idx: np.ndarray,
                             n_heads: int, head_dim: int, v_col0: int) -> None:
        grid, block = self._grid(qkv.shape[0], n_heads)
        ops_cuda.add_value_embed_kernel[grid, block](qkv, x, self.dev(gate_w), self.dev(table), cuda.to_device(idx),
                                                     n_heads, head_dim, v_col0)

    def store_kv(self, qkv: Any, seq: int, start: int, n_heads: int, head_dim: int, k_cache: Any,
                 v_cache: Any) -> None:
        grid, block = self._grid(qkv.shape[0], n_heads)
        ops_cuda.store_kv_kernel[grid, block](qkv, seq, start, n_heads, head_dim, k_cache, v_cache)

    def causal_attention_prefill(self, qkv: Any, seq: int, n_heads: int, head_dim: int, k_cache: Any,
                                 v_cache: Any, scratch: Any, out: Any) -> None:
        ops_cuda.launch_attention(qkv, seq, 0, n_heads, head_dim, k_cache, v_cache, out)

    def attention_decode(self, qkv: Any, n_keys: int, n_heads: int, head_dim: int, k_cache: Any, v_cache: Any,
                         scratch: Any, out: Any) -> None:
        ops_cuda.launch_attention(qkv, 1, n_keys - 1, n_heads, head_dim, k_cache, v_cache, out)

    def copy_positions(self, src_k: Any, src_v: Any, dst_k: Any, dst_v: Any, lo: int, hi: int) -> None:
        grid, block = self._grid(src_k.shape[0] * src_k.shape[1], hi - lo)
        ops_cuda.copy_positions_kernel[grid, block](src_k, src_v, dst_k, dst_v, lo, hi)

    def relu2_rows(self, x: Any, out: Any) -> None:
        grid, block = self._grid(*x.shape)
        ops_cuda.relu2_kernel[grid, block](x, out)

    def swiglu_rows(self, gate_up: Any, d_ff: int, out: Any) -> None:
        grid, block = self._grid(gate_up.shape[0], d_ff)
        ops_cuda.swiglu_kernel[grid, block](gate_up, d_ff, out)

    def scale_columns_rows(self, x: Any, scale: np.ndarray) -> None:
        grid, block = self._grid(*x.shape)
        ops_cuda.scale_columns_kernel[grid, block](x, self.dev(scale))

    def diagonal_injection_rows(self, h: Any, e_in: Any, decay: np.ndarray, out: Any) -> None:
        grid, block = self._grid(*h.shape)
        ops_cuda.diagonal_injection_kernel[grid, block](h, e_in, self.dev(decay), out)

    def add_rows(self, x: Any, y: Any, out: Any) -> None:
        grid, block = self._grid(*x.shape)
        ops_cuda.add_rows_kernel[grid, block](x, y, out)

    def add_vector_rows(self, x: Any, vec: np.ndarray, out: Any) -> None:
        grid, block = self._grid(*x.shape)
        ops_cuda.add_vector_kernel[grid, block](x, cuda.to_device(np.ascontiguousarray(vec)), out)

    def add_scaled_rows(self, out: Any, weight: np.ndarray, x: Any) -> None:
        grid, block = self._grid(*x.shape)
        ops_cuda.add_scaled_kernel[grid, block](out, cuda.to_device(weight), x)

    # host-side decisions on small per-position data: copy back, reuse the CPU kernels
    def max_relative_change(self, new: Any, old: Any) -> float:
        return float(ops_cpu.max_relative_change(new.copy_to_host(), old.copy_to_host()))

    def log_softmax_rows(self, x: Any, out: Any) -> None:
        host = np.empty(x.shape, F32)
        ops_cpu.log_softmax_rows(x.copy_to_host(), host)
        out.copy_to_device(host)

    def max_kl_rows(self, logp: Any, prev_logp: Any) -> float:
        return float(ops_cpu.max_kl_rows(logp.copy_to_host(), prev_logp.copy_to_host()))

    def act_halting_step(self, h: Any, halt_w: np.ndarray, halt_b: np.ndarray, *state: Any) -> int:
        return int(ops_cpu.act_halting_step(h.copy_to_host(), halt_w, halt_b, *state))


class CudaEngine(NumbaEngine):
    """NumbaEngine on the GPU: `CudaEngine.from_model(model)`; the same prefill/new_cache/decode_step API."""

    def __init__(self, weights: ModelWeights, *, seed: int = 0) -> None:
        super().__init__(weights, fastmath=True, seed=seed, serial_decode=False)
        self.kernels = CudaKernels()
        self.memory = CudaMemory()
        self.timers.sync = cuda.synchronize
        self._weights_on_device: dict[int, Any] = {}
        for packed in _packed_weights(weights):  # the CUDA GEMM reads torch's [N, K] layout
            self._weights_on_device[id(packed)] = cuda.to_device(unpack_weight(packed))

    @classmethod
    def from_model(cls, model: Any, *, seed: int = 0, **_: Any) -> CudaEngine:  # type: ignore[override]
        return cls(export_model(model), seed=seed)

    def _matmul(self, x: Any, w: PackedWeight, out: Any, accumulate: bool = False) -> None:
        ops_cuda.launch_matmul(x, self._weights_on_device[id(w)], out, accumulate)

    @property
    def weight_bytes(self) -> int:
        return int(sum(math.prod(a.shape) * 4 for a in self._weights_on_device.values()))


def _packed_weights(weights: ModelWeights) -> list[PackedWeight]:
    found = [weights.head]
    for layers in weights.stages.values():
        for lw in layers:
            found += [lw.qkv, lw.o, lw.fc, lw.proj]
    found += [v for v in weights.extras.values() if isinstance(v, PackedWeight)]
    return found
