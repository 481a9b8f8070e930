"""`loopscope gate --against REF`: base commit and candidate timed on this machine, in one job.

1. The base code is checked out with `git worktree add --detach`; each side runs from its own checkout,
   its five folders linked into a `loopscope` package on PYTHONPATH (no pip), so a process imports that
   side's code and nothing installed.
2. The profile is cut to its timing cells (prefill, decode), calibration and energy off; the candidate's
   profile file is used when the base accepts it, else the base's own profile of that name.
3. Repetitions run in blocks of ABBAAB or BAABBA (random order) until the time budget is spent (at least
   `min_blocks` blocks). Each repetition is a run of the profile into a fresh directory, its cells in fresh
   worker processes. Each block starts one `loopscope repeat` process per side, whose worker fork server has
   imported torch once, and both are ready before the block's first repetition; a repetition then costs
   its cells (about 0.7 s for ab-smoke) instead of a whole `loopscope run` (about 2.5 s). A server lives
   for one block only, so anything a server's own state does to its workers' speed differs between blocks
   and averages out like other noise, never a bias that every block shares. A base without
   `loopscope repeat` gets a fresh `loopscope run` per repetition on both sides. A run that exits non-zero
   with results is data (its failed cells are missing values), not a crash.
4. Every run is read with this (the candidate's) reader; cells are matched by their axes; abjudge judges.
"""

from __future__ import annotations

import math
import os
import random
import select
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from loopscope.bench.errors import LoopscopeError
from loopscope.reports import abjudge

try:
    import tomllib
except ModuleNotFoundError:  # pragma: no cover - only on 3.10
    import tomli as tomllib  # type: ignore[no-redef]

FOLDERS = ("bench", "models", "kernels", "profiles", "reports")
TIMING_WORKLOADS = ("prefill", "decode")
MIN_TIME_S = 0.3  # timed seconds per cell and process, at least
# Three processes per side and block: the best of three is slow only when all three landed in a slow state.
# A linear drift favours neither side on average (a block's order or its mirror, drawn at random).
BLOCK_ORDERS = ("ABBAAB", "BAABBA")


class ABGateError(LoopscopeError):
    """The A/B gate cannot run (no git, unknown REF, a side that produces no results)."""


@dataclass
class ABResult:
    base_ref: str
    base_commit: str
    table: pd.DataFrame  # abjudge.judge_blocks columns
    values: pd.DataFrame  # every process's value: block, pos, side, cell, metric, value
    blocks: int
    elapsed_s: float
    notes: list[str] = field(default_factory=list)

    @property
    def failed(self) -> bool:
        return bool((self.table["verdict"] == "fail").any())

    @property
    def exit_code(self) -> int:
        return 1 if self.failed else 0

    @property
    def processes(self) -> int:
        return int(self.values[["block", "pos"]].drop_duplicates().shape[0]) if len(self.values) else 0

    def render(self) -> str:
        counts = self.table["verdict"].value_counts()
        head = "FAIL" if self.failed else "PASS"
        lines = [f"loopscope gate --against {self.base_ref} ({self.base_commit[:10]}): {head} "
                 f"({int(counts.get('fail', 0))} regression(s), {int(counts.get('unresolved', 0))} "
                 f"unresolved, {int(counts.get('pass', 0))} passed; {self.blocks} block(s) = "
                 f"{self.processes} processes in {self.elapsed_s:.0f} s)", ""]
        lines += abjudge.render(self.table) if len(self.table) else ["(no timing metric in common)"]
        if (self.table["verdict"] == "unresolved").any():
            lines += ["", "unresolved: the noise floor measured in this job (A vs A', B vs B') is above the "
                          "tolerance, so a change of the tolerance's size cannot be told from noise here; "
                          "not a failure. Give the gate more time (--budget-s) or a quieter machine."]
        lines += [f"note: {n}" for n in self.notes]
        return "\n".join(lines) + "\n"


def git(repo: Path, *args: str) -> str:
    proc = subprocess.run(["git", *args], cwd=repo, capture_output=True, text=True, timeout=120)
    if proc.returncode != 0:
        raise ABGateError(f"git {' '.join(args)} in {repo}: {proc.stderr.strip() or proc.stdout.strip()}")
    return proc.stdout.strip()


def link_site(checkout: Path, site: Path) -> Path:
    """A directory for PYTHONPATH whose `loopscope` package is `checkout`'s five folders."""
    pkg = site / "loopscope"
    pkg.mkdir(parents=True, exist_ok=True)
    for name in FOLDERS:
        target = checkout / name
        if not target.is_dir():
            raise ABGateError(f"{checkout}: no folder {name}/ (is this a loopscope checkout?)")
        (pkg / name).symlink_to(target.resolve(), target_is_directory=True)
    return site


def timing_profile(source: Path, dest: Path) -> bool:
    """Write `source` cut to its timing sweeps (calibration, energy, memory off) to `dest`; False if none."""
    try:
        doc = tomllib.loads(source.read_text(encoding="utf-8"))
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ABGateError(f"{source}: cannot read the profile ({exc})") from exc
    sweeps = []
    for sweep in doc.get("sweep", []):
        workloads = sweep.get("workload", [])
        workloads = [workloads] if isinstance(workloads, str) else list(workloads)
        kept = [w for w in workloads if w in TIMING_WORKLOADS]
        if kept:
            sweeps.append({**sweep, "workload": kept if len(kept) > 1 else kept[0]})
    if not sweeps:
        return False
    doc["sweep"] = sweeps
    doc.setdefault("profile", {})["calibration"] = "off"
    measure = doc.setdefault("measure", {})
    measure.update(energy=False, memory=False)
    # A longer timed window averages over more of the co-running load's phases (cheap beside the
    # seconds a process needs to start), which narrows the spread between processes.
    measure["min_time_s"] = max(float(measure.get("min_time_s", 0.0)), MIN_TIME_S)
    dest.write_text(_dump_toml(doc), encoding="utf-8")
    return True


def _dump_toml(doc: dict) -> str:
    def value(v) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, str):
            return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
        if isinstance(v, list):
            return "[" + ", ".join(value(x) for x in v) + "]"
        if isinstance(v, dict):
            return "{" + ", ".join(f'"{k}" = {value(x)}' for k, x in v.items()) + "}"
        return repr(v)

    lines = []
    for section, table in doc.items():
        if section == "sweep":
            continue
        lines.append(f"[{section}]")
        lines += [f'"{k}" = {value(v)}' for k, v in table.items()]
        lines.append("")
    for sweep in doc.get("sweep", []):
        lines.append("[[sweep]]")
        lines += [f'"{k}" = {value(v)}' for k, v in sweep.items()]
        lines.append("")
    return "\n".join(lines)


@dataclass(frozen=True)
class Side:
    name: str  # "A" (base) | "B" (candidate)
    checkout: Path
    site: Path
    profile: Path


def _side_env(side: Side) -> dict[str, str]:
    return {**{k: v for k, v in os.environ.items() if k != "PYTHONPATH"}, "PYTHONPATH": str(side.site)}


def _side_label(side: Side) -> str:
    return "base" if side.name == "A" else "candidate"


def _timing_of(side: Side, out: Path, returncode: int | str, output: str) -> pd.DataFrame:
    from loopscope.reports.rundir import load_run

    if not (out / "results.parquet").exists() and not (out / "results.csv").exists():
        tail = output.strip().splitlines()[-3:]
        raise ABGateError(f"{_side_label(side)} run exited {returncode} with no results: {' | '.join(tail)}")
    run = load_run(out)
    return timing_values(run.results, run.samples)


def run_once(side: Side, out: Path, *, timeout_s: float, python: str = sys.executable) -> pd.DataFrame:
    """One fresh `loopscope run` of `side` into `out`; its timing rows (cell, metric, value)."""
    cmd = [python, "-m", "loopscope.bench.cli", "run", "--profile", str(side.profile), "--out", str(out),
           "--no-report"]
    try:
        proc = subprocess.run(cmd, cwd=side.checkout, env=_side_env(side), capture_output=True, text=True,
                              timeout=timeout_s)
    except subprocess.TimeoutExpired as exc:
        raise ABGateError(f"{side.name}: `loopscope run` did not finish in {timeout_s:.0f} s") from exc
    return _timing_of(side, out, proc.returncode, proc.stderr or proc.stdout)


class Repeater:
    """One side's `loopscope repeat` process (bench/repeat.py): `run(out)` is one repetition, its cells in
    fresh worker processes forked from the server that process keeps."""

    def __init__(self, side: Side, log: Path, *, timeout_s: float, python: str = sys.executable) -> None:
        self.side, self.log, self.timeout_s = side, log, timeout_s
        with open(log, "ab") as err:
            self._proc = subprocess.Popen([python, "-m", "loopscope.bench.cli", "repeat", "--profile",
                                           str(side.profile)], cwd=side.checkout, env=_side_env(side),
                                          stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err, bufsize=0)
        self._buffer = b""

    def _reply(self, what: str) -> str:
        deadline = time.monotonic() + self.timeout_s
        fd = self._proc.stdout.fileno()
        while b"\n" not in self._buffer:
            wait = deadline - time.monotonic()
            if wait <= 0 or not select.select([fd], [], [], wait)[0]:
                self.close()
                raise ABGateError(f"{_side_label(self.side)}: `loopscope repeat` gave no {what} within "
                                  f"{self.timeout_s:.0f} s (its log: {self.log})")
            data = os.read(fd, 4096)
            if not data:
                code = self._proc.wait()
                tail = " | ".join(self.log.read_text(errors="replace").strip().splitlines()[-3:])
                raise ABGateError(f"{_side_label(self.side)}: `loopscope repeat` exited {code} before its "
                                  f"{what}: {tail or 'no output'}")
            self._buffer += data
        line, self._buffer = self._buffer.split(b"\n", 1)
        return line.decode(errors="replace")

    def wait_ready(self) -> None:
        line = self._reply("ready line")
        if not line.startswith("ready"):
            raise ABGateError(f"{_side_label(self.side)}: `loopscope repeat` said {line!r}, not ready")

    def run(self, out: Path) -> pd.DataFrame:
        self._proc.stdin.write(f"{out}\n".encode())
        self._proc.stdin.flush()
        kind, _, rest = self._reply(f"answer for {out}").partition(" ")
        if kind == "error":
            raise ABGateError(f"{_side_label(self.side)} run into {out}: {rest}")
        return _timing_of(self.side, out, rest, self.log.read_text(errors="replace"))

    def close(self) -> None:
        if self._proc.poll() is None:
            try:
                self._proc.stdin.close()
                self._proc.wait(timeout=30)
            except (OSError, subprocess.TimeoutExpired):
                self._proc.kill()
                self._proc.wait()
        self._proc.stdout.close()


def supports_repeat(side: Side) -> bool:
    """Whether the side's code has `loopscope repeat` (older commits do not)."""
    proc = subprocess.run([sys.executable, "-m", "loopscope.bench.cli", "repeat", "--help"], cwd=side.checkout,
                          env=_side_env(side), capture_output=True, text=True, timeout=120)
    return proc.returncode == 0


def timing_values(results: pd.DataFrame, samples: pd.DataFrame | None = None) -> pd.DataFrame:
    """(cell, metric, value) of the gated timing metrics and their CPU twins: the median rows and, where the
    run kept raw samples, the fastest call (abjudge.FASTEST). A throughput's fastest call is its median
    scaled by median / fastest latency of the same timer. A cell is named by its axes, so that the two
    sides' cells match even when their cell_id differs."""
    from loopscope.reports.rundir import AXES, axis_text

    names = set(abjudge.GATED_METRICS) | set(abjudge.CPU_TWINS.values())
    rows = results[results["metric"].isin(names) & (results["stat"] == "median")]
    fastest = _fastest_calls(samples)
    out = []
    for row in rows.to_dict("records"):
        value = float(row["value"]) if row["status"] == "ok" else math.nan
        label = " ".join(f"{a}={axis_text(row[a])}" for a in AXES if a in row and axis_text(row[a]) not in
                         ("", "nan", "None"))
        out.append(dict(cell=label, metric=row["metric"], value=value))
        latency = THROUGHPUT_LATENCY.get(row["metric"], row["metric"])
        low = fastest.get((row["cell_id"], latency), math.nan)
        if latency == row["metric"]:
            fast = low
        else:  # throughput at the fastest call: units per call / fastest call
            median_latency = rows[(rows["cell_id"] == row["cell_id"]) & (rows["metric"] == latency)]["value"]
            fast = value * float(median_latency.iloc[0]) / low if len(median_latency) and low > 0 else math.nan
        if math.isfinite(fast) and math.isfinite(value):
            out.append(dict(cell=label, metric=row["metric"] + abjudge.FASTEST, value=fast))
    return pd.DataFrame(out, columns=["cell", "metric", "value"])


# the latency whose calls a throughput counts (same timer)
THROUGHPUT_LATENCY = {"tokens_per_s": "latency_ms", "cpu_tokens_per_s": "cpu_latency_ms"}


def _fastest_calls(samples: pd.DataFrame | None) -> dict[tuple[str, str], float]:
    """(cell_id, metric) -> the smallest raw sample of the run's latency metrics."""
    if samples is None or samples.empty:
        return {}
    lat = samples[samples["metric"].isin(["latency_ms", "cpu_latency_ms", "ttft_ms", "cpu_ttft_ms"])]
    lat = lat[np.isfinite(lat["value"].astype(float)) & (lat["value"].astype(float) > 0)]
    return {k: float(v) for k, v in lat.groupby(["cell_id", "metric"])["value"].min().items()}


def ab_gate(ref: str, *, profile: str = "ci", repo: Path | None = None, budget_s: float = 480.0,
            min_blocks: int = 2, max_blocks: int = 50, tolerance: float = 0.05, level: float = 0.99,
            seed: int | None = None, keep: Path | None = None, rep_timeout_s: float = 600.0,
            log=print) -> ABResult:
    """Time the base commit `ref` and the candidate (the working tree of `repo`) interleaved; judge."""
    if min_blocks < 2:
        # One block leaves three same-code pairs (2 degrees of freedom) for the noise floor: a passing
        # spell of contention on one side reads as a significant change.
        raise ABGateError(f"--min-blocks {min_blocks}: the A/B gate needs at least 2 blocks "
                          "(one block leaves 3 same-code pairs for its noise floor)")
    if max_blocks < min_blocks:
        raise ABGateError(f"max_blocks {max_blocks} is below --min-blocks {min_blocks}")
    start = time.monotonic()
    repo = Path(git(repo or Path.cwd(), "rev-parse", "--show-toplevel"))
    try:
        commit = git(repo, "rev-parse", "--verify", "--quiet", f"{ref}^{{commit}}")
    except ABGateError as exc:
        raise ABGateError(f"--against {ref}: no such commit in {repo}") from exc
    tmp = Path(keep) if keep else Path(tempfile.mkdtemp(prefix="loopscope-ab-"))
    tmp.mkdir(parents=True, exist_ok=True)
    base_dir = tmp / "base"
    git(repo, "worktree", "add", "--detach", str(base_dir), commit)
    notes: list[str] = []
    try:
        sides = _sides(repo, base_dir, tmp, profile, notes)
        rng = random.Random(seed)
        records: list[dict] = []
        # One untimed run per side first: bytecode compilation and cold caches land there, not in block 1.
        for side in sides.values():
            run_once(side, tmp / "runs" / f"warm-{side.name}", timeout_s=rep_timeout_s)
        lacking = [_side_label(side) for side in sides.values() if not supports_repeat(side)]
        repeat = not lacking
        notes.append("repetitions: workers forked from one `loopscope repeat` process per side and block"
                     if repeat else "repetitions: a fresh `loopscope run` per repetition on both sides ("
                     + ", ".join(lacking) + " has no `loopscope repeat`)")
        blocks = 0
        block_s: list[float] = []
        while blocks < max_blocks:
            elapsed = time.monotonic() - start
            if blocks >= min_blocks and elapsed + (max(block_s) if block_s else 0.0) > budget_s:
                break
            order = rng.choice(BLOCK_ORDERS)
            t0 = time.monotonic()
            records += _block(sides, order, blocks, tmp, repeat=repeat, timeout_s=rep_timeout_s)
            block_s.append(time.monotonic() - t0)
            blocks += 1
            log(f"  block {blocks} ({order}) took {block_s[-1]:.0f} s")
        values = pd.DataFrame(records, columns=["block", "pos", "side", "cell", "metric", "value"])
        cells_a = set(values[values["side"] == "A"]["cell"])
        cells_b = set(values[values["side"] == "B"]["cell"])
        if not cells_a & cells_b:
            raise ABGateError(f"base {commit[:10]} and candidate have no timing cell in common "
                              f"(base: {sorted(cells_a)[:3]}, candidate: {sorted(cells_b)[:3]})")
        for side_name, only in (("base", cells_a - cells_b), ("candidate", cells_b - cells_a)):
            if only:
                notes.append(f"{len(only)} cell(s) only in the {side_name}, not gated: {', '.join(sorted(only))}")
        table = abjudge.judge_blocks(values[values["cell"].isin(cells_a & cells_b)], tolerance=tolerance,
                                     level=level)
        return ABResult(ref, commit, table, values, blocks, time.monotonic() - start, notes)
    finally:
        subprocess.run(["git", "worktree", "remove", "--force", str(base_dir)], cwd=repo,
                       capture_output=True, timeout=120)
        if keep is None:
            shutil.rmtree(tmp, ignore_errors=True)


def _block(sides: dict[str, Side], order: str, block: int, tmp: Path, *, repeat: bool,
           timeout_s: float) -> list[dict]:
    """One block's repetitions in `order`: (block, pos, side, cell, metric, value) records."""
    runners: dict[str, Repeater] = {}
    try:
        if repeat:  # both servers ready (torch imported) before the first timed repetition
            runners = {name: Repeater(side, tmp / f"repeat-{name}.log", timeout_s=timeout_s)
                       for name, side in sides.items()}
            for runner in runners.values():
                runner.wait_ready()
        records: list[dict] = []
        for pos, name in enumerate(order):
            out = tmp / "runs" / f"b{block:02d}-{pos}{name}"
            vals = runners[name].run(out) if repeat else run_once(sides[name], out, timeout_s=timeout_s)
            records += [dict(block=block, pos=pos, side=name, **r) for r in vals.to_dict("records")]
        return records
    finally:
        for runner in runners.values():
            runner.close()


def _sides(repo: Path, base_dir: Path, tmp: Path, profile: str, notes: list[str]) -> dict[str, Side]:
    """Both sides with the profile each one runs: the candidate's, cut to timing cells, when the base
    accepts it; otherwise each side its own shipped profile of that name, cut the same way."""
    cand_site = link_site(repo, tmp / "site-cand")
    base_site = link_site(base_dir, tmp / "site-base")
    given = Path(profile)
    cand_src = given if given.suffix == ".toml" else repo / "profiles" / f"{profile}.toml"
    if not cand_src.is_file():
        raise ABGateError(f"profile {profile!r}: no file {cand_src}")
    cand_profile = tmp / "profile-cand.toml"
    if not timing_profile(cand_src, cand_profile):
        raise ABGateError(f"{cand_src}: no prefill or decode sweep, nothing for the A/B gate to time")
    base = Side("A", base_dir, base_site, cand_profile)
    check = subprocess.run([sys.executable, "-m", "loopscope.bench.cli", "run", "--profile", str(cand_profile),
                            "--out", str(tmp / "runs" / "dry"), "--dry-run"], cwd=base_dir,
                           env=_side_env(base), capture_output=True, text=True, timeout=300)
    if check.returncode != 0:
        base_src = base_dir / "profiles" / f"{given.stem}.toml"
        base_profile = tmp / "profile-base.toml"
        if not (base_src.is_file() and timing_profile(base_src, base_profile)):
            raise ABGateError(f"the base refuses the candidate's profile ({check.stderr.strip()[-200:]}) and "
                              f"has no usable profile {base_src.name} of its own")
        notes.append(f"the base refused the candidate's profile; it ran its own {base_src.name}")
        base = Side("A", base_dir, base_site, base_profile)
    return {"A": base, "B": Side("B", repo, cand_site, cand_profile)}
