"""Load a run's tidy tables and shape them into the frames the tables and charts need."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from loopscope.bench.errors import LoopscopeError


@dataclass
class RunData:
    run_dir: Path
    manifest: dict[str, Any]
    results: pd.DataFrame
    samples: pd.DataFrame
    cells: dict[str, dict[str, Any]]

    def metric(self, name: str, *, stat: str | tuple[str, ...] = ("", "mean", "median"),
               ok_only: bool = True) -> pd.DataFrame:
        """Rows of one metric, one per cell (the first matching stat in the given order)."""
        df = self.results[self.results["metric"] == name]
        if ok_only:
            df = df[df["status"] == "ok"]
        stats = (stat,) if isinstance(stat, str) else stat
        parts = [df[df["stat"].fillna("") == s] for s in stats]
        out = pd.concat(parts) if parts else df
        return out.drop_duplicates("cell_id", keep="first")


def load_run(run_dir: Path) -> RunData:
    """Read a run directory; a missing or unreadable part is a LoopscopeError naming the path."""
    run_dir = Path(run_dir)
    manifest_path = run_dir / "manifest.json"
    if not manifest_path.is_file():
        raise LoopscopeError(f"{run_dir}: not a loopscope run directory (no manifest.json)")
    try:
        manifest = json.loads(manifest_path.read_text())
    except (OSError, ValueError) as err:
        raise LoopscopeError(f"{manifest_path}: unreadable ({err})") from None
    from loopscope.bench.store import RunStore

    store = RunStore(run_dir)
    results, samples = store.tables()
    cells = store.read_cells()
    return RunData(run_dir, manifest, results, samples, cells)


def quality_frame(run: RunData) -> pd.DataFrame:
    """bpb per eval cell with its model accounting and test-time loops."""
    bpb = run.metric("bpb")
    if bpb.empty:
        return bpb
    std = run.metric("bpb_std").set_index("cell_id")["value"]
    out = bpb.copy()
    out["bpb_std"] = out["cell_id"].map(std)
    return out


def at_training_loops(quality: pd.DataFrame) -> pd.DataFrame:
    """One bpb per model: dense models as they are, looped models at T = their training mean loops."""
    if quality.empty:
        return quality
    looped = quality["loops_test"].notna()
    same = quality["loops_test"] == quality["loops_train"]
    return quality[~looped | same].drop_duplicates("model")


def pareto_front(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Indices of the points not dominated in (smaller x, smaller y), sorted by x."""
    order = np.argsort(x, kind="stable")
    front, best = [], np.inf
    for i in order:
        if y[i] < best:
            front.append(i)
            best = y[i]
    return np.asarray(front, dtype=int)
