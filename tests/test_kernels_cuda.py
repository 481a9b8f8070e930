"""The CUDA kernels under numba's CUDA simulator, in a separate process: NUMBA_ENABLE_CUDASIM must be set
before numba.cuda is first imported, and the CPU tests in this process must not see it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

CASES = Path(__file__).with_name("kernels_cuda_cases.py")


def test_cuda_kernels_match_torch_under_the_simulator() -> None:
    env = {**os.environ, "NUMBA_ENABLE_CUDASIM": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(CASES)],
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert " passed" in proc.stdout and "failed" not in proc.stdout


def test_this_process_is_not_simulating() -> None:
    """The subprocess's environment did not leak into the CPU test session."""
    assert os.environ.get("NUMBA_ENABLE_CUDASIM", "0") != "1"
