"""Incremental decoding around an explicit KVCache, and the measured cost of a cache policy.

`generate` is plain Python: prefill the prompt, then one forward per new token. `decode_deviation`
compares token-by-token decoding against the full-sequence forward, which is exact (to fp32 rounding)
for `per-loop` and approximate for `last-loop`; the deviation is measured, never hidden.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from .cache import KVCache
from .recurrence import ExitRule, initial_state


@dataclass
class Generation:
    tokens: torch.Tensor          # [B, T_prompt + n_new]
    loops_per_step: list[float]   # mean loops used by each decode forward (prefill excluded)
    prefill_loops: float
    cache_bytes: int              # bytes allocated by the cache

    @property
    def mean_loops(self) -> float:
        """Mean loops used per decoded token; NaN when no decode step ran."""
        return sum(self.loops_per_step) / len(self.loops_per_step) if self.loops_per_step else math.nan


@torch.no_grad()
def generate(model: nn.Module, prompt: torch.Tensor, max_new_tokens: int, *, loops: int | None = None,
             policy: str = "per-loop", exit: ExitRule | None = None, exit_in_prefill: bool = False,
             temperature: float = 0.0, generator: torch.Generator | None = None,
             max_len: int | None = None) -> Generation:
    """Greedy (temperature 0) or sampled decoding. `exit` applies to decode steps (and to the prefill
    only with `exit_in_prefill`, which Huginn and Ouro advise against)."""
    if max_new_tokens < 1:
        raise ValueError(f"generate: max_new_tokens={max_new_tokens} must be >= 1")
    model.eval()
    cache = KVCache(max_len or prompt.shape[1] + max_new_tokens, policy)
    stats: dict = {}
    logits = model(prompt, loops=loops, cache=cache, stats=stats, exit=exit if exit_in_prefill else None)
    prefill_loops = float(stats.get("loops_used", math.nan))
    tokens = [prompt]
    loops_per_step: list[float] = []
    for i in range(max_new_tokens):
        last = logits[:, -1].float()
        if temperature > 0:
            probs = F.softmax(last / temperature, dim=-1)
            nxt = torch.multinomial(probs, 1, generator=generator)
        else:
            nxt = last.argmax(dim=-1, keepdim=True)
        tokens.append(nxt)
        if i == max_new_tokens - 1:
            break
        stats = {}
        logits = model(nxt, loops=loops, cache=cache, stats=stats, exit=exit)
        loops_per_step.append(float(stats.get("loops_used", math.nan)))
    return Generation(torch.cat(tokens, dim=1), loops_per_step, prefill_loops, cache.nbytes())


@torch.no_grad()
def decode_deviation(model: nn.Module, idx: torch.Tensor, *, loops: int | None = None,
                     policy: str = "last-loop", prefill: int = 1, seed: int = 0) -> dict[str, float]:
    """Logits of token-by-token decoding (after a `prefill`-token prefix) against the full forward,
    on the same input and the same initial state. Returns max/mean absolute logit difference, the
    mean KL(full || decoded) in nats, and the fraction of positions whose argmax differs."""
    model.eval()
    cfg = model.config
    B, T = idx.shape
    kwargs: dict = {"loops": loops}
    h0 = None
    if cfg.is_looped and cfg.state_init in ("like-init", "scaled-normal"):  # one fixed draw shared by both paths
        shape_ref = torch.zeros(B, T, cfg.d_model, device=idx.device,
                                dtype=next(model.parameters()).dtype)
        gen = torch.Generator(device=idx.device).manual_seed(seed)
        h0 = initial_state(cfg, shape_ref, gen)
    full = model(idx, **kwargs, **({"h0": h0} if h0 is not None else {})).float()
    cache = KVCache(T, policy)
    pieces = []
    for lo, hi in [(0, prefill), *((t, t + 1) for t in range(prefill, T))]:
        extra = {"h0": h0[:, lo:hi]} if h0 is not None else {}
        pieces.append(model(idx[:, lo:hi], cache=cache, **kwargs, **extra).float())
    decoded = torch.cat(pieces, dim=1)
    diff = (full - decoded).abs()
    logp_full, logp_dec = F.log_softmax(full, -1), F.log_softmax(decoded, -1)
    kl = (logp_full.exp() * (logp_full - logp_dec)).sum(-1)
    return {
        "max_abs": float(diff.max()),
        "mean_abs": float(diff.mean()),
        "kl_mean": float(kl.mean()),
        "argmax_mismatch": float((full.argmax(-1) != decoded.argmax(-1)).float().mean()),
        "cache_bytes": float(cache.nbytes()),
    }
