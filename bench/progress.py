"""Sweep progress: a tqdm bar on a terminal, plain lines otherwise (CI logs, pipes, tox).

Everything goes to one stream (stdout, flushed each line), so progress and the run's other messages
arrive in the order they happened even when stdout and stderr are captured separately. The ETA comes
from the dry run's per-cell estimates, scaled by how long the finished cells really took against their
estimates: it is right from the first cell on, and a cheap cell done early does not make it optimistic.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Sequence
from typing import TextIO


def _clock(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def remaining_seconds(estimates: Sequence[float], done: int, elapsed: float) -> float:
    """Seconds left: the estimates of the cells not yet done, times the measured/estimated ratio so far."""
    left = float(sum(estimates[done:]))
    spent = float(sum(estimates[:done]))
    scale = elapsed / spent if done and spent > 0 else 1.0
    return left * scale


class Progress:
    def __init__(self, total: int, stream: TextIO | None = None,
                 estimates: Sequence[float] | None = None) -> None:
        self.total = total
        self.done = 0
        self.stream = stream or sys.stdout
        self.estimates = list(estimates) if estimates is not None and len(estimates) == total else None
        self.start = time.perf_counter()
        self.bar = None
        if self.stream.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, file=self.stream, unit="cell", dynamic_ncols=True)

    def starting(self, label: str) -> None:
        if self.bar is not None:
            self.bar.set_description_str(label[:60])
        else:
            print(f"[{self.done + 1}/{self.total}] {label} ... (elapsed {_clock(self.elapsed)}, "
                  f"eta {self.eta})", file=self.stream, flush=True)

    def finished(self, label: str, status: str, wall_s: float, reason: str = "") -> None:
        self.done += 1
        note = f"{label}: {status} in {wall_s:.1f} s" + (f" ({reason[:120]})" if reason else "")
        if self.bar is not None:
            self.bar.write(note)
            self.bar.update(1)
        else:
            print(f"    {note}", file=self.stream, flush=True)

    @property
    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    @property
    def eta(self) -> str:
        if self.estimates is not None:
            return _clock(remaining_seconds(self.estimates, self.done, self.elapsed))
        if not self.done:
            return "?"
        return _clock(self.elapsed / self.done * (self.total - self.done))

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
