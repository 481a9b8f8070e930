"""The profiled pass: where a forward's time, memory and (on a GPU) energy go, region by region.

It runs AFTER the timed pass of a cell, on the same callable, so it never disturbs the timed numbers:

    def body(mark):
        call()                      # unmarked: the first call under a profiler pays its warm-up
        for _ in range(5):
            with mark("forward"):   # one profiled call: a labelled root span, timed on the wall clock
                call()
    passed = profile_torch(body, device=cell.device, trace_path=trace_path(ctx.run_dir, cell.cell_id))
    rows = pass_rows(passed, timed_median_s=timed.median_s)

torch backends are profiled with torch.profiler (CPU, and CUDA kernels on a GPU) and the region labels of
models/regions.py; the numba engine with its own region timers (the same labels). Both become one tree of
`Span`s, so one function (`breakdown`) turns either into per-region, per-loop times. A Chrome trace (gzip
JSON with "traceEvents", for ui.perfetto.dev or chrome://tracing) is written for each profiled cell.
The workloads call `profile_forward_rows` (prefill) and `profile_generation_rows` (decode).

Also here, for the per-loop costs: KV-cache bytes as the loop count grows for each policy
(`kv_growth_rows`), and training activation memory vs the loop count and mu_bwd (`activation_rows`).
"""

from __future__ import annotations

import dataclasses
import gzip
import json
import math
import os
import re
import statistics
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from loopscope.bench.schema import metric_row, unmeasured
from loopscope.models.regions import is_region

ROOTS: tuple[str, ...] = ("forward", "prefill", "decode_step")  # labels of one profiled call
TOP_OPS = 10
_LOOP = re.compile(r"^loop\[(\d+)\]$")
_INDEX = re.compile(r"\[\d+\]$")

Mark = Callable[[str], AbstractContextManager]


# --- spans: one tree for torch.profiler events and for the engine's timers ------------------------


@dataclass
class Span:
    """A labelled interval (a root call or a region) and the labelled intervals inside it."""

    name: str
    start_us: float
    end_us: float
    device_us: float = 0.0      # GPU kernel time launched inside (0 on CPU)
    alloc_bytes: float = 0.0    # gross bytes allocated inside (profile_memory; 0 when not recorded)
    children: list[Span] = field(default_factory=list)

    @property
    def duration_us(self) -> float:
        return self.end_us - self.start_us

    def walk(self) -> Iterator[Span]:
        yield self
        for child in self.children:
            yield from child.walk()


def _labelled(name: str) -> bool:
    return name in ROOTS or is_region(name)


def _is_cpu(event: Any) -> bool:
    return str(getattr(event, "device_type", "DeviceType.CPU")).endswith("CPU")


def spans_from_torch(events: Sequence[Any], *, device: bool = False) -> list[Span]:
    """Root spans from torch.profiler FunctionEvents: every labelled CPU event becomes a Span attached to
    its nearest labelled ancestor. `device`: record the GPU kernel time and device allocations instead
    of host allocations."""
    spans: dict[int, Span] = {}
    roots: list[Span] = []
    for ev in sorted((e for e in events if _is_cpu(e) and _labelled(e.name)), key=lambda e: e.time_range.start):
        span = Span(ev.name, float(ev.time_range.start), float(ev.time_range.end),
                    device_us=float(ev.device_time_total) if device else 0.0,
                    alloc_bytes=_gross_alloc(ev, device))
        spans[id(ev)] = span
        parent = ev.cpu_parent
        while parent is not None and id(parent) not in spans:
            parent = parent.cpu_parent
        (spans[id(parent)].children if parent is not None else roots).append(span)
    return roots


def _gross_alloc(event: Any, device: bool) -> float:
    """Bytes allocated by the event's whole subtree (frees not subtracted)."""
    attr = "self_device_memory_usage" if device else "self_cpu_memory_usage"
    total, stack = 0.0, [event]
    while stack:
        ev = stack.pop()
        total += max(float(getattr(ev, attr, 0) or 0), 0.0)
        stack.extend(ev.cpu_children)
    return total


def spans_from_intervals(intervals: Sequence[tuple[str, float, float]]) -> list[Span]:
    """Root spans from (name, start_s, end_s) wall-clock intervals (the engine's timers), nested by
    containment: an interval inside another is its child."""
    roots: list[Span] = []
    stack: list[Span] = []
    for name, t0, t1 in sorted(intervals, key=lambda iv: (iv[1], -iv[2])):
        span = Span(name, t0 * 1e6, t1 * 1e6)
        while stack and not span.end_us <= stack[-1].end_us:
            stack.pop()
        (stack[-1].children if stack else roots).append(span)
        stack.append(span)
    return roots


# --- the breakdown ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Breakdown:
    """Milliseconds per root call, each the median over the profiled calls. `top_ms` holds the regions directly
    under the root (they add up to about `labelled_ms` <= `call_ms`); `nested_ms` the regions inside them, keyed
    "loop/core[0]", "loop/injection", "blocks/block[2]" (summed over the loops); `loop_ms[i]` the time of loop i."""

    root: str
    calls: int
    call_ms: float
    top_ms: dict[str, float]
    nested_ms: dict[str, float]
    loop_ms: list[float]
    alloc_bytes: dict[str, float]
    clock: str  # what the times measure: "host wall clock" or "GPU kernel time"
    coverage: float  # fraction of a call inside top-level regions (median over calls; 1.0: they add up)

    @property
    def labelled_ms(self) -> float:
        return sum(self.top_ms.values())

    @property
    def unlabelled_ms(self) -> float:
        return self.call_ms * (1.0 - self.coverage)

    def totals_ms(self) -> dict[str, float]:
        """Per label, every occurrence at any depth summed ("injection" = once-per-forward + per-loop part):
        what a flat timer per label (the engine's RegionTimers.seconds) measures."""
        out: dict[str, float] = defaultdict(float)
        for key, ms in (*self.top_ms.items(), *self.nested_ms.items()):
            out[key.rsplit("/", 1)[-1]] += ms
        return dict(out)


def breakdown(roots: Sequence[Span], root: str = "forward", *, device: bool = False) -> Breakdown:
    """Per-call times of the root calls named `root`, each region's median over the calls (robust to a call
    preempted on a shared machine). With `device`, times are GPU kernel times (CPU-side spans only launch
    work on a GPU), else host wall time."""
    calls = [r for r in roots if r.name == root]
    if not calls:
        found = sorted({r.name for r in roots})
        raise ValueError(f"breakdown: no root span named {root!r} (found {found or 'none'})")

    def ms(span: Span) -> float:
        return (span.device_us if device else span.duration_us) / 1e3

    per_call: list[tuple[dict[str, float], dict[str, float], dict[str, float]]] = []
    loops: dict[int, list[float]] = defaultdict(list)
    for call in calls:
        top: dict[str, float] = defaultdict(float)
        nested: dict[str, float] = defaultdict(float)
        alloc: dict[str, float] = defaultdict(float)
        for region in call.children:
            top[region.name] += ms(region)
            alloc[region.name] += region.alloc_bytes
            m = _LOOP.match(region.name)
            if m:
                loops[int(m.group(1))].append(ms(region))
            for parent in region.walk():
                kind = _INDEX.sub("", parent.name)
                for child in parent.children:
                    nested[f"{kind}/{child.name}"] += ms(child)
        per_call.append((top, nested, alloc))

    def medians(which: int) -> dict[str, float]:
        keys = dict.fromkeys(k for parts in per_call for k in parts[which])  # first-seen order
        return {k: statistics.median(parts[which].get(k, 0.0) for parts in per_call) for k in keys}

    loop_ms = [statistics.median(loops[i]) for i in range(max(loops) + 1)] if loops else []
    # per call, so a stall inside one region of one call moves neither the medians nor the coverage
    coverage = statistics.median(sum(top.values()) / ms(c) if ms(c) > 0 else math.nan
                                 for c, (top, _, _) in zip(calls, per_call, strict=True))
    return Breakdown(root=root, calls=len(calls), call_ms=statistics.median(ms(c) for c in calls),
                     top_ms=medians(0), nested_ms=medians(1), loop_ms=loop_ms, alloc_bytes=medians(2),
                     clock="GPU kernel time" if device else "host wall clock", coverage=coverage)


# --- top ops ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class OpStat:
    name: str
    calls: float       # per root call
    self_ms: float     # per root call
    flops: float       # per root call (0 where torch does not count the op)
    shapes: str        # the most frequent input shapes


def top_ops(events: Sequence[Any], root: str, n_calls: int, *, device: bool = False, k: int = TOP_OPS) -> list[OpStat]:
    """The k ops with the most self time inside roots named `root`, per root call."""
    root_of: dict[int, str | None] = {}

    def root_name(ev: Any) -> str | None:
        chain = []
        while ev is not None and id(ev) not in root_of:
            chain.append(ev)
            ev = ev.cpu_parent
        found = root_of[id(ev)] if ev is not None else None
        for e in reversed(chain):
            found = e.name if e.name in ROOTS else found
            root_of[id(e)] = found
        return found

    self_us: dict[str, float] = defaultdict(float)
    count: dict[str, int] = defaultdict(int)
    flops: dict[str, float] = defaultdict(float)
    shapes: dict[str, Counter] = defaultdict(Counter)
    for ev in events:
        if not _is_cpu(ev) or _labelled(ev.name) or root_name(ev) != root:
            continue
        self_us[ev.name] += float(ev.self_device_time_total if device else ev.self_cpu_time_total)
        count[ev.name] += 1
        flops[ev.name] += float(getattr(ev, "flops", 0) or 0)
        if ev.input_shapes:
            shapes[ev.name][str(ev.input_shapes)] += 1
    ranked = sorted(self_us, key=lambda name: -self_us[name])[:k]
    n = max(n_calls, 1)
    return [OpStat(name, count[name] / n, self_us[name] / 1e3 / n, flops[name] / n,
                   "; ".join(s for s, _ in shapes[name].most_common(2))) for name in ranked]


# --- the profiled pass ----------------------------------------------------------------------------


@dataclass
class ProfiledPass:
    breakdown: Breakdown
    ops: list[OpStat]
    wall_s: dict[str, list[float]]   # per root name: wall seconds of each call under the profiler
    tool: str                        # what recorded the trace, the ops and the allocations
    trace_path: Path | None = None
    region_wall_s: dict[str, list[float]] = field(default_factory=dict)  # the regions-only pass, when separate
    region_tool: str = ""            # what recorded the region times
    avg_power_w: float = math.nan    # GPU: mean NVML power over the pass (energy estimate per region)
    power_source: str = ""


class _Roots:
    """`mark(name)`: one profiled call as a labelled root span, timed on the wall clock (after a sync)."""

    def __init__(self, sync: Callable[[], None], label: Callable[[str], AbstractContextManager]) -> None:
        self.sync, self.label = sync, label
        self.wall: dict[str, list[float]] = defaultdict(list)
        self.intervals: list[tuple[str, float, float]] = []

    @contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        if name not in ROOTS:
            raise ValueError(f"mark: root {name!r} is not one of {ROOTS}")
        self.sync()
        t0 = time.perf_counter()
        with self.label(name):
            yield
            self.sync()
        t1 = time.perf_counter()
        self.wall[name].append(t1 - t0)
        self.intervals.append((name, t0, t1))


def _no_sync() -> None:
    return None


def profile_torch(body: Callable[[Mark], None], *, root: str = "forward", device: str = "cpu",
                  trace_path: Path | None = None, sync: Callable[[], None] = _no_sync,
                  nvml: Any = None) -> ProfiledPass:
    """Run `body(mark)` under torch.profiler (shapes, memory, FLOPs; CUDA kernels on a GPU): the trace, the top
    ops and the region allocations, and on a GPU the region times (GPU kernel time) and the mean NVML power.

    On a CPU the region times come from a separate pass first, with the labels as wall-clock intervals
    (`recording_regions`, about 1 us per label): under torch.profiler every aten op recorded inflates small
    forwards 1.5-2x, and even a labels-only profiler costs about 10 us per label."""
    from torch.profiler import ProfilerActivity, profile, record_function

    from loopscope.models.regions import recording_regions

    on_gpu = device.startswith("cuda")
    light_bd, light_wall = None, {}
    if not on_gpu:
        marks = _Roots(sync, lambda _name: nullcontext())
        with recording_regions() as recorder:
            body(marks)
        intervals = [(name, t0 / 1e9, t1 / 1e9) for name, t0, t1 in recorder.intervals]
        light_bd = breakdown(spans_from_intervals([*marks.intervals, *intervals]), root)
        light_wall = dict(marks.wall)

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if on_gpu else [])
    marks = _Roots(sync, record_function)
    power = _PowerWindow(device, nvml) if on_gpu else nullcontext()
    with power, profile(activities=activities, record_shapes=True, profile_memory=True, with_flops=True) as prof:
        _profiler_start()
        body(marks)
    if trace_path is not None:
        trace_path.parent.mkdir(parents=True, exist_ok=True)
        prof.export_chrome_trace(str(trace_path))
    events = prof.events()
    full = breakdown(spans_from_torch(events, device=on_gpu), root, device=on_gpu)
    tool = f"torch.profiler {torch.__version__} ({'CPU + CUDA' if on_gpu else 'CPU'})"
    bd = full if light_bd is None else dataclasses.replace(light_bd, alloc_bytes=full.alloc_bytes)
    passed = ProfiledPass(bd, top_ops(events, root, full.calls, device=on_gpu), dict(marks.wall), tool, trace_path,
                          region_wall_s=light_wall,
                          region_tool=("region labels as wall-clock intervals (perf_counter_ns), a pass of their own"
                                       if light_bd is not None else tool + ", full pass"))
    if isinstance(power, _PowerWindow):
        passed.avg_power_w, passed.power_source = power.avg_power_w, power.source
    return passed


def _profiler_start() -> None:
    """A first labelled event: the profiler's start-up cost lands in it, not in the first call."""
    with torch.profiler.record_function("profiler_start"):
        torch.zeros(1)


def profile_engine(engine: Any, body: Callable[[Mark], None], *, root: str = "forward",
                   trace_path: Path | None = None) -> ProfiledPass:
    """Run `body(mark)` with the numba engine's region timers recording every interval, then restore
    the engine's own timers."""
    from loopscope.kernels.engine import RegionTimers

    @dataclass
    class IntervalTimers(RegionTimers):
        intervals: list = field(default_factory=list)

        def stop(self, region: str, t0: float) -> None:
            super().stop(region, t0)
            if self.enabled:
                self.intervals.append((region, t0, time.perf_counter()))

    own = engine.timers
    timers = IntervalTimers(enabled=True, sync=own.sync)
    marks = _Roots(own.sync or _no_sync, lambda _name: nullcontext())
    engine.timers = timers
    try:
        body(marks)
    finally:
        engine.timers = own
    spans = spans_from_intervals([*marks.intervals, *timers.intervals])
    if trace_path is not None:
        write_chrome_trace(spans, trace_path)
    bd = breakdown(spans, root)
    tool = "numba engine region timers (perf_counter)"
    return ProfiledPass(bd, [], dict(marks.wall), tool, trace_path, region_tool=tool)


class _PowerWindow:
    """Mean GPU power over a window, from the project's NVML energy meter (no minimum window: an estimate)."""

    def __init__(self, device: str, nvml: Any = None) -> None:
        from loopscope.bench.meters.energy import EnergyMeter

        self.meter = EnergyMeter(device, nvml=nvml, min_window_s=0.0)
        self.avg_power_w = math.nan
        self.source = ""

    def __enter__(self) -> _PowerWindow:
        self.meter.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.meter.__exit__(*exc)
        self.avg_power_w = self.meter.avg_power_w
        self.source = f"{self.meter.source} over {self.meter.duration_s:.3g} s"


def write_chrome_trace(roots: Sequence[Span], path: Path) -> None:
    """Spans as Chrome trace complete events ("ph": "X", microseconds), gzip JSON."""
    t0 = min((r.start_us for r in roots), default=0.0)
    events = [{"name": s.name, "ph": "X", "cat": "root" if s.name in ROOTS else "region",
               "ts": s.start_us - t0, "dur": s.duration_us, "pid": os.getpid(), "tid": 0}
              for r in roots for s in r.walk()]
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with gzip.open(tmp, "wt") as f:
        json.dump({"traceEvents": events, "displayTimeUnit": "ms"}, f)
    tmp.replace(path)


def trace_path(run_dir: str | Path, cell_id: str) -> Path:
    return Path(run_dir) / "traces" / f"{cell_id}.json.gz"


def load_trace(path: Path) -> dict[str, Any]:
    """A written trace, parsed; a ValueError naming the file when it is not gzip JSON with traceEvents."""
    try:
        with gzip.open(path, "rt") as f:
            data = json.load(f)
    except (OSError, ValueError) as err:
        raise ValueError(f"{path}: not a gzip JSON trace ({err})") from None
    if not isinstance(data, dict) or not isinstance(data.get("traceEvents"), list):
        raise ValueError(f"{path}: no 'traceEvents' list")
    return data


# --- rows ------------------------------------------------------------------------------------------


def pass_rows(passed: ProfiledPass, timed_median_s: float | None, *, timed_what: str = "timed pass median"
              ) -> list[dict[str, Any]]:
    """Tidy rows of a profiled pass: profiled_call_ms, region_time_ms (stat = top-level region, nested
    "loop/core[0]", and "unlabelled"), loop_time_ms (stat loop1..), loop_first_over_rest, region_alloc_bytes,
    op_self_time_ms and op_flops (stat = op), profile_overhead (stat "regions" and "trace"), and on a GPU
    region_energy_j (an estimate)."""
    bd = passed.breakdown
    where = f"{passed.region_tool or passed.tool}; median of {bd.calls} '{bd.root}' calls, {bd.clock}"
    rows = [metric_row("profiled_call_ms", bd.call_ms, "ms", source=where, n_samples=bd.calls)]
    for name, ms in bd.top_ms.items():
        rows.append(metric_row("region_time_ms", ms, "ms", stat=name, source=where, n_samples=bd.calls))
    for key, ms in bd.nested_ms.items():
        rows.append(metric_row("region_time_ms", ms, "ms", stat=key, n_samples=bd.calls,
                               source=f"nested, summed over its occurrences; {where}"))
    note = "" if bd.top_ms else " (no region labels were recorded: torch.compile leaves them out)"
    rows.append(metric_row("region_time_ms", max(bd.unlabelled_ms, 0.0), "ms", stat="unlabelled",
                           source=f"call minus its top-level regions, coverage {bd.coverage:.3f}{note}; {where}"))
    rows.append(metric_row("region_coverage", bd.coverage, "fraction", stat="call",
                           source=f"sum of top-level regions / the profiled call; {where}"))
    if timed_median_s and timed_median_s > 0:
        rows.append(metric_row("region_coverage", bd.labelled_ms / 1e3 / timed_median_s, "fraction", stat="timed",
                               source=f"sum of top-level regions / {timed_what} {timed_median_s * 1e3:.3g} ms "
                                      "(above 1: the labels' own cost, about 10 us each, and run-to-run noise)"))
    for i, ms in enumerate(bd.loop_ms):
        rows.append(metric_row("loop_time_ms", ms, "ms", stat=f"loop{i + 1}", source=where, n_samples=bd.calls))
    if len(bd.loop_ms) >= 2:
        later = sorted(bd.loop_ms[1:])[(len(bd.loop_ms) - 1) // 2]
        rows.append(metric_row("loop_first_over_rest", bd.loop_ms[0] / later, "ratio",
                               source=f"loop1 time / median of loops 2..{len(bd.loop_ms)}; {where}"))
    if any(v > 0 for v in bd.alloc_bytes.values()):
        for name, b in bd.alloc_bytes.items():
            rows.append(metric_row("region_alloc_bytes", b, "bytes", stat=name,
                                   source=f"gross bytes allocated inside the region per call; {passed.tool}, "
                                          "profile_memory"))
    for op in passed.ops:
        src = f"{op.calls:g} calls per '{bd.root}'; input shapes {op.shapes or 'not recorded'}; {passed.tool}"
        rows.append(metric_row("op_self_time_ms", op.self_ms, "ms", stat=op.name, source=src))
        if op.flops > 0:
            rows.append(metric_row("op_flops", op.flops, "FLOP", stat=op.name,
                                   source=f"torch.profiler with_flops, per '{bd.root}'"))
    passes = [("trace", passed.wall_s, passed.tool)]
    if passed.region_wall_s:
        passes.append(("regions", passed.region_wall_s, passed.region_tool))
    for stat, wall, tool in passes:
        calls = wall.get(bd.root, [])
        if timed_median_s and timed_median_s > 0 and calls:
            median = statistics.median(calls)
            rows.append(metric_row("profile_overhead", median / timed_median_s, "ratio", stat=stat,
                                   n_samples=len(calls), source=f"{tool}: profiled call {median * 1e3:.3g} ms (median) "
                                                                f"/ {timed_what} {timed_median_s * 1e3:.3g} ms"))
        else:
            rows.append(unmeasured("profile_overhead", "ratio", "unavailable: no timed median to compare with",
                                   stat=stat))
    if bd.clock == "GPU kernel time":
        rows += region_energy_rows(bd, passed.avg_power_w, passed.power_source)
    return rows


def region_energy_rows(bd: Breakdown, avg_power_w: float, power_source: str) -> list[dict[str, Any]]:
    """Energy per top-level region, ESTIMATED as the mean GPU power over the profiled pass times the region's
    GPU kernel time (NVML power is itself a ~1 s average on recent GPUs: no finer attribution is honest)."""
    if not (math.isfinite(avg_power_w) and avg_power_w > 0):
        why = f"unavailable: no NVML power over the profiled pass ({power_source or 'not measured'})"
        return [unmeasured("region_energy_j", "J", why, stat=name) for name in bd.top_ms]
    src = f"estimate: mean NVML power {avg_power_w:.4g} W ({power_source}) x the region's GPU kernel time"
    return [metric_row("region_energy_j", avg_power_w * ms / 1e3, "J", stat=name, source=src)
            for name, ms in bd.top_ms.items()]


# --- per-loop costs: KV cache and training activations ---------------------------------------------


@torch.inference_mode()
def kv_growth(model: torch.nn.Module, prompt: torch.Tensor, loops: Sequence[int],
              policies: Sequence[str] = ("per-loop", "last-loop")) -> dict[tuple[str, int], int]:
    """KV-cache bytes after prefilling `prompt` with each loop count, per policy (a real models.KVCache)."""
    from loopscope.models import KVCache

    out = {}
    for policy in policies:
        for T in loops:
            cache = KVCache(prompt.shape[1], policy=policy)
            model(prompt, cache=cache, loops=T)
            out[(policy, T)] = int(cache.used_bytes())
    return out


def kv_growth_rows(model: torch.nn.Module, prompt: torch.Tensor, loops: Sequence[int],
                   dtype_bytes: int) -> list[dict[str, Any]]:
    """kv_cache_bytes_vs_loops, stat "<policy> T=<loops>", measured, with the analytic value in `source`."""
    from loopscope.models import kv_bytes_per_token

    cfg = model.config
    rows = []
    for (policy, T), measured in kv_growth(model, prompt, loops).items():
        expected = kv_bytes_per_token(cfg, T, dtype_bytes=dtype_bytes, policy=policy) * prompt.numel()
        rows.append(metric_row("kv_cache_bytes_vs_loops", measured, "bytes", stat=f"{policy} T={T}",
                               source=f"KVCache.used_bytes after a {prompt.shape[0]} x {prompt.shape[1]} prefill "
                                      f"(analytic {expected})"))
    return rows


def saved_activation_bytes(fn: Callable[[], Any], params: Sequence[torch.Tensor]) -> int:
    """Bytes of the tensors autograd saves for backward while `fn()` runs (each storage once; parameters,
    which are stored anyway, left out)."""
    param_ptrs = {p.untyped_storage().data_ptr() for p in params}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        ptr = storage.data_ptr()
        if ptr not in param_ptrs:
            seen[ptr] = max(seen.get(ptr, 0), storage.nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(seen.values())


def activation_loops(cfg: Any) -> list[int]:
    """Loop counts to measure: up to twice the training mean, past mu_bwd so the truncation shows."""
    top = max(2 * int(cfg.mu_rec), int(cfg.mu_bwd or 1) + 2)
    if cfg.family == "ut":
        top = min(top, int(cfg.act_max_steps))
    return sorted({1, 2, *(t for t in (3, 4, 6, 8, 12, 16, 24, 32) if t <= top)})


def activation_rows(model: torch.nn.Module, idx: torch.Tensor, targets: torch.Tensor,
                    loops: Sequence[int] | None = None) -> list[dict[str, Any]]:
    """Training activation memory (bytes saved for backward) per loop count, against the estimate
    a + b * k(T) with k(T) = min(T, mu_bwd) the loops with gradient (T for ut, which has no truncation),
    a and b from T = 1 and 2. Rows train_activation_bytes (stat "T=t" measured, "T=t estimate") and
    activation_vs_estimate (stat "T=t")."""
    cfg = model.config
    shape = f"batch {idx.shape[0]} x {idx.shape[1]}"
    was_training = model.training
    model.train()
    params = list(model.parameters())
    try:
        if not cfg.is_looped:
            measured = saved_activation_bytes(lambda: model.compute_loss(idx, targets), params)
            return [metric_row("train_activation_bytes", measured, "bytes",
                               source=f"tensors saved for backward, {shape} (dense: no loops)")]
        loops = list(loops or activation_loops(cfg))
        measured = {T: saved_activation_bytes(lambda T=T: model.compute_loss(idx, targets, loops=T), params)
                    for T in sorted({1, 2, *loops})}
    finally:
        model.train(was_training)

    def k(T: int) -> int:
        return T if cfg.family == "ut" else min(T, int(cfg.mu_bwd))

    slope = (measured[2] - measured[1]) / (k(2) - k(1)) if k(2) != k(1) else 0.0
    base = measured[1] - slope * k(1)
    src = f"tensors saved for backward (saved_tensors_hooks), parameters excluded, {shape}, mu_bwd {cfg.mu_bwd}"
    est_src = f"a + b * min(T, mu_bwd={cfg.mu_bwd}), a and b from T=1,2 (b = {slope:.4g} bytes per grad loop)"
    if cfg.family == "ut":
        est_src = f"a + b * T (ut: every step has gradient), a and b from T=1,2 (b = {slope:.4g} bytes per step)"
    rows = []
    for T in loops:
        estimate = base + slope * k(T)
        rows.append(metric_row("train_activation_bytes", measured[T], "bytes", stat=f"T={T}", source=src))
        rows.append(metric_row("train_activation_bytes", estimate, "bytes", stat=f"T={T} estimate", source=est_src))
        rows.append(metric_row("activation_vs_estimate", measured[T] / estimate, "ratio", stat=f"T={T}",
                               source="measured / estimate; T=1,2 match by construction"))
    return rows


# --- what the workloads call when tracing is on ------------------------------------------------------

PROFILED_CALLS = 5  # forwards per profiled prefill pass: a median that a preempted call cannot move


def profile_forward_rows(cell: Any, ctx: Any, call: Callable[[], object], timed_median_s: float,
                         engine: Any = None) -> list[dict[str, Any]]:
    """Prefill: PROFILED_CALLS forwards of the already-timed `call` under the profiler (the numba engine's
    timers when `engine` is given), the trace, the rows, and the roofline of the timed median."""
    from loopscope.bench import roofline
    from loopscope.bench.workloads.common import DTYPES, synchronize
    from loopscope.models import ModelConfig

    def body(mark: Mark) -> None:
        call()  # unmarked, so left out: the first call under a profiler pays its warm-up
        for _ in range(PROFILED_CALLS):
            with mark("forward"):
                call()

    path = trace_path(ctx.run_dir, cell.cell_id)
    if engine is not None:
        passed = profile_engine(engine, body, trace_path=path)
    else:
        passed = profile_torch(body, device=cell.device, trace_path=path, sync=lambda: synchronize(cell.device))
    rows = pass_rows(passed, timed_median_s)
    cfg = ModelConfig.from_dict(cell.model_config)
    dtype_bytes = torch.finfo(DTYPES[cell.dtype]).bits // 8
    flops = roofline.prefill_flops(cfg, cell.batch, cell.seq_len, cell.loops_test)
    moved = roofline.prefill_bytes(cfg, cell.batch, cell.seq_len, cell.loops_test, dtype_bytes)
    rows += roofline.roofline_rows(flops, moved, timed_median_s, ctx.calibration, cell.dtype,
                                   what=f"one forward of {cell.batch} x {cell.seq_len} tokens")
    return rows


def profile_generation_rows(cell: Any, ctx: Any, gen: Any, prompt: Any, new_tokens: int,
                            step_median_s: float) -> list[dict[str, Any]]:
    """Decode: one greedy generation under the profiler (prefill marked "prefill", each step "decode_step";
    the breakdown is per decode step), the trace, the roofline of a step at the mid-generation context,
    and the KV-cache bytes as the loop count grows under each policy."""
    import numpy as np

    from loopscope.bench import roofline
    from loopscope.bench.workloads.common import DTYPES, synchronize
    from loopscope.models import ModelConfig

    def body(mark: Mark) -> None:
        with mark("prefill"):
            tok = gen.prefill(prompt, prompt.shape[1] + new_tokens)
        for _ in range(new_tokens - 1):
            with mark("decode_step"):
                tok = gen.step(tok.astype(np.int64))

    path = trace_path(ctx.run_dir, cell.cell_id)
    engine = getattr(gen, "engine", None)
    if engine is not None:
        passed = profile_engine(engine, body, root="decode_step", trace_path=path)
    else:
        passed = profile_torch(body, root="decode_step", device=cell.device, trace_path=path,
                               sync=lambda: synchronize(cell.device))
    rows = pass_rows(passed, step_median_s, timed_what="timed per-token step median")
    cfg = ModelConfig.from_dict(cell.model_config)
    dtype_bytes = torch.finfo(DTYPES[cell.dtype]).bits // 8
    context = prompt.shape[1] + new_tokens // 2
    flops = roofline.decode_step_flops(cfg, cell.batch, context, cell.loops_test)
    rows.append(metric_row("achieved_flops", flops / step_median_s, "FLOP/s",
                           source=f"analytic FLOPs of a decode step at context {context} / median step time"))
    rows += roofline.roofline_rows(flops, roofline.decode_step_bytes(cfg, cell.batch, context, cell.loops_test,
                                                                     dtype_bytes),
                                   step_median_s, ctx.calibration, cell.dtype,
                                   what=f"one decode step of {cell.batch} sequences at context {context}")
    if cfg.is_looped:
        top = int(cell.loops_test or cfg.mu_rec)
        loops = sorted({1, *(t for t in (2, 4, 8, 16, 32) if t < top), top})
        if cfg.family == "ut":
            loops = [t for t in loops if t <= int(cfg.act_max_steps)]
        idx = torch.from_numpy(prompt[:, : min(prompt.shape[1], 64)]).to(cell.device)
        # the torch model of the cell (the numba generator keeps its fp32 source model)
        rows += kv_growth_rows(gen.model, idx, loops, dtype_bytes if engine is None else 4)
    return rows
