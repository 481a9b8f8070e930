"""`gpt`: the nanochat-style dense baseline. Token embedding -> n_layers blocks -> RMSNorm -> tied head."""

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
from .recurrence import ExitRule
from .regions import block_label, region


class GPT(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        if config.family != "gpt":
            raise ValueError(f"GPT: config.family={config.family!r}, expected 'gpt'")
        self.config = config
        self.wte = nn.Embedding(config.vocab_size, config.d_model)
        self.value_embeds = ValueEmbeddings(config, value_embed_layers(config))
        self.blocks = make_stack(config, range(config.n_layers), config.n_layers)
        self.ln_f = make_norm(config)

    def reseed(self, seed: int) -> None:
        """Nothing random in the forward pass; kept so every family has the same interface."""

    def forward(self, idx: torch.Tensor, *, loops: int | None = None, cache: KVCache | None = None,
                stats: dict | None = None, exit: ExitRule | None = None) -> torch.Tensor:
        """Logits [B, T, V]. `loops` and `exit` are accepted for a uniform interface and ignored."""
        B, T = idx.shape
        start = cache.pos if cache is not None else 0
        with region("embed"):
            rope = positions(self.config, start, T, idx.device)
            ves = self.value_embeds.lookup(idx)
            x = embed_tokens(self.config, self.wte, idx)
        with region("blocks"):
            for i, block in enumerate(self.blocks):
                with region(block_label(i)):
                    x = block(x, rope, ves.get(i), kv_slot(cache, "dense", i))
        with region("head"):
            logits = lm_logits(self.config, self.ln_f(x), self.wte.weight)
        if cache is not None:
            cache.advance(T)
        if stats is not None:
            stats["loops_used"] = 1.0
        return logits

    def compute_loss(self, idx: torch.Tensor, targets: torch.Tensor, *, loops: int | None = None,
                     stats: dict | None = None) -> torch.Tensor:
        """Mean next-token cross-entropy (nats); the training objective."""
        return next_token_loss(self(idx, loops=loops, stats=stats), targets)
