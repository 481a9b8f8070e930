"""`loopscope run`: profile -> matrix -> isolated cells -> run store -> report."""

from __future__ import annotations

import datetime as dt
import fnmatch
import platform
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

from loopscope.bench.context import RunContext
from loopscope.bench.errors import ConfigError
from loopscope.bench.executors import make_executor
from loopscope.bench.matrix import Cell, expand, resolved_settings
from loopscope.bench.progress import Progress
from loopscope.bench.store import RunStore
from loopscope.profiles.loader import Profile, load_profile

DEFAULT_RUNS_DIR = Path("runs")


@dataclass(frozen=True)
class RunOptions:
    profile: str | None = None
    out: Path | None = None
    only: tuple[str, ...] = ()
    dry_run: bool = False
    trace: bool = False
    retry_failed: bool = False
    executor: str = "local"
    report: bool = True
    shard: str | None = None  # "i/n", "auto" or "auto/n" (bench/shard.py)
    address: str | None = None  # the Ray cluster for --executor ray (None: start one on this machine)


def select(cells: list[Cell], patterns: tuple[str, ...]) -> list[Cell]:
    """Keep cells whose id, model, workload or label matches any pattern (shell wildcards)."""
    if not patterns:
        return cells
    keep = []
    for cell in cells:
        keys = (cell.cell_id, cell.model, cell.workload, cell.label)
        if any(fnmatch.fnmatch(k, p) or p in cell.label for p in patterns for k in keys):
            keep.append(cell)
    # An eval cell needs its train cell.
    ids = {c.cell_id for c in keep}
    needed = {c.depends_on for c in keep if c.depends_on and c.depends_on not in ids}
    return [c for c in cells if c.cell_id in ids or c.cell_id in needed]


def _estimate(cell: Cell) -> tuple[float, float]:
    """Rough (seconds, bytes) of a cell from its analytic FLOPs, for --dry-run only."""
    from loopscope.bench.workloads.prefill import analytic_memory_rows
    from loopscope.bench.workloads.train import token_budget
    from loopscope.models import ModelConfig, flops_per_token, param_counts

    cfg = ModelConfig.from_dict(cell.model_config)
    rate = 30e9 if cell.device == "cpu" else 100e12  # nominal sustained FLOP/s, not a measurement
    if cell.workload == "train":
        tokens = token_budget(cell)
        flops = flops_per_token(cfg, cell.seq_len, mode="train") * tokens
        mem = param_counts(cfg).unique * 16 + cell.batch * cell.seq_len * cfg.d_model * 4 * 40
    elif cell.workload == "eval":
        tokens = int(cell.settings["eval"]["max_tokens"]) * int(cell.settings["eval"]["seeds"])
        flops = flops_per_token(cfg, cell.seq_len, loops=cell.loops_test, mode="forward") * tokens
        mem = param_counts(cfg).unique * 4
    else:
        flops = flops_per_token(cfg, cell.seq_len, loops=cell.loops_test, mode="forward") \
            * cell.batch * cell.seq_len * 10
        mem = next(r["value"] for r in analytic_memory_rows(cell) if r["metric"] == "estimated_mem_bytes")
    return 4.0 + flops / rate, mem


def dry_run_table(cells: list[Cell]) -> str:
    lines = [f"{'cell_id':12}  {'est_s':>7}  {'est_mem':>9}  cell"]
    total = 0.0
    for cell in cells:
        seconds, mem = _estimate(cell)
        total += seconds
        lines.append(f"{cell.cell_id:12}  {seconds:7.0f}  {mem / 2**20:7.0f}MB  {cell.label}")
    lines.append(f"{len(cells)} cells, about {total / 60:.1f} min (rough: nominal FLOP rate + start-up)")
    return "\n".join(lines)


def _check_fits(profile: Profile, cells: list[Cell]) -> None:
    """Refuse, before anything runs, cells whose analytic memory exceeds the profile's limit."""
    limit = float(resolved_settings(profile)["profile"]["memory_limit_gb"]) * 2**30
    too_big = [(c, mem) for c in cells for _, mem in [_estimate(c)] if mem > limit]
    if too_big:
        raise ConfigError("\n".join(
            f"{profile.path}: cell {c.label!r} needs about {mem / 2**30:.1f} GiB by the analytic estimate, "
            f"over profile.memory_limit_gb = {limit / 2**30:g}" for c, mem in too_big))


def default_profile_name() -> tuple[str, str]:
    from loopscope.profiles.detect import detect_device_class

    cls = detect_device_class()
    return cls.name, cls.reason


def _manifest(store: RunStore, profile: Profile, cells: list[Cell], ctx: RunContext, old: dict) -> dict:
    from loopscope.bench.corpus import load_corpus
    from loopscope.bench.fingerprint import fingerprint

    data = resolved_settings(profile)["data"]
    corpus = load_corpus(data["corpus"], max_bytes=data["max_bytes"])
    fp = old.get("fingerprint") or fingerprint()
    fp["device_class"] = ctx.device_class
    return {
        "run_id": store.run_id,
        "created": old.get("created") or dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "updated": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "profile": {"name": profile.name, "path": profile.path, "hash": profile.raw_hash,
                    "settings": profile.settings},
        "fingerprint": fp,
        "versions": fp.get("versions", {"python": platform.python_version()}),
        "git": fp.get("git", {}),
        "calibration": ctx.calibration,
        "workers": {"threads": ctx.threads or "library defaults",
                    "numba_threading_layer": ctx.numba_threading or "workqueue (loopscope default)"},
        "corpus": {"name": corpus.name, "train_bytes": int(len(corpus.train)),
                   "val_bytes": int(len(corpus.val)), "val_sha256": corpus.val_hash,
                   "description": corpus.description},
        "cells": len(cells),
        "cell_ids": [c.cell_id for c in cells],
    }


def run(opts: RunOptions, out: TextIO = sys.stdout) -> int:
    name, why = (opts.profile, "given") if opts.profile else default_profile_name()
    if not opts.profile:
        print(f"profile: {name} (detected device class: {why})", file=out)
    profile = load_profile(name)
    cells = select(expand(profile), opts.only)
    if not cells:
        raise ConfigError(f"--only {' '.join(opts.only)!r} matches no cell of profile {profile.path}")
    shard = None
    if opts.shard:
        from loopscope.bench.shard import parse_shard, shard_cells

        shard = parse_shard(opts.shard)
        cells = shard_cells(cells, shard)
        print(f"shard {shard} ({shard.source}): {len(cells)} cells", file=out)
        if not cells:
            return 0
    if opts.dry_run:
        print(dry_run_table(cells), file=out)
        return 0
    _check_fits(profile, cells)

    run_dir = opts.out or DEFAULT_RUNS_DIR / (f"{profile.name}-shard{shard.index}of{shard.count}" if shard
                                               else profile.name)
    store = RunStore(run_dir)
    store.create()
    with store.lock():
        return _run_locked(store, profile, cells, opts, out)


def _run_locked(store: RunStore, profile: Profile, cells: list[Cell], opts: RunOptions, out: TextIO) -> int:
    from loopscope.profiles.detect import detect_device_class

    records = store.read_cells()
    done = {cid for cid, r in records.items() if r["status"] == "ok" or not opts.retry_failed}
    pending = [c for c in cells if c.cell_id not in done]
    if not pending:
        failed = sum(records[c.cell_id]["status"] != "ok" for c in cells)
        note = f" ({failed} failed; rerun them with --retry-failed)" if failed else ""
        print(f"nothing to do: all {len(cells)} cells in {store.run_dir} are done{note}", file=out)
        return 0

    settings = resolved_settings(profile)["profile"]
    old = store.read_manifest()
    device_class = old.get("fingerprint", {}).get("device_class") or detect_device_class().name
    calibration = old.get("calibration") or _calibrate(settings, settings.get("device", "cpu"), out)
    ctx = RunContext(run_dir=str(store.run_dir), device_class=device_class, calibration=calibration,
                     trace=opts.trace or bool(settings["trace"]), threads=int(settings["threads"]),
                     numba_threading=str(settings["numba_threading"]))
    manifest = _manifest(store, profile, cells, ctx, old)
    if opts.shard:
        manifest["shard"] = {"spec": opts.shard, "cells": len(cells)}
    store.write_manifest(manifest)
    print(f"running {len(pending)} of {len(cells)} cells into {store.run_dir}", file=out)

    memory_limit = int(float(settings["memory_limit_gb"]) * 2**30)
    executor = make_executor(opts.executor, store, ctx, memory_limit_bytes=memory_limit, address=opts.address)
    progress = Progress(len(pending))
    statuses = {cid: r["status"] for cid, r in records.items()}
    startups: list[float] = []

    def on_done(cell: Cell, record: dict) -> None:
        if record.get("startup_s"):
            startups.append(record["startup_s"])
        progress.finished(cell.label, record["status"], record["wall_s"], record["reason"])
        store.write_tables()

    try:
        executor.run_all(pending, statuses, on_start=lambda cell: progress.starting(cell.label), on_done=on_done)
    finally:
        progress.close()
    manifest = store.read_manifest()
    if startups:
        manifest["cell_fixed_cost_s"] = {"median_startup_s": statistics.median(startups),
                                         "what": "worker process start-up and imports, before the workload"}
    store.write_manifest(manifest)
    store.write_tables()
    if opts.report:
        from loopscope.reports.report import write_report

        paths = write_report(store.run_dir)
        print(f"report: {paths['html']}", file=out)
    failed = [c for c in cells if statuses.get(c.cell_id) != "ok"]
    print(f"done: {len(cells) - len(failed)} ok, {len(failed)} not ok, in {store.run_dir}", file=out)
    return 0


def _calibrate(settings: dict, device: str, out: TextIO) -> dict:
    """GEMM FLOP/s and memory bandwidth of the run's device, measured once per run."""
    from loopscope.bench.meters.calibration import calibrate

    mode = settings["calibration"]
    if mode == "off":
        return {}
    print(f"calibrating {device} ({mode}) ...", file=out)
    cal = calibrate(device, quick=(mode == "quick"))
    return cal.as_dict() if hasattr(cal, "as_dict") else dict(vars(cal))
