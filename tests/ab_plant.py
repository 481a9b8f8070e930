"""Planted slowdowns for the A/B gate's self-tests and trials: real code changes, committed in a detached
worktree of the repository, never a switch in the product code."""

from __future__ import annotations

import subprocess
from pathlib import Path

PREFILL = "bench/engines.py"  # the torch backend's prefill call
BLOCKS = "models/blocks.py"

_EAGER = '''        def call() -> object:
            with torch.inference_mode():
                return model(idx, **kwargs)
'''
# Busy-wait `fraction` of each forward's own CPU time after it, so wall and process CPU time both grow.
_EAGER_SLOW = '''        def call() -> object:
            import time
            c0 = time.process_time()
            with torch.inference_mode():
                out = model(idx, **kwargs)
            stop = c0 + (time.process_time() - c0) * (1.0 + {fraction!r})
            while time.process_time() < stop:
                pass
            return out
'''
_MLP = "        h = self.fc(x)\n"
_MLP_SLOW = "        h = self.fc(x) + 0.0 * self.fc(x)\n"  # one extra matmul per MLP, numerically a no-op


def _replace(path: Path, old: str, new: str) -> None:
    text = path.read_text(encoding="utf-8")
    if text.count(old) != 1:
        raise RuntimeError(f"{path}: the planting site was not found exactly once")
    path.write_text(text.replace(old, new), encoding="utf-8")


def checkout(repo: Path, dest: Path, ref: str = "HEAD") -> Path:
    subprocess.run(["git", "worktree", "add", "--detach", str(dest), ref], cwd=repo, check=True,
                   capture_output=True)
    return dest


def remove(repo: Path, dest: Path) -> None:
    subprocess.run(["git", "worktree", "remove", "--force", str(dest)], cwd=repo, capture_output=True)


def commit_all(tree: Path, message: str) -> str:
    git = ["git", "-c", "user.name=loopscope-test", "-c", "user.email=test@loopscope.invalid"]
    subprocess.run([*git, "commit", "-qam", message], cwd=tree, check=True, capture_output=True)
    return subprocess.run(["git", "rev-parse", "HEAD"], cwd=tree, check=True, capture_output=True,
                          text=True).stdout.strip()


def plant_prefill_slowdown(tree: Path, fraction: float) -> str:
    _replace(tree / PREFILL, _EAGER, _EAGER_SLOW.format(fraction=fraction))
    return commit_all(tree, f"prefill: {fraction:.0%} slower (planted)")


def plant_mlp_matmul(tree: Path) -> str:
    _replace(tree / BLOCKS, _MLP, _MLP_SLOW)
    return commit_all(tree, "MLP: one extra matmul (planted)")


def remove_repeat_command(tree: Path) -> str:
    """A base as commits before `loopscope repeat` were: the CLI has no such command."""
    _replace(tree / "bench" / "cli.py", 'sub.add_parser("repeat",', 'sub.add_parser("repeat-removed",')
    return commit_all(tree, "cli: no repeat command (as older commits)")
