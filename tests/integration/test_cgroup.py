"""procurator/cgroup.py on this host's real cgroup hierarchy (v1 here: memory, cpu, cpuacct, blkio mounted
apart), with real processes joined through process.spawn's hook as the hypervisors are: the CPU quota
holds as measured by cpuacct, a process past its memory limit is OOM-killed inside its own group while a
neighbour runs on, and nothing is left in the cgroup tree afterwards. Needs root."""

from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from procurator import cgroup, process
from procurator.errors import CgroupError

BUSY = ["sh", "-c", "while :; do :; done"]
# Allocate and touch `mib` MiB (an untouched bytearray is zero pages, charged to nobody), then wait.
GRAB = (
    "import time\nb = bytearray({mib} << 20)\nfor i in range(0, len(b), 4096): b[i] = 1\n"
    "print('ready', flush=True)\ntime.sleep(60)"
)


@pytest.fixture
def drv() -> Iterator[cgroup.Driver]:
    # The suite runs as root (network namespaces, TAPs, cgroups); a host without the memory and cpu
    # controllers cannot run what this file checks, and that is a failure, not a skip.
    assert os.geteuid() == 0, "the cgroup tests make cgroups: run the suite as root (make test does)"
    found = cgroup.driver()
    assert found is not None, "this host mounts no cgroup memory and cpu controllers (see /proc/mounts)"
    names = [f"itest{os.getpid()}-{n}" for n in ("cpu", "mem", "nb")]
    yield found
    for name in names:  # whatever a failed test left
        for pid in found.pids(name):
            process.signal_process(pid, signal.SIGKILL)
        found.remove(name)
    assert not set(names) & set(found.leftovers())


def name(kind: str) -> str:
    return f"itest{os.getpid()}-{kind}"


def spawn_in(drv: cgroup.Driver, group: cgroup.Group, argv: list[str]) -> subprocess.Popen[bytes]:
    return process.spawn(argv, join=lambda pid: drv.join(group, pid))


def test_a_busy_process_stays_within_its_cpu_quota(drv: cgroup.Driver) -> None:
    vm = name("cpu")
    limits = cgroup.Limits(memory_max=64 << 20, cpu_quota_us=30_000)  # 30% of one CPU
    group = drv.create(vm, limits)
    busy = spawn_in(drv, group, BUSY)
    try:
        assert cgroup.check_joined(drv, group, busy.pid, limits) == ()
        time.sleep(0.5)  # past the first period, which may start with a full slice
        first, start = drv.usage(vm), time.monotonic()
        time.sleep(3.0)
        last, end = drv.usage(vm), time.monotonic()
        assert first is not None
        assert last is not None
        share = (last.cpu_usec - first.cpu_usec) / 1e6 / (end - start)
        assert abs(share - 0.30) <= 0.03, f"used {share:.3f} of a CPU under a 0.30 quota"
    finally:
        busy.kill()
        busy.wait()
    assert drv.remove(vm)
    assert vm not in drv.leftovers()


def test_past_its_memory_limit_a_process_is_oom_killed_in_its_group_and_a_neighbour_runs_on(
    drv: cgroup.Driver,
) -> None:
    small, neighbour = name("mem"), name("nb")
    limits = cgroup.Limits(memory_max=48 << 20)
    hog_group = drv.create(small, limits)
    calm_group = drv.create(neighbour, cgroup.Limits(memory_max=256 << 20))
    calm = process.spawn(
        [sys.executable, "-c", GRAB.format(mib=32)],
        stdout=subprocess.PIPE,
        join=lambda pid: drv.join(calm_group, pid),
    )
    assert calm.stdout is not None
    ready, _, _ = select.select([calm.stdout], [], [], 30)
    assert ready, "the neighbour did not touch its memory within 30 s"
    assert calm.stdout.readline() == b"ready\n"
    hog = spawn_in(drv, hog_group, [sys.executable, "-c", GRAB.format(mib=128)])
    try:
        assert hog.wait(timeout=30) == -signal.SIGKILL
        usage = drv.usage(small)
        assert usage is not None
        assert usage.oom_kills >= 1
        assert usage.memory_max == 48 << 20
        time.sleep(0.5)
        assert calm.poll() is None, "the neighbour died with the hog"
        neighbour_usage = drv.usage(neighbour)
        assert neighbour_usage is not None
        assert neighbour_usage.oom_kills == 0
        assert neighbour_usage.memory_bytes > 0  # (its pages may since be swapped or reclaimed)
    finally:
        calm.kill()
        calm.wait()
    assert drv.remove(small)
    assert drv.remove(neighbour)
    left = drv.leftovers()
    assert small not in left
    assert neighbour not in left


def test_join_failure_kills_the_child(drv: cgroup.Driver) -> None:
    """The spawn hook's contract: a child that cannot be put in its group does not run on outside it."""
    gone = cgroup.Group("never-made", tuple(d / "nope" for d in drv.dirs("never-made")))
    before = set(Path("/proc").iterdir())
    with pytest.raises(CgroupError, match="cannot open for writing"):
        spawn_in(drv, gone, ["sleep", "30"])
    after = {p for p in Path("/proc").iterdir() if p not in before and p.name.isdigit()}
    for entry in after:
        try:
            assert "sleep\x0030" not in (entry / "cmdline").read_text()
        except OSError:
            continue
