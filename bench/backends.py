"""The backend table: which engine may run which workload, on which device, in which dtype.

Pure data, no torch import: profiles/loader.py normalises the spellings when it reads a profile and
bench/matrix.py refuses, at expand time and with one line, every combination the table does not declare.
What a backend does lives in one place per backend, bench/engines.py; every row a workload writes names
the engine that really ran (the `engine` column), read from the object that ran, never from this label.
"""

from __future__ import annotations

from dataclasses import dataclass

from loopscope.bench.errors import LoopscopeError

ALL_DTYPES: tuple[str, ...] = ("float32", "bfloat16", "float16")
DEVICE_KINDS: tuple[str, ...] = ("cpu", "cuda")


@dataclass(frozen=True)
class BackendSpec:
    name: str
    devices: tuple[str, ...]      # device kinds: "cpu", "cuda" (any "cuda:N" is "cuda")
    dtypes: tuple[str, ...]
    workloads: tuple[str, ...]
    aliases: tuple[str, ...] = ()
    what: str = ""


BACKENDS: dict[str, BackendSpec] = {spec.name: spec for spec in (
    # the kernels workload measures every backend itself, round-robin in one cell: its cell runs under "torch"
    BackendSpec("torch", DEVICE_KINDS, ALL_DTYPES, ("train", "eval", "prefill", "decode", "kernels"),
                aliases=("eager", "torch-eager"), what="PyTorch eager"),
    BackendSpec("torch-compile", DEVICE_KINDS, ALL_DTYPES, ("train", "eval", "prefill", "decode"),
                aliases=("torch.compile", "torch_compile", "inductor"),
                what="torch.compile (inductor): whole-forward prefill, static-cache decode step (CUDA graphs "
                     "on a GPU), training and eval compiled per block"),
    BackendSpec("numba", ("cpu",), ("float32",), ("prefill", "decode"),
                what="loopscope's Numba CPU engine (kernels/engine.py)"),
    BackendSpec("numba-cuda", ("cuda",), ("float32",), ("prefill", "decode"), aliases=("numba_cuda",),
                what="loopscope's numba-cuda engine (kernels/engine_cuda.py)"),
)}
_ALIASES: dict[str, str] = {a: s.name for s in BACKENDS.values() for a in (s.name, *s.aliases)}


class BackendUnavailable(LoopscopeError):
    """The backend cannot run on this machine (a missing or broken library); the cell is `unavailable`."""


def canonical_backend(name: str) -> str | None:
    """The one spelling of a backend name or alias; None when it names no backend."""
    return _ALIASES.get(name)


def known_spellings() -> str:
    return ", ".join(f"{s.name}" + (f" (also {', '.join(s.aliases)})" if s.aliases else "")
                     for s in BACKENDS.values())


def device_kind(device: str) -> str:
    return device.split(":", 1)[0]


def refusal(backend: str, workload: str, device: str, dtype: str) -> str | None:
    """Why the table refuses this combination (one line), or None when it is declared."""
    spec = BACKENDS.get(canonical_backend(backend) or "")
    if spec is None:
        return f"backend {backend!r} is unknown (known: {known_spellings()})"
    if workload not in spec.workloads:
        return (f"backend {spec.name!r} does not run the {workload!r} workload "
                f"(it runs {', '.join(spec.workloads)})")
    if device_kind(device) not in spec.devices:
        return f"backend {spec.name!r} does not run on device {device!r} (it runs on {', '.join(spec.devices)})"
    if dtype not in spec.dtypes:
        return f"backend {spec.name!r} does not support dtype {dtype!r} (it supports {', '.join(spec.dtypes)})"
    return None


def declared_combinations(devices: tuple[str, ...] = DEVICE_KINDS,
                          workloads: tuple[str, ...] = ("train", "eval", "prefill", "decode", "kernels"),
                          ) -> list[tuple[str, str, str, str]]:
    """Every (backend, workload, device, dtype) the table declares."""
    return [(b, w, d, t) for b, spec in BACKENDS.items() for w in workloads for d in devices
            for t in ALL_DTYPES if refusal(b, w, d, t) is None]
