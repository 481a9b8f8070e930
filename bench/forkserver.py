"""Workers forked from one process that has already imported torch: `python -m loopscope.bench.forkserver`.

A fresh `python -m loopscope.bench.worker` spends about a second importing torch before its cell starts;
on a CPU sweep of small cells that is most of the time a cell costs outside what it measures. The fork
server pays that once per run: it imports torch, the models and the workloads (never initialising CUDA,
never running an op, so no thread pool exists yet) and then forks one worker per cell. Each worker is
still a process of its own, in its own process group, with its own memory, timers and thread pools, and
it runs exactly the code a fresh worker runs (worker.main).

Its command line names the run's jobs directory (`python -m loopscope.bench.forkserver RUN/jobs/`), and a
forked worker keeps that command line, so the run store finds both as it finds fresh workers.

Protocol, one line each way: the executor writes a job directory; the server answers `pid N` at once and
`exit N CODE` when that worker ends (CODE as `subprocess` gives it: negative for a signal). It starts with
`ready SECONDS` (its import time). End of input (the executor closed the pipe, or died) ends the server,
and it kills the workers still alive. A worker watches the server (worker_guard), the server its input.
"""

from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

PRELOAD = ("torch", "loopscope.models", "loopscope.bench.worker", "loopscope.bench.engines",
           "loopscope.bench.workloads.prefill", "loopscope.bench.workloads.decode",
           "loopscope.bench.workloads.train", "loopscope.bench.workloads.evaluate")


EXIT_SERVER_DIED = 70  # EX_SOFTWARE: the worker's fate is unknown because its fork server died


ENTRY = "loopscope.bench.worker:main"  # what a forked worker runs: main(job_dir, started=...)


class ForkServerError(RuntimeError):
    """The fork server did not start, or stopped answering."""


# --- the server process -----------------------------------------------------------------------------
def _fork_worker(job: str, entry, listen_fds: tuple[int, ...]) -> int:
    pid = os.fork()
    if pid:
        try:
            os.setpgid(pid, pid)  # also done in the child: whichever runs first, the group exists
        except OSError:
            pass
        return pid
    code = 1
    try:
        started = time.perf_counter()
        os.setpgid(0, 0)
        signal.set_wakeup_fd(-1)
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        for fd in listen_fds:
            os.close(fd)
        devnull = os.open(os.devnull, os.O_RDONLY)
        os.dup2(devnull, 0)
        for fd, name in ((1, "stdout.txt"), (2, "stderr.txt")):
            target = os.open(os.path.join(job, name), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            os.dup2(target, fd)
            os.close(target)
        from loopscope.bench.worker_guard import PARENT_ENV

        os.environ[PARENT_ENV] = str(os.getppid())  # its parent is this server, which watches the run
        code = entry(job, started=started) or 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else int(exc.code is not None)
    except BaseException:  # noqa: BLE001 - whatever happens, the child never returns into the server loop
        import traceback

        traceback.print_exc()
    finally:
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(code)


def serve(entry_name: str = ENTRY) -> int:
    t0 = time.perf_counter()
    import importlib

    for name in PRELOAD:
        importlib.import_module(name)
    module, _, function = entry_name.partition(":")
    entry = getattr(importlib.import_module(module), function)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the executor decides; an interrupt reaches it, not us
    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_w, False)
    signal.set_wakeup_fd(wake_w)
    signal.signal(signal.SIGCHLD, lambda *_: None)
    out = os.fdopen(os.dup(1), "w", buffering=1)
    out.write(f"ready {time.perf_counter() - t0:.4f}\n")
    live: set[int] = set()
    pending = b""
    try:
        while True:
            readable, _, _ = select.select([0, wake_r], [], [])
            if wake_r in readable:
                os.read(wake_r, 4096)
            while live:
                pid, status = os.waitpid(-1, os.WNOHANG)
                if pid == 0:
                    break
                live.discard(pid)
                out.write(f"exit {pid} {os.waitstatus_to_exitcode(status)}\n")
            if 0 in readable:
                data = os.read(0, 65536)
                if not data:
                    return 0
                pending += data
                while b"\n" in pending:
                    line, pending = pending.split(b"\n", 1)
                    pid = _fork_worker(line.decode(), entry, (wake_r, wake_w, out.fileno()))
                    live.add(pid)
                    out.write(f"pid {pid}\n")
    finally:
        for pid in live:
            for kill in (os.killpg, os.kill):
                try:
                    kill(pid, signal.SIGKILL)
                except OSError:
                    pass


# --- the executor's side ----------------------------------------------------------------------------
class ForkServer:
    """One server per executor; `spawn(job)` gives a handle that behaves like a `subprocess.Popen`."""

    def __init__(self, env: dict[str, str], jobs_dir: Path, *, entry: str = ENTRY, python: str = sys.executable,
                 timeout_s: float = 120.0):
        # The command line names the run's jobs directory, as a fresh worker's does, and forked workers
        # keep it: that is how a resumed run finds the server and workers a killed one left behind.
        self._proc = subprocess.Popen([python, "-m", "loopscope.bench.forkserver", f"{os.path.abspath(jobs_dir)}/",
                                       entry],
                                      stdin=subprocess.PIPE,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env,
                                      process_group=0)
        self._buffer = b""
        self._exits: dict[int, int] = {}
        self._timeout_s = timeout_s
        self.preload_s: float | None = None
        self.failure = ""
        self._ready = False

    def _lines(self, timeout_s: float | None) -> list[str]:
        """Lines from the server: what is there now (timeout 0), or wait up to timeout_s for one."""
        fd = self._proc.stdout.fileno()
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        lines: list[str] = []
        while not lines:
            wait = None if deadline is None else max(deadline - time.monotonic(), 0.0)
            if not select.select([fd], [], [], wait)[0]:
                return lines
            data = os.read(fd, 65536)
            if not data:
                raise ForkServerError(self._died())
            self._buffer += data
            while b"\n" in self._buffer:
                line, self._buffer = self._buffer.split(b"\n", 1)
                lines.append(line.decode())
            if timeout_s == 0:
                break
        return lines

    def _died(self) -> str:
        code = self._proc.wait()
        tail = self._proc.stderr.read().decode("utf-8", "replace").strip().splitlines()[-3:]
        return f"the worker fork server exited with code {code}: {' | '.join(tail) or 'no output'}"

    def _take(self, lines: list[str]) -> int | None:
        pid = None
        for line in lines:
            kind, *rest = line.split()
            if kind == "ready":
                self.preload_s, self._ready = float(rest[0]), True
            elif kind == "pid":
                pid = int(rest[0])
            elif kind == "exit":
                self._exits[int(rest[0])] = int(rest[1])
        return pid

    def wait_ready(self) -> None:
        while not self._ready:
            lines = self._lines(self._timeout_s)
            if not lines:
                raise ForkServerError(f"the worker fork server was not ready within {self._timeout_s:.0f} s")
            self._take(lines)

    def spawn(self, job: Path) -> ForkedWorker:
        self.wait_ready()
        self._proc.stdin.write(f"{job}\n".encode())
        self._proc.stdin.flush()
        while True:
            lines = self._lines(self._timeout_s)
            if not lines:
                raise ForkServerError(f"the worker fork server did not fork within {self._timeout_s:.0f} s")
            pid = self._take(lines)
            if pid is not None:
                return ForkedWorker(pid, self)

    def exit_code(self, pid: int, *, block: bool) -> int | None:
        """The worker's exit code once the server reported it; EXIT_SERVER_DIED if the server died first
        (its workers then stop themselves, and the reason goes to `failure`)."""
        try:
            while pid not in self._exits:
                self._take(self._lines(None if block else 0))
                if not block:
                    break
        except ForkServerError as exc:
            self.failure = str(exc)
            self._exits[pid] = EXIT_SERVER_DIED
        return self._exits.get(pid)

    def alive(self) -> bool:
        return self._proc.poll() is None and not self.failure

    def close(self) -> None:
        if self._proc.poll() is None:
            try:
                self._proc.stdin.close()
                self._proc.wait(timeout=10)
            except (OSError, subprocess.TimeoutExpired):
                self._proc.kill()
                self._proc.wait()
        for stream in (self._proc.stdout, self._proc.stderr):
            stream.close()


class ForkedWorker:
    """The part of `subprocess.Popen` the executor uses: pid, poll, wait, kill, returncode."""

    def __init__(self, pid: int, server: ForkServer) -> None:
        self.pid = pid
        self._server = server
        self.returncode: int | None = None

    def poll(self) -> int | None:
        if self.returncode is None:
            self.returncode = self._server.exit_code(self.pid, block=False)
        return self.returncode

    def wait(self, timeout: Any = None) -> int:
        if self.returncode is None:
            self.returncode = self._server.exit_code(self.pid, block=True)
        return self.returncode

    def kill(self) -> None:
        try:
            os.kill(self.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


if __name__ == "__main__":  # python -m loopscope.bench.forkserver RUN/jobs/ [module:function]
    sys.exit(serve(*sys.argv[2:3]))
