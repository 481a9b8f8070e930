"""Checkpoints: safetensors save/load, and import of the official Parcae checkpoints.

Nothing is unpickled: our own files are safetensors (the config travels in the file's metadata); the
official `.bin`/`.pt` state dicts are read with `torch.load(weights_only=True)`, the one legacy path.

Official names come from the `sandyresearch/parcae` code (`parcae_lm/`), module paths
`transformer.{wte, prelude, ln_prelude, adapter, core_block, C, coda, ln_f}`, `value_embeds.{layer}`,
`lm_head`; block internals `norm_1, norm_2, attn.{c_q, c_k, c_v, c_proj, ve_gate}, mlp.{fc, proj}`.
They are mapped onto ours by the explicit tables below, which are the one place to correct a name.
"""

from __future__ import annotations

import json
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
    "mlp.fc.weight": "mlp.fc.weight",
    "mlp.proj.weight": "mlp.proj.weight",
}
OFFICIAL_TIED_HEAD = "lm_head.weight"  # tied to transformer.wte.weight in the released models
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
    "state_init": ("state_init",),
    "prelude_norm": ("prelude_norm",),
}
# Official settings this implementation reproduces only with these values.
OFFICIAL_REQUIRED: dict[str, Any] = {
    "injection_type": "diagonal",
    "tie_embeddings": True,
    "qk_norm": True,
    "bias": False,
    "qk_bias": False,
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
    return out


def ours_state_to_official(state: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """The inverse mapping (official names, interleaved RoPE rows, tied lm_head written out)."""
    state = dict(state)
    if OFFICIAL_ROPE_INTERLEAVED:
        _convert_rope(state, cfg, to_half_split=False, names=("attn.q.weight", "attn.k.weight"))
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
    """A ModelConfig from an official Parcae config.json (raw training config or HF export)."""
    for key, want in OFFICIAL_REQUIRED.items():
        if key in raw and raw[key] != want:
            raise CheckpointError(f"{source}: {key}={raw[key]!r} is not supported (need {want!r})")
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
        raise CheckpointError(f"{source}: recurrent_embedding_dimension="
                              f"{raw['recurrent_embedding_dimension']} != n_embd={d} is not supported")
    if raw.get("num_key_value_heads", fields["n_heads"]) != fields["n_heads"]:
        raise CheckpointError(f"{source}: num_key_value_heads={raw['num_key_value_heads']} "
                              f"(grouped-query attention) is not supported")
    if "head_dim" in raw and raw["head_dim"] != d // fields["n_heads"]:
        raise CheckpointError(f"{source}: head_dim={raw['head_dim']} != n_embd / num_attention_heads")
    for key in ("emb_scale", "embed_scale"):
        if raw.get(key, 1) != 1:
            raise CheckpointError(f"{source}: {key}={raw[key]} is not supported (need 1)")
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
