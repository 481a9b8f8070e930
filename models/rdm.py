"""`rdm`: Huginn-style recurrent depth (Geiping et al.), the looped model Parcae compares with.

    e   = prelude(x)
    h0  ~ trunc-normal(std sqrt(2/(5d)))           # fresh on every forward ("like-init"), or 0
    h   = core(W [h; e])                           # T times; W = Linear(2d -> d): concat injection
    out = head(ln_f(coda(ln_f(h_T))))               # Huginn reuses ln_f after the loop and after the coda

Blocks use sandwich norms by default. W's h-part is unconstrained, so rho can exceed 1 (Parcae's point);
its spectral norm is reported as the stability proxy. Training draws T from Huginn's log-normal Poisson
(one draw per batch by default) and backpropagates through the last min(T, mu_bwd) loops.
Differences from Huginn kept on purpose: no sqrt(d) embedding scale, scaled-zero init (as the other families).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .blocks import RMSNorm, ValueEmbeddings, make_stack, next_token_loss, rope_tables, value_embed_layers
from .cache import KVCache, kv_slot
from .config import ModelConfig
from .recurrence import ExitRule, LoopRNG, initial_state, plan_loops, run_loops
from .regions import core_label, region


class RDM(nn.Module):
    def __init__(self, config: ModelConfig, seed: int = 0) -> None:
        super().__init__()
        if config.family != "rdm":
            raise ValueError(f"RDM: config.family={config.family!r}, expected 'rdm'")
        self.config = config
        P, R, n = config.n_prelude, config.n_core, config.n_physical_layers
        d = config.d_model
        self.wte = nn.Embedding(config.vocab_size, d)
        self.value_embeds = ValueEmbeddings(config, value_embed_layers(config))
        self.prelude = make_stack(config, range(0, P), n)
        self.ln_prelude = RMSNorm(d, config.norm_eps) if config.prelude_norm else nn.Identity()
        self.adapter = nn.Linear(2 * d, d, bias=False) if config.injection == "concat" else None
        self.core = make_stack(config, range(P, P + R), n)
        self.coda = make_stack(config, range(P + R, n), n)
        self.ln_f = RMSNorm(d, config.norm_eps)
        self.rng = LoopRNG(seed)

    def reseed(self, seed: int) -> None:
        self.rng.reseed(seed)

    def inject(self, h: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
        if self.adapter is not None:
            return self.adapter(torch.cat((h, e), dim=-1))
        return h + e if self.config.injection == "add" else h

    def adapter_spectral_norm(self) -> float:
        """||W_h||_2 of the adapter's h-part: the linear state gain; > 1 can blow the state up."""
        if self.adapter is None:
            return 1.0 if self.config.injection in ("add", "none") else float("nan")
        w_h = self.adapter.weight.detach()[:, : self.config.d_model].float()
        return float(torch.linalg.matrix_norm(w_h, ord=2))

    def forward(self, idx: torch.Tensor, *, loops: int | None = None, cache: KVCache | None = None,
                stats: dict | None = None, exit: ExitRule | None = None,
                h0: torch.Tensor | None = None) -> torch.Tensor:
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

        def step(h: torch.Tensor, loop: int) -> torch.Tensor:
            with region("injection"):
                x = self.inject(h, e)
            for j, block in enumerate(self.core):
                with region(core_label(j)):
                    x = block(x, rope, ves.get(P + j), kv_slot(cache, "core", P + j, loop))
            return x

        def head(h: torch.Tensor) -> torch.Tensor:
            with region("readout"):
                x = self.ln_f(h)
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
            stats["adapter_spectral_norm"] = self.adapter_spectral_norm()
        return logits

    def compute_loss(self, idx: torch.Tensor, targets: torch.Tensor, *, loops: int | None = None,
                     stats: dict | None = None) -> torch.Tensor:
        return next_token_loss(self(idx, loops=loops, stats=stats), targets)
