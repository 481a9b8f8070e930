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
from loopscope.bench.executors import Executor, make_executor
from loopscope.bench.matrix import Cell, expand, resolved_settings
from loopscope.bench.meters.calibration import CalibrationProbes
from loopscope.bench.progress import Progress
from loopscope.bench.store import RunStore
from loopscope.profiles.loader import Profile, load_profile

DEFAULT_RUNS_DIR = Path("runs")
EXIT_CELLS_NOT_OK = 3  # the run finished, but some cells of the selection have a status other than ok


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
    allow_profile_change: bool = False
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
    from loopscope.bench.workloads.budgets import analytic_memory_rows, token_budget
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


TEXT_WORKLOADS = ("train", "eval")  # the workloads that read the corpus


def default_profile_name() -> tuple[str, str]:
    from loopscope.profiles.detect import detect_device_class

    cls = detect_device_class()
    return cls.name, cls.reason


def _manifest(store: RunStore, profile: Profile, matrix: list[Cell], ctx: RunContext, old: dict) -> dict:
    from loopscope.bench.corpus import load_corpus
    from loopscope.bench.fingerprint import fingerprint

    data = resolved_settings(profile)["data"]
    if any(c.workload in TEXT_WORKLOADS for c in matrix):
        corpus = load_corpus(data["corpus"], max_bytes=data["max_bytes"])
        corpus_entry = {"name": corpus.name, "train_bytes": int(len(corpus.train)),
                        "val_bytes": int(len(corpus.val)), "val_sha256": corpus.val_hash,
                        "description": corpus.description}
    else:  # reading and hashing the corpus costs most of a second, for a run that never reads it
        corpus_entry = {"name": data["corpus"], "read": False,
                        "why": "no cell of this run reads text (only prefill, decode or kernels)"}
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
        "corpus": corpus_entry,
        # The whole matrix (also under --only): the tables hold exactly the finished cells of it.
        "cells": len(matrix),
        "cell_ids": [c.cell_id for c in matrix],
        **{k: old[k] for k in ("calibration_first", "calibration_probes", "cell_conditions") if k in old},
    }


class SharedExecutor:
    """The local executor, and so its worker fork server, kept across the runs of one process
    (`loopscope repeat`, bench/repeat.py): each run binds it to its own store and context."""

    def __init__(self, home: Path) -> None:
        self.home = Path(home)  # the fork server's command line names home/jobs/ (no run owns it)
        self.executor: Executor | None = None

    def bind(self, store: RunStore | None = None, ctx: RunContext | None = None,
             memory_limit_bytes: int | None = None) -> Executor:
        ctx = ctx or RunContext(run_dir=str(self.home))
        if self.executor is None:
            self.executor = make_executor("local", RunStore(self.home), ctx, memory_limit_bytes=memory_limit_bytes)
            self.executor.keep_server = True
        if store is not None:
            self.executor.store = store
        self.executor.ctx = ctx
        self.executor.memory_limit_bytes = memory_limit_bytes
        return self.executor

    def warm(self) -> float:
        """Start the fork server and wait for its imports; their seconds."""
        server = self.bind().prepare()
        if server is None:
            return 0.0
        server.wait_ready()
        return float(server.preload_s or 0.0)

    def close(self) -> None:
        if self.executor is not None:
            self.executor.close()
            self.executor = None


def run(opts: RunOptions, out: TextIO = sys.stdout, shared: SharedExecutor | None = None) -> int:
    """Run (or resume) a sweep. Returns 0 when every selected cell is ok, EXIT_CELLS_NOT_OK otherwise;
    unusable input raises a LoopscopeError (the CLI's exit 2). With `shared`, the cells run on its
    executor, which outlives this run."""
    name, why = (opts.profile, "given") if opts.profile else default_profile_name()
    if not opts.profile:
        print(f"profile: {name} (detected device class: {why})", file=out)
    profile = load_profile(name)
    matrix = expand(profile)
    cells = select(matrix, opts.only)
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

    run_dir = opts.out if opts.out is not None else DEFAULT_RUNS_DIR / (
        f"{profile.name}-shard{shard.index}of{shard.count}" if shard else profile.name)
    store = RunStore(run_dir)
    store.create()
    with store.lock():
        return _run_locked(store, profile, matrix, cells, opts, out, shared)


def check_profile_change(store: RunStore, profile: Profile, old: dict, allow: bool) -> bool:
    """True when the run directory was made with another profile (by hash), which is refused unless
    `allow`: the tables then keep only the cells of the new matrix."""
    if not old:
        return False
    old_profile = old.get("profile") if isinstance(old.get("profile"), dict) else {}
    old_hash = str(old_profile.get("hash") or "unknown")
    if old_hash == profile.raw_hash:
        return False
    if not allow:
        raise ConfigError(
            f"{store.run_dir}: was run with profile {old_profile.get('path', '?')} (hash {old_hash}), not "
            f"{profile.path} (hash {profile.raw_hash}); resume with the same profile, choose another --out, or "
            "pass --allow-profile-change to keep the cells both share and drop the others from the tables")
    return True


def check_corpus(profile: Profile, cells: list[Cell]) -> None:
    """Refuse, before anything runs, a corpus whose splits cannot fill one window of a train or eval cell."""
    from loopscope.bench.corpus import load_corpus

    needy = [c for c in cells if c.workload in TEXT_WORKLOADS]
    if not needy:
        return
    data = resolved_settings(profile)["data"]
    corpus = load_corpus(data["corpus"], max_bytes=data["max_bytes"])
    problems = []
    for cell in needy:
        split, have, key = (("training", len(corpus.train), "train.seq_len") if cell.workload == "train"
                            else ("held-out", len(corpus.val), "eval.seq_len"))
        if have < cell.seq_len + 2:  # one window plus its next-token target, at a random offset
            problems.append(f"{profile.path}: {key} = {cell.seq_len} ({cell.label}) needs more than the "
                            f"{have:,}-byte {split} split of corpus {data['corpus']!r}: give a larger corpus "
                            f"(or data.max_bytes) or a shorter seq_len")
    if problems:
        raise ConfigError("\n".join(dict.fromkeys(problems)))


def _run_locked(store: RunStore, profile: Profile, matrix: list[Cell], cells: list[Cell], opts: RunOptions,
                out: TextIO, shared: SharedExecutor | None = None) -> int:
    from loopscope.profiles.detect import detect_device_class

    old = store.read_manifest()
    changed = check_profile_change(store, profile, old, opts.allow_profile_change)
    matrix_ids = [c.cell_id for c in matrix]
    records = store.read_cells(set(matrix_ids))
    done = {cid for cid, r in records.items() if r["status"] == "ok" or not opts.retry_failed}
    pending = [c for c in cells if c.cell_id not in done]
    statuses = {cid: r["status"] for cid, r in records.items()}

    if pending or changed or not old:
        check_corpus(profile, pending)
        settings = resolved_settings(profile)["profile"]
        device_class = old.get("fingerprint", {}).get("device_class") or detect_device_class().name
        calibration = old.get("calibration") or (
            _calibrate(settings, settings.get("device", "cpu"), out) if pending else {})
        ctx = RunContext(run_dir=str(store.run_dir), device_class=device_class, calibration=calibration,
                         trace=opts.trace or bool(settings["trace"]), threads=int(settings["threads"]),
                         numba_threading=str(settings["numba_threading"]))
        if pending:  # after calibration, which must have the machine to itself
            limit = int(float(settings["memory_limit_gb"]) * 2**30)
            executor = (shared.bind(store, ctx, limit) if shared is not None else
                        make_executor(opts.executor, store, ctx, address=opts.address, memory_limit_bytes=limit))
            if hasattr(executor, "prepare"):
                executor.prepare()  # the worker fork server imports torch while the manifest is written
        manifest = _manifest(store, profile, matrix, ctx, old)
        if opts.shard:
            manifest["shard"] = {"spec": opts.shard, "cells": len(cells)}
        store.write_manifest(manifest)
        if changed:
            print(f"profile changed ({old.get('profile', {}).get('hash')} -> {profile.raw_hash}): the tables keep "
                  f"only cells of the new matrix", file=out)
    if pending:
        _run_cells(store, ctx, settings, executor, pending, cells, statuses, old, out)
    else:
        failed = sum(statuses.get(c.cell_id) != "ok" for c in cells)
        note = f" ({failed} failed; rerun them with --retry-failed)" if failed else ""
        print(f"nothing to do: all {len(cells)} cells in {store.run_dir} are done{note}", file=out)

    # A run killed after its last cell, or between a cell file and the tables, is completed here.
    if pending or changed or store.tables_stale(matrix_ids):
        store.write_tables(matrix_ids)
    if opts.report and (pending or changed or store.report_stale(matrix_ids)):
        from loopscope.reports.report import write_report

        paths = write_report(store.run_dir)
        print(f"report: {paths['html']}", file=out)
    failed = [c for c in cells if statuses.get(c.cell_id) != "ok"]
    if pending:
        print(f"done: {len(cells) - len(failed)} ok, {len(failed)} not ok, in {store.run_dir}", file=out)
    return EXIT_CELLS_NOT_OK if failed else 0


def _run_cells(store: RunStore, ctx: RunContext, settings: dict, executor: Executor, pending: list[Cell],
               cells: list[Cell], statuses: dict[str, str], old: dict, out: TextIO) -> None:
    print(f"running {len(pending)} of {len(cells)} cells into {store.run_dir}", file=out)
    progress = Progress(len(pending), estimates=[_estimate(c)[0] for c in pending])
    probes = CalibrationProbes.resume(old, ctx.calibration, settings.get("device", "cpu"))
    startups: list[float] = []
    last = pending[-1].cell_id

    def on_done(cell: Cell, record: dict) -> None:
        if record.get("startup_s"):
            startups.append(record["startup_s"])
        progress.finished(cell.label, record["status"], record["wall_s"], record["reason"])
        probes.after_cell(cell.cell_id)  # load during the cell; a calibration probe every few minutes
        if cell.cell_id != last:  # partial tables while the sweep goes on; the run writes the final ones
            store.write_tables()

    try:
        executor.run_all(pending, statuses, on_start=lambda cell: progress.starting(cell.label), on_done=on_done)
    finally:
        progress.close()
    manifest = {**store.read_manifest(), **probes.manifest_entries()}
    if startups:
        fixed = {"median_startup_s": statistics.median(startups),
                 "what": "worker process start-up and imports, before the workload"}
        imported = getattr(executor, "server_import_s", None)
        if imported:
            fixed["fork_server_import_s"] = imported
            fixed["what"] = ("worker start-up (fork from a server that imported torch once, per run: "
                             "fork_server_import_s) and the cell's own imports, before the workload")
        manifest["cell_fixed_cost_s"] = fixed
    store.write_manifest(manifest)


def _calibrate(settings: dict, device: str, out: TextIO) -> dict:
    """GEMM FLOP/s and memory bandwidth of the run's device, measured once per run."""
    from loopscope.bench.meters.calibration import calibrate

    mode = settings["calibration"]
    if mode == "off":
        return {}
    print(f"calibrating {device} ({mode}) ...", file=out)
    cal = calibrate(device, quick=(mode == "quick"))
    return cal.as_dict() if hasattr(cal, "as_dict") else dict(vars(cal))
