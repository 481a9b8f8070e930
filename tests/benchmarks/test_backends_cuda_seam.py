"""numba-cuda prefill and decode cells through the real workload code under the numba CUDA simulator
(NUMBA_ENABLE_CUDASIM=1): each row names the CUDA engine that ran. Minutes per cell on 2 cores, hence here."""

from __future__ import annotations

import pytest

from loopscope.bench.backends import declared_combinations
from tests.test_backends import test_declared_cuda_combination_runs_through_a_seam as run_seam_case

CASES = [c for c in declared_combinations() if c[0] == "numba-cuda" and c[2] == "cuda"]


@pytest.mark.benchmark_heavy
@pytest.mark.parametrize("backend,workload,device,dtype", CASES)
def test_numba_cuda_cells_run_under_the_simulator(tmp_path, monkeypatch, backend, workload, device, dtype):
    monkeypatch.setenv("LOOPSCOPE_CUDASIM_CELLS", "1")
    run_seam_case(tmp_path, backend, workload, device, dtype)
