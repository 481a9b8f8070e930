"""What this machine and software stack are, for the run manifest: a result is only comparable with
results from the same fingerprint. Everything returned is JSON-serialisable; a part that cannot be read
is None or carries a `reason`, never a guess.

Also GPU health snapshots (temperature, clocks, clock-event "throttle" reasons) taken before and after a
GPU pass, and `is_throttled(before, after)` to flag the rows of a pass that ran with reduced clocks.
"""

from __future__ import annotations

import os
import platform
import subprocess
import sys
import time
from collections.abc import Mapping
from importlib import metadata
from typing import Any

from loopscope.bench.meters import nvml as nvml_seam
from loopscope.profiles.detect import NO_GPU_NODE, detect_device_class, gpu_device_nodes

ENV_PREFIXES: tuple[str, ...] = ("OPENBLAS_", "OMP_", "MKL_", "NUMBA_", "KMP_", "GOMP_")
ENV_NAMES: tuple[str, ...] = ("CUDA_VISIBLE_DEVICES", "CUDA_DEVICE_ORDER", "PYTORCH_CUDA_ALLOC_CONF",
                              "CUBLAS_WORKSPACE_CONFIG", "TORCHINDUCTOR_CACHE_DIR")
VERSIONED_PACKAGES: tuple[str, ...] = ("loopscope", "torch", "numba", "llvmlite", "numpy", "scipy", "pandas",
                                       "nvidia-ml-py", "triton")


def fingerprint(*, nvml: Any = None, cwd: str | None = None, env: Mapping[str, str] | None = None,
                torch_cuda: Any = None) -> dict[str, Any]:
    """The machine and software fingerprint (see module docstring). Arguments are test seams."""
    env = os.environ if env is None else env
    device_class = detect_device_class(nvml=nvml, torch_cuda=torch_cuda)
    return {
        "created_unix_s": time.time(),
        "platform": platform_info(),
        "cpu": cpu_info(),
        "memory": memory_info(),
        "gpus": gpu_info(nvml=nvml),
        "device_class": device_class.name,
        "device_class_reason": device_class.reason,
        "device": device_class.device,
        "versions": versions(),
        "torch": torch_info(),
        "threads": thread_info(),
        "env": thread_env(env),
        "git": git_state(cwd),
    }


# --- host ------------------------------------------------------------------------------------------------
def platform_info() -> dict[str, Any]:
    return {"system": platform.system(), "release": platform.release(), "machine": platform.machine(),
            "hostname": platform.node(), "python_implementation": platform.python_implementation()}


def cpu_info(cpuinfo_path: str = "/proc/cpuinfo") -> dict[str, Any]:
    """CPU model, logical/physical/usable cores, ISA extensions that matter for GEMM, frequency governor."""
    model, flags, cores = None, set(), set()
    physical_id = "0"
    try:
        with open(cpuinfo_path) as f:
            for line in f:
                key, _, value = (part.strip() for part in line.partition(":"))
                if key == "model name" and model is None:
                    model = value
                elif key == "flags" and not flags:
                    flags = set(value.split())
                elif key == "physical id":
                    physical_id = value
                elif key == "core id":
                    cores.add((physical_id, value))
    except OSError:
        pass
    try:
        usable = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        usable = os.cpu_count()
    wanted = ("avx2", "fma", "avx512f", "avx512_bf16", "avx512_fp16", "amx_bf16", "amx_tile", "asimd", "sve")
    isa = [f for f in wanted if f in flags]
    return {
        "model": model or platform.processor() or None,
        "logical_cores": os.cpu_count(),
        "physical_cores": len(cores) or None,
        "usable_cores": usable,
        "isa": isa,
        "governor": _read_text("/sys/devices/system/cpu/cpu0/cpufreq/scaling_governor"),
        "hypervisor": "hypervisor" in flags,
    }


def memory_info(meminfo_path: str = "/proc/meminfo") -> dict[str, Any]:
    values: dict[str, int] = {}
    try:
        with open(meminfo_path) as f:
            for line in f:
                key, _, rest = line.partition(":")
                parts = rest.split()
                if key in ("MemTotal", "MemAvailable", "SwapTotal") and parts:
                    values[key] = int(parts[0]) * 1024
    except (OSError, ValueError):
        pass
    return {"total_bytes": values.get("MemTotal"), "available_bytes": values.get("MemAvailable"),
            "swap_total_bytes": values.get("SwapTotal")}


def _read_text(path: str) -> str | None:
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return None


# --- GPUs -------------------------------------------------------------------------------------------------
def gpu_info(*, nvml: Any = None) -> dict[str, Any]:
    """Driver/CUDA versions; per NVML device: name, UUID, memory, clocks, power limit, MIG, persistence."""
    try:
        with nvml_seam.nvml_session(nvml) as lib:
            errors = nvml_seam.error_types(lib)
            info: dict[str, Any] = {
                "available": True,
                "driver_version": _nvml_call(lib, errors, lambda: nvml_seam.decode(
                    lib.nvmlSystemGetDriverVersion())),
                "cuda_driver_version": _nvml_call(lib, errors, lambda: _cuda_version_string(
                    lib.nvmlSystemGetCudaDriverVersion())),
                "devices": [],
            }
            for index in range(lib.nvmlDeviceGetCount()):
                info["devices"].append(_gpu_device(lib, errors, lib.nvmlDeviceGetHandleByIndex(index), index))
            return info
    except nvml_seam.NvmlUnavailable as exc:
        return {"available": False, "reason": str(exc), "devices": []}


def _gpu_device(lib: Any, errors: tuple, handle: Any, index: int) -> dict[str, Any]:
    def call(fn):
        return _nvml_call(lib, errors, fn)

    def mig_mode():
        current, pending = lib.nvmlDeviceGetMigMode(handle)
        return {"current": "enabled" if current == 1 else "disabled",
                "pending": "enabled" if pending == 1 else "disabled"}

    memory = call(lambda: lib.nvmlDeviceGetMemoryInfo(handle))
    return {
        "index": index,
        "name": call(lambda: nvml_seam.decode(lib.nvmlDeviceGetName(handle))),
        "uuid": call(lambda: nvml_seam.decode(lib.nvmlDeviceGetUUID(handle))),
        "memory_total_bytes": getattr(memory, "total", None),
        "compute_capability": call(
            lambda: ".".join(map(str, lib.nvmlDeviceGetCudaComputeCapability(handle)))),
        "sm_clock_mhz": call(lambda: lib.nvmlDeviceGetClockInfo(handle, nvml_seam.NVML_CLOCK_SM)),
        "mem_clock_mhz": call(lambda: lib.nvmlDeviceGetClockInfo(handle, nvml_seam.NVML_CLOCK_MEM)),
        "max_sm_clock_mhz": call(lambda: lib.nvmlDeviceGetMaxClockInfo(handle, nvml_seam.NVML_CLOCK_SM)),
        "max_mem_clock_mhz": call(lambda: lib.nvmlDeviceGetMaxClockInfo(handle, nvml_seam.NVML_CLOCK_MEM)),
        "power_limit_w": call(lambda: lib.nvmlDeviceGetPowerManagementLimit(handle) / 1000.0),
        "mig_mode": call(mig_mode),
        "persistence_mode": call(lambda: bool(lib.nvmlDeviceGetPersistenceMode(handle))),
        "temperature_c": call(lambda: lib.nvmlDeviceGetTemperature(handle, nvml_seam.NVML_TEMPERATURE_GPU)),
    }


def _nvml_call(lib: Any, errors: tuple, fn) -> Any:
    """One NVML query; None when the driver or the bindings do not support it."""
    try:
        return fn()
    except (*errors, AttributeError, TypeError, ValueError):
        return None


def _cuda_version_string(version: int) -> str:
    """NVML encodes CUDA 12.4 as 12040."""
    return f"{version // 1000}.{(version % 1000) // 10}"


def gpu_health(nvml: Any = None, *, device: str = "cuda:0") -> dict[str, Any]:
    """Temperature, SM clock, power and clock-event reasons of one GPU now (before/after a GPU pass)."""
    snapshot: dict[str, Any] = {"device": device, "time_unix_s": time.time()}
    try:
        with nvml_seam.nvml_session(nvml) as lib:
            errors = nvml_seam.error_types(lib)
            try:
                handle = nvml_seam.device_handle(lib, device)
            except errors as exc:
                raise nvml_seam.NvmlUnavailable(f"no NVML handle for {device} ({exc})") from exc
            snapshot["available"] = True
            snapshot["temperature_c"] = _nvml_call(
                lib, errors, lambda: lib.nvmlDeviceGetTemperature(handle, nvml_seam.NVML_TEMPERATURE_GPU))
            snapshot["sm_clock_mhz"] = _nvml_call(
                lib, errors, lambda: lib.nvmlDeviceGetClockInfo(handle, nvml_seam.NVML_CLOCK_SM))
            snapshot["power_w"] = _nvml_call(
                lib, errors, lambda: lib.nvmlDeviceGetPowerUsage(handle) / 1000.0)
            try:
                snapshot["throttle_reasons"] = nvml_seam.throttle_reason_names(
                    nvml_seam.current_throttle_mask(lib, handle))
            except nvml_seam.NvmlUnavailable as exc:
                snapshot["throttle_reasons"] = None
                snapshot["throttle_reasons_unavailable"] = str(exc)
    except nvml_seam.NvmlUnavailable as exc:
        snapshot["available"] = False
        snapshot["reason"] = str(exc)
    return snapshot


def is_throttled(before: Mapping[str, Any], after: Mapping[str, Any]) -> bool:
    """True when either snapshot shows a reason that holds clocks down (power cap, thermal, HW slowdown...).
    Idle, application-clock settings and sync boost do not count; missing data is not evidence."""
    for snapshot in (before, after):
        reasons = snapshot.get("throttle_reasons") or []
        if any(reason in nvml_seam.THROTTLING_REASONS for reason in reasons):
            return True
    return False


# --- software -----------------------------------------------------------------------------------------------
def versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {"python": platform.python_version()}
    for package in VERSIONED_PACKAGES:
        try:
            out[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            out[package] = None
    return out


def torch_info() -> dict[str, Any]:
    if "torch" not in sys.modules and not gpu_device_nodes():
        return torch_build_info()
    try:
        import torch
    except ImportError as exc:
        return {"available": False, "reason": str(exc)}
    cuda_ok = torch.cuda.is_available()
    return {
        "version": torch.__version__,
        "cuda_build": torch.version.cuda,
        "hip_build": getattr(torch.version, "hip", None),
        "cudnn": torch.backends.cudnn.version() if cuda_ok else None,
        "cuda_available": cuda_ok,
        "cuda_device_count": torch.cuda.device_count() if cuda_ok else 0,
        "tf32_matmul": bool(torch.backends.cuda.matmul.allow_tf32),
        "float32_matmul_precision": torch.get_float32_matmul_precision(),
    }


def torch_build_info() -> dict[str, Any]:
    """torch's version and build, read from its installed files without importing it (no GPU node here,
    so no CUDA device either); its runtime settings are those of each worker, which sets its own."""
    import ast
    from importlib.util import find_spec

    try:
        spec = find_spec("torch")
    except (ImportError, ValueError) as exc:
        return {"available": False, "reason": str(exc)}
    if spec is None or not spec.submodule_search_locations:
        return {"available": False, "reason": "torch is not installed"}
    build: dict[str, Any] = {}
    path = os.path.join(next(iter(spec.submodule_search_locations)), "version.py")
    try:
        for node in ast.parse(open(path, encoding="utf-8").read()).body:
            target = node.targets[0] if isinstance(node, ast.Assign) else getattr(node, "target", None)
            if isinstance(target, ast.Name) and isinstance(getattr(node, "value", None), ast.Constant):
                build[target.id] = node.value.value
    except (OSError, SyntaxError) as exc:
        return {"available": True, "reason": f"{path}: cannot read the build ({exc})"}
    return {"version": build.get("__version__"), "cuda_build": build.get("cuda"),
            "hip_build": build.get("hip"), "cudnn": None, "cuda_available": False,
            "cuda_device_count": 0, "read_from": f"{path} (torch not imported: {NO_GPU_NODE})"}


def thread_info() -> dict[str, Any]:
    """Thread pools as configured. Numba's layer is reported only if already initialised: querying
    numba.get_num_threads() would itself launch the thread pool and pick a layer."""
    out: dict[str, Any] = {}
    if "torch" not in sys.modules and not gpu_device_nodes():
        out["torch_num_threads"] = None
        out["torch_threads_note"] = "torch is imported only by the cell workers; see workers.threads"
    else:
        try:
            import torch

            out["torch_num_threads"] = torch.get_num_threads()
            out["torch_num_interop_threads"] = torch.get_num_interop_threads()
        except ImportError:
            out["torch_num_threads"] = None
    if "numba" not in sys.modules:  # importing numba costs a tenth of a second; its config is the env's
        out["numba_num_threads_config"] = int(os.environ.get("NUMBA_NUM_THREADS") or os.cpu_count() or 1)
        out["numba_threading_layer_config"] = os.environ.get("NUMBA_THREADING_LAYER", "default")
        out["numba_threading_layer"] = "not initialised (numba not imported in this process)"
        out["blas_pools"] = _threadpool_summary()
        return out
    try:
        import numba
        from numba.np.ufunc import parallel as numba_parallel

        out["numba_num_threads_config"] = numba.config.NUMBA_NUM_THREADS
        out["numba_threading_layer_config"] = numba.config.THREADING_LAYER
        try:
            out["numba_threading_layer"] = numba.threading_layer()
            out["numba_num_threads"] = numba_parallel.get_num_threads()
        except ValueError:
            out["numba_threading_layer"] = "not initialised (no parallel numba function has run yet)"
    except ImportError:
        out["numba_num_threads_config"] = None
    out["blas_pools"] = _threadpool_summary()
    return out


def _threadpool_summary() -> list[dict[str, Any]] | None:
    """BLAS/OpenMP pools loaded now (library, version, threads, kernel architecture), via threadpoolctl."""
    try:
        from threadpoolctl import threadpool_info
    except ImportError:
        return None
    keys = ("user_api", "internal_api", "version", "num_threads", "architecture", "threading_layer")
    return [{k: pool.get(k) for k in keys if k in pool} for pool in threadpool_info()]


def thread_env(env: Mapping[str, str]) -> dict[str, str]:
    """Environment variables that change threading or numerics (OPENBLAS_*, OMP_*, MKL_*, NUMBA_*, ...)."""
    return {k: env[k] for k in sorted(env) if k.startswith(ENV_PREFIXES) or k in ENV_NAMES}


def git_state(cwd: str | None = None) -> dict[str, Any] | None:
    """{"commit": sha or None (no commits yet), "dirty": bool} of the repo containing `cwd`; None outside git.
    Untracked files that git does not ignore make the tree dirty: they can change what runs."""
    cwd = cwd or os.getcwd()

    def git(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, timeout=10)

    try:
        inside = git("rev-parse", "--is-inside-work-tree")
    except (OSError, subprocess.TimeoutExpired):
        return None
    if inside.returncode != 0 or inside.stdout.strip() != "true":
        return None
    head = git("rev-parse", "--verify", "--quiet", "HEAD")
    status = git("status", "--porcelain")
    return {
        "commit": head.stdout.strip() if head.returncode == 0 else None,
        "dirty": bool(status.stdout.strip()) if status.returncode == 0 else None,
        "root": git("rev-parse", "--show-toplevel").stdout.strip() or None,
    }


if __name__ == "__main__":  # `python -m loopscope.bench.fingerprint` prints it
    import json

    json.dump(fingerprint(), sys.stdout, indent=2, default=str)
    print()
