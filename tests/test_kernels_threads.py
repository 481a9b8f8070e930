"""set_threads sets torch, numba and BLAS together and reports what each pool uses."""

from __future__ import annotations

import subprocess
import sys

import llvmlite.binding as llvm
import numba
import torch

from loopscope import kernels
from loopscope.bench.threads import set_threads
from loopscope.kernels import cpu_target


def test_set_threads_sets_every_pool() -> None:
    before = torch.get_num_threads()
    try:
        record = set_threads(1)
        assert record["requested"] == 1
        assert torch.get_num_threads() == record["torch"] == 1
        assert numba.get_num_threads() == record["numba"] == 1
        assert record["blas"], "no BLAS pool reported"
        assert all(pool["num_threads"] == 1 for pool in record["blas"]
                   if pool.get("internal_api") in ("openblas", "mkl", "env"))
        if kernels.THREADING_LAYER_DECISION.startswith("workqueue"):  # chosen by loopscope.kernels at import
            assert "workqueue" in record["numba_threading_layer"]
    finally:
        set_threads(min(before, numba.config.NUMBA_NUM_THREADS))


def test_set_threads_rejects_nonsense() -> None:
    for bad in (0, -2, 1.5):
        try:
            set_threads(bad)  # type: ignore[arg-type]
        except ValueError as err:
            assert "positive int" in str(err)
        else:
            raise AssertionError(f"set_threads({bad!r}) did not raise")


def test_kernels_package_picks_wide_vectors() -> None:
    features = llvm.get_host_cpu_features().flatten().split(",")
    expected = 512 if "+avx512f" in features else (256 if "+avx2" in features else 128)
    assert cpu_target.vector_info()["numba_vector_bits"] == expected


def test_set_threads_before_numba_sizes_its_pool_without_importing_it() -> None:
    code = ("import os, sys; os.environ.pop('NUMBA_NUM_THREADS', None)\n"
            "from loopscope.bench.threads import set_threads\n"
            "record = set_threads(1)\n"
            "assert 'numba' not in sys.modules, 'numba imported'\n"
            "import numba\n"
            "assert numba.get_num_threads() == record['numba'] == 1, (numba.get_num_threads(), record)\n")
    subprocess.run([sys.executable, "-c", code], check=True)
