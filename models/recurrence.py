"""What every looped family shares: how many loops to run (per sequence, with truncated backprop),
the initial state, the loop driver with adaptive exit, the per-loop instrumentation, and the
prelude -> loop -> coda skeleton (`LoopedLM`) with its KV slots per loop and region labels.

A family file subclasses `LoopedLM` and holds only its own math: injection, readout, init.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from .blocks import (
    ValueEmbeddings,
    embed_tokens,
    lm_logits,
    make_norm,
    make_stack,
    next_token_loss,
    positions,
    value_embed_layers,
)
from .cache import KVCache, kv_slot
from .config import ModelConfig
from .regions import core_label, loop_label, region

EXIT_KINDS: tuple[str, ...] = ("state", "kl", "latent-diff", "huginn-kl", "kl-entropy")
PER_SEQUENCE_EXITS: tuple[str, ...] = ("latent-diff", "huginn-kl", "kl-entropy")


@dataclass(frozen=True)
class ExitRule:
    """Adaptive exit at inference.

    All tokens at once (the whole batch stops when every token's criterion is below `threshold`):
      "state"  max over tokens of ||h_t - h_{t-1}|| / ||h_t||;
      "kl"     max over tokens of KL(p_t || p_{t-1}) between successive readouts.
    Per sequence (a sequence that meets it keeps its state; the loop stops once all have), as the
    official code does:
      "latent-diff"  Huginn: mean over tokens of ||h_t - h_{t-1}|| / ||h_t|| (its default 0.03);
      "huginn-kl"    Huginn: KL(p_{t-1} || p_t) at the last token, the first step against the uniform
                     distribution (its default 1e-3);
      "kl-entropy"   Ohio State: KL(p_t || p_{t-1}) < threshold and entropy(p_t) < `entropy` at the last
                     token, checked from the second loop on (its defaults 1e-3 and 3.0 nats).
    KL kinds need a coda + head pass per loop."""

    kind: str = "state"
    threshold: float = 0.03
    min_loops: int = 1
    entropy: float = 3.0

    def __post_init__(self) -> None:
        if self.kind not in EXIT_KINDS:
            raise ValueError(f"ExitRule: kind={self.kind!r} is not one of {EXIT_KINDS}")
        if not self.threshold > 0:
            raise ValueError(f"ExitRule: threshold={self.threshold} must be > 0")
        if not self.entropy > 0:
            raise ValueError(f"ExitRule: entropy={self.entropy} must be > 0")

    @property
    def per_sequence(self) -> bool:
        return self.kind in PER_SEQUENCE_EXITS

    @property
    def needs_readout(self) -> bool:
        return self.kind in ("kl", "huginn-kl", "kl-entropy")

    @classmethod
    def huginn(cls, kind: str = "huginn-kl") -> ExitRule:
        """Huginn's rules at their official default thresholds."""
        return cls(kind, 1e-3 if kind == "huginn-kl" else 0.03)

    @classmethod
    def ohio_state(cls, eps_kl: float = 1e-3, entropy: float = 3.0, min_loops: int = 1) -> ExitRule:
        return cls("kl-entropy", eps_kl, min_loops, entropy)


@dataclass(frozen=True)
class LoopPlan:
    """Loops per sequence: `nograd[i]` steps without grad, then `grad[i]` steps with grad."""

    nograd: torch.Tensor  # [B] int64 on CPU
    grad: torch.Tensor    # [B] int64 on CPU
    fixed: tuple[int, int] | None = None  # (nograd, grad) as Python ints when every sequence runs the same
                                          # count: the loop then unrolls under torch.compile, no graph break

    @property
    def total(self) -> torch.Tensor:
        return self.nograd + self.grad

    @property
    def uniform(self) -> bool:
        if self.fixed is not None:
            return True
        return bool((self.nograd == self.nograd[0]).all() and (self.grad == self.grad[0]).all())


class LoopRNG:
    """The random draws a looped model owns (loop counts on CPU, h0 on the model's device), so seeded
    runs are deterministic without touching the global RNG."""

    def __init__(self, seed: int) -> None:
        self.reseed(seed)

    def reseed(self, seed: int) -> None:
        self.seed = seed
        self.cpu = torch.Generator().manual_seed(seed)
        self._device: dict[str, torch.Generator] = {}

    def on(self, device: torch.device) -> torch.Generator:
        if device.type == "cpu":
            return self.cpu
        key = str(device)
        if key not in self._device:  # a separate stream per device, seeded from the same seed
            self._device[key] = torch.Generator(device=device).manual_seed(self.seed + 1)
        return self._device[key]


def plan_loops(cfg: ModelConfig, batch: int, loops: int | None, training: bool,
               gen: torch.Generator) -> LoopPlan:
    """`loops` given: exactly that many. Training without `loops`: the family's sampler. Eval: mu_rec.
    Backprop reaches only the last min(T, mu_bwd) loops of each sequence."""
    assert cfg.mu_bwd is not None
    if loops is not None or not training or cfg.loop_sampler == "fixed":
        count = cfg.mu_rec if loops is None else loops
        if count < 1:
            raise ValueError(f"{cfg.family}: loops={count} must be >= 1")
        grad_count = min(count, cfg.mu_bwd)
        return LoopPlan(nograd=torch.full((batch,), count - grad_count, dtype=torch.int64),
                        grad=torch.full((batch,), grad_count, dtype=torch.int64),
                        fixed=(count - grad_count, grad_count))
    n_draws = batch if cfg.loop_scope == "sequence" else 1
    total = sample_loop_counts(cfg, n_draws, gen).expand(batch).clone()
    grad = total.clamp(max=cfg.mu_bwd)
    return LoopPlan(nograd=total - grad, grad=grad)


def sample_loop_counts(cfg: ModelConfig, n: int, gen: torch.Generator) -> torch.Tensor:
    if cfg.loop_sampler == "poisson":  # Parcae: T = max(1, Poisson(mu_rec)); Ohio State clips to [2, 8]
        draws = torch.poisson(torch.full((n,), float(cfg.mu_rec)), generator=gen)
        return draws.to(torch.int64).clamp(min=cfg.loops_min, max=cfg.loops_max)
    if cfg.loop_sampler == "lognormal-poisson":  # Huginn: tau ~ N(ln r - s^2/2, s); T = Poisson(e^tau) + 1
        sigma = cfg.lognormal_sigma
        tau = torch.randn(n, generator=gen) * sigma + (math.log(cfg.mu_rec) - sigma**2 / 2)
        return torch.poisson(tau.exp(), generator=gen).to(torch.int64) + 1
    raise ValueError(f"{cfg.family}: loop_sampler={cfg.loop_sampler!r} does not sample")


def initial_state(cfg: ModelConfig, e: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """h0: "like-init" = fresh trunc-normal (std sqrt(2/(5d)), +-3 std) times embed_scale on every call
    (Huginn and official Parcae scale it with the embedding); "zero"; "embed" = e; "scaled-normal" =
    N(0, 1/d) (official Parcae's state_init "embed")."""
    if cfg.state_init == "zero":
        return torch.zeros_like(e)
    if cfg.state_init == "embed":
        return e
    if cfg.state_init == "scaled-normal":
        draw = torch.randn(e.shape, device=e.device, dtype=torch.float32, generator=gen)
        return (draw / math.sqrt(cfg.d_model)).to(e.dtype)
    std = cfg.state_std if cfg.state_std is not None else math.sqrt(2.0 / (5.0 * cfg.d_model))
    # inverse-CDF truncated normal (+-3 std); bounds computed in Python so torch.compile does not
    # break the graph on a .item() as nn.init.trunc_normal_ does
    lo, hi = (0.5 * (1.0 + math.erf(z / math.sqrt(2.0))) for z in (-3.0, 3.0))
    u = torch.rand(e.shape, device=e.device, dtype=torch.float32, generator=gen) * (hi - lo) + lo
    h0 = torch.erfinv(2.0 * u - 1.0) * (math.sqrt(2.0) * std)
    if cfg.embed_scale != 1.0:
        h0 = h0 * cfg.embed_scale
    return h0.to(e.dtype)


def _token_norm(x: torch.Tensor) -> torch.Tensor:
    return x.float().norm(dim=-1)


def _exit_measure(rule: ExitRule, new: torch.Tensor, delta: torch.Tensor, norm: torch.Tensor,
                  logits: torch.Tensor | None, prev_logp: torch.Tensor | None,
                  loop: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(the criterion: a 0-dim tensor for batch-wide kinds, [B] for per-sequence kinds; this readout's
    log-probabilities, kept for the next loop)."""
    relative = delta / norm.clamp_min(1e-12)  # [B, T]
    if rule.kind == "state":
        return relative.max(), None
    if rule.kind == "latent-diff":
        return relative.mean(dim=-1), None
    assert logits is not None
    if rule.kind == "kl":
        logp = F.log_softmax(logits.float(), dim=-1)
        if prev_logp is None:
            return torch.tensor(float("inf")), logp
        return (logp.exp() * (logp - prev_logp)).sum(-1).max(), logp
    logp = F.log_softmax(logits[:, -1].float(), dim=-1)  # [B, V]: the last token, as the official code
    if rule.kind == "huginn-kl":
        if prev_logp is None:  # the first step is compared with the uniform distribution
            prev_logp = torch.full_like(logp, -math.log(logp.shape[-1]))
        return (prev_logp.exp() * (prev_logp - logp)).sum(-1), logp
    # kl-entropy (Ohio State): both below their thresholds, from the second loop on
    if prev_logp is None:
        return torch.full(logp.shape[:1], float("inf"), device=logp.device), logp
    p = logp.exp()
    kl = (p * (logp - prev_logp)).sum(-1)
    entropy = -(p * logp).sum(-1)
    return torch.where(entropy < rule.entropy, kl, torch.full_like(kl, float("inf"))), logp


def run_loops(step: Callable[[torch.Tensor, int], torch.Tensor], h: torch.Tensor, plan: LoopPlan, *,
              exit_rule: ExitRule | None = None,
              readout: Callable[[torch.Tensor], torch.Tensor] | None = None,
              stats: dict | None = None) -> torch.Tensor:
    """Run the loops of `plan`; sequences whose count is used up keep their state (torch.where).
    With `exit_rule`, stop early once all tokens (or, per-sequence kinds, all sequences) meet it; the
    skipped loops are really not computed."""
    uniform = plan.uniform
    if exit_rule is not None and not uniform:
        raise ValueError("run_loops: adaptive exit needs the same loop count for every sequence "
                         "(pass loops=T or use eval mode)")
    if exit_rule is not None and exit_rule.needs_readout and readout is None:
        raise ValueError(f"run_loops: exit kind {exit_rule.kind!r} needs a readout function")
    per_sequence = exit_rule is not None and exit_rule.per_sequence
    batch = h.shape[0]
    exit_loop = plan.total.clone()          # loops each sequence ran (per-sequence exits lower it)
    done = torch.zeros(batch, dtype=torch.bool)
    norms: list[float] = []
    measures: list[float] = []
    prev_logp: torch.Tensor | None = None
    residual = float("nan")
    loop = 0
    exited = False
    for i, (phase, counts) in enumerate((("nograd", plan.nograd), ("grad", plan.grad))):
        n_steps = plan.fixed[i] if plan.fixed is not None else int(counts.max())
        with torch.set_grad_enabled(phase == "grad" and torch.is_grad_enabled()):
            for s in range(n_steps):
                with region(loop_label(loop)):
                    new = step(h, loop)
                    if not uniform or (per_sequence and bool(done.any())):  # freeze finished sequences
                        active = ((counts > s) & ~done).to(h.device).view(-1, *([1] * (h.dim() - 1)))
                        new = torch.where(active, new, h)
                loop += 1
                if stats is not None or exit_rule is not None:
                    delta = _token_norm((new - h).detach())
                    norm = _token_norm(new.detach())
                    if stats is not None:
                        norms.append(float(norm.mean()))
                        residual = float(delta.mean())
                    if exit_rule is not None:
                        logits = readout(new).detach() if exit_rule.needs_readout and readout else None
                        measure, prev_logp = _exit_measure(exit_rule, new, delta, norm, logits, prev_logp, loop)
                        measure = measure.cpu()
                        if per_sequence:
                            newly = (measure < exit_rule.threshold) & ~done & (loop >= exit_rule.min_loops)
                            exit_loop[newly] = loop
                            done |= newly
                            measures.append(float(measure[~done | newly].max()) if batch else float("nan"))
                            exited = bool(done.all())
                        else:
                            measures.append(float(measure))
                            exited = loop >= exit_rule.min_loops and float(measure) < exit_rule.threshold
                h = new
                if exited:
                    break
        if exited:
            break
    if exit_rule is not None and not per_sequence:
        exit_loop.fill_(loop)
    elif exit_rule is not None:
        exit_loop[~done] = loop
    if stats is not None:
        stats["state_norm"] = norms
        stats["final_residual"] = residual
        stats["loops_used"] = float(exit_loop.float().mean())
        stats["loops_per_sequence"] = exit_loop.tolist()
        if exit_rule is not None:
            stats["loops_computed"] = loop
            stats["exit_measure"] = measures
            stats["exited_early"] = exited
    return h


class LoopedLM(nn.Module):
    """The skeleton every prelude -> loop -> coda family shares, written once:

        x   = embed(idx); x = prelude(x); e = ln_prelude(x)
        h   = h0 (the family's state_init, or `h0`)
        h   = core(inject(h, e)) for T loops          # run_loops: sampled T, truncated backprop, exit
        out = head(ln_f(coda(readout(h))))

    A family subclass builds its modules in order (`_build_prelude`, its injection, `_build_core`, its
    readout, `_build_coda`: the order fixes the seeded init) and defines only its own math:
    `make_injection(e)` (returns the per-loop map h -> core input, computing loop-invariant parts once),
    `read_state(h)` (default: none), `loop_stats(stats)` (default: none)."""

    has_readout = False  # whether `read_state` does anything (its region label is only entered if so)

    def __init__(self, config: ModelConfig, seed: int, family: str) -> None:
        super().__init__()
        if config.family != family:
            raise ValueError(f"{type(self).__name__}: config.family={config.family!r}, expected {family!r}")
        self.config = config
        self.rng = LoopRNG(seed)

    # --- construction, in init order ------------------------------------------------------------
    def _build_prelude(self) -> None:
        cfg = self.config
        self.wte = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.value_embeds = ValueEmbeddings(cfg, value_embed_layers(cfg))
        self.prelude = make_stack(cfg, range(0, cfg.n_prelude), cfg.n_physical_layers)
        self.ln_prelude = make_norm(cfg) if cfg.prelude_norm else nn.Identity()

    def _build_core(self) -> None:
        cfg = self.config
        self.core = make_stack(cfg, range(cfg.n_prelude, cfg.n_prelude + cfg.n_core), cfg.n_physical_layers)

    def _build_coda(self) -> None:
        cfg = self.config
        n = cfg.n_physical_layers
        self.coda = make_stack(cfg, range(cfg.n_prelude + cfg.n_core, n), n)
        self.ln_f = make_norm(cfg)

    # --- the family's own math -----------------------------------------------------------------
    def make_injection(self, e: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
        raise NotImplementedError

    def read_state(self, h: torch.Tensor) -> torch.Tensor:
        return h

    def loop_stats(self, stats: dict) -> None:
        """Family-specific stability statistics added to `stats` after a forward."""

    # --- shared ---------------------------------------------------------------------------------
    def reseed(self, seed: int) -> None:
        self.rng.reseed(seed)

    def forward(self, idx: torch.Tensor, *, loops: int | None = None, cache: KVCache | None = None,
                stats: dict | None = None, exit: ExitRule | None = None,
                h0: torch.Tensor | None = None) -> torch.Tensor:
        """Logits [B, T, V]. `loops`: exact loop count (else sampled in training, mu_rec in eval);
        `exit`: adaptive exit (loops, or mu_rec, is then the maximum); `h0`: a fixed initial state."""
        cfg, (B, T) = self.config, idx.shape
        P, R = cfg.n_prelude, cfg.n_core
        start = cache.pos if cache is not None else 0
        with region("embed"):
            rope = positions(cfg, start, T, idx.device)
            ves = self.value_embeds.lookup(idx)
            x = embed_tokens(cfg, self.wte, idx)

        with region("prelude"):
            for i, block in enumerate(self.prelude):
                x = block(x, rope, ves.get(i), kv_slot(cache, "prelude", i))
            e = self.ln_prelude(x)

        with region("injection"):
            h = h0 if h0 is not None else initial_state(cfg, e, self.rng.on(e.device))
            inject = self.make_injection(e)

        def step(h: torch.Tensor, loop: int) -> torch.Tensor:
            with region("injection"):
                x = inject(h)
            for j, block in enumerate(self.core):
                with region(core_label(j)):
                    x = block(x, rope, ves.get(P + j), kv_slot(cache, "core", P + j, loop))
            return x

        def head(h: torch.Tensor) -> torch.Tensor:
            if self.has_readout:
                with region("readout"):
                    h = self.read_state(h)
            with region("coda"):
                for j, block in enumerate(self.coda):
                    h = block(h, rope, ves.get(P + R + j), kv_slot(cache, "coda", P + R + j))
            with region("head"):
                return lm_logits(cfg, self.ln_f(h), self.wte.weight)

        plan = plan_loops(cfg, B, loops, self.training, self.rng.cpu)
        h = run_loops(step, h, plan, exit_rule=exit, readout=head, stats=stats)
        logits = head(h)
        if cache is not None:
            cache.advance(T)
        if stats is not None:
            self.loop_stats(stats)
        return logits

    def compute_loss(self, idx: torch.Tensor, targets: torch.Tensor, *, loops: int | None = None,
                     stats: dict | None = None) -> torch.Tensor:
        return next_token_loss(self(idx, loops=loops, stats=stats), targets)
