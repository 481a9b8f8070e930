"""Executors: where the cells of a run execute. One interface, registered by name, chosen with `--executor`.

`local` runs one isolated worker process per cell on this machine (bench/executor.py); `ray` runs the same
isolated worker inside a Ray task on whichever node Ray places it. Both write finished cells through the
driver's atomic run store, so resume, failure rows and the report are the same whichever ran a cell.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any, Protocol

from loopscope.bench.errors import ConfigError

if TYPE_CHECKING:  # the CLI reads the registry's names without importing the run machinery
    from loopscope.bench.context import RunContext
    from loopscope.bench.matrix import Cell
    from loopscope.bench.store import RunStore

OnStart = Callable[["Cell"], None]
OnDone = Callable[["Cell", dict[str, Any]], None]

# name -> "module:class"; imported only when chosen, so `ray` stays an optional dependency.
EXECUTORS: dict[str, str] = {
    "local": "loopscope.bench.executors.local:SequentialExecutor",
    "ray": "loopscope.bench.executors.ray_cluster:RayExecutor",
}


class Executor(Protocol):
    store: RunStore
    ctx: RunContext

    def run_all(self, cells: Iterable[Cell], statuses: dict[str, str], *, on_start: OnStart | None = None,
                on_done: OnDone | None = None) -> None:
        """Run every cell (each cell's dependency first), write each finished cell to the store, update
        `statuses` (cell_id -> status) and call `on_done` as each one finishes."""

    def make_record(self, cell: Cell, status: str, reason: str, result: dict[str, Any], stderr_tail: str,
                    wall_s: float) -> dict[str, Any]: ...


def executor_names() -> tuple[str, ...]:
    return tuple(EXECUTORS)


def make_executor(name: str, store: RunStore, ctx: RunContext, *, memory_limit_bytes: int | None = None,
                  address: str | None = None, worker_cmd: list[str] | None = None) -> Executor:
    if name not in EXECUTORS:
        raise ConfigError(f"--executor {name!r}: unknown executor; known: {', '.join(EXECUTORS)}")
    if address and name != "ray":
        raise ConfigError(f"--address {address!r} is for --executor ray, not --executor {name}")
    module, cls = EXECUTORS[name].split(":")
    factory = getattr(importlib.import_module(module), cls)
    kwargs: dict[str, Any] = {"memory_limit_bytes": memory_limit_bytes, "worker_cmd": worker_cmd}
    if name == "ray":
        kwargs["address"] = address
    return factory(store, ctx, **kwargs)


def blocked_by(cell: Cell, statuses: dict[str, str]) -> str | None:
    """Why a cell cannot run yet: None when it can, else its dependency's status ("missing" if not run)."""
    if not cell.depends_on or statuses.get(cell.depends_on) == "ok":
        return None
    return statuses.get(cell.depends_on, "missing")


def write_skipped(executor: Executor, cell: Cell, dep_status: str) -> dict[str, Any]:
    record = executor.make_record(cell, "skipped", f"its train cell {cell.depends_on} is {dep_status}",
                                  {}, "", 0.0)
    executor.store.write_cell(record)
    return record

