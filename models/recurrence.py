"""What every looped family shares: how many loops to run (per sequence, with truncated backprop),
the initial state, the loop driver with adaptive exit, and the per-loop instrumentation.

A family file builds its own step function `step(h, loop) -> h` and hands it to `run_loops`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .config import ModelConfig
from .regions import loop_label, region

EXIT_KINDS: tuple[str, ...] = ("state", "kl")


@dataclass(frozen=True)
class ExitRule:
    """Adaptive exit at inference: stop once every token's criterion is below `threshold`.
    "state": relative state change ||h_t - h_{t-1}|| / ||h_t||; "kl": KL(p_t || p_{t-1}) between
    successive readouts (needs a coda + head pass per loop, as in Huginn)."""

    kind: str = "state"
    threshold: float = 0.03
    min_loops: int = 1

    def __post_init__(self) -> None:
        if self.kind not in EXIT_KINDS:
            raise ValueError(f"ExitRule: kind={self.kind!r} is not one of {EXIT_KINDS}")
        if not self.threshold > 0:
            raise ValueError(f"ExitRule: threshold={self.threshold} must be > 0")


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
    if cfg.loop_sampler == "poisson":  # Parcae: T = max(1, Poisson(mu_rec))
        draws = torch.poisson(torch.full((n,), float(cfg.mu_rec)), generator=gen)
        return draws.to(torch.int64).clamp(min=1)
    if cfg.loop_sampler == "lognormal-poisson":  # Huginn: tau ~ N(ln r - s^2/2, s); T = Poisson(e^tau) + 1
        sigma = cfg.lognormal_sigma
        tau = torch.randn(n, generator=gen) * sigma + (math.log(cfg.mu_rec) - sigma**2 / 2)
        return torch.poisson(tau.exp(), generator=gen).to(torch.int64) + 1
    raise ValueError(f"{cfg.family}: loop_sampler={cfg.loop_sampler!r} does not sample")


def initial_state(cfg: ModelConfig, e: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """h0: "like-init" = fresh trunc-normal (std sqrt(2/(5d)), +-3 std) on every call; "zero"; "embed" = e."""
    if cfg.state_init == "zero":
        return torch.zeros_like(e)
    if cfg.state_init == "embed":
        return e
    std = math.sqrt(2.0 / (5.0 * cfg.d_model))
    # inverse-CDF truncated normal (+-3 std); bounds computed in Python so torch.compile does not
    # break the graph on a .item() as nn.init.trunc_normal_ does
    lo, hi = (0.5 * (1.0 + math.erf(z / math.sqrt(2.0))) for z in (-3.0, 3.0))
    u = torch.rand(e.shape, device=e.device, dtype=torch.float32, generator=gen) * (hi - lo) + lo
    h0 = torch.erfinv(2.0 * u - 1.0) * (math.sqrt(2.0) * std)
    return h0.to(e.dtype)


def _token_norm(x: torch.Tensor) -> torch.Tensor:
    return x.float().norm(dim=-1)


def run_loops(step: Callable[[torch.Tensor, int], torch.Tensor], h: torch.Tensor, plan: LoopPlan, *,
              exit_rule: ExitRule | None = None,
              readout: Callable[[torch.Tensor], torch.Tensor] | None = None,
              stats: dict | None = None) -> torch.Tensor:
    """Run the loops of `plan`; sequences whose count is used up keep their state (torch.where).
    With `exit_rule`, stop early once all tokens meet it; the skipped loops are really not computed."""
    uniform = plan.uniform
    if exit_rule is not None and not uniform:
        raise ValueError("run_loops: adaptive exit needs the same loop count for every sequence "
                         "(pass loops=T or use eval mode)")
    if exit_rule is not None and exit_rule.kind == "kl" and readout is None:
        raise ValueError("run_loops: exit kind 'kl' needs a readout function")
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
                    if not uniform:  # freeze sequences whose count is exhausted
                        active = (counts > s).to(h.device).view(-1, *([1] * (h.dim() - 1)))
                        new = torch.where(active, new, h)
                loop += 1
                if stats is not None or exit_rule is not None:
                    delta = _token_norm((new - h).detach())
                    norm = _token_norm(new.detach())
                    if stats is not None:
                        norms.append(float(norm.mean()))
                        residual = float(delta.mean())
                    if exit_rule is not None:
                        if exit_rule.kind == "state":
                            measure = float((delta / norm.clamp_min(1e-12)).max())
                        else:
                            assert readout is not None
                            logp = F.log_softmax(readout(new).detach().float(), dim=-1)
                            measure = (float("inf") if prev_logp is None else
                                       float((logp.exp() * (logp - prev_logp)).sum(-1).max()))
                            prev_logp = logp
                        measures.append(measure)
                        if loop >= exit_rule.min_loops and measure < exit_rule.threshold:
                            exited = True
                h = new
                if exited:
                    break
        if exited:
            break
    if stats is not None:
        stats["state_norm"] = norms
        stats["final_residual"] = residual
        stats["loops_used"] = float(loop) if exit_rule is not None else float(plan.total.float().mean())
        stats["loops_per_sequence"] = ([loop] * len(plan.total) if exit_rule is not None
                                       else plan.total.tolist())
        if exit_rule is not None:
            stats["exit_measure"] = measures
            stats["exited_early"] = exited
    return h
