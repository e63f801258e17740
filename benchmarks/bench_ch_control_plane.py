"""Control-plane cost of the cloud-hypervisor backend, per VM, against the test double.

For N = 1, 10 and 100 VMs, one after the other: start (spawn, vmm.ping, vm.create, vm.boot), vm.info and a
graceful stop (power button, the guest's power-off event, vmm.shutdown, the process gone) through
`CloudHypervisor`, in a throwaway network namespace holding the VMs' TAP (the backend's Landlock rules
name its `tun_flags`, which cloud-hypervisor's config validation wants to exist). The double records
when each of its processes started serving, how long it spent on each request, how long its simulated
guest took to power off and when it exited (CHDOUBLE_RECORD; both sides read the same CLOCK_MONOTONIC).
Procurator's time per VM is the wall time minus that double time; its CPU time (this process only) is
printed beside it. The serial keeper (a second interpreter per VM) is part of Procurator's time: it is
awaited before vm.boot below v53, after it from v53 (the double's default release).

    .venv/bin/python benchmarks/bench_ch_control_plane.py [--validate] [--sizes 1,10,100]

By default the double skips validating vm.create against the official spec (about 0.4 s of its own time per
VM, covered by the tests); `--validate` keeps it. Exit status 0; the figures are the result.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from procurator import process
from procurator.hypervisor.base import LaunchSpec
from procurator.hypervisor.cloud_hypervisor import CloudHypervisor
from tests.support.netns import throwaway_netns

REPO = Path(__file__).resolve().parents[1]
DOUBLE = REPO / "tests" / "chdouble" / "cloud-hypervisor"
TARGET_MS = 15.0
TAP = "pc-bench-eth0"
FLAT_RATIO = 1.25  # per-VM cost counts as flat while the larger run stays within this factor


@dataclass(frozen=True)
class Sample:
    wall: float  # seconds, start to stopped
    double: float  # seconds of that spent in the double (start-up, requests, guest, exit)
    cpu: float  # CPU seconds of this process

    @property
    def procurator(self) -> float:
        return self.wall - self.double


def config(vm_dir: Path, kernel: Path) -> dict[str, Any]:
    return {
        "cpus": {"boot_vcpus": 1, "max_vcpus": 1},
        "memory": {"size": 256 << 20},
        "payload": {"kernel": str(kernel), "cmdline": "console=ttyS0"},
        "disks": [
            {"id": "store", "path": str(kernel.with_name("store.img")), "readonly": True, "image_type": "Raw"}
        ],
        "net": [{"id": "eth0", "tap": TAP, "mac": "02:00:00:00:00:01"}],
        "serial": {"mode": "File", "file": str(vm_dir / "serial.log")},
        "console": {"mode": "Off"},
    }


def double_seconds(entries: list[dict[str, Any]], spawned: float) -> float:
    """The double's own time on the critical path of one VM, from its record."""
    total = 0.0
    shutdown_done = None
    for entry in entries:
        if entry["kind"] == "process" and entry["what"] == "ready":
            total += entry["t"] - spawned  # interpreter start-up and imports
        elif entry["kind"] == "request":
            total += entry["t_done"] - entry["t_recv"]
            if entry["path"].endswith("/vmm.shutdown"):
                shutdown_done = entry["t_done"]
        elif entry["kind"] == "guest":
            total += entry["t_done"] - entry["t_start"]  # the simulated guest powering off
        elif entry["kind"] == "process" and entry["what"] == "exit" and shutdown_done is not None:
            total += entry["t"] - shutdown_done
    return total


def run(count: int, workdir: Path, record: Path, netns: str) -> list[Sample]:
    backend = CloudHypervisor(DOUBLE, start_timeout=30.0, step_timeout=5.0)
    kernel = workdir / "vmlinuz"
    kernel.write_bytes(b"not a kernel")
    with kernel.with_name("store.img").open("wb") as image:  # the double opens, types and locks disks
        image.truncate(1 << 20)
    spawned: dict[int, float] = {}
    real_spawn: Callable[..., subprocess.Popen[bytes]] = process.spawn

    def timed_spawn(*args: Any, **kwargs: Any) -> subprocess.Popen[bytes]:
        proc = real_spawn(*args, **kwargs)
        spawned[proc.pid] = time.monotonic()
        return proc

    process.spawn = timed_spawn
    measured: list[tuple[int, float, float]] = []
    try:
        for i in range(count):
            vm_dir = workdir / f"vm{i}"
            spec = LaunchSpec(
                name=f"vm{i}",
                vm_dir=vm_dir,
                config=config(vm_dir, kernel),
                serial_log=vm_dir / "serial.log",
                netns=netns,
            )
            cpu0, t0 = time.process_time(), time.monotonic()
            handle = backend.start(spec)
            backend.info(handle)
            result = backend.shutdown(handle, timeout=10.0)
            t1, cpu1 = time.monotonic(), time.process_time()
            if not result.graceful:
                raise SystemExit(f"vm{i} did not stop gracefully: {result.steps}")
            measured.append((handle.pid, t1 - t0, cpu1 - cpu0))
    finally:
        process.spawn = real_spawn
    by_pid: dict[int, list[dict[str, Any]]] = defaultdict(list)
    for line in record.read_text().splitlines():
        entry = json.loads(line)
        by_pid[entry["pid"]].append(entry)
    return [Sample(wall, double_seconds(by_pid[pid], spawned[pid]), cpu) for pid, wall, cpu in measured]


def ms(seconds: float) -> str:
    return f"{seconds * 1000:7.2f}"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--validate", action="store_true", help="let the double validate vm.create bodies")
    parser.add_argument("--sizes", default="1,10,100", help="comma-separated VM counts (default 1,10,100)")
    args = parser.parse_args(argv)
    sizes = [int(s) for s in args.sizes.split(",")]

    os.environ["CHDOUBLE_POWEROFF_DELAY"] = "0.005"
    os.environ["CHDOUBLE_VALIDATE"] = "1" if args.validate else "0"
    for knob in ("CHDOUBLE_FAULT", "CHDOUBLE_BOOT_DELAY", "CHDOUBLE_START_DELAY"):
        os.environ.pop(knob, None)

    results: dict[int, list[Sample]] = {}
    with tempfile.TemporaryDirectory(prefix="bench-ch-") as tmp, throwaway_netns("pcbch") as ns:
        ns.ip("tuntap", "add", "dev", TAP, "mode", "tap")  # one VM at a time: they take turns on it
        for label, count in [("warm-up", 3), *((str(n), n) for n in sizes)]:
            workdir = Path(tmp) / label
            workdir.mkdir()
            record = workdir / "record.jsonl"
            os.environ["CHDOUBLE_RECORD"] = str(record)
            samples = run(count, workdir, record, ns.name)
            if label != "warm-up":
                results[count] = samples

    print("cloud-hypervisor backend, control plane per VM (start + vm.info + graceful stop), sequential,")
    print(f"against the test double (spec validation {'on' if args.validate else 'off'}); times in ms per VM")
    print()
    print("    N   wall   double  procurator: mean  median     p95      cpu")
    for count, samples in results.items():
        own = sorted(s.procurator for s in samples)
        p95 = own[min(len(own) - 1, int(0.95 * len(own)))]
        wall = statistics.mean(s.wall for s in samples)
        double = statistics.mean(s.double for s in samples)
        cpu = statistics.mean(s.cpu for s in samples)
        mean, median = statistics.mean(own), statistics.median(own)
        print(f"{count:5d} {ms(wall)} {ms(double)}        {ms(mean)} {ms(median)} {ms(p95)}  {ms(cpu)}")
    print()

    # Flatness is judged on medians of this process's CPU time per VM: wall time on a shared machine
    # moves with whatever else runs. The wall-time medians are printed beside it.
    def typical(samples: Sequence[Sample], metric: Callable[[Sample], float]) -> float:
        return statistics.median(metric(s) for s in samples)

    def compare(label: str, before: Sequence[Sample], after: Sequence[Sample]) -> bool:
        cpu = typical(after, lambda s: s.cpu) / typical(before, lambda s: s.cpu)
        wall = typical(after, lambda s: s.procurator) / typical(before, lambda s: s.procurator)
        print(f"{label}: CPU per VM {cpu:.2f}x, Procurator wall per VM {wall:.2f}x")
        return cpu <= FLAT_RATIO

    verdicts = []
    several = sorted(count for count in results if count >= 10)
    for smaller, larger in itertools.pairwise(several):
        verdicts.append(compare(f"N={larger} vs N={smaller}", results[smaller], results[larger]))
    largest = max(results)
    if largest >= 20:
        tenth = largest // 10
        verdicts.append(
            compare(f"N={largest}, last tenth vs first", results[largest][:tenth], results[largest][-tenth:])
        )
    if verdicts:
        print(f"per-VM cost flat (CPU within {FLAT_RATIO:.2f}x): {'yes' if all(verdicts) else 'no'}")
    judged = several or list(results)
    worst = max(statistics.mean(s.procurator for s in results[count]) for count in judged)
    verdict = "met" if worst * 1000 <= TARGET_MS else "NOT met"
    print(
        f"target <= {TARGET_MS:.0f} ms per VM in Procurator: {verdict} "
        f"(worst mean over N={', '.join(map(str, judged))}: {worst * 1000:.2f} ms; N=1 is a single sample)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
