"""The cost of a VM's cgroup box at start-up (target: under 5 ms per VM), on this host's real hierarchy.

Run as root: `.venv/bin/python benchmarks/bench_cgroup.py`. For each of VMS groups, what `up` adds to a
start: `create` (the group in every hierarchy, its limits written), `join` (the hypervisor's pid written
before its guest runs) and `check_joined` (the pid found in the group, every limit read back); then, apart,
what `down` adds (`remove`, after the process exited) and what `ps` adds per running VM (`usage`). The
process is a `sleep` spawned through process.spawn's hook, as the backends spawn hypervisors; its own
spawn is not counted. Prints the medians, the target and the ratio.
"""

from __future__ import annotations

import os
import signal
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from procurator import cgroup, process

VMS = 40
TARGET_MS = 5.0
LIMITS = cgroup.Limits(memory_max=384 << 20, cpu_quota_us=150_000, cpu_weight=200, io_weight=100)


def main() -> int:
    drv = cgroup.driver()
    if os.geteuid() != 0 or drv is None:
        print("bench_cgroup: skipped (needs root and a cgroup hierarchy with memory and cpu)")
        return 0
    names = [f"bench{os.getpid()}-{i}" for i in range(VMS)]
    start, usage, remove = [], [], []
    children = []
    try:
        for name in names:
            t0 = time.perf_counter()
            group = drv.create(name, LIMITS)
            created = time.perf_counter() - t0
            joined: list[float] = []

            def join(pid: int, group: cgroup.Group = group, joined: list[float] = joined) -> None:
                t = time.perf_counter()
                drv.join(group, pid)
                joined.append(time.perf_counter() - t)

            child = process.spawn(["sleep", "60"], join=join)  # the spawn itself is not counted
            children.append(child)
            t0 = time.perf_counter()
            cgroup.check_joined(drv, group, child.pid, LIMITS)
            start.append((created + joined[0] + time.perf_counter() - t0) * 1000)
            t0 = time.perf_counter()
            drv.usage(name)
            usage.append((time.perf_counter() - t0) * 1000)
        for name, child in zip(names, children, strict=True):
            child.kill()
            child.wait()
            t0 = time.perf_counter()
            gone = drv.remove(name)
            remove.append((time.perf_counter() - t0) * 1000)
            assert gone, f"{name}: group not removed"
    finally:
        for child in children:
            process.signal_process(child.pid, signal.SIGKILL)
            child.wait()
        for name in names:
            drv.remove(name, timeout=1.0)
    s, u, r = statistics.median(start), statistics.median(usage), statistics.median(remove)
    print(
        f"cgroup v{drv.version} box per VM, median of {VMS}: start {s:.2f} ms (create, join, read back), "
        f"remove {r:.2f} ms, usage for ps {u:.3f} ms"
    )
    verdict = "met" if s < TARGET_MS else "NOT met"
    print(f"target start < {TARGET_MS:.0f} ms: {verdict} (ratio {s / TARGET_MS:.2f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
