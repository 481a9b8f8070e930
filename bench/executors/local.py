"""The `local` executor: the cells one after another, each in its own worker process on this machine."""

from __future__ import annotations

from collections.abc import Iterable

from loopscope.bench.executor import LocalExecutor
from loopscope.bench.executors import OnDone, OnStart, blocked_by, write_skipped
from loopscope.bench.matrix import Cell


class SequentialExecutor(LocalExecutor):
    def run_all(self, cells: Iterable[Cell], statuses: dict[str, str], *, on_start: OnStart | None = None,
                on_done: OnDone | None = None) -> None:
        try:
            for cell in cells:  # expand() orders train cells before the eval cells that read them
                if on_start:
                    on_start(cell)
                dep = blocked_by(cell, statuses)
                record = write_skipped(self, cell, dep) if dep else self.run_cell(cell)
                statuses[cell.cell_id] = record["status"]
                if on_done:
                    on_done(cell, record)
        finally:
            if not self.keep_server:  # a shared executor's server serves the next run too
                self.close()
