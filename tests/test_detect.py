"""Device-class detection with fake torch.cuda and NVML: each rule, and the reason it gives."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from loopscope.profiles.detect import (
    CONSUMER_GPU,
    CPU,
    DATACENTER_GPU,
    NO_GPU_NODE,
    DeviceClass,
    classify_gpu,
    detect_device_class,
    gpu_device_nodes,
)
from tests.fake_nvml import FakeGPU, FakeNVML, FakeTorchCuda

GB = 10**9
SMALL_DC = "datacenter part by name, but under 32 GB of memory, sized as consumer"
NO_NVML = FakeNVML(init_error="NVML Shared Library Not Found")


def detect(name: str, memory: int, nvml=NO_NVML, count: int = 1) -> DeviceClass:
    return detect_device_class(nvml=nvml, torch_cuda=FakeTorchCuda([(name, memory)] * count))


def test_no_cuda_device_is_cpu():
    cls = detect_device_class(nvml=NO_NVML, torch_cuda=FakeTorchCuda([]))
    assert cls == DeviceClass(CPU, "no CUDA device visible to torch", "cpu")


def test_this_machine():
    cls = detect_device_class()
    if not torch.cuda.is_available():
        reasons = ("no CUDA device visible to torch", NO_GPU_NODE)
        assert (cls.name, cls.device) == (CPU, "cpu") and cls.reason in reasons
    else:
        assert cls.name in (CONSUMER_GPU, DATACENTER_GPU) and cls.device == "cuda:0"


@pytest.mark.parametrize("name, memory, expected, why", [
    ("NVIDIA H200", 150 * GB, DATACENTER_GPU, "datacenter part by name"),
    ("NVIDIA H100 80GB HBM3", 85 * GB, DATACENTER_GPU, "datacenter part by name"),
    ("NVIDIA A100-SXM4-40GB", 42 * GB, DATACENTER_GPU, "datacenter part by name"),
    ("NVIDIA L40S", 48 * GB, DATACENTER_GPU, "datacenter part by name"),
    ("Tesla V100-SXM2-32GB", 34_089_730_048, DATACENTER_GPU, "datacenter part by name"),
    ("AMD Instinct MI300X", 206 * GB, DATACENTER_GPU, "datacenter part by name"),
    ("NVIDIA GeForce RTX 4090", 25 * GB, CONSUMER_GPU, "consumer/workstation part by name"),
    ("NVIDIA GeForce RTX 5090", 34 * GB, CONSUMER_GPU, "consumer/workstation part by name"),
    ("NVIDIA RTX 6000 Ada Generation", 51 * GB, CONSUMER_GPU, "consumer/workstation part by name"),
    ("AMD Radeon RX 7900 XTX", 25 * GB, CONSUMER_GPU, "consumer/workstation part by name"),
    ("Tesla T4", 16 * GB, CONSUMER_GPU, SMALL_DC),
    ("NVIDIA L4", 24 * GB, CONSUMER_GPU, SMALL_DC),
    ("Some New GPU", 12 * GB, CONSUMER_GPU, "under 32 GB of memory, sized as consumer"),
    ("Some New GPU", 96 * GB, DATACENTER_GPU,
     "unknown part with 32 GB or more, sized as datacenter by memory"),
])
def test_classification_by_name_and_memory(name, memory, expected, why):
    cls = detect(name, memory)
    assert cls.name == expected
    assert cls.reason.startswith(f"{name}, {memory / 1e9:.0f} GB: ")
    assert cls.reason.endswith(why)
    assert cls.device == "cuda:0" and cls.gpu_name == name and cls.memory_bytes == memory


def test_nvml_brand_decides_an_unknown_name():
    tesla = FakeNVML([FakeGPU(name="Mystery", brand=2)])
    geforce = FakeNVML([FakeGPU(name="Mystery", brand=5)])
    assert detect("Mystery", 64 * GB, nvml=tesla).reason.endswith("NVML brand Tesla")
    cls = detect("Mystery", 64 * GB, nvml=geforce)
    assert cls.name == CONSUMER_GPU and cls.reason.endswith("NVML brand GeForce")


def test_mig_slice_is_sized_by_its_own_memory():
    nvml = FakeNVML([FakeGPU(name="NVIDIA H100 80GB HBM3", mig_mode=(1, 1))])
    cls = detect("NVIDIA H100 80GB HBM3 MIG 1g.10gb", 10 * GB, nvml=nvml)
    assert cls.name == CONSUMER_GPU
    assert "(MIG slice)" in cls.reason and cls.reason.endswith("under 32 GB of memory, sized as consumer")
    assert nvml.initialised == 0


def test_several_devices_are_mentioned():
    cls = detect("NVIDIA H200", 150 * GB, count=8)
    assert cls.name == DATACENTER_GPU and cls.reason.endswith("; 8 devices visible, classified by cuda:0")


def test_classify_gpu_is_pure():
    assert classify_gpu("NVIDIA H200", 150 * GB) == classify_gpu("NVIDIA H200", 150 * GB, brand=5)


def test_no_gpu_device_node_is_cpu_without_importing_torch(tmp_path):
    assert gpu_device_nodes(str(tmp_path)) == []
    (tmp_path / "nvidiactl").touch()  # the control node alone is not a device
    assert gpu_device_nodes(str(tmp_path)) == []
    for name in ("nvidia0", "kfd"):
        (tmp_path / name).touch()
    assert gpu_device_nodes(str(tmp_path)) == [str(tmp_path / "kfd"), str(tmp_path / "nvidia0")]
    if not gpu_device_nodes():
        code = ("import sys; from loopscope.profiles.detect import detect_device_class; "
                "from loopscope.bench.fingerprint import fingerprint; cls = detect_device_class(); "
                "fp = fingerprint(); assert 'torch' not in sys.modules and 'numba' not in sys.modules; "
                "assert cls.name == 'cpu' and fp['torch']['version'] and fp['torch']['cuda_available'] is False")
        subprocess.run([sys.executable, "-c", code], check=True)
