"""`rdm`: Huginn-style recurrent depth (Geiping et al., `seal-rg/recurrent-pretraining`), the looped
model Parcae compares with.

    e   = prelude(embed_scale * wte(x))
    h0  ~ trunc-normal(std sqrt(2/(5d))) * embed_scale   # fresh on every forward ("like-init"), or 0
    h   = core(W [h; e])                           # T times; W = Linear(2d -> d): concat injection
    out = head(ln_f(coda(ln_f(h_T))))               # Huginn reuses ln_f after the loop and after the coda

Blocks use sandwich norms by default. W's h-part is unconstrained, so rho can exceed 1 (Parcae's point);
its spectral norm is reported as the stability proxy. Training draws T from Huginn's log-normal Poisson
(one draw per batch by default) and backpropagates through the last min(T, mu_bwd) loops.

The `rdm-*` presets keep the shared nanochat blocks (QK-norm, relu^2 MLP, no embedding scale, scaled-zero
init); the `rdm-huginn-*` presets switch every one of those to Huginn's (`layout.huginn_overrides`), and
tests/test_models_rdm_huginn.py checks their logits against Huginn's math with official-shaped weights.
`listing.fidelity_flags` names each difference a config keeps.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn as nn

from .config import ModelConfig
from .layout import huginn_d_ff, huginn_overrides  # noqa: F401
from .recurrence import LoopedLM


class RDM(LoopedLM):
    has_readout = True

    def __init__(self, config: ModelConfig, seed: int = 0) -> None:
        super().__init__(config, seed, "rdm")
        self._build_prelude()
        d = config.d_model
        self.adapter = nn.Linear(2 * d, d, bias=False) if config.injection == "concat" else None
        self._build_core()
        self._build_coda()

    def make_injection(self, e: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
        if self.adapter is not None:
            adapter = self.adapter
            return lambda h: adapter(torch.cat((h, e), dim=-1))
        if self.config.injection == "add":
            return lambda h: h + e
        return lambda h: h

    def read_state(self, h: torch.Tensor) -> torch.Tensor:
        return self.ln_f(h)

    def adapter_spectral_norm(self) -> float:
        """||W_h||_2 of the adapter's h-part: the linear state gain; > 1 can blow the state up."""
        if self.adapter is None:
            return 1.0 if self.config.injection in ("add", "none") else float("nan")
        w_h = self.adapter.weight.detach()[:, : self.config.d_model].float()
        return float(torch.linalg.matrix_norm(w_h, ord=2))

    def loop_stats(self, stats: dict) -> None:
        stats["adapter_spectral_norm"] = self.adapter_spectral_norm()
