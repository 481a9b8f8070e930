"""Sweep progress: a tqdm bar on a terminal, plain lines otherwise (CI logs, pipes)."""

from __future__ import annotations

import sys
import time
from typing import TextIO


def _clock(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class Progress:
    def __init__(self, total: int, stream: TextIO | None = None) -> None:
        self.total = total
        self.done = 0
        self.stream = stream or sys.stderr
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
        if not self.done:
            return "?"
        return _clock(self.elapsed / self.done * (self.total - self.done))

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
