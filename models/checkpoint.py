"""Checkpoints: safetensors save/load, and import of the official Parcae checkpoints.

Nothing is unpickled: our own files are safetensors (the config travels in the file's metadata); the
official `.bin`/`.pt` state dicts are read with `torch.load(weights_only=True)`, the one legacy path.

Official names come from the `sandyresearch/parcae` code (`parcae_lm/`), module paths
`transformer.{wte, prelude, ln_prelude, adapter, core_block, C, coda, ln_f}`, `value_embeds.{layer}`,
`lm_head`; block internals `norm_1, norm_2, attn.{c_q, c_k, c_v, c_proj, ve_gate}, mlp.{fc, proj}`.
They are mapped onto ours by the explicit tables below, which are the one place to correct a name.
The persistent RoPE buffer `freqs_cis` is checked against the table loopscope computes from config.json
(this catches a wrong base or condense ratio) and then dropped. Every official setting that changes the
math is either reproduced (`OFFICIAL_INIT_SCALES`, logit_softcap, GELU, rope_condense_ratio, clip_qkv,
qk_norm, qk_bias, state_init) or refused with one line naming the config key.

Huginn (`seal-rg/recurrent-pretraining`, `recpre/raven_modeling_minimal.py`) state dicts load into the
`rdm` family through `huginn_state_to_rdm` (fused Wqkv and SwiGLU fc are split, interleaved RoPE rows and
the q/k bias permuted, `freqs_cis` dropped).
"""

from __future__ import annotations

import json
import math
import re
import socket
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from safetensors import safe_open
from safetensors.torch import save_file

from .config import ModelConfig
from .factory import build

CONFIG_METADATA_KEY = "loopscope_config"

# --- official Parcae parameter names -> ours ({i}: layer index within the stage, {n}: absolute layer) ---
OFFICIAL_TOP_LEVEL: dict[str, str] = {
    "transformer.wte.weight": "wte.weight",
    "transformer.ln_prelude.weight": "ln_prelude.weight",
    "transformer.adapter.A_log": "injection.A_log",
    "transformer.adapter.dt_bias": "injection.dt_bias",
    "transformer.adapter.B": "injection.B",
    "transformer.C.weight": "readout.weight",
    "transformer.ln_f.weight": "ln_f.weight",
}
OFFICIAL_STAGES: dict[str, str] = {"prelude": "prelude", "core_block": "core", "coda": "coda"}
OFFICIAL_BLOCK_PARTS: dict[str, str] = {
    "norm_1.weight": "norm1.weight",
    "norm_2.weight": "norm2.weight",
    "attn.c_q.weight": "attn.q.weight",
    "attn.c_k.weight": "attn.k.weight",
    "attn.c_v.weight": "attn.v.weight",
    "attn.c_proj.weight": "attn.o.weight",
    "attn.ve_gate.weight": "attn.ve_gate.weight",
    "attn.qk_bias": "attn.qk_bias",
    "mlp.fc.weight": "mlp.fc.weight",
    "mlp.proj.weight": "mlp.proj.weight",
}
OFFICIAL_TIED_HEAD = "lm_head.weight"  # tied to transformer.wte.weight in the released models
OFFICIAL_ROPE_BUFFER = "freqs_cis"     # [1, block_size, 1, head_dim/2, 2] = (cos, sin), persistent
# Prefixes that wrappers add (HF *ForCausalLM, torch.compile, DDP); stripped before mapping.
WRAPPER_PREFIXES: tuple[str, ...] = ("_orig_mod.", "module.", "model.")
# The official attention rotates adjacent channel pairs (2i, 2i+1) (complex freqs_cis); ours rotates
# (i, i + hd/2). Set to False if a checkpoint turns out to use the half-split layout already.
OFFICIAL_ROPE_INTERLEAVED = True

# --- official config.json keys -> ModelConfig fields (first key present wins) ---
OFFICIAL_CONFIG_KEYS: dict[str, tuple[str, ...]] = {
    "d_model": ("n_embd", "hidden_size"),
    "n_heads": ("num_attention_heads", "n_heads"),
    "vocab_size": ("padded_vocab_size", "vocab_size"),
    "d_ff": ("intermediate_size",),
    "n_prelude": ("n_layers_in_prelude",),
    "n_core": ("n_layers_in_recurrent_block",),
    "n_coda": ("n_layers_in_coda",),
    "mu_rec": ("mean_recurrence",),
    "mu_bwd": ("mean_backprop_depth",),
    "rope_theta": ("rope_base", "rope_theta", "rope_settings.rope_base"),
    "norm_eps": ("norm_eps",),
    "max_seq_len": ("block_size", "max_position_embeddings"),
    "prelude_norm": ("prelude_norm",),
    "rope_condense": ("rope_settings.rope_condense_ratio",),
    "logit_softcap": ("logit_softcap",),
    "clip_qkv": ("clip_qkv",),
    "qk_norm": ("qk_norm",),
    "qk_bias": ("qk_bias",),
}
# official init_strategy -> (embedding scale, logit scale) as functions of d: the only parts of an init
# strategy that act in the forward pass (parcae_lm/utils/init.py: embed_scale, logit_scale); every
# strategy not named here has neither, and h0 ("like-init") is drawn with its "embedding" std.
_INV_SQRT = (lambda d: 1.0, lambda d: 1.0 / math.sqrt(d))
OFFICIAL_INIT_SCALES: dict[str, tuple[Any, Any]] = {
    "takase": (math.sqrt, lambda d: 1.0),
    "takase-scaled": (math.sqrt, lambda d: math.sqrt(2 / 5) / math.sqrt(d)),
    "scaled-and-logit-scale": _INV_SQRT,
    "llama-by-dim-ls": _INV_SQRT,
    "noci-anagnostidis": _INV_SQRT,
    "shaped": _INV_SQRT,
    "deep-scale-simple": _INV_SQRT,
    "deep-scale-full": _INV_SQRT,
}
# init strategies whose "embedding" std (the like-init h0 std) is not sqrt(2/(5d)): d -> std
OFFICIAL_EMBEDDING_STD: dict[str, Any] = {
    "mitchell": lambda d: 1 / math.sqrt(d), "normal": lambda d: 1 / math.sqrt(d), "llama": lambda d: 1.0,
    "llama-by-dim": lambda d: 1.0, "llama-by-dim-ls": lambda d: 1.0, "kaiming": lambda d: math.sqrt(2 / d),
    "bert": lambda d: 0.02, "megatron": lambda d: 0.02, "megatron2": lambda d: math.sqrt(1 / (3 * d)),
    "wang": None, "deepnorm-straight": lambda d: 0.02, "deepnorm-subln": lambda d: 0.02,
    "noci-anagnostidis": lambda d: 1.0, "shaped": lambda d: 1.0, "deep-scale-simple": lambda d: math.sqrt(1 / 3),
    "deep-scale-full": lambda d: math.sqrt(1 / 3), "scaled-and-logit-scale": lambda d: 1.0,
    "bernstein": lambda d: 1.0, "illiterate": lambda d: 1.0, "scaled-large-embed": lambda d: 1.0,
}
# keys a config.json may lack take the official dataclass defaults (parcae_lm/models/config.py, ParcaeConfig)
OFFICIAL_DEFAULTS: dict[str, Any] = {
    "nonlin_name": "GELU", "qk_norm": False, "qk_bias": False, "norm_class_name": "LayerNorm",
    "mlp_class_name": "BaseMLP", "block_class_name": "TransformerPreNormBlock", "init_strategy": "scaled",
    "state_init": "like-init", "prelude_norm": False, "norm_eps": 1e-5, "bias": False,
}
# official nonlin_name (BaseMLP) -> our mlp kind
OFFICIAL_NONLINS: dict[str, str] = {"ReLU2": "relu2", "GELU": "gelu"}
# official state_init -> ours ("embed" is a random draw scaled by 1/sqrt(d), not h0 = e)
OFFICIAL_STATE_INITS: dict[str, str] = {"like-init": "like-init", "zero": "zero", "embed": "scaled-normal"}
# Official settings this implementation reproduces only with these values.
OFFICIAL_REQUIRED: dict[str, Any] = {
    "injection_type": "diagonal",
    "tie_embeddings": True,
    "bias": False,
    "block_class_name": "TransformerPreNormBlock",
    "norm_class_name": "RMSNorm",
    "mlp_class_name": "BaseMLP",
    "mup_model_scaling_factor": 1,
    "debias_attention": False,
    "center_attention": False,
    "use_abacus": False,
    "_class_name": "ParcaeConfig",
}


class CheckpointError(ValueError):
    """A checkpoint that does not fit the model: the message names the file and the tensor."""


# ------------------------------------------------------------------------------------------------
# our own format
# ------------------------------------------------------------------------------------------------
def save_checkpoint(model: nn.Module, path: str | Path, *, metadata: dict[str, str] | None = None) -> Path:
    """Write the model's tensors and its config to a safetensors file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    meta = {CONFIG_METADATA_KEY: json.dumps(model.config.to_dict()), **(metadata or {})}
    save_file(state, str(path), metadata=meta)
    return path


def read_checkpoint_config(path: str | Path) -> ModelConfig:
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    if CONFIG_METADATA_KEY not in meta:
        raise CheckpointError(f"{path}: no {CONFIG_METADATA_KEY!r} in the safetensors metadata "
                              f"(not written by loopscope.models.save_checkpoint)")
    return ModelConfig.from_dict(json.loads(meta[CONFIG_METADATA_KEY]))


def load_checkpoint(path: str | Path, *, device: str | torch.device = "cpu",
                    dtype: torch.dtype | None = None, seed: int | None = None) -> nn.Module:
    """Build the model a checkpoint was saved from and load its tensors (strict)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"load_checkpoint: {path} does not exist")
    cfg = read_checkpoint_config(path)
    with safe_open(str(path), framework="pt") as f:
        state = {k: f.get_tensor(k) for k in f.keys()}
    dtype = dtype or next(iter(state.values())).dtype
    model = build(cfg, device="cpu", dtype=dtype, seed=seed)
    load_state_strict(model, state, source=str(path))
    return model.to(device)


def load_state_strict(model: nn.Module, state: dict[str, torch.Tensor], *, source: str) -> None:
    """Copy `state` into `model`; every tensor must exist on both sides with the same shape."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing:
        raise CheckpointError(f"{source}: missing tensor {missing[0]!r} (all missing: {missing})")
    if unexpected:
        raise CheckpointError(f"{source}: unexpected tensor {unexpected[0]!r} (all unexpected: {unexpected})")
    for name, tensor in state.items():
        if tuple(tensor.shape) != tuple(expected[name].shape):
            raise CheckpointError(f"{source}: tensor {name!r} has shape {tuple(tensor.shape)}, "
                                  f"the model expects {tuple(expected[name].shape)}")
    model.load_state_dict(state, strict=True)


# ------------------------------------------------------------------------------------------------
# official Parcae checkpoints
# ------------------------------------------------------------------------------------------------
_BLOCK_RE = re.compile(r"^transformer\.(prelude|core_block|coda)\.(\d+)\.(.+)$")
_VE_RE = re.compile(r"^value_embeds\.(\d+)\.weight$")


def official_name_to_ours(name: str, cfg: ModelConfig) -> str:
    """Map one official parameter name onto ours (KeyError naming it if the tables do not know it)."""
    if name in OFFICIAL_TOP_LEVEL:
        return OFFICIAL_TOP_LEVEL[name]
    if m := _VE_RE.match(name):
        return f"value_embeds.tables.{m.group(1)}.weight"
    if (m := _BLOCK_RE.match(name)) and m.group(3) in OFFICIAL_BLOCK_PARTS:
        return f"{OFFICIAL_STAGES[m.group(1)]}.{m.group(2)}.{OFFICIAL_BLOCK_PARTS[m.group(3)]}"
    raise KeyError(f"official parameter {name!r} has no entry in the name tables of models/checkpoint.py")


def our_name_to_official(name: str) -> str:
    for official, ours in OFFICIAL_TOP_LEVEL.items():
        if name == ours:
            return official
    if m := re.match(r"^value_embeds\.tables\.(\d+)\.weight$", name):
        return f"value_embeds.{m.group(1)}.weight"
    stages = {ours: official for official, ours in OFFICIAL_STAGES.items()}
    parts = {ours: official for official, ours in OFFICIAL_BLOCK_PARTS.items()}
    if (m := re.match(r"^(prelude|core|coda)\.(\d+)\.(.+)$", name)) and m.group(3) in parts:
        return f"transformer.{stages[m.group(1)]}.{m.group(2)}.{parts[m.group(3)]}"
    raise KeyError(f"parameter {name!r} has no official name in the tables of models/checkpoint.py")


def _rope_rows(head_dim: int, n_heads: int, to_half_split: bool) -> torch.Tensor:
    """Row permutation of a q/k projection between interleaved and half-split RoPE layouts."""
    per_head = torch.cat((torch.arange(0, head_dim, 2), torch.arange(1, head_dim, 2)))
    if not to_half_split:
        per_head = torch.argsort(per_head)
    return torch.cat([per_head + h * head_dim for h in range(n_heads)])


def _convert_rope(state: dict[str, torch.Tensor], cfg: ModelConfig, to_half_split: bool,
                  names: tuple[str, str]) -> None:
    rows = _rope_rows(cfg.head_dim, cfg.n_heads, to_half_split)
    for name in list(state):
        if name.endswith(names):
            state[name] = state[name][rows].contiguous()


def official_state_to_ours(state: dict[str, torch.Tensor], cfg: ModelConfig, *,
                           source: str = "official checkpoint") -> dict[str, torch.Tensor]:
    state = {_strip_prefixes(k): v for k, v in state.items()}
    freqs = state.pop(OFFICIAL_ROPE_BUFFER, None)
    if freqs is not None:
        check_rope_buffer(freqs, cfg, source=source)
    head = state.pop(OFFICIAL_TIED_HEAD, None)
    wte = state.get("transformer.wte.weight")
    if head is not None and wte is not None and not torch.equal(head, wte):
        raise CheckpointError(f"{source}: {OFFICIAL_TIED_HEAD!r} differs from 'transformer.wte.weight'; "
                              f"only tied embeddings are supported")
    out: dict[str, torch.Tensor] = {}
    for name, tensor in state.items():
        try:
            out[official_name_to_ours(name, cfg)] = tensor
        except KeyError as err:
            raise CheckpointError(f"{source}: {err.args[0]}") from None
    if OFFICIAL_ROPE_INTERLEAVED:
        _convert_rope(out, cfg, to_half_split=True, names=("attn.q.weight", "attn.k.weight"))
        _convert_qk_bias(out, cfg, to_half_split=True)
    return out


def _convert_qk_bias(state: dict[str, torch.Tensor], cfg: ModelConfig, to_half_split: bool) -> None:
    """Official q/k bias [2, 1, H, hd] (interleaved channels) <-> ours [2, H, hd] (half-split)."""
    per_head = _rope_rows(cfg.head_dim, 1, to_half_split)
    for name in list(state):
        if name.endswith("attn.qk_bias"):
            bias = state[name]
            state[name] = (bias.reshape(2, cfg.n_heads, cfg.head_dim)[..., per_head].contiguous() if to_half_split
                           else bias[..., per_head].reshape(2, 1, cfg.n_heads, cfg.head_dim).contiguous())


def check_rope_buffer(freqs: torch.Tensor, cfg: ModelConfig, *, source: str) -> None:
    """An official freqs_cis buffer ([1, L, 1, hd/2, 2] = cos, sin) must equal the table loopscope
    computes for this config (base, condense ratio, head dim); it is dropped after this check."""
    from .blocks import rope_tables

    want_shape = (cfg.head_dim // 2, 2)
    if freqs.dim() != 5 or tuple(freqs.shape[-2:]) != want_shape:
        raise CheckpointError(f"{source}: buffer {OFFICIAL_ROPE_BUFFER!r} has shape {tuple(freqs.shape)}; "
                              f"expected [1, L, 1, {cfg.head_dim // 2}, 2] for head_dim {cfg.head_dim}")
    length = freqs.shape[1]
    cos, sin = rope_tables(0, length, cfg.head_dim, cfg.rope_theta, torch.device("cpu"), condense=cfg.rope_condense)
    got = freqs[0, :, 0].float()
    # float32 angles of positions up to L: allow the rounding of two ways of computing them
    tolerance = 1e-6 * max(length, 1) + 1e-5
    err = max(float((got[..., 0] - cos).abs().max()), float((got[..., 1] - sin).abs().max()))
    if err > tolerance:
        raise CheckpointError(f"{source}: buffer {OFFICIAL_ROPE_BUFFER!r} differs from the RoPE table for "
                              f"rope_base={cfg.rope_theta:g}, rope_condense_ratio={cfg.rope_condense:g} by {err:.3g} "
                              f"(> {tolerance:.2g}): config.json's rope_settings do not match the weights")


def ours_state_to_official(state: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """The inverse mapping (official names, interleaved RoPE rows, tied lm_head written out)."""
    state = dict(state)
    if OFFICIAL_ROPE_INTERLEAVED:
        _convert_rope(state, cfg, to_half_split=False, names=("attn.q.weight", "attn.k.weight"))
        _convert_qk_bias(state, cfg, to_half_split=False)
    out = {our_name_to_official(k): v for k, v in state.items()}
    out[OFFICIAL_TIED_HEAD] = out["transformer.wte.weight"]
    return out


def _strip_prefixes(name: str) -> str:
    changed = True
    while changed:
        changed = False
        for prefix in WRAPPER_PREFIXES:
            if name.startswith(prefix):
                name, changed = name[len(prefix):], True
    return name


def _lookup(raw: dict[str, Any], dotted: str) -> Any:
    value: Any = raw
    for part in dotted.split("."):
        if not isinstance(value, dict) or part not in value:
            return None
        value = value[part]
    return value


def config_from_official(raw: dict[str, Any], *, value_embeds: bool, source: str = "config.json") -> ModelConfig:
    """A ModelConfig from an official Parcae config.json (`save_pretrained`'s asdict(config), or a training
    config). Settings that change the math are reproduced or refused with one line naming the key."""
    def refuse(key: str, value: Any, why: str) -> CheckpointError:
        return CheckpointError(f"{source}: {key}={value!r} is not supported: {why}")

    raw = {**OFFICIAL_DEFAULTS, **raw}

    for key, want in OFFICIAL_REQUIRED.items():
        if key in raw and raw[key] != want:
            raise refuse(key, raw[key], f"loopscope reproduces only {want!r}")
    fields: dict[str, Any] = {}
    for field, keys in OFFICIAL_CONFIG_KEYS.items():
        for key in keys:
            value = _lookup(raw, key)
            if value is not None:
                if isinstance(value, list):
                    raise CheckpointError(f"{source}: {key}={value!r} is a schedule; a checkpoint needs one value")
                fields[field] = value
                break
    for field in ("d_model", "n_heads", "vocab_size", "n_core"):
        if field not in fields:
            raise CheckpointError(f"{source}: none of {OFFICIAL_CONFIG_KEYS[field]} found (needed for {field})")
    d = fields["d_model"]
    if raw.get("recurrent_embedding_dimension", d) != d:
        raise refuse("recurrent_embedding_dimension", raw["recurrent_embedding_dimension"],
                     f"the state width must equal n_embd={d}")
    if raw.get("num_key_value_heads", fields["n_heads"]) != fields["n_heads"]:
        raise refuse("num_key_value_heads", raw["num_key_value_heads"], "grouped-query attention")
    if raw.get("recurrent_num_attention_heads") not in (None, fields["n_heads"]):
        raise refuse("recurrent_num_attention_heads", raw["recurrent_num_attention_heads"],
                     f"the core must have num_attention_heads={fields['n_heads']} heads")
    core_ff = raw.get("recurrent_intermediation_embedding_dimension")
    if core_ff is not None and core_ff != fields.get("d_ff", 4 * d):
        raise refuse("recurrent_intermediation_embedding_dimension", core_ff,
                      f"the core MLP width must equal intermediate_size={fields.get('d_ff', 4 * d)}")
    if "head_dim" in raw and raw["head_dim"] != d // fields["n_heads"]:
        raise CheckpointError(f"{source}: head_dim={raw['head_dim']} != n_embd / num_attention_heads")
    if _lookup(raw, "rope_settings.use_rope") is False:
        fields["positional"] = "none"
    nonlin = raw["nonlin_name"]
    if nonlin not in OFFICIAL_NONLINS:
        raise refuse("nonlin_name", nonlin, f"known: {sorted(OFFICIAL_NONLINS)}")
    fields["mlp"] = OFFICIAL_NONLINS[nonlin]
    state_init = raw["state_init"]
    if state_init not in OFFICIAL_STATE_INITS:
        raise refuse("state_init", state_init, f"known: {sorted(OFFICIAL_STATE_INITS)}")
    fields["state_init"] = OFFICIAL_STATE_INITS[state_init]
    strategy = raw["init_strategy"]
    embed_scale, logit_scale = OFFICIAL_INIT_SCALES.get(strategy, (lambda d: 1.0, lambda d: 1.0))
    fields["embed_scale"], fields["logit_scale"] = float(embed_scale(d)), float(logit_scale(d))
    if strategy in OFFICIAL_EMBEDDING_STD:
        std = OFFICIAL_EMBEDDING_STD[strategy]
        if std is None:
            raise refuse("init_strategy", strategy, "its like-init state std depends on the layer count")
        fields["state_std"] = float(std(d))
    for key in ("emb_scale", "embed_scale"):  # flat keys some exports carry
        if raw.get(key, 1) != 1 and raw[key] != fields["embed_scale"]:
            raise refuse(key, raw[key], f"init_strategy {strategy!r} implies {fields['embed_scale']:g}")
    for key in ("logit_softcap", "clip_qkv"):
        if fields.get(key) is not None:
            fields[key] = float(fields[key])
    if "rope_condense" in fields:
        fields["rope_condense"] = float(fields["rope_condense"])
    fields["loop_scope"] = "batch" if raw.get("recurrent_iteration_method") == "per-batch" else "sequence"
    return ModelConfig("parcae", value_embeds=value_embeds, **fields)


def _load_official_weights(directory: Path) -> tuple[dict[str, torch.Tensor], Path]:
    """model.safetensors if present; else the legacy pickled state dict, read with weights_only=True."""
    st = directory / "model.safetensors"
    if st.is_file():
        with safe_open(str(st), framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}, st
    for name in ("pytorch_model.bin", "model.pt"):
        path = directory / name
        if path.is_file():
            state = torch.load(path, map_location="cpu", weights_only=True)
            if isinstance(state, dict) and "model" in state and isinstance(state["model"], dict):
                state = state["model"]  # training checkpoints wrap the state dict
            if not isinstance(state, dict):
                raise CheckpointError(f"{path}: expected a state dict, got {type(state).__name__}")
            return state, path
    raise FileNotFoundError(f"{directory}: no model.safetensors, pytorch_model.bin or model.pt")


def load_official_parcae(source: str | Path, *, device: str | torch.device = "cpu",
                         dtype: torch.dtype | None = None, revision: str | None = None,
                         network_timeout_s: float = 3.0, seed: int | None = None) -> nn.Module:
    """An official Parcae checkpoint as a loopscope model. `source` is a local directory
    (config.json + weights) or a Hugging Face repo id such as "SandyResearch/parcae-140m"."""
    directory = Path(source)
    if not directory.is_dir():
        directory = _download_from_hub(str(source), revision, network_timeout_s)
    config_path = directory / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"{directory}: no config.json")
    raw = json.loads(config_path.read_text())
    state, weights_path = _load_official_weights(directory)
    has_ve = any(_VE_RE.match(_strip_prefixes(k)) for k in state)
    cfg = config_from_official(raw, value_embeds=has_ve, source=str(config_path))
    ours = official_state_to_ours(state, cfg, source=str(weights_path))
    dtype = dtype or next(iter(ours.values())).dtype
    model = build(cfg, device="cpu", dtype=dtype, seed=seed)
    missing = sorted(set(model.state_dict()) - set(ours))
    if missing:
        official = [our_name_to_official(n) for n in missing]
        raise CheckpointError(f"{weights_path}: missing tensor {official[0]!r} (ours: {missing[0]!r}); "
                              f"all missing: {official}")
    expected = model.state_dict()
    for name, tensor in ours.items():
        if name in expected and tensor.shape != expected[name].shape:
            raise CheckpointError(f"{weights_path}: tensor {our_name_to_official(name)!r} has shape "
                                  f"{tuple(tensor.shape)}; config.json implies {tuple(expected[name].shape)}")
    load_state_strict(model, ours, source=str(weights_path))
    return model.to(device)


def _unreachable(host: str, port: int, timeout_s: float) -> str | None:
    """Why `host` cannot be reached within `timeout_s` (DNS included), or None if it can."""
    def connect() -> None:
        socket.create_connection((host, port), timeout=timeout_s).close()

    pool = ThreadPoolExecutor(max_workers=1)
    try:
        pool.submit(connect).result(timeout=timeout_s)
        return None
    except FutureTimeout:
        return f"no answer within {timeout_s} s"
    except OSError as err:
        return str(err)
    finally:
        pool.shutdown(wait=False)  # a hung DNS lookup must not hold the caller


def _download_from_hub(repo_id: str, revision: str | None, timeout_s: float) -> Path:
    """Fetch config.json and the weights; fail fast and clearly without huggingface_hub or network."""
    try:
        from huggingface_hub import hf_hub_download
        from huggingface_hub.errors import EntryNotFoundError
    except ImportError:
        raise RuntimeError(f"load_official_parcae: {repo_id!r} is not a local directory and huggingface_hub "
                           f"is not installed (pip install 'loopscope[hf]'), or pass a local directory") from None
    problem = _unreachable("huggingface.co", 443, timeout_s)
    if problem:
        raise RuntimeError(f"load_official_parcae: {repo_id!r} is not a local directory and huggingface.co "
                           f"is unreachable ({problem}); download it elsewhere and pass the directory")
    config = Path(hf_hub_download(repo_id, "config.json", revision=revision))
    for name in ("model.safetensors", "pytorch_model.bin", "model.pt"):
        try:
            hf_hub_download(repo_id, name, revision=revision)
            return config.parent
        except EntryNotFoundError:
            continue
    raise FileNotFoundError(f"{repo_id}: no model.safetensors, pytorch_model.bin or model.pt in the repo")


# ------------------------------------------------------------------------------------------------
# Huginn (recurrent-depth) state dicts -> the `rdm` family
# ------------------------------------------------------------------------------------------------
HUGINN_TOP_LEVEL: dict[str, str] = {
    "transformer.wte.weight": "wte.weight",
    "transformer.adapter.weight": "adapter.weight",
    "transformer.ln_f.weight": "ln_f.weight",
}
HUGINN_BLOCK_PARTS: dict[str, str] = {
    "norm_1.weight": "norm1.weight", "norm_2.weight": "norm2.weight",
    "norm_3.weight": "norm3.weight", "norm_4.weight": "norm4.weight",
    "attn.proj.weight": "attn.o.weight", "mlp.proj.weight": "mlp.proj.weight",
}
_HUGINN_BLOCK_RE = re.compile(r"^transformer\.(prelude|core_block|coda)\.(\d+)\.(.+)$")


def rdm_config_from_huginn(raw: dict[str, Any], *, source: str = "config.json") -> ModelConfig:
    """An `rdm` ModelConfig with Huginn's architecture from a RavenConfig-style config.json."""
    from .layout import huginn_overrides

    for key, want in {"injection_type": "linear", "block_class_name": "SandwichBlock",
                      "mlp_class_name": "GatedMLP", "nonlin_name": "SiLU", "bias": False,
                      "tie_embeddings": True}.items():
        if key in raw and raw[key] != want:
            raise CheckpointError(f"{source}: {key}={raw[key]!r} is not supported (Huginn's is {want!r})")
    d, heads = raw["n_embd"], raw.get("n_heads", raw.get("num_attention_heads"))
    fields = huginn_overrides(d) | {
        "d_ff": raw["intermediate_size"], "qk_bias": bool(raw.get("qk_bias", True)),
        "norm_eps": raw.get("norm_eps", 1e-6), "rope_theta": float(raw.get("rope_base", 50_000)),
    }
    if raw.get("init_strategy", "takase") != "takase":
        raise CheckpointError(f"{source}: init_strategy={raw['init_strategy']!r} is not supported (need 'takase')")
    return ModelConfig("rdm", vocab_size=raw.get("padded_vocab_size", raw["vocab_size"]), d_model=d,
                       n_heads=heads, n_prelude=raw["n_layers_in_prelude"],
                       n_core=raw["n_layers_in_recurrent_block"], n_coda=raw["n_layers_in_coda"],
                       mu_rec=raw["mean_recurrence"], mu_bwd=raw["mean_backprop_depth"],
                       max_seq_len=raw.get("block_size", 4096), **fields)


def huginn_state_to_rdm(state: dict[str, torch.Tensor], cfg: ModelConfig, *,
                        source: str = "Huginn state dict") -> dict[str, torch.Tensor]:
    """Huginn tensor names and layouts -> `rdm`'s: Wqkv -> q, k, v; SwiGLU fc [2f, d] -> fc (gate) and up;
    q/k rows and the q/k bias from interleaved to half-split RoPE; freqs_cis checked and dropped; the tied
    lm_head dropped."""
    state = {_strip_prefixes(k): v for k, v in state.items()}
    freqs = state.pop(OFFICIAL_ROPE_BUFFER, None)
    if freqs is not None:
        check_rope_buffer(freqs, cfg, source=source)
    head = state.pop(OFFICIAL_TIED_HEAD, None)
    if head is not None and not torch.equal(head, state["transformer.wte.weight"]):
        raise CheckpointError(f"{source}: {OFFICIAL_TIED_HEAD!r} differs from 'transformer.wte.weight'; "
                              f"only tied embeddings are supported")
    stages = {"prelude": "prelude", "core_block": "core", "coda": "coda"}
    d = cfg.d_model
    out: dict[str, torch.Tensor] = {}
    for name, tensor in state.items():
        if name in HUGINN_TOP_LEVEL:
            out[HUGINN_TOP_LEVEL[name]] = tensor
            continue
        m = _HUGINN_BLOCK_RE.match(name)
        if m is None:
            raise CheckpointError(f"{source}: Huginn tensor {name!r} has no entry in models/checkpoint.py")
        stage, index, part = m.groups()
        prefix = f"{stages[stage]}.{index}."
        if part in HUGINN_BLOCK_PARTS:
            out[prefix + HUGINN_BLOCK_PARTS[part]] = tensor
        elif part == "attn.Wqkv.weight":
            q, k, v = tensor.split([d, d, d], dim=0)
            out[prefix + "attn.q.weight"], out[prefix + "attn.k.weight"], out[prefix + "attn.v.weight"] = q, k, v
        elif part == "attn.qk_bias":
            out[prefix + "attn.qk_bias"] = tensor
        elif part == "mlp.fc.weight":
            gate, up = tensor.chunk(2, dim=0)
            out[prefix + "mlp.fc.weight"], out[prefix + "mlp.up.weight"] = gate, up
        else:
            raise CheckpointError(f"{source}: Huginn tensor {name!r} has no entry in models/checkpoint.py")
    _convert_rope(out, cfg, to_half_split=True, names=("attn.q.weight", "attn.k.weight"))
    _convert_qk_bias(out, cfg, to_half_split=True)
    return {k: v.contiguous() for k, v in out.items()}
