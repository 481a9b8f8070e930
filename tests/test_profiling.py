"""Profiling: region labels in every family, valid traces, region sums, the numba engine's timers against
torch's breakdown, the rows, the per-loop memory measurements, and `loopscope run --trace` end to end."""

from __future__ import annotations

import contextlib
import gzip
import json
import math
import statistics
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from loopscope.bench import profiling
from loopscope.bench.profiling import ProfiledPass, Span, breakdown
from loopscope.models import FAMILIES, build, kv_bytes_per_token
from loopscope.models.regions import is_region, recording_regions, region
from tests.conftest import run_cli
from tests.fake_nvml import FakeGPU, FakeNVML

LOOPS = 3


@pytest.fixture
def one_thread():
    """Single-threaded torch: on a shared 2-core machine a busy core stalls a 2-thread OpenMP region."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _expected_labels(family: str, cfg) -> set[str]:
    if family == "gpt":
        return {"embed", "blocks", "head"} | {f"block[{j}]" for j in range(cfg.n_layers)}
    labels = {"embed", "prelude", "injection", "coda", "head"}
    labels |= {f"loop[{i}]" for i in range(LOOPS)} | {f"core[{j}]" for j in range(cfg.n_core)}
    return labels | ({"readout"} if family in ("parcae", "rdm") else set())


def _forward(model: torch.nn.Module, idx: torch.Tensor):
    kwargs = {} if model.config.family == "gpt" else {"loops": LOOPS}

    def call() -> torch.Tensor:
        with torch.inference_mode():
            return model(idx, **kwargs)
    return call


def _profile(call, calls: int = 2, trace: Path | None = None) -> ProfiledPass:
    def body(mark) -> None:
        call()
        for _ in range(calls):
            with mark("forward"):
                call()
    return profiling.profile_torch(body, trace_path=trace)


# --- the labels -------------------------------------------------------------------------------------


def test_region_is_a_shared_noop_when_profiling_is_off() -> None:
    assert not torch.autograd._profiler_enabled()
    first, second = region("prelude"), region("loop[3]")
    assert isinstance(first, contextlib.nullcontext) and first is second
    with torch.profiler.profile() as prof:
        on = region("prelude")
        assert isinstance(on, torch.profiler.record_function)
        with on:
            torch.zeros(2)
    assert "prelude" in {e.name for e in prof.events()}
    assert isinstance(region("prelude"), contextlib.nullcontext)


def test_label_grammar() -> None:
    for name in ("embed", "blocks", "block[11]", "prelude", "injection", "loop[0]", "core[2]", "readout", "coda",
                 "head"):
        assert is_region(name), name
    for name in ("forward", "loop", "loop[x]", "aten::mm", "core[0]/x"):
        assert not is_region(name), name


@pytest.mark.parametrize("name", ["parcae-micro", "ut-micro"])
def test_labels_add_no_graph_break_under_torch_compile(name: str, monkeypatch) -> None:
    """Under torch.compile `region` must not consult the profiler (that breaks the graph): the shipped model
    and the same model with the labels patched out trace into the same number of graphs."""
    import importlib

    idx = torch.randint(0, 256, (2, 16))

    def breaks() -> int:
        torch._dynamo.reset()
        try:
            return torch._dynamo.explain(build(name, seed=0).eval())(idx, loops=2).graph_break_count
        finally:
            torch._dynamo.reset()

    shipped = breaks()
    for module in ("gpt", "parcae", "rdm", "looped", "ut", "recurrence"):
        mod = importlib.import_module(f"loopscope.models.{module}")
        if hasattr(mod, "region"):  # the looped families' labels live in recurrence.LoopedLM
            monkeypatch.setattr(mod, "region", lambda _name: contextlib.nullcontext())
    assert shipped == breaks()


@pytest.mark.parametrize("family", FAMILIES)
def test_every_family_writes_a_valid_trace_with_its_labels(family: str, tmp_path: Path) -> None:
    model = build(f"{family}-micro", seed=0).eval()
    idx = torch.randint(0, model.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    path = tmp_path / "traces" / "cell.json.gz"
    passed = _profile(_forward(model, idx), trace=path)
    data = profiling.load_trace(path)
    names = {e.get("name") for e in data["traceEvents"]}
    expected = _expected_labels(family, model.config)
    assert expected <= names, expected - names
    assert "forward" in names and any(str(n).startswith("aten::") for n in names)
    bd = passed.breakdown
    top = set(bd.top_ms)
    nested = {key.split("/")[-1] for key in bd.nested_ms}
    assert top | nested == expected  # the breakdown sees exactly the family's regions
    if family != "gpt":
        assert len(bd.loop_ms) == LOOPS and all(ms > 0 for ms in bd.loop_ms)
        assert {f"loop/core[{j}]" for j in range(model.config.n_core)} <= set(bd.nested_ms)
    assert passed.ops and passed.ops[0].self_ms > 0


def test_load_trace_names_a_bad_file(tmp_path: Path) -> None:
    bad = tmp_path / "x.json.gz"
    with gzip.open(bad, "wt") as f:
        json.dump({"events": []}, f)
    with pytest.raises(ValueError, match="x.json.gz: no 'traceEvents'"):
        profiling.load_trace(bad)
    bad.write_text("plain")
    with pytest.raises(ValueError, match="not a gzip JSON trace"):
        profiling.load_trace(bad)


# --- the region sums ----------------------------------------------------------------------------------


def _fastest_call_ratio(call) -> tuple[float, float]:
    """(regions of the fastest profiled call / fastest unprofiled call, median coverage) from 15 calls of each,
    in interleaved blocks of 5."""
    unprofiled: list[float] = []
    profiled: list[Span] = []
    for _ in range(3):
        for _ in range(5):
            t0 = time.perf_counter()
            call()
            unprofiled.append((time.perf_counter() - t0) * 1e3)
        roots = []
        with recording_regions() as recorder:
            call()
            for _ in range(5):
                t0 = time.perf_counter()
                call()
                roots.append(("forward", t0, time.perf_counter()))
        intervals = [(name, t0 / 1e9, t1 / 1e9) for name, t0, t1 in recorder.intervals]
        profiled += [r for r in profiling.spans_from_intervals([*roots, *intervals]) if r.name == "forward"]
    assert len(profiled) == len(unprofiled) == 15
    fastest = min(profiled, key=lambda span: span.duration_us)
    assert {c.name for c in fastest.children} == {"embed", "prelude", "injection", "loop[0]", "loop[1]", "loop[2]",
                                                  "readout", "coda", "head"}
    regions_ms = sum(c.duration_us for c in fastest.children) / 1e3
    return regions_ms / min(unprofiled), breakdown(profiled).coverage


def test_region_times_add_up_to_the_measured_forward(one_thread) -> None:
    """The top-level regions of the regions-only pass cover the profiled calls, and add up to the forward time
    measured without any profiler, both within 10%. On a shared machine calls are preempted for scheduler
    slices, noise that only ever adds time: the regions of the fastest profiled call are compared with the
    fastest unprofiled call, and a measurement that every call of one side was preempted in is repeated
    (up to 5 times). Regions that do not add up fail every attempt."""
    model = build("parcae-micro", seed=0).eval()
    idx = torch.randint(0, 256, (4, 128), generator=torch.Generator().manual_seed(0))
    call = _forward(model, idx)
    for _ in range(3):
        call()
    attempts = []
    for _ in range(5):
        ratio, coverage = _fastest_call_ratio(call)
        attempts.append((round(ratio, 3), round(coverage, 3)))
        if 0.9 <= ratio <= 1.1 and 0.9 <= coverage <= 1.0:
            return
    pytest.fail(f"regions / forward and coverage, per attempt: {attempts}")


def test_engine_timers_agree_with_the_torch_breakdown(one_thread) -> None:
    """The same regions, and shares of the call of the same order (loosely: within 5x for regions that take at
    least 10% of either call; smaller ones are dominated by fixed per-call costs that differ by design, e.g.
    torch builds the RoPE tables inside `embed` on every call where the engine keeps them)."""
    from loopscope.kernels.engine import NumbaEngine

    for name in ("parcae-micro", "gpt-micro"):
        model = build(name, seed=0).eval()
        idx = torch.randint(0, 256, (2, 64), generator=torch.Generator().manual_seed(1))
        torch_bd = _profile(_forward(model, idx), calls=5).breakdown
        engine = NumbaEngine.from_model(model)
        engine.warmup()
        tokens = idx.numpy()
        kwargs = {} if model.config.family == "gpt" else {"loops": LOOPS}

        def body(mark, engine=engine, tokens=tokens, kwargs=kwargs) -> None:
            engine.prefill(tokens, **kwargs)
            for _ in range(5):
                with mark("forward"):
                    engine.prefill(tokens, **kwargs)
        engine_bd = profiling.profile_engine(engine, body).breakdown
        assert engine.timers.enabled is False  # the engine's own timers are restored
        torch_share = {k: v / torch_bd.call_ms for k, v in torch_bd.totals_ms().items()}
        engine_share = {k: v / engine_bd.call_ms for k, v in engine_bd.totals_ms().items()}
        assert set(torch_share) == set(engine_share), name
        assert engine_bd.coverage > 0.9 and len(engine_bd.loop_ms) == len(torch_bd.loop_ms)
        for label in torch_share:
            if max(torch_share[label], engine_share[label]) >= 0.10:
                ratio = engine_share[label] / torch_share[label]
                assert 1 / 5 < ratio < 5, (name, label, torch_share[label], engine_share[label])


# --- spans and breakdowns, from hand-made trees ------------------------------------------------------


def _call(start: float, loop_us: list[float], device: bool = False) -> Span:
    """A forward at `start` (us): embed 10, prelude 20, injection 5, the loops (each: injection 1 + core[0]),
    coda 20, head 5, and 3 us unlabelled at the end."""
    t = start
    children = []
    for name, dur in (("embed", 10.0), ("prelude", 20.0), ("injection", 5.0)):
        children.append(Span(name, t, t + dur, device_us=dur / 2 if device else 0.0))
        t += dur
    for i, dur in enumerate(loop_us):
        inner = [Span("injection", t, t + 1.0), Span("core[0]", t + 1.0, t + dur)]
        children.append(Span(f"loop[{i}]", t, t + dur, device_us=dur / 2 if device else 0.0, children=inner))
        t += dur
    for name, dur in (("coda", 20.0), ("head", 5.0)):
        children.append(Span(name, t, t + dur, device_us=dur / 2 if device else 0.0))
        t += dur
    return Span("forward", start, t + 3.0, device_us=(t - start) / 2 if device else 0.0, children=children)


def test_breakdown_of_a_known_tree() -> None:
    roots = [_call(0.0, [40.0, 30.0]), _call(1000.0, [50.0, 30.0]), Span("prefill", 5000.0, 5100.0)]
    bd = breakdown(roots, "forward")
    assert bd.calls == 2 and bd.clock == "host wall clock"
    assert bd.call_ms == pytest.approx((133.0 + 143.0) / 2 / 1e3)
    assert bd.top_ms["loop[0]"] == pytest.approx(0.045) and bd.top_ms["loop[1]"] == pytest.approx(0.030)
    assert bd.loop_ms == pytest.approx([0.045, 0.030])
    assert bd.nested_ms["loop/injection"] == pytest.approx(0.002)
    assert bd.nested_ms["loop/core[0]"] == pytest.approx((39 + 29 + 49 + 29) / 2 / 1e3)
    assert bd.coverage == pytest.approx(statistics.median([130 / 133, 140 / 143]))
    assert bd.unlabelled_ms == pytest.approx(0.003, rel=0.01)
    totals = bd.totals_ms()
    assert totals["injection"] == pytest.approx(0.005 + 0.002)  # once-per-forward + per-loop parts
    with pytest.raises(ValueError, match="no root span named 'decode_step'"):
        breakdown(roots, "decode_step")


def test_breakdown_in_gpu_kernel_time() -> None:
    bd = breakdown([_call(0.0, [40.0, 40.0], device=True)], "forward", device=True)
    assert bd.clock == "GPU kernel time"
    assert bd.top_ms["prelude"] == pytest.approx(0.010) and bd.call_ms == pytest.approx(0.070)


def test_spans_from_intervals_nest_by_containment() -> None:
    intervals = [("forward", 0.0, 1.0), ("prelude", 0.1, 0.2), ("loop[0]", 0.2, 0.6), ("injection", 0.2, 0.25),
                 ("core[0]", 0.25, 0.6), ("head", 0.6, 0.9), ("forward", 2.0, 3.0), ("head", 2.5, 2.9)]
    roots = profiling.spans_from_intervals(intervals)
    assert [r.name for r in roots] == ["forward", "forward"]
    assert [c.name for c in roots[0].children] == ["prelude", "loop[0]", "head"]
    assert [c.name for c in roots[0].children[1].children] == ["injection", "core[0]"]
    bd = breakdown(roots)
    assert bd.top_ms["head"] == pytest.approx((300.0 + 400.0) / 2)


def test_engine_chrome_trace_is_valid(tmp_path: Path) -> None:
    roots = profiling.spans_from_intervals([("forward", 1.0, 2.0), ("head", 1.5, 1.9)])
    path = tmp_path / "t.json.gz"
    profiling.write_chrome_trace(roots, path)
    events = profiling.load_trace(path)["traceEvents"]
    assert [(e["name"], e["ph"]) for e in events] == [("forward", "X"), ("head", "X")]
    assert events[0]["ts"] == 0.0 and events[1]["dur"] == pytest.approx(0.4e6)


# --- rows ----------------------------------------------------------------------------------------------


def _pass(device: bool = False, power: float = math.nan) -> ProfiledPass:
    bd = breakdown([_call(0.0, [40.0, 30.0, 30.0], device=device)], "forward", device=device)
    ops = [profiling.OpStat("aten::mm", 4.0, 0.05, 2e6, "[[4, 64], [64, 64]]")]
    return ProfiledPass(bd, ops, {"forward": [0.0004]}, "fake profiler", region_wall_s={"forward": [0.0002]},
                        region_tool="fake regions", avg_power_w=power, power_source="fake")


def test_pass_rows() -> None:
    rows = pd.DataFrame(profiling.pass_rows(_pass(), timed_median_s=0.0002))
    regions = rows[rows["metric"] == "region_time_ms"].set_index("stat")["value"]
    assert {"embed", "prelude", "injection", "loop[0]", "loop[1]", "loop[2]", "coda", "head", "unlabelled",
            "loop/core[0]", "loop/injection"} == set(regions.index)
    top = regions[[s for s in regions.index if "/" not in s]].sum()
    call = rows.loc[rows["metric"] == "profiled_call_ms", "value"].item()
    assert top == pytest.approx(call)  # top-level regions + unlabelled = the call
    loops = rows[rows["metric"] == "loop_time_ms"]
    assert list(loops["stat"]) == ["loop1", "loop2", "loop3"]
    assert rows.loc[rows["metric"] == "loop_first_over_rest", "value"].item() == pytest.approx(40 / 30)
    overhead = rows[rows["metric"] == "profile_overhead"].set_index("stat")["value"]
    assert overhead["trace"] == pytest.approx(2.0) and overhead["regions"] == pytest.approx(1.0)
    op = rows[rows["metric"] == "op_self_time_ms"].iloc[0]
    assert op["stat"] == "aten::mm" and "[[4, 64], [64, 64]]" in op["source"]
    assert rows.loc[rows["metric"] == "op_flops", "value"].item() == 2e6
    assert not (rows["metric"] == "region_energy_j").any()  # CPU: no energy estimate
    bare = pd.DataFrame(profiling.pass_rows(_pass(), timed_median_s=None))
    missing = bare[bare["metric"] == "profile_overhead"]
    assert missing["value"].isna().all() and missing["source"].str.startswith("unavailable").all()


def test_gpu_pass_estimates_energy_per_region() -> None:
    rows = pd.DataFrame(profiling.pass_rows(_pass(device=True, power=300.0), timed_median_s=0.0002))
    energy = rows[rows["metric"] == "region_energy_j"].set_index("stat")
    assert energy.loc["prelude", "value"] == pytest.approx(300.0 * 10e-6)  # 300 W x 10 us of kernels
    assert energy["source"].str.startswith("estimate:").all()
    none = pd.DataFrame(profiling.pass_rows(_pass(device=True), timed_median_s=0.0002))
    unmeasured = none[none["metric"] == "region_energy_j"]
    assert unmeasured["value"].isna().all() and unmeasured["source"].str.startswith("unavailable").all()


def test_power_window_reads_fake_nvml() -> None:
    nvml = FakeNVML([FakeGPU(power_w=250.0)])
    with profiling._PowerWindow("cuda:0", nvml) as window:
        time.sleep(0.3)
    assert window.avg_power_w == pytest.approx(250.0, rel=0.05)
    assert window.source.startswith("nvml-energy-counter") and nvml.initialised == 0


# --- per-loop memory -----------------------------------------------------------------------------------


def test_kv_cache_grows_per_loop_only_under_the_per_loop_policy() -> None:
    model = build("parcae-micro", seed=0).eval()
    prompt = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(2))
    grown = profiling.kv_growth(model, prompt, [1, 2, 4])
    cfg = model.config
    for T in (1, 2, 4):
        assert grown[("per-loop", T)] == kv_bytes_per_token(cfg, T, policy="per-loop") * prompt.numel()
        assert grown[("last-loop", T)] == grown[("last-loop", 1)]
    assert grown[("per-loop", 4)] > grown[("per-loop", 2)] > grown[("per-loop", 1)]


def test_training_activations_stop_growing_at_mu_bwd() -> None:
    model = build("parcae-micro", seed=0)
    assert model.config.mu_bwd == 2
    gen = torch.Generator().manual_seed(3)
    x, y = (torch.randint(0, 256, (2, 16), generator=gen) for _ in range(2))
    rows = pd.DataFrame(profiling.activation_rows(model, x, y, loops=[1, 2, 3, 6]))
    assert model.training  # the mode is restored
    measured = rows[(rows["metric"] == "train_activation_bytes") & ~rows["stat"].str.endswith("estimate")]
    by_T = measured.set_index("stat")["value"]
    assert by_T["T=2"] > by_T["T=1"] and by_T["T=6"] == by_T["T=3"] == by_T["T=2"]  # truncated backprop
    ratio = rows[rows["metric"] == "activation_vs_estimate"]["value"]
    assert ratio.to_numpy() == pytest.approx(np.ones(4), rel=0.02)


def test_ut_activations_grow_with_every_step() -> None:
    model = build("ut-micro", seed=0)
    gen = torch.Generator().manual_seed(4)
    x, y = (torch.randint(0, 256, (2, 16), generator=gen) for _ in range(2))
    rows = pd.DataFrame(profiling.activation_rows(model, x, y, loops=[1, 2, 4]))
    by_T = rows[rows["metric"] == "train_activation_bytes"].set_index("stat")["value"]
    assert by_T["T=4"] > by_T["T=2"] > by_T["T=1"]
    assert rows[rows["metric"] == "activation_vs_estimate"]["value"].to_numpy() == pytest.approx(1.0, rel=0.05)


def test_dense_activations_are_one_row() -> None:
    model = build("gpt-micro", seed=0)
    x = torch.randint(0, 256, (2, 16))
    rows = profiling.activation_rows(model, x, x)
    assert len(rows) == 1 and rows[0]["value"] > 0 and rows[0]["stat"] == ""


# --- loopscope run --trace, end to end -------------------------------------------------------------

TRACE_PROFILE = """
[profile]
description = "every family traced"
timeout_s = 300
calibration = "quick"
threads = 1
trace = true

[data]
max_bytes = 200_000

[train]
tokens = 2_048
batch = 4
seq_len = 32

[measure]
min_time_s = 0.1
min_count = 3
energy = false
memory = false

[decode]
new_tokens = 6

[[sweep]]
model = ["gpt-micro", "parcae-micro", "rdm-micro", "looped-micro", "ut-micro"]
workload = "prefill"
batch = 2
seq_len = 32
loops_test = 3

[[sweep]]
model = "parcae-micro"
workload = "prefill"
backend = "numba"
batch = 2
seq_len = 32
loops_test = 3

[[sweep]]
model = "parcae-micro"
workload = ["decode", "train"]
seq_len = 24
loops_test = 3
"""


@pytest.mark.slow
def test_run_with_trace_end_to_end(write_profile, tmp_path: Path) -> None:
    out = tmp_path / "run"
    proc = run_cli("run", "--profile", str(write_profile(TRACE_PROFILE)), "--out", str(out), timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    df = pd.read_parquet(out / "results.parquet")
    assert (df["status"] == "ok").all()
    cells = df.drop_duplicates("cell_id").set_index("cell_id")
    traced = cells[cells["workload"].isin(["prefill", "decode"])]
    for cell_id, cell in traced.iterrows():
        events = profiling.load_trace(out / "traces" / f"{cell_id}.json.gz")["traceEvents"]
        names = {e.get("name") for e in events}
        assert "loop[2]" in names or cell["family"] == "gpt", (cell["model"], cell["backend"])
        assert {"embed", "head"} <= names
    assert not (out / "traces" / f"{cells.index[cells['workload'] == 'train'][0]}.json.gz").exists()
    coverage = df[(df["metric"] == "region_coverage") & (df["stat"] == "call")]
    assert len(coverage) == len(traced) and (coverage["value"] > 0.8).all()
    assert set(df.loc[df["metric"] == "roofline_bound", "value"]) <= {0.0, 1.0}
    assert (df["metric"] == "kv_cache_bytes_vs_loops").sum() == 2 * 3  # 2 policies x T in 1, 2, 3
    assert (df["metric"] == "activation_vs_estimate").any()
    md = (out / "report.md").read_text()
    for chart in ("time_breakdown", "loop_time_curve", "roofline", "per_loop_memory"):
        assert f"(charts/{chart}.png)" in md and (out / "charts" / f"{chart}.png").stat().st_size > 5000
    assert "Where the time goes: top 10 ops" in md and "traces/" in md


def test_the_region_pass_is_separate_from_the_trace_pass_on_cpu() -> None:
    model = build("parcae-micro", seed=0).eval()
    passed = _profile(_forward(model, torch.randint(0, 256, (2, 16))))
    assert passed.region_tool.startswith("region labels as wall-clock intervals") and passed.region_wall_s
    assert len(passed.breakdown.loop_ms) == LOOPS and passed.breakdown.coverage > 0.5
    overhead = pd.DataFrame(profiling.pass_rows(passed, timed_median_s=1e-3))
    assert set(overhead.loc[overhead["metric"] == "profile_overhead", "stat"]) == {"trace", "regions"}
