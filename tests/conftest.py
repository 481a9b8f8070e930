"""Shared test helpers. Tests are fast; heavy benchmarks live in tests/benchmarks/."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def run_cli(*args: str, cwd: Path | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    """Run `loopscope ARGS` in a fresh interpreter, as a user would."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.run([sys.executable, "-m", "loopscope.bench.cli", *args], cwd=cwd or REPO,
                          capture_output=True, text=True, timeout=timeout, env=env)


@pytest.fixture
def write_profile(tmp_path: Path):
    def _write(text: str, name: str = "p.toml") -> Path:
        path = tmp_path / name
        path.write_text(text)
        return path
    return _write
