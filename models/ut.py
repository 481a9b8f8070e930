"""`ut`: Universal Transformer (Dehghani et al.) with a learned step embedding and ACT halting.

    h_0 = e                                           # the embedded tokens (after an optional prelude)
    step t: p_t = sigmoid(w . h_t + b)                # per-position halting probability (from the state
            h_{t+1} = core(h_t + step_emb[t])         #  entering the step, as in tensor2tensor)
    out = sum_t w_t h_{t+1}, with ACT weights w_t: p_t while the running sum stays below 1 - eps,
          then the remainder R = 1 - sum; positions at the step cap are forced to halt.
    ponder cost = mean(N + R) per position, weighted by `ponder_cost` in `compute_loss`.

Halted positions keep being transformed (their keys/values stay visible to attention) but their output
is frozen. Compute stops once every position has halted, or after act_max_steps; with `loops=T` exactly
T steps run (the last one forces halting).
"""

from __future__ import annotations

import torch
import torch.nn as nn

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
from .recurrence import ExitRule, LoopRNG
from .regions import core_label, loop_label, region

HALTING_BIAS_INIT = 1.0  # tensor2tensor's act_halting_bias_init: start with short ponder times


class Halting(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.proj = nn.Linear(d, 1)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.proj(h).squeeze(-1).float())

    @torch.no_grad()
    def reset_parameters(self) -> None:
        self.proj.bias.fill_(HALTING_BIAS_INIT)


class UT(nn.Module):
    def __init__(self, config: ModelConfig, seed: int = 0) -> None:
        super().__init__()
        if config.family != "ut":
            raise ValueError(f"UT: config.family={config.family!r}, expected 'ut'")
        assert config.act_max_steps is not None
        self.config = config
        P, R, n = config.n_prelude, config.n_core, config.n_physical_layers
        d = config.d_model
        self.wte = nn.Embedding(config.vocab_size, d)
        self.value_embeds = ValueEmbeddings(config, value_embed_layers(config))
        self.prelude = make_stack(config, range(0, P), n)
        self.ln_prelude = make_norm(config) if config.prelude_norm else nn.Identity()
        self.step_embed = nn.Embedding(config.act_max_steps, d)
        self.halting = Halting(d)
        self.core = make_stack(config, range(P, P + R), n)
        self.coda = make_stack(config, range(P + R, n), n)
        self.ln_f = make_norm(config)
        self.rng = LoopRNG(seed)  # UT draws nothing at random; kept for the common interface

    def reseed(self, seed: int) -> None:
        self.rng.reseed(seed)

    def forward(self, idx: torch.Tensor, *, loops: int | None = None, cache: KVCache | None = None,
                stats: dict | None = None, exit: ExitRule | None = None,
                h0: torch.Tensor | None = None) -> torch.Tensor:
        return self._run(idx, loops=loops, cache=cache, stats=stats, exit=exit, h0=h0)[0]

    def _run(self, idx: torch.Tensor, *, loops: int | None, cache: KVCache | None, stats: dict | None,
             exit: ExitRule | None, h0: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """(logits, ponder cost per position [B, T])."""
        if exit is not None:
            raise ValueError("ut: adaptive exit is ACT halting; pass exit=None (act_eps sets the threshold)")
        cfg, (B, T) = self.config, idx.shape
        P, R = cfg.n_prelude, cfg.n_core
        max_steps = cfg.act_max_steps if loops is None else loops
        if max_steps < 1 or (loops is not None and loops > cfg.act_max_steps):
            raise ValueError(f"ut: loops={loops} must be in [1, act_max_steps={cfg.act_max_steps}]")
        start = cache.pos if cache is not None else 0
        with region("embed"):
            rope = positions(cfg, start, T, idx.device)
            ves = self.value_embeds.lookup(idx)
            x = embed_tokens(self.config, self.wte, idx)

        with region("prelude"):
            for i, block in enumerate(self.prelude):
                x = block(x, rope, ves.get(i), kv_slot(cache, "prelude", i))
            e = self.ln_prelude(x)
        with region("injection"):
            h = e if h0 is None else h0
            halt_sum = torch.zeros(B, T, device=idx.device)   # running sum of halting probabilities
            remainder = torch.zeros(B, T, device=idx.device)
            n_updates = torch.zeros(B, T, device=idx.device)
            output = torch.zeros_like(h)
        threshold = 1.0 - cfg.act_eps
        norms: list[float] = []
        residual = float("nan")
        steps = 0
        for t in range(max_steps):
            with region(loop_label(t)):
                with region("injection"):  # the halting unit and the step signal
                    p = self.halting(h)
                    running = halt_sum < threshold
                    last = t == max_steps - 1
                    crosses = halt_sum + p > threshold
                    new_halted = running & (crosses | last)
                    still = running & ~new_halted
                    halt_sum = halt_sum + p * still
                    remainder = remainder + new_halted * (1.0 - halt_sum)
                    halt_sum = halt_sum + new_halted * (1.0 - halt_sum)
                    n_updates = n_updates + (still | new_halted).float()
                    weight = (p * still + new_halted * remainder).unsqueeze(-1).type_as(h)
                    x = h + self.step_embed.weight[t] + (e if cfg.injection == "add" else 0)

                for j, block in enumerate(self.core):
                    with region(core_label(j)):
                        x = block(x, rope, ves.get(P + j), kv_slot(cache, "core", P + j, t))
                if stats is not None:
                    norms.append(float(x.detach().float().norm(dim=-1).mean()))
                    residual = float((x - h).detach().float().norm(dim=-1).mean())
                h = x
                output = output + weight * h
                steps += 1
            if loops is None and not bool((halt_sum < threshold).any()):
                break  # every position has halted: the remaining steps are really skipped

        with region("coda"):
            for j, block in enumerate(self.coda):
                output = block(output, rope, ves.get(P + R + j), kv_slot(cache, "coda", P + R + j))
        with region("head"):
            logits = lm_logits(self.config, self.ln_f(output), self.wte.weight)
        if cache is not None:
            cache.advance(T)
        ponder = n_updates + remainder
        if stats is not None:
            stats["state_norm"] = norms
            stats["final_residual"] = residual
            stats["loops_used"] = float(n_updates.mean())  # mean ACT steps per position
            stats["steps_computed"] = steps
            stats["ponder"] = float(ponder.detach().mean())
        return logits, ponder

    def compute_loss(self, idx: torch.Tensor, targets: torch.Tensor, *, loops: int | None = None,
                     stats: dict | None = None) -> torch.Tensor:
        """Cross-entropy + ponder_cost * mean(N + R) (the ACT ponder loss)."""
        logits, ponder = self._run(idx, loops=loops, cache=None, stats=stats, exit=None, h0=None)
        return next_token_loss(logits, targets) + self.config.ponder_cost * ponder.mean()
