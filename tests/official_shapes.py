"""Official-shaped checkpoints and the official models' forward math, written against official tensor names.

Parcae (`sandyresearch/parcae`, parcae_lm): `save_pretrained` writes config.json = asdict(ParcaeConfig) plus
"_class_name", and model.pt = model.state_dict(), which holds the persistent `freqs_cis` buffer
([1, block_size, 1, head_dim/2, 2] = cos, sin of interleaved channel pairs) and the tied `lm_head.weight`.
Huginn (`seal-rg/recurrent-pretraining`, recpre/raven_modeling_minimal.py): fused `attn.Wqkv`, per-head
`attn.qk_bias` [2, 1, H, hd], SwiGLU `mlp.fc` [2f, d] (gate rows first), sandwich norms, concat adapter.
The math below is re-expressed from those sources; it shares no code with loopscope.models.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

# the keys of asdict(ParcaeConfig) with the official dataclass defaults
PARCAE_CONFIG_DEFAULTS: dict = {
    "name": "", "hf_config": {}, "block_size": 4096, "n_embd": 4096, "intermediate_size": None,
    "num_attention_heads": 32, "num_key_value_heads": None, "vocab_size": 50254, "padding_multiple": 512,
    "padded_vocab_size": None,
    "rope_settings": {"use_rope": True, "rope_condense_ratio": 1, "rope_base": 50000},
    "use_abacus": False, "randomize_positions_from": None, "block_class_name": "TransformerPreNormBlock",
    "norm_class_name": "LayerNorm", "attn_impl": "flash", "norm_eps": 1e-05, "mlp_class_name": "BaseMLP",
    "nonlin_name": "GELU", "bias": False, "qk_bias": False, "init_strategy": "scaled", "init_orthogonal": False,
    "skip_initialization": False, "mup_model_scaling_factor": 1, "use_fused_head": "pytorch",
    "debias_attention": False, "center_attention": False, "clip_qkv": None, "qk_norm": False,
    "logit_softcap": None, "activation_checkpoint_impl": "per-iteration", "simple_ops": False,
    "strategy": "single", "injection_type": "diagonal", "n_layers_in_recurrent_block": 4,
    "n_layers_in_prelude": 1, "n_layers_in_coda": 1, "state_init": "like-init",
    "recurrent_embedding_dimension": 1024, "recurrent_intermediation_embedding_dimension": 3520,
    "recurrent_num_attention_heads": None, "prelude_norm": False, "sampling_scheme": "poisson-truncated-full",
    "mean_recurrence": 32, "mean_backprop_depth": 8, "lockstep_n": False, "lockstep_k": False,
    "curriculum_target": "forward", "recurrent_iteration_method": "per-batch", "tie_embeddings": False,
    "model_class_name": "Parcae", "_is_recurrent_block_config": False, "_class_name": "ParcaeConfig",
}

# scales of the official init tables that act in the forward pass: strategy -> (embed_scale, logit_scale)
INIT_SCALES = {
    "scaled-zero": (lambda d: 1.0, lambda d: 1.0),
    "takase-scaled": (lambda d: math.sqrt(d), lambda d: math.sqrt(2 / 5) / math.sqrt(d)),
    "scaled-and-logit-scale": (lambda d: 1.0, lambda d: 1 / math.sqrt(d)),
}


def has_ve(layer: int, n_layer: int) -> bool:
    return layer % 2 == (n_layer - 1) % 2


def freqs_cis(head_dim: int, length: int, theta: float, condense: float = 1) -> torch.Tensor:
    inv = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    t = torch.arange(length, dtype=torch.float32) / condense
    f = torch.outer(t, inv)
    return torch.stack([f.cos()[None, :, None, :], f.sin()[None, :, None, :]], dim=4)


def parcae_config(**changes) -> dict:
    """A save_pretrained config.json for a small Parcae model (released-preset settings unless changed)."""
    raw = dict(PARCAE_CONFIG_DEFAULTS)
    raw.update(name="parcae-test", block_size=32, vocab_size=256, padding_multiple=64, padded_vocab_size=256,
               n_embd=64, num_attention_heads=2, num_key_value_heads=2, intermediate_size=256, tie_embeddings=True,
               norm_class_name="RMSNorm", nonlin_name="ReLU2", qk_norm=True, prelude_norm=True,
               init_strategy="scaled-zero", init_orthogonal=True, recurrent_embedding_dimension=64,
               recurrent_intermediation_embedding_dimension=256, n_layers_in_recurrent_block=2,
               n_layers_in_prelude=1, n_layers_in_coda=2, mean_recurrence=3, mean_backprop_depth=2,
               recurrent_iteration_method="per-sequence")
    raw.update(changes)
    return raw


def parcae_state(raw: dict, *, value_embeds: bool = True, seed: int = 0) -> dict[str, torch.Tensor]:
    """An official Parcae state dict: official names, the gate rule of parcae_lm (n_layer = R * mu_bwd,
    coda ids offset by R * mu_rec), freqs_cis, tied lm_head. Every tensor random (norm gains near 1)."""
    g = torch.Generator().manual_seed(seed)
    d, V, f = raw["n_embd"], raw["padded_vocab_size"], raw["intermediate_size"]
    H = raw["num_attention_heads"]
    P, R, C = raw["n_layers_in_prelude"], raw["n_layers_in_recurrent_block"], raw["n_layers_in_coda"]

    def rnd(*shape, scale=0.1, base=0.0):
        return torch.randn(*shape, generator=g) * scale + base

    w: dict[str, torch.Tensor] = {"transformer.wte.weight": rnd(V, d, scale=0.3)}
    n_layer = R * raw["mean_backprop_depth"]
    coda_offset = P + R * raw["mean_recurrence"]
    stages = [("prelude", i, i) for i in range(P)] + [("core_block", i, P + i) for i in range(R)]
    stages += [("coda", i, coda_offset + i) for i in range(C)]
    for stage, i, layer_id in stages:
        pre = f"transformer.{stage}.{i}."
        w[pre + "norm_1.weight"] = rnd(d, base=1.0)
        w[pre + "norm_2.weight"] = rnd(d, base=1.0)
        for part in ("c_q", "c_k", "c_v", "c_proj"):
            w[pre + f"attn.{part}.weight"] = rnd(d, d, scale=0.15)
        if raw["qk_bias"]:
            w[pre + "attn.qk_bias"] = rnd(2, 1, H, d // H, scale=0.3)
        if value_embeds and has_ve(layer_id, n_layer):
            w[pre + "attn.ve_gate.weight"] = rnd(H, 32)
        w[pre + "mlp.fc.weight"] = rnd(f, d, scale=0.15)
        w[pre + "mlp.proj.weight"] = rnd(d, f, scale=0.1)
    w["transformer.adapter.A_log"] = rnd(d)
    w["transformer.adapter.dt_bias"] = rnd(d, base=0.5)
    w["transformer.adapter.B"] = torch.eye(d) + rnd(d, d, scale=0.05)
    w["transformer.C.weight"] = torch.eye(d) + rnd(d, d, scale=0.05)
    w["transformer.ln_f.weight"] = rnd(d, base=1.0)
    if raw["prelude_norm"]:
        w["transformer.ln_prelude.weight"] = rnd(d, base=1.0)
    if value_embeds:
        n = P + R + C
        for i in range(n):
            if has_ve(i, n):
                w[f"value_embeds.{i}.weight"] = rnd(V, d, scale=0.3)
    w["lm_head.weight"] = w["transformer.wte.weight"]
    rope = raw["rope_settings"]
    w["freqs_cis"] = freqs_cis(d // H, raw["block_size"], rope["rope_base"], rope["rope_condense_ratio"])
    return w


def _rms(x: torch.Tensor, weight: torch.Tensor | None, eps: float) -> torch.Tensor:
    y = x * torch.rsqrt(x.square().mean(-1, keepdim=True) + eps)
    return y if weight is None else y * weight


def _rope(x: torch.Tensor, fc: torch.Tensor) -> torch.Tensor:
    """Interleaved pairs (2i, 2i+1) rotated by the buffer's (cos, sin); x [T, H, hd]."""
    pairs = x.unflatten(-1, (-1, 2))
    cos, sin = fc[0, : x.shape[0], :, :, 0], fc[0, : x.shape[0], :, :, 1]
    return torch.stack([pairs[..., 0] * cos - pairs[..., 1] * sin,
                        pairs[..., 1] * cos + pairs[..., 0] * sin], -1).flatten(-2)


def _causal(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    T, hd = q.shape[0], q.shape[-1]
    scores = torch.einsum("thd,shd->hts", q, k) / math.sqrt(hd)
    scores = scores.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf"))
    return torch.einsum("hts,shd->thd", scores.softmax(-1), v).reshape(T, -1)


def parcae_logits(w: dict, raw: dict, tokens: torch.Tensor, h0: torch.Tensor, loops: int) -> torch.Tensor:
    """parcae_lm's Parcae.forward for one sequence, with a fixed h0 and `loops` iterations."""
    T, H, d = tokens.shape[0], raw["num_attention_heads"], raw["n_embd"]
    hd, eps, fc = d // H, raw["norm_eps"], w["freqs_cis"]
    P, R, C = raw["n_layers_in_prelude"], raw["n_layers_in_recurrent_block"], raw["n_layers_in_coda"]
    embed_scale, logit_scale = (s(d) for s in INIT_SCALES[raw["init_strategy"]])
    clip = raw["clip_qkv"]

    def block(x, pre, table):
        src = _rms(x, w[pre + "norm_1.weight"], eps)
        q, k, v = ((src @ w[pre + f"attn.{p}.weight"].T).reshape(T, H, hd) for p in ("c_q", "c_k", "c_v"))
        if table in w and pre + "attn.ve_gate.weight" in w:
            gate = 2 * torch.sigmoid(src[:, :32] @ w[pre + "attn.ve_gate.weight"].T)
            v = v + gate[..., None] * w[table][tokens].reshape(T, H, hd)
        if clip is not None:
            q, k, v = q.clamp(-clip, clip), k.clamp(-clip, clip), v.clamp(-clip, clip)
        if raw["qk_bias"]:
            q, k = q + w[pre + "attn.qk_bias"][0, 0], k + w[pre + "attn.qk_bias"][1, 0]
        q, k = _rope(q, fc), _rope(k, fc)
        if raw["qk_norm"]:
            q, k = _rms(q, None, torch.finfo(q.dtype).eps), _rms(k, None, torch.finfo(k.dtype).eps)
        x = x + _causal(q, k, v) @ w[pre + "attn.c_proj.weight"].T
        hidden = _rms(x, w[pre + "norm_2.weight"], eps) @ w[pre + "mlp.fc.weight"].T
        hidden = 0.5 * F.relu(hidden).square() if raw["nonlin_name"] == "ReLU2" else F.gelu(hidden)
        return x + hidden @ w[pre + "mlp.proj.weight"].T

    e = w["transformer.wte.weight"][tokens] * embed_scale
    for i in range(P):
        e = block(e, f"transformer.prelude.{i}.", f"value_embeds.{i}.weight")
    if raw["prelude_norm"]:
        e = _rms(e, w["transformer.ln_prelude.weight"], eps)
    dt = F.softplus(w["transformer.adapter.dt_bias"])
    decay = torch.exp(-dt * w["transformer.adapter.A_log"].exp())
    h = h0
    for _ in range(loops):
        h = h * decay + dt * (e @ w["transformer.adapter.B"].T)
        for i in range(R):
            h = block(h, f"transformer.core_block.{i}.", f"value_embeds.{P + i}.weight")
    x = h @ w["transformer.C.weight"].T
    for i in range(C):
        x = block(x, f"transformer.coda.{i}.", f"value_embeds.{P + R + i}.weight")
    logits = (_rms(x, w["transformer.ln_f.weight"], eps) @ w["lm_head.weight"].T) * logit_scale
    if raw["logit_softcap"] is not None:
        logits = raw["logit_softcap"] * torch.tanh(logits / raw["logit_softcap"])
    return logits


# --- Huginn ------------------------------------------------------------------------------------------
def huginn_config(**changes) -> dict:
    raw = dict(n_embd=64, n_heads=2, n_layers=6, block_size=32, vocab_size=256, padded_vocab_size=256,
               padding_multiple=256, tie_embeddings=True, intermediate_size=176, bias=False,
               architecture_class_name="RecurrentGPT", block_class_name="SandwichBlock",
               norm_class_name="RMSNorm_llama", norm_eps=1e-6, mlp_class_name="GatedMLP", nonlin_name="SiLU",
               init_strategy="takase", state_init="like-init", injection_type="linear",
               n_layers_in_recurrent_block=2, mean_recurrence=4, sampling_scheme="poisson-lognormal-filling",
               mean_backprop_depth=2, n_layers_in_prelude=2, n_layers_in_coda=2, qk_bias=True, rope_base=50000)
    raw.update(changes)
    return raw


def huginn_state(raw: dict, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    d, V, f, H = raw["n_embd"], raw["padded_vocab_size"], raw["intermediate_size"], raw["n_heads"]

    def rnd(*shape, scale=0.1, base=0.0):
        return torch.randn(*shape, generator=g) * scale + base

    w = {"transformer.wte.weight": rnd(V, d, scale=0.05)}
    for stage, n in (("prelude", raw["n_layers_in_prelude"]), ("core_block", raw["n_layers_in_recurrent_block"]),
                     ("coda", raw["n_layers_in_coda"])):
        for i in range(n):
            pre = f"transformer.{stage}.{i}."
            for j in (1, 2, 3, 4):
                w[pre + f"norm_{j}.weight"] = rnd(d, base=1.0)
            w[pre + "attn.Wqkv.weight"] = rnd(3 * d, d, scale=0.15)
            w[pre + "attn.qk_bias"] = rnd(2, 1, H, d // H, scale=0.3)
            w[pre + "attn.proj.weight"] = rnd(d, d)
            w[pre + "mlp.fc.weight"] = rnd(2 * f, d, scale=0.15)
            w[pre + "mlp.proj.weight"] = rnd(d, f)
    w["transformer.adapter.weight"] = rnd(d, 2 * d, scale=0.15)
    w["transformer.ln_f.weight"] = rnd(d, base=1.0)
    w["lm_head.weight"] = w["transformer.wte.weight"]
    w["freqs_cis"] = freqs_cis(d // H, raw["block_size"], raw["rope_base"])
    return w


def huginn_logits(w: dict, raw: dict, tokens: torch.Tensor, h0: torch.Tensor, loops: int) -> torch.Tensor:
    """RavenForCausalLM.forward for one sequence with input_states = h0 and num_steps = (loops, 0)."""
    T, H, d = tokens.shape[0], raw["n_heads"], raw["n_embd"]
    hd, eps, fc = d // H, raw["norm_eps"], w["freqs_cis"]

    def block(x, pre):
        src = _rms(x, w[pre + "norm_1.weight"], eps)
        q, k, v = (src @ w[pre + "attn.Wqkv.weight"].T).split([d, d, d], dim=-1)
        q, k, v = q.reshape(T, H, hd), k.reshape(T, H, hd), v.reshape(T, H, hd)
        q, k = q + w[pre + "attn.qk_bias"][0, 0], k + w[pre + "attn.qk_bias"][1, 0]
        q, k = _rope(q, fc), _rope(k, fc)
        x = _rms(_causal(q, k, v) @ w[pre + "attn.proj.weight"].T + x, w[pre + "norm_2.weight"], eps)
        gate, up = (_rms(x, w[pre + "norm_3.weight"], eps) @ w[pre + "mlp.fc.weight"].T).chunk(2, dim=-1)
        return _rms((F.silu(gate) * up) @ w[pre + "mlp.proj.weight"].T + x, w[pre + "norm_4.weight"], eps)

    e = w["transformer.wte.weight"][tokens] * math.sqrt(d)
    for i in range(raw["n_layers_in_prelude"]):
        e = block(e, f"transformer.prelude.{i}.")
    x = h0
    for _ in range(loops):
        x = torch.cat([x, e], dim=-1) @ w["transformer.adapter.weight"].T
        for i in range(raw["n_layers_in_recurrent_block"]):
            x = block(x, f"transformer.core_block.{i}.")
    x = _rms(x, w["transformer.ln_f.weight"], eps)
    for i in range(raw["n_layers_in_coda"]):
        x = block(x, f"transformer.coda.{i}.")
    return _rms(x, w["transformer.ln_f.weight"], eps) @ w["lm_head.weight"].T
