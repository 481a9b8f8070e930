"""`parcae`: prelude -> looped core with a stable diagonal injection -> readout C -> coda.

    e   = RMSNorm(prelude(x))                      # the prelude norm (ln_prelude)
    h0  ~ trunc-normal(std sqrt(2/(5d)))           # fresh on every forward ("like-init"), or 0
    h   = core(A_bar * h + dt * (e @ B^T))         # T times; A_bar = exp(-dt * exp(A_log)), dt = softplus(dt_bias)
    out = head(RMSNorm(coda(C @ h_T)))

A_bar lies in (0, 1) by construction, so the linear part is stable: rho(A_bar) = max A_bar < 1.
Training draws T = max(1, Poisson(mu_rec)) per sequence and backpropagates through the last min(T, mu_bwd)
loops only; evaluation runs a fixed T (mu_rec unless `loops` is given).
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from .blocks import RMSNorm, ValueEmbeddings, make_stack, next_token_loss, rope_tables, value_embed_layers
from .cache import KVCache, kv_slot
from .config import ModelConfig
from .recurrence import ExitRule, LoopRNG, initial_state, plan_loops, run_loops
from .regions import core_label, region

DT_INIT = 0.5 * math.log(5.0)  # softplus(dt_bias) = -ln(sqrt(1/5)) ~ 0.8047, so A_bar = sqrt(1/5) at init


class DiagonalInjection(nn.Module):
    """Parcae's adapter: A_bar * h + dt * (e @ B^T), with B a full d x d matrix (identity at init)."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.A_log = nn.Parameter(torch.zeros(d))
        self.dt_bias = nn.Parameter(torch.full((d,), math.log(math.expm1(DT_INIT))))
        self.B = nn.Parameter(torch.eye(d))

    def decay(self) -> torch.Tensor:
        """A_bar = exp(-dt * exp(A_log)), every entry in (0, 1)."""
        return torch.exp(-F.softplus(self.dt_bias) * torch.exp(self.A_log))

    def drive(self, e: torch.Tensor) -> torch.Tensor:
        """dt * (e @ B^T). e is the same on every loop, so this is computed once per forward."""
        return F.softplus(self.dt_bias) * F.linear(e, self.B)

    @torch.no_grad()
    def reset_parameters(self) -> None:
        self.A_log.zero_()
        self.dt_bias.fill_(math.log(math.expm1(DT_INIT)))
        self.B.copy_(torch.eye(self.B.shape[0], dtype=self.B.dtype, device=self.B.device))


class Parcae(nn.Module):
    def __init__(self, config: ModelConfig, seed: int = 0) -> None:
        super().__init__()
        if config.family != "parcae":
            raise ValueError(f"Parcae: config.family={config.family!r}, expected 'parcae'")
        self.config = config
        P, R, n = config.n_prelude, config.n_core, config.n_physical_layers
        d = config.d_model
        self.wte = nn.Embedding(config.vocab_size, d)
        self.value_embeds = ValueEmbeddings(config, value_embed_layers(config))
        self.prelude = make_stack(config, range(0, P), n)
        self.ln_prelude = RMSNorm(d, config.norm_eps) if config.prelude_norm else nn.Identity()
        self.injection = DiagonalInjection(d)
        self.core = make_stack(config, range(P, P + R), n)
        self.readout = nn.Linear(d, d, bias=False)  # C
        self.coda = make_stack(config, range(P + R, n), n)
        self.ln_f = RMSNorm(d, config.norm_eps)
        self.rng = LoopRNG(seed)

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
            rope = rope_tables(start, T, cfg.head_dim, cfg.rope_theta, idx.device)
            ves = self.value_embeds.lookup(idx)
            x = self.wte(idx)

        with region("prelude"):
            for i, block in enumerate(self.prelude):
                x = block(x, rope, ves.get(i), kv_slot(cache, "prelude", i))
            e = self.ln_prelude(x)

        with region("injection"):
            h = h0 if h0 is not None else initial_state(cfg, e, self.rng.on(e.device))
            decay, drive = self.injection.decay(), self.injection.drive(e)

        def step(h: torch.Tensor, loop: int) -> torch.Tensor:
            with region("injection"):
                x = decay * h + drive
            for j, block in enumerate(self.core):
                with region(core_label(j)):
                    x = block(x, rope, ves.get(P + j), kv_slot(cache, "core", P + j, loop))
            return x

        def head(h: torch.Tensor) -> torch.Tensor:
            with region("readout"):
                x = self.readout(h)
            with region("coda"):
                for j, block in enumerate(self.coda):
                    x = block(x, rope, ves.get(P + R + j), kv_slot(cache, "coda", P + R + j))
            with region("head"):
                return F.linear(self.ln_f(x), self.wte.weight)

        plan = plan_loops(cfg, B, loops, self.training, self.rng.cpu)
        h = run_loops(step, h, plan, exit_rule=exit, readout=head, stats=stats)
        logits = head(h)
        if cache is not None:
            cache.advance(T)
        if stats is not None:
            stats["spectral_radius"] = float(decay.detach().max())
        return logits

    def compute_loss(self, idx: torch.Tensor, targets: torch.Tensor, *, loops: int | None = None,
                     stats: dict | None = None) -> torch.Tensor:
        return next_token_loss(self(idx, loops=loops, stats=stats), targets)
