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

Inside `recording_regions()` each label is a wall-clock interval (time.perf_counter_ns, about a microsecond
per label: the CPU region pass). Under a torch profiler it is torch.profiler.record_function (a range in the
trace, about 10 us per label). Otherwise it is a shared no-op context, so an unprofiled forward pays a
context-variable read and two flag checks per label and records nothing. Under torch.compile the labels
are left out (checking the profiler state there would break the graph).
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from contextvars import ContextVar

import torch

_OFF = nullcontext()  # stateless: one instance serves every call
REGION_NAME = re.compile(r"^(embed|blocks|block\[\d+\]|prelude|injection|loop\[\d+\]|core\[\d+\]|readout|coda|head)$")


class RegionRecorder:
    """Wall-clock intervals (name, start_ns, end_ns) of every label entered while it is active."""

    def __init__(self) -> None:
        self.intervals: list[tuple[str, int, int]] = []

    def interval(self, name: str) -> _Interval:
        return _Interval(self.intervals, name)


class _Interval:
    """A plain-class context manager: about a third of the cost of a generator-based one."""

    __slots__ = ("intervals", "name", "t0")

    def __init__(self, intervals: list[tuple[str, int, int]], name: str) -> None:
        self.intervals, self.name, self.t0 = intervals, name, 0

    def __enter__(self) -> None:
        self.t0 = time.perf_counter_ns()

    def __exit__(self, *exc: object) -> None:
        self.intervals.append((self.name, self.t0, time.perf_counter_ns()))


_RECORDER: ContextVar[RegionRecorder | None] = ContextVar("loopscope_region_recorder", default=None)


@contextmanager
def recording_regions() -> Iterator[RegionRecorder]:
    """Within the block (this thread or task only), every region label records a wall-clock interval."""
    recorder = RegionRecorder()
    token = _RECORDER.set(recorder)
    try:
        yield recorder
    finally:
        _RECORDER.reset(token)


def region(name: str) -> AbstractContextManager:
    """A wall-clock interval inside recording_regions(), a labelled range while a torch profiler records, else
    a no-op (always a no-op under torch.compile)."""
    if torch.compiler.is_compiling():
        return _OFF
    recorder = _RECORDER.get()
    if recorder is not None:
        return recorder.interval(name)
    if torch.autograd._profiler_enabled():
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
