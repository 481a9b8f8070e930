"""`backend = "numba"` as a profile axis: prefill and decode cells of every family run through the same
workload code as torch cells and give real throughput rows (in-process here; the runner adds only the
subprocess around it)."""

from __future__ import annotations

import math

import pytest

from loopscope.bench.context import RunContext
from loopscope.bench.matrix import expand
from loopscope.bench.workloads import run_workload
from loopscope.profiles.loader import load_profile

PROFILE = """
[profile]
calibration = "quick"
[measure]
min_time_s = 0.01
min_count = 2
energy = false
[decode]
prompt_len = 8
new_tokens = 4
[[sweep]]
model = ["gpt-micro", "parcae-micro", "rdm-micro", "looped-micro", "ut-micro"]
workload = "prefill"
backend = "numba"
batch = 2
seq_len = 16
loops_test = 2
[[sweep]]
model = ["parcae-micro", "looped-micro"]
workload = "decode"
backend = "numba"
loops_test = 2
kv_policy = ["per-loop", "last-loop"]
"""


@pytest.fixture(scope="module")
def cells(tmp_path_factory):
    path = tmp_path_factory.mktemp("profile") / "numba.toml"
    path.write_text(PROFILE)
    return expand(load_profile(str(path)))


def test_every_family_runs_as_a_numba_cell(cells, tmp_path):
    ctx = RunContext(run_dir=str(tmp_path))
    seen = set()
    for cell in cells:
        result = run_workload(cell, ctx)
        assert result.status == "ok", (cell.label, result.reason)
        tps = [r for r in result.rows if r["metric"] == "tokens_per_s"]
        assert tps and all(math.isfinite(r["value"]) and r["value"] > 0 for r in tps), cell.label
        seen.add((cell.family, cell.workload, cell.kv_policy))
    assert {f for f, w, _ in seen if w == "prefill"} == {"gpt", "parcae", "rdm", "looped", "ut"}
    assert {(f, p) for f, w, p in seen if w == "decode"} == {(f, p) for f in ("parcae", "looped")
                                                            for p in ("per-loop", "last-loop")}
