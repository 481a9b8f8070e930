"""`looped`: a plain k-layer block repeated r times (Universal-Transformer style, Saunshi's k (x) L).

    e   = prelude(x)            # usually no prelude: e is the token embedding
    h0  = e  (injection "none") | 0 (injection "add", Yang/OSU)
    h   = core(h + e) | core(h) # r = mu_rec times, no loop sampling by default
    out = head(ln_f(coda(h_r)))

With k = 1 and many loops this is the single-layer depth-recurrent model (Ohio State, Aleph Alpha).
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


class Looped(nn.Module):
    def __init__(self, config: ModelConfig, seed: int = 0) -> None:
        super().__init__()
        if config.family != "looped":
            raise ValueError(f"Looped: config.family={config.family!r}, expected 'looped'")
        self.config = config
        P, R, n = config.n_prelude, config.n_core, config.n_physical_layers
        self.wte = nn.Embedding(config.vocab_size, config.d_model)
        self.value_embeds = ValueEmbeddings(config, value_embed_layers(config))
        self.prelude = make_stack(config, range(0, P), n)
        self.ln_prelude = RMSNorm(config.d_model, config.norm_eps) if config.prelude_norm else nn.Identity()
        self.core = make_stack(config, range(P, P + R), n)
        self.coda = make_stack(config, range(P + R, n), n)
        self.ln_f = RMSNorm(config.d_model, config.norm_eps)
        self.rng = LoopRNG(seed)

    def reseed(self, seed: int) -> None:
        self.rng.reseed(seed)

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
                x = h + e if cfg.injection == "add" else h
            for j, block in enumerate(self.core):
                with region(core_label(j)):
                    x = block(x, rope, ves.get(P + j), kv_slot(cache, "core", P + j, loop))
            return x

        def head(h: torch.Tensor) -> torch.Tensor:
            with region("coda"):
                for j, block in enumerate(self.coda):
                    h = block(h, rope, ves.get(P + R + j), kv_slot(cache, "coda", P + R + j))
            with region("head"):
                return F.linear(self.ln_f(h), self.wte.weight)

        plan = plan_loops(cfg, B, loops, self.training, self.rng.cpu)
        h = run_loops(step, h, plan, exit_rule=exit, readout=head, stats=stats)
        logits = head(h)
        if cache is not None:
            cache.advance(T)
        return logits

    def compute_loss(self, idx: torch.Tensor, targets: torch.Tensor, *, loops: int | None = None,
                     stats: dict | None = None) -> torch.Tensor:
        return next_token_loss(self(idx, loops=loops, stats=stats), targets)
