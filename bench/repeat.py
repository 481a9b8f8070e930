"""`loopscope repeat --profile P`: the same profile run into each directory named on stdin, one per line.

This is how the A/B gate (reports/abgate.py) takes its repetitions cheaply. One `loopscope run` process
costs about 2.5 s on a 2-core CPU before its cells do anything (the interpreter, pandas and, in the worker
fork server, torch). Here that is paid once per `repeat` process, and each run costs its cells and its
tables. Every cell still runs in a fresh worker process, forked from the one server this process keeps.

Protocol, one line each way. It answers `ready SECONDS` once its fork server has imported torch; then,
for each directory it reads, `done RC` (RC as `loopscope run` would exit: 0, or 3 when a cell is not ok)
or `error MESSAGE` (unusable input, the line the CLI would print). End of input ends it. Everything else
it prints (progress, notes) goes to stderr, so stdout carries only the protocol.
"""

from __future__ import annotations

import io
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import TextIO

from loopscope.bench.errors import LoopscopeError


def serve_repetitions(profile: str, requests: TextIO, answers: TextIO) -> int:
    from loopscope.bench.runner import RunOptions, SharedExecutor, run

    home = Path(tempfile.mkdtemp(prefix="loopscope-repeat-"))
    shared = SharedExecutor(home)
    try:
        answers.write(f"ready {shared.warm():.4f}\n")
        answers.flush()
        for line in requests:
            out = line.strip()
            if not out:
                continue
            try:
                rc = run(RunOptions(profile=profile, out=Path(out), report=False), out=io.StringIO(),
                         shared=shared)
                answers.write(f"done {rc}\n")
            except LoopscopeError as exc:
                answers.write(f"error {' '.join(str(exc).split())}\n")
            answers.flush()
    finally:
        shared.close()
        shutil.rmtree(home, ignore_errors=True)
    return 0


def main(profile: str) -> int:
    # The protocol gets its own copy of stdout; fd 1 then points at stderr, so that a stray print
    # (a progress line, a library's warning) cannot break a line of the protocol.
    answers = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    sys.stdout = os.fdopen(1, "w", buffering=1)
    return serve_repetitions(profile, sys.stdin, answers)
