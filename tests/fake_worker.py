"""A stand-in worker for executor tests: behaves according to the cell's model name.

ok -> writes a result; raise -> writes an error result; sleep -> runs past any timeout;
alloc -> grows its memory until killed; die -> exits without a result (as a segfault would).
Runs as a script (`python fake_worker.py JOB`) or, forked by the fork server, as `main(JOB)`.
"""

import json
import sys
import time
from pathlib import Path


def main(job_dir: str, started: float | None = None) -> int:
    job = Path(job_dir)
    cell = json.loads((job / "cell.json").read_text())
    action = cell["model"]
    if action == "sleep":
        time.sleep(60)
    if action == "alloc":
        hog = []
        while True:
            hog.append(bytearray(50 * 2**20))
            time.sleep(0.01)
    if action == "die":
        sys.exit(3)
    status, reason = ("error", "ValueError: planted") if action == "raise" else ("ok", "")
    rows = [] if status != "ok" else [{"metric": "answer", "stat": "", "value": 42.0, "unit": "", "source": "fake"}]
    (job / "result.json").write_text(json.dumps({"status": status, "reason": reason, "rows": rows,
                                                 "samples": [], "startup_s": 0.0}))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
