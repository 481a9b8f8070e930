"""`build(name_or_config)`: one constructor for every family.

Weights are allocated uninitialised (meta -> to_empty) and initialised on the CPU from a seeded generator,
so a seed gives the same weights on every device; then moved and cast. On `device="meta"` nothing is
allocated or initialised (instant, for accounting of paper-size models).

Adding a family: copy models/looped.py (the shortest family file), then register the name in
config.py (FAMILIES, INJECTIONS, _FAMILY_DEFAULTS), its cost in accounting._parts, its class in
FAMILY_CLASSES below, and a tiny preset in presets.py; the accounting tests then check it.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn

from .accounting import param_counts
from .blocks import init_weights
from .config import ModelConfig
from .gpt import GPT
from .looped import Looped
from .parcae import Parcae
from .presets import preset
from .rdm import RDM
from .ut import UT

# Above this many parameters a model is allocated on meta first, so no throwaway default init runs.
DIRECT_BUILD_MAX_PARAMS = 50_000_000

FAMILY_CLASSES: dict[str, type[nn.Module]] = {"gpt": GPT, "parcae": Parcae, "rdm": RDM, "looped": Looped, "ut": UT}


def resolve_config(name_or_config: str | ModelConfig | dict) -> ModelConfig:
    if isinstance(name_or_config, ModelConfig):
        return name_or_config
    if isinstance(name_or_config, str):
        return preset(name_or_config)
    if isinstance(name_or_config, dict):
        return ModelConfig.from_dict(name_or_config)
    raise TypeError(f"build: expected a preset name, ModelConfig or dict, got {type(name_or_config).__name__}")


def build(name_or_config: str | ModelConfig | dict, *, device: str | torch.device = "cpu",
          dtype: torch.dtype = torch.float32, seed: int | None = None) -> nn.Module:
    """A model from a preset name, a ModelConfig or a config dict. `seed` fixes the weights and the
    model's own random draws (h0, loop counts); None draws one from torch's global RNG."""
    cfg = resolve_config(name_or_config)
    cls: Any = FAMILY_CLASSES[cfg.family]
    if seed is None:
        seed = int(torch.randint(0, 2**31 - 1, (1,)).item())
    device = torch.device(device)
    if device.type == "meta" or param_counts(cfg).unique > DIRECT_BUILD_MAX_PARAMS:
        with torch.device("meta"):
            model = cls(cfg) if cfg.family == "gpt" else cls(cfg, seed=seed)
        if device.type == "meta":
            return model.to(dtype=dtype)
        model = model.to_empty(device="cpu")
    else:  # small: built in place (meta init pulls in about a second of torch imports); reinitialised below.
        # Its throwaway default init must not draw from the global generator, as the meta path does not.
        with torch.random.fork_rng(devices=[]):
            model = cls(cfg) if cfg.family == "gpt" else cls(cfg, seed=seed)
    init_weights(model, cfg, torch.Generator().manual_seed(seed))
    return model.to(device=device, dtype=dtype)
