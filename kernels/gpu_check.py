"""The prepared device check for a machine with an NVIDIA GPU (issue #6): numba-cuda correctness on the real
GPU, then speed against torch CUDA eager, synchronised, written as one JSON file for runs/reference/.

    python -m loopscope.kernels.gpu_check --out runs/reference/numba_cuda_gpu.json [--quick]

Correctness runs tests/kernels_cuda_cases.py (the simulator cases) without the simulator. Timing uses CUDA
events on both sides (numba.cuda.event / torch.cuda.Event) after a warm-up call, best and median of N.
On a machine without a GPU it writes a record that says so and exits 2.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

F32 = np.float32
REPO = Path(__file__).resolve().parents[1]


def _correctness() -> dict[str, Any]:
    env = {k: v for k, v in os.environ.items() if k != "NUMBA_ENABLE_CUDASIM"}
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                           str(REPO / "tests" / "kernels_cuda_cases.py")], env=env, capture_output=True, text=True,
                          timeout=900)
    return {"returncode": proc.returncode, "summary": proc.stdout.strip().splitlines()[-1:] or [""],
            "seconds": time.perf_counter() - t0, "tail": proc.stdout[-3000:] + proc.stderr[-2000:]}


def _time_numba(fn: Any, reps: int) -> list[float]:
    from numba import cuda

    fn()
    cuda.synchronize()
    out = []
    for _ in range(reps):
        start, end = cuda.event(), cuda.event()
        start.record()
        fn()
        end.record()
        end.synchronize()
        out.append(cuda.event_elapsed_time(start, end) / 1e3)
    return out


def _time_torch(fn: Any, reps: int) -> list[float]:
    import torch

    fn()
    torch.cuda.synchronize()
    out = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        out.append(start.elapsed_time(end) / 1e3)
    return out


def _pair(name: str, numba_s: list[float], torch_s: list[float], work: float, unit: str) -> dict[str, Any]:
    n_med, t_med = statistics.median(numba_s), statistics.median(torch_s)
    return {"name": name, "numba_ms": n_med * 1e3, "torch_ms": t_med * 1e3, "numba_best_ms": min(numba_s) * 1e3,
            "torch_best_ms": min(torch_s) * 1e3, f"numba_{unit}": work / n_med, f"torch_{unit}": work / t_med,
            "time_ratio_numba_vs_torch": n_med / t_med}


DECODE_STEPS = 16


def _numba_decode(engine: Any, prompt: np.ndarray) -> None:
    cache = engine.new_cache(1, prompt.shape[1] + DECODE_STEPS)
    engine.prefill(prompt, cache=cache)
    for s in range(DECODE_STEPS):
        engine.decode_step(np.array([s]), cache)


def _torch_decode(model: Any, prompt: np.ndarray) -> None:
    import torch

    from loopscope.models import KVCache

    cache = KVCache(prompt.shape[1] + DECODE_STEPS)
    model(torch.from_numpy(prompt).cuda(), cache=cache)
    for s in range(DECODE_STEPS):
        model(torch.tensor([[s]], device="cuda"), cache=cache)


def _speed(quick: bool) -> list[dict[str, Any]]:
    import torch
    import torch.nn.functional as F
    from numba import cuda

    from loopscope.kernels import ops_cuda
    from loopscope.kernels.bench import bench_configs
    from loopscope.kernels.engine_cuda import CudaEngine
    from loopscope.models import build

    reps = 5 if quick else 20
    rng = np.random.default_rng(0)
    rows = []
    m, k, n = 4096, 1024, 4096
    x, w = rng.standard_normal((m, k)).astype(F32), rng.standard_normal((n, k)).astype(F32)
    dx, dw, dout = cuda.to_device(x), cuda.to_device(w), cuda.device_array((m, n), np.float32)
    tx, tw = torch.from_numpy(x).cuda(), torch.from_numpy(w).cuda()
    rows.append(_pair(f"matmul {m}x{k}x{n} fp32", _time_numba(lambda: ops_cuda.launch_matmul(dx, dw, dout), reps),
                      _time_torch(lambda: F.linear(tx, tw), reps), 2.0 * m * n * k / 1e9, "gflop_per_s"))
    B, T, H, hd = 4, 512, 8, 64
    qkv = rng.standard_normal((B * T, 3 * H * hd)).astype(F32)
    dqkv = cuda.to_device(qkv)
    dk, dv = cuda.device_array((B, H, T, hd), np.float32), cuda.device_array((B, H, T, hd), np.float32)
    datt = cuda.device_array((B * T, H * hd), np.float32)
    grid, block = ops_cuda.grid_2d(B * T, H)
    ops_cuda.store_kv_kernel[grid, block](dqkv, T, 0, H, hd, dk, dv)
    tq, tk, tv = (torch.from_numpy(np.ascontiguousarray(qkv[:, i * H * hd:(i + 1) * H * hd])).cuda()
                  .view(B, T, H, hd).transpose(1, 2) for i in range(3))
    flops = 4.0 * B * H * hd * T * (T + 1) / 2 / 1e9
    rows.append(_pair(f"causal attention B{B} T{T} H{H} hd{hd}",
                      _time_numba(lambda: ops_cuda.launch_attention(dqkv, T, 0, H, hd, dk, dv, datt), reps),
                      _time_torch(lambda: F.scaled_dot_product_attention(tq, tk, tv, is_causal=True), reps),
                      flops, "gflop_per_s"))
    shapes = ((256, 4, 8, 256),) if quick else ((256, 4, 8, 256), (512, 8, 4, 512))
    for d, heads, batch, seq in shapes:
        for name, cfg in bench_configs(d, heads, seq).items():
            model = build(cfg, seed=0).eval()
            engine = CudaEngine.from_model(model)
            model = model.cuda()
            idx = np.random.default_rng(1).integers(0, 256, (batch, seq))
            t_idx = torch.from_numpy(idx).cuda()
            with torch.inference_mode():
                rows.append(_pair(f"prefill {name} B{batch} T{seq}",
                                  _time_numba(lambda e=engine, i=idx: e.prefill(i), reps),
                                  _time_torch(lambda mm=model, i=t_idx: mm(i), reps), batch * seq, "tokens_per_s"))
                rows.append(_pair(f"prompt 64 + decode {DECODE_STEPS} {name} B1",
                                  _time_numba(lambda e=engine, i=idx: _numba_decode(e, i[:1, :64]), 3),
                                  _time_torch(lambda mm=model, i=idx: _torch_decode(mm, i[:1, :64]), 3),
                                  64 + DECODE_STEPS, "tokens_per_s"))
    return rows


def _package_version(name: str) -> str:
    from importlib import metadata

    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "not installed (numba's built-in CUDA target)"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="JSON file to write")
    parser.add_argument("--quick", action="store_true", help="fewer repetitions and shapes")
    args = parser.parse_args(argv)
    record: dict[str, Any] = {"started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    try:
        from numba import cuda

        available = cuda.is_available()
    except Exception as err:  # noqa: BLE001 - recorded, not hidden
        available, record["cuda_error"] = False, repr(err)
    record["cuda_available"] = bool(available)
    if not available:
        record["status"] = "unavailable"
        record["reason"] = record.get("cuda_error", "numba.cuda.is_available() is False")
    if available:
        import numba
        import torch

        name = cuda.get_current_device().name
        record["device"] = name.decode() if isinstance(name, bytes) else str(name)
        record["versions"] = {"numba": numba.__version__, "torch": torch.__version__, "numpy": np.__version__,
                              "numba_cuda": _package_version("numba-cuda"),
                              "implementation": getattr(cuda, "implementation", "?")}
        try:  # the loopscope cell's own probe: one token through the engine compiles every kernel it uses
            from loopscope.bench.engines import NumbaCudaBackend
            from loopscope.models import build

            NumbaCudaBackend().build_engine(build("gpt-micro", seed=0).eval())
        except Exception as err:  # noqa: BLE001 - the reason a numba-cuda cell would give
            record["status"], record["reason"] = "unavailable", f"{type(err).__name__}: {err}"[:2000]
        else:
            record["status"] = "ok"
            record["correctness"] = _correctness()
            record["speed"] = _speed(args.quick)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=2, default=str))
    print(json.dumps({k: v for k, v in record.items() if k != "speed"}, indent=2, default=str)[:4000])
    for row in record.get("speed", []):
        print(row)
    if not available:
        return 2
    if record["status"] != "ok":
        return 1
    return 0 if record["correctness"]["returncode"] == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
