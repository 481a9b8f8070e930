"""loopscope.models: configs, shared blocks, the model families, presets and exact cost accounting.

Tables for `loopscope models [--matched]` live in `loopscope.models.listing` (imports pandas).
Names are imported on first use: configs, presets and accounting are free of torch, so profile expansion
and the CLI's parent process can use them without paying for torch's import."""

from __future__ import annotations

import importlib
from typing import Any

_HOME = {
    "ParamCounts": "accounting", "effective_depth": "accounting", "flops_per_token": "accounting",
    "kv_bytes_per_token": "accounting", "memory_bytes": "accounting", "param_counts": "accounting",
    "KV_POLICIES": "cache", "KVCache": "cache",
    "CheckpointError": "checkpoint", "load_checkpoint": "checkpoint", "load_official_parcae": "checkpoint",
    "save_checkpoint": "checkpoint",
    "FAMILIES": "config", "LOOPED_FAMILIES": "config", "ModelConfig": "config",
    "FAMILY_CLASSES": "factory", "build": "factory", "resolve_config": "factory",
    "Generation": "generation", "decode_deviation": "generation", "generate": "generation",
    "PRESETS": "presets", "list_presets": "presets", "preset": "presets",
    "ExitRule": "recurrence",
}
__all__ = sorted(_HOME)


def __getattr__(name: str) -> Any:
    if name not in _HOME:
        raise AttributeError(f"module 'loopscope.models' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_HOME[name]}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_HOME))
