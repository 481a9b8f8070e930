"""`--shard i/n`: a deterministic share of a run's matrix, for job arrays (SLURM, Kubernetes) and SSH fan-out.

Cells are grouped with the train cell their eval cells read (a group never spans shards), the groups are
ordered by the train cell's id, and group k goes to shard k mod n. The same matrix gives the same split
on every machine; `loopscope merge` puts the shards' run directories back together.
`--shard auto` takes i and n from the scheduler: SLURM_ARRAY_TASK_ID (less SLURM_ARRAY_TASK_MIN) and
SLURM_ARRAY_TASK_COUNT, or Kubernetes' JOB_COMPLETION_INDEX with the count given as `auto/n`.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass

from loopscope.bench.errors import ConfigError
from loopscope.bench.matrix import Cell


@dataclass(frozen=True)
class Shard:
    index: int
    count: int
    source: str = "given"  # where i and n came from

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"


def _int(text: str, what: str, spec: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise ConfigError(f"--shard {spec!r}: {what} {text!r} is not a whole number "
                          "(expected i/n, auto or auto/n)") from None


def parse_shard(spec: str, env: Mapping[str, str] | None = None) -> Shard:
    env = os.environ if env is None else env
    head, _, tail = spec.partition("/")
    if head == "auto":
        count = _int(tail, "count", spec) if tail else None
        if "SLURM_ARRAY_TASK_ID" in env:
            index = _int(env["SLURM_ARRAY_TASK_ID"], "SLURM_ARRAY_TASK_ID", spec) \
                - _int(env.get("SLURM_ARRAY_TASK_MIN", "0"), "SLURM_ARRAY_TASK_MIN", spec)
            if count is None:
                if "SLURM_ARRAY_TASK_COUNT" not in env:
                    raise ConfigError(f"--shard {spec}: SLURM_ARRAY_TASK_COUNT is not set; give the count as auto/n")
                count = _int(env["SLURM_ARRAY_TASK_COUNT"], "SLURM_ARRAY_TASK_COUNT", spec)
            source = "SLURM_ARRAY_TASK_ID"
        elif "JOB_COMPLETION_INDEX" in env:
            if count is None:
                raise ConfigError(f"--shard {spec}: Kubernetes gives JOB_COMPLETION_INDEX but not the count; "
                                  "use --shard auto/n with n = the Job's completions")
            index = _int(env["JOB_COMPLETION_INDEX"], "JOB_COMPLETION_INDEX", spec)
            source = "JOB_COMPLETION_INDEX"
        else:
            raise ConfigError(f"--shard {spec}: neither SLURM_ARRAY_TASK_ID nor JOB_COMPLETION_INDEX is set; "
                              "give the shard as i/n")
    else:
        if not tail:
            raise ConfigError(f"--shard {spec!r}: expected i/n (e.g. 0/4), auto or auto/n")
        index, count, source = _int(head, "index", spec), _int(tail, "count", spec), "given"
    if count < 1 or not 0 <= index < count:
        raise ConfigError(f"--shard {spec}: index {index} and count {count} need 0 <= index < count")
    return Shard(index, count, source)


def shard_cells(cells: list[Cell], shard: Shard) -> list[Cell]:
    """This shard's cells, in the matrix's order."""
    groups = sorted({c.depends_on or c.cell_id for c in cells})
    mine = {g for k, g in enumerate(groups) if k % shard.count == shard.index}
    return [c for c in cells if (c.depends_on or c.cell_id) in mine]
