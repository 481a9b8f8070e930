"""`loopscope merge OUT RUN...`: the run directories of shards (or of any runs of one profile) as one run.

Every input must come from the same profile (its hash) and no cell may appear twice; otherwise nothing
is written and the error names the run and the cell. Cell files, raw samples and checkpoints are copied,
rows take the merged run's id, and the merged manifest keeps every input's manifest under `merged_from`.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import shutil
from pathlib import Path
from typing import Any

from loopscope.bench.errors import LoopscopeError
from loopscope.bench.store import RunStore


def _load(run: Path) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    store = RunStore(run)
    if not (run / "manifest.json").is_file():
        raise LoopscopeError(f"{run}: not a run directory (no manifest.json)")
    try:
        manifest = store.read_manifest()
    except ValueError as err:
        raise LoopscopeError(f"{run / 'manifest.json'}: unreadable ({err})") from None
    return manifest, store.read_cells()


def _profile_hash(manifest: dict[str, Any]) -> str:
    return str(manifest.get("profile", {}).get("hash", ""))


def merge_runs(out: Path, runs: list[Path], *, report: bool = True) -> int:
    """Merge `runs` into `out`; return the number of cells. Raises LoopscopeError, writing nothing, when
    the runs do not fit together."""
    out = Path(out)
    target = RunStore(out)
    if target.read_cells() or (out / "manifest.json").is_file():
        raise LoopscopeError(f"{out}: already holds a run; merge into a new or empty directory")
    if len({p.resolve() for p in runs}) != len(runs):
        raise LoopscopeError("merge: a run directory is given twice")
    loaded = [(Path(run), *_load(Path(run))) for run in runs]
    first_run, first_manifest, _ = loaded[0]
    expected = _profile_hash(first_manifest)
    owner: dict[str, Path] = {}
    for run, manifest, cells in loaded:
        if _profile_hash(manifest) != expected:
            raise LoopscopeError(f"{run}: profile hash {_profile_hash(manifest) or '(none)'} differs from "
                                 f"{first_run}'s {expected or '(none)'}; only runs of one profile merge")
        for cell_id in cells:
            if cell_id in owner:
                raise LoopscopeError(f"{run}: cell {cell_id} is also in {owner[cell_id]}; "
                                     "merge runs whose cells do not overlap (e.g. the shards of one matrix)")
            owner[cell_id] = run

    target.create()
    with target.lock():
        for run, _, cells in loaded:
            for record in cells.values():
                _relabel(record, target.run_id, run)
                target.write_cell(record)
            _copy_checkpoints(run / "checkpoints", target.checkpoints_dir)
        target.write_manifest(_merged_manifest(target, loaded))
        target.write_tables()
    if report:
        from loopscope.reports.report import write_report

        write_report(out)
    return len(owner)


def _relabel(record: dict[str, Any], run_id: str, source: Path) -> None:
    record["merged_from"] = str(source)
    for item in (*record.get("rows", []), *record.get("samples", [])):
        item["run_id"] = run_id


def _copy_checkpoints(src: Path, dst: Path) -> None:
    """Checkpoints of train cells, so eval cells rerun in the merged run find them (hard links if possible)."""
    if not src.is_dir():
        return
    for path in src.glob("*.safetensors"):
        if path.name.endswith(".partial.safetensors") or (dst / path.name).exists():
            continue
        try:
            os.link(path, dst / path.name)
        except OSError:
            shutil.copy2(path, dst / path.name)


def _merged_manifest(target: RunStore, loaded: list[tuple[Path, dict[str, Any], dict[str, Any]]]) -> dict[str, Any]:
    base = json.loads(json.dumps(loaded[0][1]))  # a deep copy
    now = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
    cell_ids = [cid for _, manifest, _ in loaded for cid in manifest.get("cell_ids", [])]
    base.update({
        "run_id": target.run_id, "created": now, "updated": now,
        "cell_ids": list(dict.fromkeys(cell_ids)), "cells": len(dict.fromkeys(cell_ids)),
        "merged_from": [{"run_dir": str(run), "cells_done": len(cells), "manifest": manifest}
                        for run, manifest, cells in loaded],
    })
    base.pop("shard", None)
    hardware = {(str(m.get("fingerprint", {}).get("cpu", {}).get("model")),
                 str([d.get("name") for d in m.get("fingerprint", {}).get("gpus", {}).get("devices", [])]))
                for _, m, _ in loaded}
    if len(hardware) > 1:
        base["fingerprint_note"] = ("the inputs ran on different hardware: `fingerprint` is the first input's; "
                                    "each input's is under merged_from")
    return base
