"""`parcae`: prelude -> looped core with a stable diagonal injection -> readout C -> coda.

    e   = RMSNorm(prelude(x))                      # the prelude norm (ln_prelude)
    h0  ~ trunc-normal(std sqrt(2/(5d)))           # fresh on every forward ("like-init"), or 0
    h   = core(A_bar * h + dt * (e @ B^T))         # T times; A_bar = exp(-dt * exp(A_log)), dt = softplus(dt_bias)
    out = head(RMSNorm(coda(C @ h_T)))

A_bar lies in (0, 1) by construction, so the linear part is stable: rho(A_bar) = max A_bar < 1.
Training draws T = max(1, Poisson(mu_rec)) per sequence and backpropagates through the last min(T, mu_bwd)
loops only; evaluation runs a fixed T (mu_rec unless `loops` is given). The loop itself is
`recurrence.LoopedLM`.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import ModelConfig
from .recurrence import LoopedLM

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


class Parcae(LoopedLM):
    has_readout = True

    def __init__(self, config: ModelConfig, seed: int = 0) -> None:
        super().__init__(config, seed, "parcae")
        self._build_prelude()
        self.injection = DiagonalInjection(config.d_model)
        self._build_core()
        self.readout = nn.Linear(config.d_model, config.d_model, bias=False)  # C
        self._build_coda()

    def make_injection(self, e: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
        decay, drive = self.injection.decay(), self.injection.drive(e)
        return lambda h: decay * h + drive

    def read_state(self, h: torch.Tensor) -> torch.Tensor:
        return self.readout(h)

    def loop_stats(self, stats: dict) -> None:
        stats["spectral_radius"] = float(self.injection.decay().detach().max())
