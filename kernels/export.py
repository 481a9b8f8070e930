"""Export a loopscope model's weights once into the engine's contiguous float32 arrays.

Reads `model.state_dict()` by parameter name (models/blocks.py, models/<family>.py), fuses what the engine
computes together (q|k|v into one projection, fc|up for SwiGLU), packs every projection for `gemm.matmul`,
and evaluates the loop-invariant parts of the injections (Parcae's decay and dt) with the same torch ops the
model uses, so they are bit-identical. Torch is used here only; the engine's hot path never touches it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .gemm import PackedWeight, pack_weight

F32 = np.float32
STAGES_BY_FAMILY: dict[str, tuple[str, ...]] = {
    "gpt": ("blocks",),
    "parcae": ("prelude", "core", "coda"),
    "rdm": ("prelude", "core", "coda"),
    "looped": ("prelude", "core", "coda"),
    "ut": ("prelude", "core", "coda"),
}


@dataclass(frozen=True)
class LayerWeights:
    """One transformer block. With sandwich norms: x = post_attn(x + attn(attn_norm x)), and the same for the
    MLP; otherwise pre-norm residual blocks (post_* are None)."""

    layer_id: int            # index in the model's physical stack (value embeddings, cache keys)
    attn_norm: np.ndarray    # [d]
    qkv: PackedWeight        # [3d, d]: q | k | v
    o: PackedWeight          # [d, d]
    mlp_norm: np.ndarray     # [d]
    fc: PackedWeight         # [d_ff, d] (relu2) or [2*d_ff, d] = fc | up (swiglu)
    proj: PackedWeight       # [d, d_ff]
    post_attn_norm: np.ndarray | None = None
    post_mlp_norm: np.ndarray | None = None
    ve_gate: np.ndarray | None = None    # [n_heads, min(32, d)]
    ve_table: np.ndarray | None = None   # [vocab, d]


@dataclass(frozen=True)
class ModelWeights:
    config: Any                                   # the model's ModelConfig
    wte: np.ndarray                               # [vocab, d] token embedding
    head: PackedWeight                            # tied LM head (wte packed)
    ln_f: np.ndarray                              # [d]
    stages: dict[str, tuple[LayerWeights, ...]]   # "blocks" (gpt) or "prelude"/"core"/"coda"
    extras: dict[str, Any] = field(default_factory=dict)  # family-specific (injection, readout, ...)

    @property
    def nbytes(self) -> int:
        total = self.wte.nbytes + self.head.nbytes + self.ln_f.nbytes
        for layers in self.stages.values():
            for lw in layers:
                for value in vars(lw).values():
                    total += value.nbytes if isinstance(value, np.ndarray | PackedWeight) else 0
        for value in self.extras.values():
            total += value.nbytes if isinstance(value, np.ndarray | PackedWeight) else 0
        return int(total)


def _array(state: dict[str, Any], name: str) -> np.ndarray:
    if name not in state:
        raise KeyError(f"export: state_dict has no parameter {name!r}")
    return np.ascontiguousarray(state[name].detach().to("cpu").float().numpy(), dtype=F32)


def _layer(state: dict[str, Any], prefix: str, layer_id: int, cfg: Any) -> LayerWeights:
    def get(name: str) -> np.ndarray:
        return _array(state, f"{prefix}.{name}")

    qkv = np.concatenate([get("attn.q.weight"), get("attn.k.weight"), get("attn.v.weight")], axis=0)
    fc = get("mlp.fc.weight")
    if cfg.mlp == "swiglu":
        fc = np.concatenate([fc, get("mlp.up.weight")], axis=0)
    sandwich = bool(cfg.sandwich_norm)
    ve_gate = get("attn.ve_gate.weight") if f"{prefix}.attn.ve_gate.weight" in state else None
    ve_table = None
    if ve_gate is not None and f"value_embeds.tables.{layer_id}.weight" not in state:
        ve_gate = None  # a gate without a table (Parcae's official rule allows it) never acts
    if ve_gate is not None:
        ve_table = _array(state, f"value_embeds.tables.{layer_id}.weight")
    return LayerWeights(
        layer_id=layer_id,
        attn_norm=get("norm1.weight"),
        qkv=pack_weight(qkv),
        o=pack_weight(get("attn.o.weight")),
        mlp_norm=get("norm3.weight") if sandwich else get("norm2.weight"),
        fc=pack_weight(fc),
        proj=pack_weight(get("mlp.proj.weight")),
        post_attn_norm=get("norm2.weight") if sandwich else None,
        post_mlp_norm=get("norm4.weight") if sandwich else None,
        ve_gate=ve_gate,
        ve_table=ve_table,
    )


def _family_extras(state: dict[str, Any], cfg: Any) -> dict[str, Any]:
    """What a looped family adds around its blocks: injection, readout, step signal, halting."""
    extras: dict[str, Any] = {}
    if cfg.family == "gpt":
        return extras
    if cfg.prelude_norm:
        extras["ln_prelude"] = _array(state, "ln_prelude.weight")
    if cfg.family == "parcae":
        extras.update(_parcae_extras(state))
    elif cfg.family == "rdm" and cfg.injection == "concat":
        adapter = _array(state, "adapter.weight")  # [d, 2d] acting on [h; e]
        d = cfg.d_model
        extras["adapter_h"] = pack_weight(adapter[:, :d])
        extras["adapter_e"] = pack_weight(adapter[:, d:])
        extras["adapter_spectral_norm"] = float(np.linalg.norm(adapter[:, :d].astype(np.float64), ord=2))
    elif cfg.family == "ut":
        extras["step_embed"] = _array(state, "step_embed.weight")       # [act_max_steps, d]
        extras["halt_w"] = _array(state, "halting.proj.weight").reshape(-1)  # [d]
        extras["halt_b"] = _array(state, "halting.proj.bias").reshape(-1)    # [1]
    return extras


def _parcae_extras(state: dict[str, Any]) -> dict[str, Any]:
    import torch
    import torch.nn.functional as F

    with torch.no_grad():
        dt_bias = state["injection.dt_bias"].float().cpu()
        a_log = state["injection.A_log"].float().cpu()
        dt = F.softplus(dt_bias)
        decay = torch.exp(-dt * torch.exp(a_log))
    return {
        "decay": np.ascontiguousarray(decay.numpy(), F32),
        "dt": np.ascontiguousarray(dt.numpy(), F32),
        "B": pack_weight(_array(state, "injection.B")),
        "readout": pack_weight(_array(state, "readout.weight")),
    }


# block switches of models/config.py the engine's kernels do not implement: field -> its default
ENGINE_DEFAULTS: dict[str, Any] = {
    "embed_scale": 1.0, "logit_scale": 1.0, "logit_softcap": None, "positional": "rope", "rope_condense": 1.0,
    "qk_norm": True, "qk_bias": False, "clip_qkv": None, "norm": "rmsnorm", "linear_bias": False,
    "state_std": None,
}
ENGINE_MLPS: tuple[str, ...] = ("relu2", "swiglu")


def engine_refusal(cfg: Any) -> str | None:
    """Why the numba engine cannot run this config (one line), or None."""
    if cfg.family not in STAGES_BY_FAMILY:
        return (f"family {cfg.family!r} is not supported by the numba engine yet "
                f"(supported: {', '.join(STAGES_BY_FAMILY)})")
    if cfg.state_init == "scaled-normal":
        return "state_init='scaled-normal' is not implemented by the numba engine"
    if cfg.mlp not in ENGINE_MLPS:
        return f"mlp={cfg.mlp!r} is not implemented by the numba engine (it runs {', '.join(ENGINE_MLPS)})"
    for key, default in ENGINE_DEFAULTS.items():
        if getattr(cfg, key) != default:
            return f"{key}={getattr(cfg, key)!r} is not implemented by the numba engine (it runs {key}={default!r})"
    return None


def export_model(model: Any) -> ModelWeights:
    """The engine's weights for a loopscope model (any device or dtype; exported as float32 on CPU)."""
    cfg = model.config
    refusal = engine_refusal(cfg)
    if refusal is not None:
        raise NotImplementedError(f"export: {refusal}")
    state = model.state_dict()
    wte = _array(state, "wte.weight")
    stages: dict[str, tuple[LayerWeights, ...]] = {}
    layer_id = 0
    for stage in STAGES_BY_FAMILY[cfg.family]:
        count = sum(1 for name in state if name.startswith(f"{stage}.") and name.endswith(".norm1.weight"))
        stages[stage] = tuple(_layer(state, f"{stage}.{i}", layer_id + i, cfg) for i in range(count))
        layer_id += count
    if layer_id != cfg.n_physical_layers:
        raise ValueError(f"export: found {layer_id} blocks in the state_dict, config says "
                         f"n_physical_layers={cfg.n_physical_layers} (family {cfg.family!r})")
    extras = _family_extras(state, cfg)
    return ModelWeights(config=cfg, wte=wte, head=pack_weight(wte), ln_f=_array(state, "ln_f.weight"),
                        stages=stages, extras=extras)
