"""loopscope.kernels: the Numba-JIT backend (CPU njit kernels, CUDA kernels via numba.cuda, the engine).

    from loopscope.kernels.engine import NumbaEngine        # backend "numba"
    from loopscope.kernels.engine_cuda import CudaEngine    # backend "numba-cuda" (imports numba.cuda)
    from loopscope.kernels.bench import kernel_benchmarks   # tidy rows for the `kernels` workload

Modules: cpu_target (vector width, threading layer), mathfn (vectorisable exp), gemm (packed GEMM),
ops_cpu (norms, RoPE, activations, injections), attention (fused causal attention, decode attention),
decode (one fused call per block for a few decode rows), kernel_set (fastmath on/off), export (weights),
engine, ops_cuda, engine_cuda, bench, gpu_check (the prepared real-GPU check).

The vector-width choice must be made before numba builds its code generator, i.e. before the first
@njit in the process, so it runs here, ahead of every kernel module; so does the choice of numba's threading
layer (see cpu_target.py for both, with the measurements behind them).
"""

from .cpu_target import prefer_wide_vectors, prefer_workqueue_threads

VECTOR_WIDTH_DECISION = prefer_wide_vectors()
THREADING_LAYER_DECISION = prefer_workqueue_threads()
