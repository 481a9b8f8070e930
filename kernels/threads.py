"""One place that sets the thread count of every pool in the process: torch's OpenMP pool, numba's
threading layer and the BLAS pools (numpy's and scipy's OpenBLAS, torch's MKL). The probe found these are
independent knobs: torch.set_num_threads leaves numba and OpenBLAS at their defaults and vice versa.

`set_threads` returns what it set and what each pool reports afterwards, for the run manifest.
"""

from __future__ import annotations

import os
from typing import Any

BLAS_ENV_VARS = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")


def _blas_pools(n: int) -> list[dict[str, Any]]:
    """Limit every BLAS/OpenMP pool threadpoolctl can see; without threadpoolctl, set the env vars, which
    only affect libraries that are not loaded yet (that is said in the returned record)."""
    try:
        from threadpoolctl import threadpool_info, threadpool_limits
    except ImportError:
        for var in BLAS_ENV_VARS:
            os.environ[var] = str(n)
        return [{"internal_api": "env", "num_threads": n,
                 "note": "threadpoolctl missing: env vars set, effective only for pools not yet loaded"}]
    threadpool_limits(limits=n, user_api="blas")
    return [{"internal_api": p.get("internal_api"), "prefix": p.get("prefix"),
             "num_threads": p.get("num_threads"), "architecture": p.get("architecture"),
             "version": p.get("version")} for p in threadpool_info()]


def set_threads(n: int) -> dict[str, Any]:
    """Use n threads in torch, numba and BLAS together. Returns the record for the manifest:
    {"requested", "torch", "torch_interop", "numba", "numba_threading_layer", "blas": [...]}."""
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"set_threads: n={n!r} must be a positive int")
    import numba
    import torch

    cpu_count = os.cpu_count() or 1
    record: dict[str, Any] = {"requested": n, "cpu_count": cpu_count}
    torch.set_num_threads(n)
    record["torch"] = torch.get_num_threads()
    record["torch_interop"] = torch.get_num_interop_threads()
    max_numba = numba.config.NUMBA_NUM_THREADS
    numba.set_num_threads(min(n, max_numba))
    record["numba"] = numba.get_num_threads()
    if n > max_numba:
        record["numba_note"] = f"numba's pool was created with {max_numba} threads (NUMBA_NUM_THREADS); capped"
    record["numba_threading_layer"] = _numba_layer()
    record["blas"] = _blas_pools(n)
    if n > cpu_count:
        record["warning"] = f"{n} threads on {cpu_count} CPUs oversubscribes"
    return record


def _numba_layer() -> str:
    """The threading layer numba picked (it is chosen when the first parallel kernel runs)."""
    import numba

    try:
        return str(numba.threading_layer())
    except ValueError:  # no parallel kernel has run yet
        return f"not yet chosen (configured: {numba.config.THREADING_LAYER})"
