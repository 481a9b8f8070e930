"""Which vector width numba's LLVM uses for our kernels.

On AVX-512 CPUs LLVM's default tuning ("prefer-256-bit") keeps auto-vectorised loops in 256-bit ymm
registers. Measured on this project's 2-core Xeon (Emerald Rapids), 2048-row fp32 GEMMs with the packed
8x32 register tile ran at 115-150 GFLOP/s with ymm and 170-290 GFLOP/s with zmm; torch (MKL/oneDNN) runs at
115-320 on the same shapes. So we ask for 512-bit vectors, through numba's documented NUMBA_CPU_FEATURES
knob, before numba builds its code generator (it does so on the first @njit decoration in a process).

The setting is process-wide and only touches numba's CPU target. A user's own NUMBA_CPU_FEATURES or
NUMBA_CPU_NAME wins. Cached kernels are keyed on the feature string, so both widths can coexist on disk.
"""

from __future__ import annotations

import os

NO_PREFER_256 = "-prefer-256-bit"


def _codegen_started() -> bool:
    from numba.core.registry import cpu_target

    return "_toplevel_target_context" in cpu_target.__dict__


def prefer_wide_vectors() -> str:
    """Ask numba for 512-bit vectors when the CPU has AVX-512. Returns what was decided, for logs."""
    import llvmlite.binding as llvm
    from numba.core import config

    if os.environ.get("NUMBA_CPU_FEATURES") or os.environ.get("NUMBA_CPU_NAME"):
        return "user-set NUMBA_CPU_FEATURES/NUMBA_CPU_NAME kept"
    features = llvm.get_host_cpu_features().flatten()
    if "+avx512f" not in features.split(","):
        return "no AVX-512: default vector width"
    if _codegen_started():
        return "numba code generator already built in this process: default vector width"
    os.environ["NUMBA_CPU_FEATURES"] = f"{features},{NO_PREFER_256}"
    config.reload_config()
    return "512-bit vectors requested (NUMBA_CPU_FEATURES += -prefer-256-bit)"


def prefer_workqueue_threads() -> str:
    """Use numba's `workqueue` threading layer unless the user chose one (NUMBA_THREADING_LAYER).

    Measured on this 2-core VM while other processes were busy (tests/benchmarks/test_kernels_threads.py):
    a 2-row RMSNorm call took 7-16 ms with the default `omp` layer (each parallel region waited a scheduler
    tick for its worker; torch was imported, so two OpenMP runtimes were in the process), 20-30 us with
    `workqueue`, whose workers do not spin. The layer is fixed when the first parallel kernel runs.
    """
    from numba.core import config

    if os.environ.get("NUMBA_THREADING_LAYER"):
        return f"user-set NUMBA_THREADING_LAYER={os.environ['NUMBA_THREADING_LAYER']} kept"
    os.environ["NUMBA_THREADING_LAYER"] = "workqueue"
    config.reload_config()
    return "workqueue threading layer requested"


def vector_info() -> dict[str, object]:
    """The CPU name, whether numba's active codegen may use 512-bit vectors, and the SVML flag."""
    import llvmlite.binding as llvm
    from numba.core import config
    from numba.core.registry import cpu_target

    features = cpu_target.target_context.codegen()._tm_features
    avx512 = "+avx512f" in features.split(",")
    return {
        "numba_cpu_name": config.CPU_NAME or llvm.get_host_cpu_name(),
        "numba_vector_bits": 512 if avx512 and NO_PREFER_256 in features else (256 if "+avx2" in features else 128),
        "numba_svml": bool(getattr(config, "USING_SVML", False)),
    }
