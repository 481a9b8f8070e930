"""`looped`: a plain k-layer block repeated r times (Universal-Transformer style, Saunshi's k (x) L).

    e   = prelude(x)            # usually no prelude: e is the token embedding
    h0  = e  (injection "none") | 0 (injection "add", Yang/OSU)
    h   = core(h + e) | core(h) # r = mu_rec times, no loop sampling by default
    out = head(ln_f(coda(h_r)))

With k = 1 and many loops this is the single-layer depth-recurrent model (Aleph Alpha). The Ohio State
model ("Loop, Think, & Generalize") is this family with GPT-2 blocks: the `looped-osu-*` presets
(presets.py). With h0 = 0 and "add", the first loop's input is e and every later one h + e, which is
the official `h += e before every iteration after the first`. The loop itself is `recurrence.LoopedLM`.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from .config import ModelConfig
from .recurrence import LoopedLM


class Looped(LoopedLM):
    def __init__(self, config: ModelConfig, seed: int = 0) -> None:
        super().__init__(config, seed, "looped")
        self._build_prelude()
        self._build_core()
        self._build_coda()

    def make_injection(self, e: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
        if self.config.injection == "add":
            return lambda h: h + e
        return lambda h: h
