"""restart.fromSnapshot: time from `procurator start` to the guest's health check answering, after a cold
boot and after a restore of the snapshot `procurator shutdown` took, the same VM in the same run, QEMU;
median of RUNS each, alternating (target: the restore is faster than the cold boot, ratio below 1).

Run as root: `.venv/bin/python benchmarks/bench_restore.py`. It builds the `web` example with
`restart.fromSnapshot = true`, and works in a network namespace it creates and deletes (the host's
interfaces are never touched). Each round: `procurator stop` then `procurator start` (a cold boot: the
stop leaves no snapshot to resume), and `procurator shutdown` (snapshot, then kill) then `procurator
start` (the restore). The clock runs from invoking `start` to the first answer of the guest's health
check (HTTP GET /health on port 80), polled every 50 ms in both cases.
"""

from __future__ import annotations

import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from qemu_guests import Guests, build_example, wait_http

RUNS = int(os.environ.get("BENCH_RESTORE_RUNS", "5"))
OVERRIDES = "{ web = { restart = { fromSnapshot = true; }; }; }"


def main() -> int:
    bundle = build_example("web", OVERRIDES)
    cold: list[float] = []
    restored: list[float] = []
    with Guests() as guests:

        def timed_start() -> float:
            started = time.monotonic()
            start = guests.popen("start", "web")
            answered = wait_http(guests.ns, ip, deadline=120) - started
            if start.wait(timeout=300) != 0:
                raise SystemExit("procurator start failed")
            return answered

        def last_exit() -> str:
            return str(guests.ps()["web"]["last_exit"])

        guests.run("up", str(bundle), "--wait", "healthy")  # untimed: learns the address, warms the caches
        ip = str(guests.ps()["web"]["ip"])
        for _ in range(RUNS):
            guests.run("stop", "web")
            cold.append(timed_start())
            if last_exit().startswith("restored"):
                raise SystemExit("a start after `stop` restored a snapshot: no cold boot to measure")
            said = guests.run("shutdown").stderr
            if "snapshot" not in said:
                raise SystemExit(f"procurator shutdown took no snapshot: {said.strip()}")
            restored.append(timed_start())
            if not last_exit().startswith("restored from snapshot"):
                raise SystemExit(f"the start after `shutdown` did not restore: {last_exit()}")

    c, r = statistics.median(cold), statistics.median(restored)
    print(f"start to health check, web (QEMU TCG), median of {RUNS}: cold boot {c:.2f} s, restore {r:.2f} s")
    print(f"  cold boots: {', '.join(f'{x:.2f}' for x in cold)}")
    print(f"  restores:   {', '.join(f'{x:.2f}' for x in restored)}")
    print(f"ratio restore/cold {r / c:.3f} (target < 1: restore faster): {'met' if r < c else 'NOT met'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
