"""Device-class detection: which sweep profile fits this machine, and why.

Classes (issue #5): `cpu` when torch sees no CUDA/ROCm device; `consumer-gpu` for GeForce/RTX/TITAN/Radeon
parts or anything under 32 GB (a MIG slice, T4, L4, A10); `datacenter-gpu` for A100/H100/H200/L40S/MI300
and the like by name, then by NVML brand, then by memory (32 GB or more). Only device 0 decides; the
reason string says which rule fired.
"""

from __future__ import annotations

import glob
import os
import re
from dataclasses import dataclass
from typing import Any

from loopscope.bench.meters import nvml as nvml_seam

CPU, CONSUMER_GPU, DATACENTER_GPU = "cpu", "consumer-gpu", "datacenter-gpu"
DEVICE_CLASSES: tuple[str, ...] = (CPU, CONSUMER_GPU, DATACENTER_GPU)
MIN_DATACENTER_MEMORY_BYTES = 32 * 10**9

_CONSUMER_NAME = re.compile(r"\b(GeForce|RTX|TITAN|Radeon)\b", re.IGNORECASE)
_DATACENTER_NAME = re.compile(
    r"\b(A100|A800|A40|A30|A10G?|A16|H100|H800|H200|H20|GH200|B100|B200|B300|GB200|L40S?|L20|L4|V100|T4|"
    r"Tesla|Instinct|MI[1-9]\d{2}[A-Z]*)\b", re.IGNORECASE)
# NVML brand codes (nvmlBrandType_t): what the driver itself calls the product line.
_CONSUMER_BRANDS = {5: "GeForce", 6: "Titan", 12: "Quadro RTX", 13: "NVIDIA RTX", 15: "GeForce RTX",
                    16: "Titan RTX"}
_DATACENTER_BRANDS = {2: "Tesla"}


@dataclass(frozen=True)
class DeviceClass:
    name: str  # one of DEVICE_CLASSES
    reason: str
    device: str  # torch device string the sweep should use: "cpu" or "cuda:0"
    gpu_name: str | None = None
    memory_bytes: int | None = None


def classify_gpu(name: str, memory_bytes: int, *, brand: int | None = None,
                 mig_enabled: bool = False) -> tuple[str, str]:
    """(class, reason) of one GPU from its name, memory (as torch sees it) and optional NVML facts."""
    label = f"{name}, {memory_bytes / 1e9:.0f} GB" + (" (MIG slice)" if mig_enabled else "")
    if _CONSUMER_NAME.search(name):
        return CONSUMER_GPU, f"{label}: consumer/workstation part by name"
    if memory_bytes < MIN_DATACENTER_MEMORY_BYTES:
        kind = "datacenter part by name, but " if _DATACENTER_NAME.search(name) else ""
        return CONSUMER_GPU, f"{label}: {kind}under 32 GB of memory, sized as consumer"
    if _DATACENTER_NAME.search(name):
        return DATACENTER_GPU, f"{label}: datacenter part by name"
    if brand in _CONSUMER_BRANDS:
        return CONSUMER_GPU, f"{label}: NVML brand {_CONSUMER_BRANDS[brand]}"
    if brand in _DATACENTER_BRANDS:
        return DATACENTER_GPU, f"{label}: NVML brand {_DATACENTER_BRANDS[brand]}"
    return DATACENTER_GPU, f"{label}: unknown part with 32 GB or more, sized as datacenter by memory"


# Device nodes a GPU runtime needs: NVIDIA (/dev/nvidia0 ...), ROCm (/dev/kfd), CUDA under WSL2 (/dev/dxg).
GPU_NODE_PATTERNS = ("nvidia[0-9]*", "kfd", "dxg")
NO_GPU_NODE = "no GPU device node (/dev/nvidia*, /dev/kfd, /dev/dxg) on this machine"


def gpu_device_nodes(dev: str = "/dev") -> list[str]:
    """The GPU device nodes present. Without any, torch can see no GPU, which is known here without
    `import torch` (most of a second that a CPU-only parent process need not pay)."""
    return sorted(p for pattern in GPU_NODE_PATTERNS for p in glob.glob(os.path.join(dev, pattern)))


def detect_device_class(*, nvml: Any = None, torch_cuda: Any = None) -> DeviceClass:
    """Detect the class of this machine. `torch_cuda` (default torch.cuda) and `nvml` (default pynvml)
    are seams for tests; both only need the few functions used here."""
    if torch_cuda is None:
        if not gpu_device_nodes():
            return DeviceClass(CPU, NO_GPU_NODE, "cpu")
        try:
            import torch
        except ImportError as exc:
            return DeviceClass(CPU, f"torch not importable ({exc})", "cpu")
        torch_cuda = torch.cuda
    if not torch_cuda.is_available() or torch_cuda.device_count() == 0:
        return DeviceClass(CPU, "no CUDA device visible to torch", "cpu")
    device = "cuda:0"
    name = str(torch_cuda.get_device_name(0))
    memory = int(torch_cuda.get_device_properties(0).total_memory)
    brand, mig = _nvml_facts(nvml, device)
    cls, reason = classify_gpu(name, memory, brand=brand, mig_enabled=mig)
    count = torch_cuda.device_count()
    if count > 1:
        reason += f"; {count} devices visible, classified by {device}"
    return DeviceClass(cls, reason, device, gpu_name=name, memory_bytes=memory)


def _nvml_facts(nvml: Any, device: str) -> tuple[int | None, bool]:
    """NVML brand code and whether MIG is on; (None, False) where NVML cannot say (ROCm, no driver)."""
    try:
        with nvml_seam.nvml_session(nvml) as lib:
            errors = nvml_seam.error_types(lib)
            try:
                handle = nvml_seam.device_handle(lib, device)
            except (nvml_seam.NvmlUnavailable, *errors):
                return None, False
            try:
                brand = int(lib.nvmlDeviceGetBrand(handle))
            except (*errors, AttributeError, TypeError, ValueError):
                brand = None
            try:
                mig = lib.nvmlDeviceGetMigMode(handle)[0] == 1
            except (*errors, AttributeError, TypeError, ValueError, IndexError):
                mig = False
            return brand, mig
    except nvml_seam.NvmlUnavailable:
        return None, False
