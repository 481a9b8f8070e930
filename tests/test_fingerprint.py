"""fingerprint(): JSON-safe, GPU facts via a fake NVML, env filtering, git state, GPU health/throttling."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from loopscope.bench import fingerprint as fp
from tests.fake_nvml import FakeGPU, FakeNVML, FakeTorchCuda


def test_fingerprint_is_json_and_has_the_manifest_fields(tmp_path: Path):
    info = fp.fingerprint(nvml=FakeNVML(), cwd=str(tmp_path), env={"OMP_NUM_THREADS": "2"},
                          torch_cuda=FakeTorchCuda([("NVIDIA H200", 150_000_000_000)]))
    text = json.dumps(info, allow_nan=False)  # strict JSON: no NaN, no objects
    assert json.loads(text) == info
    for key in ("cpu", "memory", "gpus", "device_class", "device_class_reason", "versions", "torch",
                "threads", "env", "git"):
        assert key in info, key
    assert info["device_class"] == "datacenter-gpu" and info["device"] == "cuda:0"
    assert info["cpu"]["logical_cores"] >= 1 and info["memory"]["total_bytes"] > 0
    assert info["versions"]["torch"] and info["versions"]["numpy"] and info["versions"]["python"]
    assert info["threads"]["torch_num_threads"] >= 1
    assert info["env"] == {"OMP_NUM_THREADS": "2"}
    assert info["git"] is None  # tmp_path is not a repository


def test_gpu_info_from_fake_nvml():
    gpus = fp.gpu_info(nvml=FakeNVML([FakeGPU(mig_mode=(1, 0), unsupported={"max_clock"})]))
    assert gpus["available"] and gpus["driver_version"] == "550.54.15"
    assert gpus["cuda_driver_version"] == "12.4"
    (dev,) = gpus["devices"]
    assert dev["name"] == "NVIDIA H200"  # bytes decoded
    assert dev["memory_total_bytes"] == 150_000_000_000 and dev["compute_capability"] == "9.0"
    assert dev["power_limit_w"] == 700.0 and dev["sm_clock_mhz"] == 1980 and dev["persistence_mode"] is True
    assert dev["mig_mode"] == {"current": "enabled", "pending": "disabled"}
    assert dev["max_sm_clock_mhz"] is None  # a query the driver does not support is None, not a guess


def test_gpu_info_without_nvml():
    gpus = fp.gpu_info(nvml=FakeNVML(init_error="NVML Shared Library Not Found"))
    assert gpus == {"available": False, "reason": "nvmlInit failed (NVML Shared Library Not Found)",
                    "devices": []}


def test_thread_env_keeps_only_threading_and_numerics_variables():
    env = {"OMP_NUM_THREADS": "2", "OPENBLAS_CORETYPE": "Haswell", "MKL_DEBUG_CPU_TYPE": "5",
           "NUMBA_NUM_THREADS": "2", "HOME": "/root", "AWS_SECRET_ACCESS_KEY": "x", "PATH": "/bin",
           "CUDA_VISIBLE_DEVICES": "0"}
    assert fp.thread_env(env) == {"CUDA_VISIBLE_DEVICES": "0", "MKL_DEBUG_CPU_TYPE": "5",
                                  "NUMBA_NUM_THREADS": "2", "OMP_NUM_THREADS": "2",
                                  "OPENBLAS_CORETYPE": "Haswell"}


def test_thread_info_does_not_start_numba_threads():
    from numba.np.ufunc import parallel

    before = parallel._threading_layer
    info = fp.thread_info()
    assert parallel._threading_layer == before  # querying must not pick a layer or launch the pool
    if before is None:
        assert info["numba_threading_layer"].startswith("not initialised")
    assert info["numba_num_threads_config"] >= 1


def _git(cwd: Path, *args: str) -> None:
    subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=cwd, check=True,
                   capture_output=True)


def test_git_state(tmp_path: Path):
    assert fp.git_state(str(tmp_path)) is None
    _git(tmp_path, "init", "-q")
    assert fp.git_state(str(tmp_path))["commit"] is None  # a repo with no commits yet
    (tmp_path / "a.txt").write_text("1")
    _git(tmp_path, "add", "a.txt")
    _git(tmp_path, "commit", "-q", "-m", "one")
    clean = fp.git_state(str(tmp_path))
    assert len(clean["commit"]) == 40 and clean["dirty"] is False
    (tmp_path / "a.txt").write_text("2")
    assert fp.git_state(str(tmp_path))["dirty"] is True
    _git(tmp_path, "checkout", "-q", "a.txt")
    (tmp_path / "new.py").write_text("x = 1")  # untracked code changes what runs, too
    assert fp.git_state(str(tmp_path))["dirty"] is True


def test_cpu_info_parses_cpuinfo(tmp_path: Path):
    cpuinfo = tmp_path / "cpuinfo"
    block = ("processor\t: {i}\nmodel name\t: AMD EPYC 7B13\nphysical id\t: 0\ncore id\t\t: {c}\n"
             "flags\t\t: fpu avx2 fma hypervisor\n\n")
    cpuinfo.write_text("".join(block.format(i=i, c=i // 2) for i in range(4)))  # 2 cores, SMT 2
    info = fp.cpu_info(str(cpuinfo))
    assert info["model"] == "AMD EPYC 7B13" and info["physical_cores"] == 2
    assert info["isa"] == ["avx2", "fma"] and info["hypervisor"] is True


# --- GPU health --------------------------------------------------------------------------------------------
def test_gpu_health_names_throttle_reasons():
    gpu = FakeGPU(throttle_mask=0x1 | 0x4 | 0x800, temperature_c=83)
    health = fp.gpu_health(FakeNVML([gpu]))
    assert health["available"] and health["temperature_c"] == 83 and health["power_w"] == 300.0
    assert health["throttle_reasons"] == ["gpu_idle", "sw_power_cap", "unknown_0x800"]


def test_gpu_health_unavailable():
    health = fp.gpu_health(FakeNVML(init_error="Driver Not Loaded"))
    assert health["available"] is False and health["reason"] == "nvmlInit failed (Driver Not Loaded)"
    missing = fp.gpu_health(FakeNVML([]), device="cuda:1")
    assert missing["available"] is False and "cuda:1 not found" in missing["reason"]


def test_gpu_health_without_throttle_query():
    health = fp.gpu_health(FakeNVML([FakeGPU(unsupported={"throttle"})]))
    assert health["throttle_reasons"] is None and "Not Supported" in health["throttle_reasons_unavailable"]


@pytest.mark.parametrize("before, after, throttled", [
    (["gpu_idle"], [], False),
    (["gpu_idle"], ["applications_clocks_setting", "sync_boost"], False),
    ([], ["sw_power_cap"], True),
    (["hw_thermal_slowdown"], [], True),
    (None, None, False),
])
def test_is_throttled(before, after, throttled):
    assert fp.is_throttled({"throttle_reasons": before}, {"throttle_reasons": after}) is throttled


def test_is_throttled_from_fake_snapshots():
    gpu = FakeGPU(throttle_mask=0x1)
    fake = FakeNVML([gpu])
    before = fp.gpu_health(fake)
    gpu.throttle_mask = 0x40  # hardware thermal slowdown during the pass
    after = fp.gpu_health(fake)
    assert fp.is_throttled(before, after)
    unavailable = fp.gpu_health(FakeNVML(init_error="x"))
    assert not fp.is_throttled(unavailable, unavailable)
