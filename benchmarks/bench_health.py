"""Health detection latency: from the guest saying its service is up to Procurator declaring it healthy,
at the default check settings (target: at most 100 ms), median of RUNS boots.

Run as root: `.venv/bin/python benchmarks/bench_health.py`. It builds the `web` example (an HTTP check
of /health on port 80, the defaults intervalSeconds 2, timeoutSeconds 2) and boots it with QEMU in a
network namespace it creates and deletes. A thread follows the serial log and notes, on the host's
monotonic clock, when the guest's "web up" line appears (it is printed once httpd listens); `procurator
up --wait healthy` prints "web: up" once the checks passed, and the time that line arrives is when
Procurator declared the VM healthy. The latency is the difference. The time `up` took to exit after it
(the interpreter's shutdown) is shown apart.
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from qemu_guests import Guests, build_example

RUNS = int(os.environ.get("BENCH_HEALTH_RUNS", "5"))
TARGET_MS = 100.0
LINE = b"procurator-guest: web up"


def watch(path: Path, seen: list[float], stop: threading.Event) -> None:
    """Note when LINE first appears in `path` (polled every millisecond; the file may not exist yet)."""
    offset = 0
    while not stop.is_set():
        try:
            with path.open("rb") as f:
                f.seek(offset)
                chunk = f.read()
        except FileNotFoundError:
            chunk = b""
        if LINE in chunk:
            seen.append(time.monotonic())
            return
        offset += max(0, len(chunk) - len(LINE))
        time.sleep(0.001)


def boot_once(guests: Guests, bundle: Path) -> tuple[float, float]:
    """One `up --wait healthy`: (latency to the "web: up" line, then to the process's exit), in ms."""
    seen: list[float] = []
    stop = threading.Event()
    watcher = threading.Thread(
        target=watch, args=(guests.state / "vms" / "web" / "serial.log", seen, stop), daemon=True
    )
    watcher.start()
    up = guests.popen(
        "up", str(bundle), "--wait", "healthy", stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    assert up.stderr is not None
    declared = None
    said = []
    for line in up.stderr:
        said.append(line)
        if declared is None and line.startswith("web: up"):
            declared = time.monotonic()
    up.wait(timeout=180)
    exited = time.monotonic()
    watcher.join(timeout=2)  # the serial keeper may write the line after the check saw the service
    stop.set()
    watcher.join(timeout=5)
    if up.returncode != 0 or declared is None:
        raise SystemExit(f"procurator up failed ({up.returncode}):\n{''.join(said)}")
    if not seen:
        raise SystemExit(f"the guest never printed {LINE.decode()!r}")
    return (declared - seen[0]) * 1000, (exited - declared) * 1000


def main() -> int:
    bundle = build_example("web")
    latencies, exits = [], []
    with Guests(bridge="pcbench1") as guests:
        for _ in range(RUNS):
            latency, exit_ms = boot_once(guests, bundle)
            latencies.append(latency)
            exits.append(exit_ms)
            guests.run("down", "web")
    m = statistics.median(latencies)
    runs = ", ".join(f"{x:.0f}" for x in latencies)
    spread = max(latencies) - min(latencies)
    print(f"health detection latency, median of {RUNS}: {m:.0f} ms ({runs}; spread {spread:.0f} ms)")
    tails = ", ".join(f"{x:.0f}" for x in exits)
    print(f"  then `up` exiting: median {statistics.median(exits):.0f} ms ({tails})")
    print(
        f"target <= {TARGET_MS:.0f} ms: {'met' if m <= TARGET_MS else 'NOT met'} (ratio {m / TARGET_MS:.2f})"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
