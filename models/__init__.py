"""loopscope.models: configs, shared blocks, the model families, presets and exact cost accounting.

Tables for `loopscope models [--matched]` live in `loopscope.models.listing` (imports pandas)."""

from .accounting import ParamCounts, effective_depth, flops_per_token, kv_bytes_per_token, memory_bytes, param_counts
from .cache import KV_POLICIES, KVCache
from .checkpoint import CheckpointError, load_checkpoint, load_official_parcae, save_checkpoint
from .config import FAMILIES, LOOPED_FAMILIES, ModelConfig
from .factory import FAMILY_CLASSES, build, resolve_config
from .generate import Generation, decode_deviation, generate
from .presets import PRESETS, list_presets, preset
from .recurrence import ExitRule

__all__ = [
    "FAMILIES", "FAMILY_CLASSES", "KV_POLICIES", "LOOPED_FAMILIES", "PRESETS", "CheckpointError", "ExitRule",
    "Generation", "KVCache", "ModelConfig", "ParamCounts", "build", "decode_deviation", "effective_depth",
    "flops_per_token", "generate", "kv_bytes_per_token", "list_presets", "load_checkpoint",
    "load_official_parcae", "memory_bytes", "param_counts", "preset", "resolve_config", "save_checkpoint",
]
