"""The set of CPU kernels the engine calls, with or without fastmath.

The module-level kernels are compiled with fastmath=True and cached on disk. `fastmath=False` recompiles
the top-level kernels from their Python source without fastmath and without the disk cache (numba's cache
key does not include the fastmath flag, so cached variants would collide); helpers they call (the GEMM's
cold tail path, the inlined `fexp`) keep their own flags.
"""

from __future__ import annotations

from numba import njit

from . import attention, gemm, ops_cpu

KERNELS = {
    "matmul_packed": gemm._matmul_packed,
    "rmsnorm_rows": ops_cpu.rmsnorm_rows,
    "add_rmsnorm_rows": ops_cpu.add_rmsnorm_rows,
    "rope_qknorm_rows": ops_cpu.rope_qknorm_rows,
    "relu2_rows": ops_cpu.relu2_rows,
    "swiglu_rows": ops_cpu.swiglu_rows,
    "diagonal_injection_rows": ops_cpu.diagonal_injection_rows,
    "scale_columns_rows": ops_cpu.scale_columns_rows,
    "add_rows": ops_cpu.add_rows,
    "gather_rows": ops_cpu.gather_rows,
    "add_value_embed_rows": ops_cpu.add_value_embed_rows,
    "max_relative_change": ops_cpu.max_relative_change,
    "log_softmax_rows": ops_cpu.log_softmax_rows,
    "max_kl_rows": ops_cpu.max_kl_rows,
    "act_halting_step": ops_cpu.act_halting_step,
    "add_scaled_rows": ops_cpu.add_scaled_rows,
    "add_vector_rows": ops_cpu.add_vector_rows,
    "store_kv": attention.store_kv,
    "causal_attention_prefill": attention.causal_attention_prefill,
    "attention_decode": attention.attention_decode,
    "copy_positions": attention.copy_positions,
}


class CpuKernels:
    """Attribute access to every engine kernel, e.g. `kernels.rmsnorm_rows(x, w, eps, out)`."""

    def __init__(self, fastmath: bool = True) -> None:
        self.fastmath = fastmath
        for name, dispatcher in KERNELS.items():
            setattr(self, name, dispatcher if fastmath else _without_fastmath(dispatcher))


def _without_fastmath(dispatcher):  # noqa: ANN001, ANN202 - numba dispatchers are untyped
    options = {k: v for k, v in dispatcher.targetoptions.items() if k in ("parallel", "nogil", "boundscheck")}
    return njit(fastmath=False, cache=False, **options)(dispatcher.py_func)
