"""The design card's folders install as subpackages of `loopscope`, in a normal (non-editable) install."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import tomllib

from tests.conftest import REPO

SUBPACKAGES = ["loopscope.bench", "loopscope.bench.meters", "loopscope.bench.workloads", "loopscope.models",
               "loopscope.kernels", "loopscope.profiles", "loopscope.reports"]


def test_every_code_folder_is_a_declared_package():
    declared = set(tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    mapping = {"bench": "loopscope.bench", "models": "loopscope.models", "kernels": "loopscope.kernels",
               "profiles": "loopscope.profiles", "reports": "loopscope.reports"}
    found = set()
    for folder, package in mapping.items():
        for init in (REPO / folder).rglob("__init__.py"):
            rel = init.parent.relative_to(REPO / folder)
            found.add(".".join([package, *rel.parts]))
    assert found == declared
    assert set(SUBPACKAGES) <= declared


@pytest.mark.slow
def test_non_editable_install_imports_every_subpackage(tmp_path):
    target = tmp_path / "site"
    build = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps",
                            "--no-build-isolation", "--target", str(target), str(REPO)],
                           capture_output=True, text=True, timeout=300)
    assert build.returncode == 0, build.stderr[-2000:]
    code = ("import importlib, sys\n"
            f"for name in {SUBPACKAGES!r}:\n"
            "    m = importlib.import_module(name)\n"
            f"    assert m.__file__.startswith({str(target)!r}), (name, m.__file__)\n"
            "from loopscope.profiles.loader import builtin_profiles\n"
            "print(sorted(builtin_profiles()))\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True,
                          env={"PYTHONPATH": str(target), "PATH": "/usr/bin:/bin"}, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "'ci'" in proc.stdout and "'cpu'" in proc.stdout
    assert not any(Path(target).glob("tests"))
