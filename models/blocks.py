"""Shared building blocks, nanochat style: pre-RMSNorm, RoPE, QK-norm after RoPE, relu^2 MLP, value
embeddings, "scaled-zero" init. Every family imports these; none copies them.

Switches for the official models' variants (all off by default): q/k bias and no QK-norm (Huginn), SwiGLU,
GELU (official Parcae `nonlin_name`), clip_qkv, RoPE condensing, and GPT-2 blocks (LayerNorm, biases,
tanh-GELU, no positions) for the Ohio State model."""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from .cache import CacheKey, KVCache, StaticKVCache
from .config import ModelConfig
from .layout import VE_GATE_CHANNELS, has_value_embed, value_embed_layers, ve_gate_layers  # noqa: F401


def init_std(cfg: ModelConfig) -> float:
    """The "scaled" init std sqrt(2/(5d)) used by Parcae and Huginn."""
    return math.sqrt(2.0 / (5.0 * cfg.d_model))





def make_norm(cfg: ModelConfig, dim: int | None = None) -> nn.Module:
    dim = cfg.d_model if dim is None else dim
    return nn.LayerNorm(dim, eps=cfg.norm_eps) if cfg.norm == "layernorm" else RMSNorm(dim, cfg.norm_eps)


def embed_tokens(cfg: ModelConfig, wte: nn.Embedding, idx: torch.Tensor) -> torch.Tensor:
    x = wte(idx)
    return x * cfg.embed_scale if cfg.embed_scale != 1.0 else x


def lm_logits(cfg: ModelConfig, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Tied unembedding, then the official logit scale and soft cap when set."""
    logits = F.linear(x, weight)
    if cfg.logit_scale != 1.0:
        logits = logits * cfg.logit_scale
    if cfg.logit_softcap is not None:
        logits = cfg.logit_softcap * torch.tanh(logits / cfg.logit_softcap)
    return logits


def positions(cfg: ModelConfig, start: int, length: int,
              device: torch.device) -> tuple[torch.Tensor, torch.Tensor] | None:
    """RoPE cos/sin for the positions of this forward, or None without positions (NoPE)."""
    if cfg.positional == "none":
        return None
    return rope_tables(start, length, cfg.head_dim, cfg.rope_theta, device, condense=cfg.rope_condense)


def next_token_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy in nats over all positions (fp32 softmax)."""
    return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())


class RMSNorm(nn.Module):
    """RMSNorm with a learnable gain, computed in fp32 (eps 1e-5 as in Parcae)."""

    def __init__(self, dim: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.rms_norm(x.float(), (x.shape[-1],), self.weight.float(), self.eps)
        return y.type_as(x)


def rope_tables(start: int | torch.Tensor, length: int, head_dim: int, theta: float,
                device: torch.device, condense: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin for positions [start, start+length) (divided by `condense`), shape [length, head_dim/2], fp32.
    `start` may be a 0-d tensor (a static cache's position), so a compiled decode step does not specialise
    on it."""
    inv_freq = theta ** (-torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim)
    pos = torch.arange(length, device=device, dtype=torch.float32) + start
    if condense != 1.0:
        pos = pos / condense
    angles = torch.outer(pos, inv_freq)
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate channel pairs (i, i + hd/2) of x [B, T, H, hd] (the "half-split" layout; checkpoints
    that pair adjacent channels (2i, 2i+1) are converted at import by permuting q/k rows)."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half].float(), x[..., half:].float()
    cos, sin = cos[None, :, None, :], sin[None, :, None, :]
    return torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1).type_as(x)


class Attention(nn.Module):
    """Causal MHA; QK-norm (parameter-free RMSNorm) after RoPE; optional value embedding added to v
    through a per-head gate 2*sigmoid(W_g x[..., :32]). In the official order: value embedding, clip_qkv,
    q/k bias, RoPE, QK-norm."""

    def __init__(self, cfg: ModelConfig, with_value_embed: bool) -> None:
        super().__init__()
        d, bias = cfg.d_model, cfg.linear_bias
        self.n_heads, self.head_dim = cfg.n_heads, cfg.head_dim
        self.q = nn.Linear(d, d, bias=bias)
        self.k = nn.Linear(d, d, bias=bias)
        self.v = nn.Linear(d, d, bias=bias)
        self.o = nn.Linear(d, d, bias=bias)
        self.ve_gate = nn.Linear(min(VE_GATE_CHANNELS, d), cfg.n_heads, bias=False) if with_value_embed else None
        self.qk_bias = nn.Parameter(torch.zeros(2, cfg.n_heads, cfg.head_dim)) if cfg.qk_bias else None
        self.qk_norm, self.clip = cfg.qk_norm, cfg.clip_qkv

    @torch.no_grad()
    def reset_parameters(self) -> None:
        if self.qk_bias is not None:
            self.qk_bias.zero_()

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None,
                value_embed: torch.Tensor | None = None,
                kv: tuple[KVCache | StaticKVCache, CacheKey] | None = None) -> torch.Tensor:
        B, T, d = x.shape
        q = self.q(x).view(B, T, self.n_heads, self.head_dim)
        k = self.k(x).view(B, T, self.n_heads, self.head_dim)
        v = self.v(x).view(B, T, self.n_heads, self.head_dim)
        if self.ve_gate is not None and value_embed is not None:
            gate = 2.0 * torch.sigmoid(self.ve_gate(x[..., : self.ve_gate.in_features]))
            v = v + gate.unsqueeze(-1) * value_embed.view(B, T, self.n_heads, self.head_dim)
        if self.clip is not None:
            q, k, v = (t.clamp(-self.clip, self.clip) for t in (q, k, v))
        if self.qk_bias is not None:
            q, k = q + self.qk_bias[0], k + self.qk_bias[1]
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        if self.qk_norm:  # parameter-free, torch's default eps (finfo(dtype).eps), as nanochat and Parcae
            q = F.rms_norm(q, (self.head_dim,))
            k = F.rms_norm(k, (self.head_dim,))
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        if kv is None:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            cache, key = kv
            y = cache.attend(key, q, k, v)
        return self.o(y.transpose(1, 2).reshape(B, T, d))


class MLP(nn.Module):
    """relu2: proj(0.5*relu(fc x)^2) (Parcae/nanochat); swiglu: proj(silu(fc x) * up x) (Huginn);
    gelu: proj(gelu(fc x)) (exact erf, official Parcae "GELU"); gelu-tanh: the tanh approximation (GPT-2)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        assert cfg.d_ff is not None  # resolved by ModelConfig
        self.kind = cfg.mlp
        self.fc = nn.Linear(cfg.d_model, cfg.d_ff, bias=cfg.linear_bias)
        self.up = nn.Linear(cfg.d_model, cfg.d_ff, bias=cfg.linear_bias) if cfg.mlp == "swiglu" else None
        self.proj = nn.Linear(cfg.d_ff, cfg.d_model, bias=cfg.linear_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc(x)
        if self.up is not None:
            h = F.silu(h) * self.up(x)
        elif self.kind == "relu2":
            h = 0.5 * F.relu(h).square()
        else:
            h = F.gelu(h, approximate="tanh" if self.kind == "gelu-tanh" else "none")
        return self.proj(h)


class Block(nn.Module):
    """Pre-norm residual block; with `sandwich_norm` Huginn's x = n2(x + attn(n1 x)); x = n4(x + mlp(n3 x))."""

    def __init__(self, cfg: ModelConfig, with_value_embed: bool = False) -> None:
        super().__init__()
        self.norm1 = make_norm(cfg)
        self.attn = Attention(cfg, with_value_embed)
        self.norm2 = make_norm(cfg)
        self.mlp = MLP(cfg)
        self.sandwich = bool(cfg.sandwich_norm)
        if self.sandwich:
            self.norm3 = make_norm(cfg)
            self.norm4 = make_norm(cfg)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None,
                value_embed: torch.Tensor | None = None,
                kv: tuple[KVCache | StaticKVCache, CacheKey] | None = None) -> torch.Tensor:
        if self.sandwich:
            x = self.norm2(x + self.attn(self.norm1(x), rope, value_embed, kv))
            return self.norm4(x + self.mlp(self.norm3(x)))
        x = x + self.attn(self.norm1(x), rope, value_embed, kv)
        return x + self.mlp(self.norm2(x))


class ValueEmbeddings(nn.Module):
    """Per-layer token tables (nanochat) for the layers of a stack that take one."""

    def __init__(self, cfg: ModelConfig, layers: list[int]) -> None:
        super().__init__()
        self.tables = nn.ModuleDict({str(i): nn.Embedding(cfg.vocab_size, cfg.d_model) for i in layers})

    def lookup(self, idx: torch.Tensor) -> dict[int, torch.Tensor]:
        """All tables at once: looped cores reuse the same lookups on every loop."""
        return {int(i): table(idx) for i, table in self.tables.items()}


def make_stack(cfg: ModelConfig, layer_ids: range, n_total: int) -> nn.ModuleList:
    """Blocks for `layer_ids` of a stack of `n_total` physical layers (value-embedding gates by
    `ve_gate_layers`)."""
    assert n_total == cfg.n_physical_layers
    gates = set(ve_gate_layers(cfg))
    return nn.ModuleList(Block(cfg, i in gates) for i in layer_ids)





def out_proj_std(cfg: ModelConfig) -> float:
    """Std of the output projections (attn.o, mlp.proj): 0 for "scaled-zero" and "gpt2" (the Ohio State
    training default c_scale = 0); Takase's scaled std sqrt(2/(5d)) / sqrt(2 L) for "takase", with L the
    expected unrolled depth P + R*mu_rec + C (as Huginn)."""
    if cfg.init != "takase":
        return 0.0
    depth = cfg.n_layers if not cfg.is_looped else cfg.n_prelude + cfg.n_core * cfg.mu_rec + cfg.n_coda
    return init_std(cfg) / math.sqrt(2 * depth)


@torch.no_grad()
def init_weights(model: nn.Module, cfg: ModelConfig, generator: torch.Generator) -> None:
    """Parcae's "scaled-zero" init: trunc-normal(std sqrt(2/(5d)), +-3 std) for every matrix and
    embedding, zero for output projections (attn.o, mlp.proj) and value-embedding gates (gate = 1),
    ones for norm gains. "takase" gives output projections Takase's scaled std instead; "gpt2" draws
    matrices from N(0, 0.02) and embeddings from N(0, 1) as GPT-2's Conv1D and nn.Embedding do.
    Family modules (injections, halting units) init themselves through `reset_parameters()`.
    Raises if a parameter is left uninitialised (build() allocates with to_empty)."""
    std = 0.02 if cfg.init == "gpt2" else init_std(cfg)
    out_std = out_proj_std(cfg)

    def draw(weight: torch.Tensor, s: float) -> None:
        if cfg.init == "gpt2":
            nn.init.normal_(weight, std=s, generator=generator)
        else:
            nn.init.trunc_normal_(weight, std=s, a=-3 * s, b=3 * s, generator=generator)

    done: set[int] = set()
    family_modules: list[nn.Module] = []
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            if name.endswith("ve_gate") or (name.endswith(("attn.o", "mlp.proj")) and out_std == 0.0):
                module.weight.zero_()
            else:
                draw(module.weight, out_std if name.endswith(("attn.o", "mlp.proj")) else std)
            if module.bias is not None:
                module.bias.zero_()
        elif isinstance(module, nn.Embedding):
            draw(module.weight, 1.0 if cfg.init == "gpt2" else std)
        elif isinstance(module, (RMSNorm, nn.LayerNorm)):
            module.weight.fill_(1.0)
            if getattr(module, "bias", None) is not None:
                module.bias.zero_()
        elif hasattr(module, "reset_parameters"):
            family_modules.append(module)
            continue
        else:
            continue
        done.update(id(p) for p in module.parameters(recurse=False))
    for module in family_modules:  # after the generic rules, so they may override their children
        module.reset_parameters()
        done.update(id(p) for p in module.parameters())
    missing = [n for n, p in model.named_parameters() if id(p) not in done]
    if missing:
        raise RuntimeError(f"init_weights: no init rule for parameters {missing} "
                           f"(give their module a reset_parameters() method)")
