"""A worker never outlives the run that started it.

The runner starts each worker in its own process group (so a timeout or the memory watchdog kills the
worker's whole tree) and names itself in LOOPSCOPE_PARENT_PID. The worker then asks Linux for a signal
when its parent dies (prctl PR_SET_PDEATHSIG) and, as a fallback where that is missing or the parent
died before the request, polls its parent's pid. Either way it kills its own process group.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import signal
import sys
import threading

PARENT_ENV = "LOOPSCOPE_PARENT_PID"
PR_SET_PDEATHSIG = 1
POLL_S = 0.2


def _stop_own_group(*_: object) -> None:
    try:
        if os.getpgid(0) == os.getpid():  # only a group of our own: never the parent's
            os.killpg(os.getpid(), signal.SIGKILL)
    finally:
        os._exit(1)


def _request_parent_death_signal(sig: int) -> bool:
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        return libc.prctl(PR_SET_PDEATHSIG, sig, 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def _poll_parent(parent: int) -> None:
    while True:
        if os.getppid() != parent:
            _stop_own_group()
        threading.Event().wait(POLL_S)


def watch_parent() -> None:
    """Stop this process (and its group) when the process named in LOOPSCOPE_PARENT_PID is gone."""
    try:
        parent = int(os.environ.get(PARENT_ENV, ""))
    except ValueError:
        return  # started by hand, not by a run
    signal.signal(signal.SIGTERM, _stop_own_group)
    _request_parent_death_signal(signal.SIGTERM)
    if os.getppid() != parent:  # it died before the request above was in place
        _stop_own_group()
    threading.Thread(target=_poll_parent, args=(parent,), name="parent-watch", daemon=True).start()
