"""The backend table (bench/backends.py) against what really runs (bench/engines.py).

Every (backend, workload, device, dtype) combination is either declared and runs, its rows naming the engine
that ran, or is refused at expand time with one line. CPU combinations run here for real (torch.compile with
the "aot_eager" compiler: the same Dynamo capture without code generation; inductor itself is exercised in
tests/test_compiled.py); numba-cuda runs under the numba CUDA simulator; torch on a CUDA device needs a GPU.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from loopscope.bench.backends import ALL_DTYPES, BACKENDS, DEVICE_KINDS, declared_combinations, refusal
from loopscope.bench.errors import ConfigError
from loopscope.bench.matrix import expand
from loopscope.profiles.loader import load_profile

WORKLOADS = ("train", "eval", "prefill", "decode", "kernels")
SETTINGS = """
[profile]
calibration = "off"
[data]
max_bytes = 20000
[train]
tokens = 512
batch = 2
seq_len = 16
[eval]
max_tokens = 64
seeds = 1
batch = 2
[measure]
min_time_s = 0.0
min_count = 1
warmup = 1
energy = false
memory = false
[decode]
prompt_len = 6
new_tokens = 3
"""


def _profile(tmp_path: Path, body: str, name: str = "p.toml"):
    path = tmp_path / name
    path.write_text(SETTINGS + body)
    return load_profile(str(path))


def _sweep(backend: str, workloads: list[str], device: str, dtype: str, model: str = "parcae-micro") -> str:
    return (f'[[sweep]]\nmodel = "{model}"\nworkload = {json.dumps(workloads)}\nbackend = "{backend}"\n'
            f'device = "{device}"\ndtype = "{dtype}"\nbatch = 2\nseq_len = 16\nloops_test = 2\n'
            'kv_policy = "per-loop"\n')


def test_the_table_imports_no_torch():
    code = ("import sys; import loopscope.bench.backends, loopscope.profiles.loader; "
            "assert 'torch' not in sys.modules, 'torch imported'")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_torch_compile_has_one_spelling(tmp_path):
    profile = _profile(tmp_path, '[[sweep]]\nmodel = "gpt-micro"\nworkload = "prefill"\n'
                                 'backend = ["torch.compile", "torch-compile", "inductor"]\n')
    assert profile.sweeps[0]["backend"] == ["torch-compile"] * 3
    assert {c.backend for c in expand(profile)} == {"torch-compile"}
    assert BACKENDS["torch-compile"].aliases and "torch.compile" not in BACKENDS


@pytest.mark.parametrize("backend,workload,device,dtype", [
    c for c in itertools.product(BACKENDS, WORKLOADS, DEVICE_KINDS, ALL_DTYPES) if refusal(*c) is not None])
def test_undeclared_combination_is_refused_at_expand_with_one_line(tmp_path, backend, workload, device, dtype):
    workloads = ["train", "eval"] if workload == "eval" else [workload]  # eval needs its train cell
    profile = _profile(tmp_path, _sweep(backend, workloads, device, dtype))
    with pytest.raises(ConfigError) as err:
        expand(profile)
    lines = [ln for ln in str(err.value).splitlines() if refusal(backend, workload, device, dtype) in ln]
    assert len(lines) == 1, str(err.value)
    assert str(profile.path) in lines[0] and repr(backend) in lines[0]


def _expected_engine(backend: str) -> str:
    return {"torch": "torch-eager", "torch-compile": "torch.compile(aot_eager", "numba": "NumbaEngine",
            "numba-cuda": "CudaEngine (numba CUDA simulator)"}[backend]


def _run_cells(tmp_path: Path, backend: str, workload: str, device: str, dtype: str):
    from loopscope.bench.context import RunContext
    from loopscope.bench.workloads import run_workload

    workloads = ["train", "eval"] if workload == "eval" else [workload]
    cells = expand(_profile(tmp_path, _sweep(backend, workloads, device, dtype)))
    ctx = RunContext(run_dir=str(tmp_path))
    ctx.checkpoints_dir.mkdir(exist_ok=True)
    return [(cell, run_workload(cell, ctx)) for cell in cells]


# float32 runs by default; the other dtypes (slower on a CPU) under the `slow` marker
CPU_DECLARED = [pytest.param(*c, marks=() if c[3] == "float32" else pytest.mark.slow)
                for c in declared_combinations() if c[2] == "cpu" and c[1] != "kernels"]


@pytest.mark.parametrize("backend,workload,device,dtype", CPU_DECLARED)
def test_declared_cpu_combination_runs_and_names_its_engine(tmp_path, monkeypatch, backend, workload, device,
                                                            dtype):
    import torch._dynamo

    monkeypatch.setattr("loopscope.models.compiled.COMPILER", "aot_eager")
    torch._dynamo.reset()
    for cell, result in _run_cells(tmp_path, backend, workload, device, dtype):
        assert result.status == "ok", (cell.label, result.reason)
        assert result.rows
        engines = {r.get("engine") for r in result.rows}
        assert len(engines) == 1 and engines.pop().startswith(_expected_engine(backend)), (cell.label, engines)
        if cell.workload in ("prefill", "decode"):
            tps = [r["value"] for r in result.rows if r["metric"] == "tokens_per_s"]
            assert tps and all(math.isfinite(v) and v > 0 for v in tps)


def test_kernels_cell_rows_name_the_engine_of_each_case():
    from loopscope.bench.workloads.kernels import tidy

    rows = [{"metric": "time_ms", "stat": "", "value": 1.0, "unit": "ms", "backend": "torch.compile",
             "case": "rmsnorm"}, {"metric": "time_ms", "stat": "", "value": 2.0, "unit": "ms",
                                  "backend": "numba", "case": "rmsnorm"}]
    out = tidy(rows)
    assert [r["engine"] for r in out.rows if r["metric"] == "time_ms"] == ["torch-compile", "numba"]


def test_compile_that_makes_no_graph_is_not_reported_as_compiled(tmp_path, monkeypatch):
    """The engine comes from the object: a torch.compile that falls back to eager says so."""
    import torch
    import torch._dynamo

    torch._dynamo.reset()  # no compiled code left from earlier tests in this process
    monkeypatch.setattr(torch, "compile", lambda model, **kw: model)
    [(cell, result)] = _run_cells(tmp_path, "torch-compile", "prefill", "cpu", "float32")
    assert {r["engine"] for r in result.rows} == {"torch-eager (torch.compile made no graph)"}


def test_numba_cuda_without_a_gpu_is_unavailable_not_ok(tmp_path):
    """On this machine numba sees no GPU: the worker writes `unavailable` with the reason, no numbers."""
    if os.environ.get("NUMBA_ENABLE_CUDASIM") == "1":
        pytest.skip("the simulator provides a GPU")
    from loopscope.bench.context import RunContext

    [cell] = expand(_profile(tmp_path, _sweep("numba-cuda", ["prefill"], "cuda", "float32", "gpt-micro")))
    job = tmp_path / "job"
    job.mkdir()
    (job / "cell.json").write_text(json.dumps(cell.to_dict()))
    (job / "context.json").write_text(json.dumps(RunContext(run_dir=str(tmp_path)).to_dict()))
    code = f"import sys; from loopscope.bench.worker import main; sys.exit(main({str(job)!r}))"
    env = {k: v for k, v in os.environ.items() if k != "NUMBA_ENABLE_CUDASIM"}
    subprocess.run([sys.executable, "-c", code], check=True, env=env, capture_output=True)
    record = json.loads((job / "result.json").read_text())
    assert record["status"] == "unavailable", record
    assert "numba-cuda" in record["reason"] and record["rows"] == []


SIM_CASE = r"""
import json, sys
from pathlib import Path
from loopscope.bench.context import RunContext
from loopscope.bench.matrix import expand
from loopscope.bench.workloads import run_workload
from loopscope.profiles.loader import load_profile
out = []
for cell in expand(load_profile(sys.argv[1])):
    result = run_workload(cell, RunContext(run_dir=sys.argv[2]))
    out.append({"workload": cell.workload, "status": result.status,
                "engines": sorted({r.get("engine") for r in result.rows}),
                "tps": [r["value"] for r in result.rows if r["metric"] == "tokens_per_s"]})
print(json.dumps(out))
"""


# numba-cuda's cells run under the numba CUDA simulator, minutes each on 2 cores: they are in
# tests/benchmarks/test_backends_cuda_seam.py (`tox -e benchmarks`); torch on CUDA needs a real GPU.
@pytest.mark.parametrize("backend,workload,device,dtype", [c for c in declared_combinations() if c[2] == "cuda"])
def test_declared_cuda_combination_runs_through_a_seam(tmp_path, backend, workload, device, dtype):
    if backend == "numba-cuda" and not os.environ.get("LOOPSCOPE_CUDASIM_CELLS"):
        pytest.skip("numba-cuda cells under the CUDA simulator run with tox -e benchmarks "
                    "(tests/benchmarks/test_backends_cuda_seam.py)")
    if backend != "numba-cuda":
        import torch

        if not torch.cuda.is_available():
            pytest.skip(f"{backend} {workload} on cuda {dtype}: needs a CUDA GPU (not measured here)")
        [(cell, result)] = _run_cells(tmp_path, backend, workload, device, dtype)[-1:]
        assert result.status == "ok"
        return
    body = _sweep(backend, [workload], device, dtype, "gpt-micro").replace("batch = 2", "batch = 1")
    profile = _profile(tmp_path, body.replace("seq_len = 16", "seq_len = 8"))
    env = {**os.environ, "NUMBA_ENABLE_CUDASIM": "1"}
    proc = subprocess.run([sys.executable, "-c", SIM_CASE, profile.path, str(tmp_path)], env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    [record] = json.loads(proc.stdout.strip().splitlines()[-1])
    assert record["status"] == "ok"
    assert record["engines"] == [_expected_engine(backend)]
    assert record["tps"] and all(v > 0 for v in record["tps"])


def test_numba_cuda_that_cannot_compile_is_unavailable_with_the_error(monkeypatch):
    """The H200 failure (numpy 2.5 without row_stack inside numba-cuda's compiler) becomes the reason."""
    from loopscope.bench.backends import BackendUnavailable
    from loopscope.bench.engines import NumbaCudaBackend

    class BrokenEngine:
        @classmethod
        def from_model(cls, model):
            return cls()

        def prefill(self, tokens, **kwargs):
            raise AttributeError("module 'numpy' has no attribute 'row_stack'")

    backend = NumbaCudaBackend()
    monkeypatch.setattr(backend, "engine_class", lambda: BrokenEngine)
    with pytest.raises(BackendUnavailable, match="cannot compile.*row_stack"):
        backend.build_engine(object())


def test_gpu_smoke_profile_covers_every_gpu_path():
    cells = expand(load_profile("gpu-smoke"))
    assert {c.device for c in cells} == {"cuda"}
    trained = {c.model for c in cells if c.workload == "train"}
    assert trained == {"gpt-140m", "parcae-140m"} and {c.model for c in cells if c.workload == "eval"} == trained
    for workload in ("prefill", "decode"):
        got = {(c.model, c.backend) for c in cells if c.workload == workload}
        assert got == {(m, b) for m in ("gpt-140m", "parcae-140m", "gpt-1.3b", "parcae-1.3b")
                       for b in ("torch", "torch-compile", "numba-cuda")}, workload
