"""One config schema for every model family (dense and looped).

A config is pure data: frozen, hashable, round-trips through `to_dict`/`from_dict`. Family-dependent
defaults (injection type, loop sampler, norms) are resolved in `__post_init__` so `to_dict()` always
shows the values a model is really built with.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

FAMILIES: tuple[str, ...] = ("gpt", "parcae", "rdm", "looped", "ut")
LOOPED_FAMILIES: tuple[str, ...] = ("parcae", "rdm", "looped", "ut")
MLP_KINDS: tuple[str, ...] = ("relu2", "swiglu", "gelu", "gelu-tanh")
NORM_KINDS: tuple[str, ...] = ("rmsnorm", "layernorm")
POSITIONALS: tuple[str, ...] = ("rope", "none")
INIT_KINDS: tuple[str, ...] = ("scaled-zero", "takase", "gpt2")
INJECTIONS: dict[str, tuple[str, ...]] = {
    "parcae": ("diagonal",),
    "rdm": ("concat", "add", "none"),
    "looped": ("none", "add"),
    "ut": ("none", "add"),
}
LOOP_SAMPLERS: tuple[str, ...] = ("poisson", "lognormal-poisson", "fixed")
LOOP_SCOPES: tuple[str, ...] = ("sequence", "batch")
# like-init: trunc-normal(std sqrt(2/(5d))) times embed_scale; zero; embed: h0 = e;
# scaled-normal: N(0, 1/d) (what the official Parcae code calls state_init = "embed")
STATE_INITS: tuple[str, ...] = ("like-init", "zero", "embed", "scaled-normal")
# Fields added after cell ids were fixed: `to_dict` writes them only when they differ from their default,
# so the config (and the cell id) of every model that does not use them stays what it was.
SPARSE_FIELDS: tuple[str, ...] = ("embed_scale", "logit_scale", "logit_softcap", "positional", "rope_condense",
                                  "qk_norm", "qk_bias", "clip_qkv", "norm", "linear_bias", "init",
                                  "loops_min", "loops_max", "state_std")

# Family defaults that differ from the dataclass defaults (the research notes' knob matrix).
_FAMILY_DEFAULTS: dict[str, dict[str, Any]] = {
    "gpt": {},
    "parcae": {"injection": "diagonal", "loop_sampler": "poisson", "loop_scope": "sequence",
               "state_init": "like-init", "prelude_norm": True, "sandwich_norm": False},
    "rdm": {"injection": "concat", "loop_sampler": "lognormal-poisson", "loop_scope": "batch",
            "state_init": "like-init", "prelude_norm": False, "sandwich_norm": True},
    # looped: state_init follows the injection (see __post_init__)
    "looped": {"injection": "none", "loop_sampler": "fixed", "loop_scope": "batch",
               "prelude_norm": False, "sandwich_norm": False},
    "ut": {"injection": "none", "loop_sampler": "fixed", "loop_scope": "batch",
           "state_init": "embed", "prelude_norm": False, "sandwich_norm": False},
}


def default_mu_bwd(cfg: ModelConfig) -> int | None:
    """Loops with gradient: ceil(mu_rec/2) for parcae/rdm (Parcae Eq. 6); all of them (full backprop)
    for plain looped models and for ut (ACT backpropagates through every step)."""
    if cfg.family in ("parcae", "rdm"):
        return math.ceil(cfg.mu_rec / 2)
    if cfg.family == "looped":
        return cfg.mu_rec
    if cfg.family == "ut":
        return cfg.act_max_steps
    return None


@dataclass(frozen=True)
class ModelConfig:
    family: str                     # "gpt" | "parcae" | "rdm" | "looped" | "ut"
    vocab_size: int = 256
    d_model: int = 128
    n_heads: int = 4
    n_layers: int = 4               # dense depth (gpt); forced to 0 for looped families
    n_prelude: int = 0              # P
    n_core: int = 0                 # R (layers in the looped block)
    n_coda: int = 0                 # C
    d_ff: int | None = None         # default 4*d_model
    mlp: str = "relu2"              # "relu2" (0.5*relu(x)^2) | "swiglu"
    rope_theta: float = 50_000.0
    rope_condense: float = 1.0      # positions divided by this before RoPE (official rope_condense_ratio)
    positional: str = "rope"        # "rope" | "none" (NoPE, the Ohio State default)
    embed_scale: float = 1.0        # token embedding (and like-init h0) times this; sqrt(d) in Huginn/Takase
    logit_scale: float = 1.0        # logits times this (official init_strategy "takase-scaled" etc.)
    logit_softcap: float | None = None  # logits = c * tanh(logits / c)
    qk_norm: bool = True            # parameter-free RMSNorm on q and k after RoPE (nanochat, Parcae)
    qk_bias: bool = False           # learned per-head q/k bias added before RoPE (Huginn)
    clip_qkv: float | None = None   # clamp q, k, v to [-c, c] (official clip_qkv)
    norm: str = "rmsnorm"           # "rmsnorm" | "layernorm" (GPT-2: LayerNorm with bias)
    linear_bias: bool = False       # biases on every block linear (GPT-2)
    init: str = "scaled-zero"       # "scaled-zero" (Parcae) | "takase" (Huginn) | "gpt2" (Ohio State)
    value_embeds: bool = False      # nanochat value embeddings on alternating layers
    max_seq_len: int = 256
    norm_eps: float = 1e-5
    mu_rec: int = 1                 # mean train loop count (looped families)
    mu_bwd: int | None = None       # default ceil(mu_rec/2) (parcae, rdm); mu_rec (looped); act_max_steps (ut)
    # --- looped-family knobs (None = family default, resolved in __post_init__) ---
    injection: str | None = None    # parcae "diagonal"; rdm "concat"|"add"|"none"; looped/ut "none"|"add"
    loop_sampler: str | None = None  # "poisson" | "lognormal-poisson" | "fixed"
    loop_scope: str | None = None   # train loop counts drawn per "sequence" (Parcae) or per "batch" (Huginn)
    lognormal_sigma: float = 0.5    # rdm (Huginn) log-normal Poisson sampler
    loops_min: int = 1              # "poisson" draws are clipped to [loops_min, loops_max]
    loops_max: int | None = None    # (Ohio State: Poisson(4) clipped to [2, 8])
    state_init: str | None = None   # "like-init" (fresh trunc-normal h0 every forward) | "zero" | "embed" (h0 = e)
    state_std: float | None = None  # like-init std before embed_scale (default sqrt(2/(5d)); official init tables)
    prelude_norm: bool | None = None  # RMSNorm on the prelude output before injection (parcae)
    sandwich_norm: bool | None = None  # Huginn sandwich norms: x = n2(x + attn(n1 x)); x = n4(x + mlp(n3 x))
    # --- ut (Universal Transformer + ACT) ---
    act_eps: float = 0.01           # halt when the cumulative halting probability reaches 1 - eps
    ponder_cost: float = 0.01       # weight of the ACT ponder loss
    act_max_steps: int | None = None  # default 2*mu_rec

    def __post_init__(self) -> None:
        where = f"ModelConfig(family={self.family!r})"
        if self.family not in FAMILIES:
            raise ValueError(f"{where}: unknown family {self.family!r}; known: {', '.join(FAMILIES)}")
        if self.family == "looped" and self.state_init is None:
            # Saunshi/Ouro loop the embedded input itself; with additive re-injection (Yang, OSU) h0 = 0.
            object.__setattr__(self, "state_init", "zero" if self.injection == "add" else "embed")
        for key, value in _FAMILY_DEFAULTS[self.family].items():
            if getattr(self, key) is None:
                object.__setattr__(self, key, value)
        if self.d_ff is None:
            object.__setattr__(self, "d_ff", 4 * self.d_model)
        if self.family in LOOPED_FAMILIES:
            object.__setattr__(self, "n_layers", 0)
            if self.family == "ut" and self.act_max_steps is None:
                object.__setattr__(self, "act_max_steps", 2 * self.mu_rec)
            if self.mu_bwd is None:
                object.__setattr__(self, "mu_bwd", default_mu_bwd(self))
        self._validate(where)

    def _validate(self, where: str) -> None:
        def bad(key: str, why: str) -> ValueError:
            return ValueError(f"{where}: {key}={getattr(self, key)!r} {why}")

        if self.d_model <= 0 or self.n_heads <= 0 or self.d_model % self.n_heads:
            raise bad("d_model", f"must be a positive multiple of n_heads={self.n_heads}")
        if (self.d_model // self.n_heads) % 2:
            raise bad("n_heads", "must give an even head dim (RoPE rotates channel pairs)")
        for key, kinds in (("mlp", MLP_KINDS), ("norm", NORM_KINDS), ("positional", POSITIONALS),
                           ("init", INIT_KINDS)):
            if getattr(self, key) not in kinds:
                raise bad(key, f"must be one of {kinds}")
        if not (self.embed_scale > 0 and self.logit_scale > 0 and self.rope_condense > 0):
            raise bad("embed_scale", "embed_scale, logit_scale and rope_condense must be > 0")
        for key in ("logit_softcap", "clip_qkv"):
            if getattr(self, key) is not None and not getattr(self, key) > 0:
                raise bad(key, "must be > 0 (or unset)")
        if self.vocab_size <= 0 or self.max_seq_len <= 0:
            raise bad("vocab_size", "and max_seq_len must be positive")
        if self.family == "gpt":
            if self.n_layers < 1:
                raise bad("n_layers", "must be >= 1 for family 'gpt'")
            if self.n_prelude or self.n_core or self.n_coda:
                raise bad("n_core", "n_prelude/n_core/n_coda must be 0 for family 'gpt'")
            return
        if self.n_core < 1:
            raise bad("n_core", f"must be >= 1 for looped family {self.family!r}")
        if min(self.n_prelude, self.n_coda) < 0:
            raise bad("n_prelude", "n_prelude and n_coda must be >= 0")
        if self.mu_rec < 1:
            raise bad("mu_rec", "must be >= 1")
        if self.mu_bwd is not None and self.mu_bwd < 1:
            raise bad("mu_bwd", "must be >= 1")
        if self.injection not in INJECTIONS[self.family]:
            raise bad("injection", f"must be one of {INJECTIONS[self.family]} for family {self.family!r}")
        if self.loop_sampler not in LOOP_SAMPLERS:
            raise bad("loop_sampler", f"must be one of {LOOP_SAMPLERS}")
        if self.loop_scope not in LOOP_SCOPES:
            raise bad("loop_scope", f"must be one of {LOOP_SCOPES}")
        if self.loops_min < 1 or (self.loops_max is not None and self.loops_max < self.loops_min):
            raise bad("loops_min", f"must be >= 1 and <= loops_max={self.loops_max}")
        if self.state_init not in STATE_INITS:
            raise bad("state_init", f"must be one of {STATE_INITS}")
        if self.family == "ut" and (self.act_max_steps is None or self.act_max_steps < 1):
            raise bad("act_max_steps", "must be >= 1")

    # --- derived sizes -------------------------------------------------------------------------------
    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def is_looped(self) -> bool:
        return self.family in LOOPED_FAMILIES

    @property
    def n_physical_layers(self) -> int:
        """Transformer blocks stored in the model (shared core counted once)."""
        return self.n_layers if self.family == "gpt" else self.n_prelude + self.n_core + self.n_coda

    def replace(self, **changes: Any) -> ModelConfig:
        """A copy with some fields changed. A derived field that still has its derived default
        (mu_bwd from mu_rec, act_max_steps from mu_rec, d_ff from d_model) follows its source."""
        derived = {"mu_bwd": ("mu_rec", default_mu_bwd),
                   "act_max_steps": ("mu_rec", lambda c: 2 * c.mu_rec),
                   "d_ff": ("d_model", lambda c: 4 * c.d_model)}
        for key, (source, rule) in derived.items():
            if source in changes and key not in changes and getattr(self, key) == rule(self):
                changes[key] = None
        return dataclasses.replace(self, **changes)

    # --- serialisation -------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        defaults = {f.name: f.default for f in dataclasses.fields(self)}
        return {k: v for k, v in dataclasses.asdict(self).items()
                if k not in SPARSE_FIELDS or v != defaults[k]}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"ModelConfig.from_dict: unknown key {unknown[0]!r} "
                             f"(all unknown: {unknown}); known keys: {sorted(known)}")
        if "family" not in d:
            raise ValueError("ModelConfig.from_dict: missing required key 'family'")
        return cls(**d)
