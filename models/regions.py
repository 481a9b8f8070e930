"""Region labels for profiling: `with region("prelude"): ...` marks where a forward spends its time.

Labels (the numba engine's region timers use the same names, kernels/engine.py):

    embed                   token + value embeddings, RoPE tables
    blocks > block[j]       dense gpt: the layer stack, one label per layer
    prelude                 looped families: prelude blocks and the prelude norm
    injection               the once-per-forward part of the injection (Parcae's drive, h0)
    loop[i] > injection     loop i (0-based): the per-loop injection,
            > core[j]       then each core layer
    readout                 parcae: C @ h; rdm: ln_f(h)
    coda                    coda blocks
    head                    final norm + tied unembedding

Under a profiler, `region` is torch.profiler.record_function (a user-scope range, so a profiler that
records user scopes only sees the labels without the cost of recording every op); otherwise it returns a
shared no-op context, so an unprofiled forward pays two cheap flag checks per label and records nothing.
Under torch.compile the labels are left out (checking the profiler state there would break the graph).
"""

from __future__ import annotations

import re
from contextlib import AbstractContextManager, nullcontext

import torch

_OFF = nullcontext()  # stateless: one instance serves every call
REGION_NAME = re.compile(r"^(embed|blocks|block\[\d+\]|prelude|injection|loop\[\d+\]|core\[\d+\]|readout|coda|head)$")


def region(name: str) -> AbstractContextManager:
    """A labelled range while a torch profiler records (outside torch.compile), else a no-op."""
    if not torch.compiler.is_compiling() and torch.autograd._profiler_enabled():
        return torch.profiler.record_function(name)
    return _OFF


def loop_label(i: int) -> str:
    return f"loop[{i}]"


def core_label(j: int) -> str:
    return f"core[{j}]"


def block_label(j: int) -> str:
    return f"block[{j}]"


def is_region(name: str) -> bool:
    return REGION_NAME.match(name) is not None
