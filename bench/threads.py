"""One place that sets the thread count of every pool in the process: torch's OpenMP pool, numba's
threading layer and the BLAS pools (numpy's and scipy's OpenBLAS, torch's MKL). The probe found these are
independent knobs: torch.set_num_threads leaves numba and OpenBLAS at their defaults and vice versa.

`set_threads` returns what it set and what each pool reports afterwards, for the run manifest. It imports
numba only where numba is already loaded: a cell without numba kernels (the torch backends) should not pay
a fifth of a second for it, and NUMBA_NUM_THREADS sizes the pool of a numba imported later just the same.
"""

from __future__ import annotations

import os
import sys
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
    import torch

    cpu_count = os.cpu_count() or 1
    record: dict[str, Any] = {"requested": n, "cpu_count": cpu_count}
    torch.set_num_threads(n)
    record["torch"] = torch.get_num_threads()
    record["torch_interop"] = torch.get_num_interop_threads()
    record.update(_numba_threads(n))
    record["blas"] = _blas_pools(n)
    if n > cpu_count:
        record["warning"] = f"{n} threads on {cpu_count} CPUs oversubscribes"
    return record


def _numba_threads(n: int) -> dict[str, Any]:
    if "numba" not in sys.modules:
        user_max = os.environ.get("NUMBA_NUM_THREADS", "")
        capped = user_max.isdigit() and int(user_max) < n
        if not capped:
            os.environ["NUMBA_NUM_THREADS"] = str(n)
        out: dict[str, Any] = {"numba": int(user_max) if capped else n,
                               "numba_threading_layer": "numba not imported (NUMBA_NUM_THREADS sizes its pool)"}
        if capped:
            out["numba_note"] = f"NUMBA_NUM_THREADS={user_max} set by the user; capped"
        return out
    import numba

    max_numba = numba.config.NUMBA_NUM_THREADS
    numba.set_num_threads(min(n, max_numba))
    out = {"numba": numba.get_num_threads(), "numba_threading_layer": _numba_layer()}
    if n > max_numba:
        out["numba_note"] = f"numba's pool was created with {max_numba} threads (NUMBA_NUM_THREADS); capped"
    return out


def _numba_layer() -> str:
    """The threading layer numba picked (it is chosen when the first parallel kernel runs)."""
    import numba

    try:
        return str(numba.threading_layer())
    except ValueError:  # no parallel kernel has run yet
        return f"not yet chosen (configured: {numba.config.THREADING_LAYER})"
