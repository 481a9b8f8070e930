"""A stand-in worker that takes a few seconds: `fake_slow_worker.py [--pids DIR] JOB_DIR`.

With --pids it first writes "PID PARENT_PID" to DIR/PID, so a test can kill the process that runs it
(a Ray worker) in the middle of the cell. It then sleeps 2 s and writes an ok result.
"""

import json
import os
import sys
import time
from pathlib import Path

args = sys.argv[1:]
if args[0] == "--pids":
    pid_dir, args = Path(args[1]), args[2:]
    (pid_dir / f".{os.getpid()}").write_text(f"{os.getpid()} {os.getppid()}")
    (pid_dir / f".{os.getpid()}").rename(pid_dir / str(os.getpid()))
job = Path(args[0])
time.sleep(2.0)
rows = [{"metric": "answer", "stat": "", "value": 42.0, "unit": "", "source": "fake"}]
(job / "result.json").write_text(json.dumps({"status": "ok", "reason": "", "rows": rows, "samples": [],
                                             "startup_s": 0.0}))
