"""The training optimizers: AdamW alone (the default) or Muon for the block matrices with AdamW for the rest.

Muon's parameter split follows Parcae's setup (Table 20 of the paper): the attention q, k, v, o and MLP
matrices go to Muon; embeddings, the head, norms, every 1-D parameter and the injection/readout/adapter
matrices stay with AdamW. torch.optim.Muon's "match_rms_adamw" scaling lets both share one learning rate
and one schedule, so an lr sweep means the same thing for either optimizer.
"""

from __future__ import annotations

import re
from collections.abc import Iterator

import torch

from loopscope.profiles.loader import OPTIMIZERS

MUON_PARAM = re.compile(r"\.(attn|mlp)\.[^.]+\.weight$")


class Optimizers:
    """One or more torch optimizers stepped together; the training loop and checkpoints see one object."""

    def __init__(self, parts: list[torch.optim.Optimizer]) -> None:
        self.parts = parts

    @property
    def param_groups(self) -> list[dict]:
        return [g for opt in self.parts for g in opt.param_groups]

    def params(self) -> Iterator[tuple[torch.optim.Optimizer, torch.Tensor]]:
        """(owning optimizer, parameter) in a fixed order: the checkpoint's numbering."""
        for opt in self.parts:
            for group in opt.param_groups:
                for p in group["params"]:
                    yield opt, p

    def zero_grad(self, set_to_none: bool = True) -> None:
        for opt in self.parts:
            opt.zero_grad(set_to_none=set_to_none)

    def step(self) -> None:
        for opt in self.parts:
            opt.step()


def muon_split(model: torch.nn.Module) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """(Muon parameters, AdamW parameters) by name."""
    muon, rest = [], []
    for name, p in model.named_parameters():
        (muon if p.ndim == 2 and MUON_PARAM.search(name) else rest).append(p)
    return muon, rest


def build_optimizers(model: torch.nn.Module, train: dict) -> Optimizers:
    """The optimizers for `train["optimizer"]` (default adamw), with weight decay on matrices only."""
    kind = train.get("optimizer", "adamw")
    if kind not in OPTIMIZERS:
        raise ValueError(f"train.optimizer = {kind!r}: expected one of {', '.join(OPTIMIZERS)}")
    lr, wd = float(train["lr"]), float(train["weight_decay"])
    muon: list[torch.Tensor] = []
    rest = list(model.parameters())
    parts: list[torch.optim.Optimizer] = []
    if kind == "muon":
        if not hasattr(torch.optim, "Muon"):
            raise ValueError(f"train.optimizer = 'muon' needs torch >= 2.9 (this is torch {torch.__version__})")
        muon, rest = muon_split(model)
        parts.append(torch.optim.Muon(muon, lr=lr, weight_decay=wd, momentum=float(train.get("muon_momentum", 0.95)),
                                      adjust_lr_fn="match_rms_adamw"))
    decay = [p for p in rest if p.ndim >= 2]
    no_decay = [p for p in rest if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": wd}, {"params": no_decay, "weight_decay": 0.0}]
    parts.insert(0, torch.optim.AdamW(groups, lr=lr, betas=tuple(train["betas"]), eps=1e-8))
    return Optimizers(parts)
