"""A real QEMU guest whose hypervisor runs as a uid of its own from the worker configuration's `vmUsers`
range, handed its TAP as an inherited descriptor (this host's /dev/net/tun is root's alone, so QEMU could
not open it by name): the process's uid and gid read from /proc, the guest answering HTTP on its TAP, its
volume handed over while it runs and given back by `down`, and nothing owned by that uid after
`down --purge`."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from procurator import process
from tests.integration.conftest import ExampleBuild
from tests.support.host import VmHost

pytestmark = pytest.mark.e2e

FIRST = 400000 + os.getpid() % 1000 * 10  # a range no other test run on this host uses at once
USERS = {"vmUsers": {"first": FIRST, "count": 4}}


def ids_of(pid: int) -> tuple[int, int, str]:
    """(real uid, real gid, supplementary groups) of a process, from /proc/PID/status."""
    fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines())
    return int(fields["Uid"].split()[0]), int(fields["Gid"].split()[0]), fields["Groups"].strip()


def owned_by(root: Path, uid: int) -> list[str]:
    found = [str(root)] if root.lstat().st_uid == uid else []
    for directory, dirs, files in os.walk(root):
        found += [
            str(Path(directory) / n) for n in (*dirs, *files) if (Path(directory) / n).lstat().st_uid == uid
        ]
    return found


def processes_of(uid: int) -> list[int]:
    """Live processes of `uid` (a zombie has ended; whoever inherited it reaps it in its own time)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if ids_of(int(entry.name))[0] == uid and process.alive(int(entry.name), None):
                    pids.append(int(entry.name))
            except (OSError, KeyError):
                continue
    return pids


@pytest.mark.parametrize("vm_host", [USERS], indirect=True)
def test_qemu_runs_as_its_vm_uid_on_a_handed_tap_and_leaves_nothing(
    vm_host: VmHost, example_build: ExampleBuild
) -> None:
    host = vm_host
    host.ok("up", str(example_build.web), "--wait", "healthy")
    vm = host.ps()["web"]
    assert ids_of(vm["pid"]) == (FIRST, FIRST, "")
    record = json.loads((host.state / "vms" / "web" / "record.json").read_text())
    assert record["uid"] == FIRST
    cmdline = Path(f"/proc/{vm['pid']}/cmdline").read_bytes().decode().split("\0")
    netdev = next(cmdline[i + 1] for i, a in enumerate(cmdline) if a == "-netdev")
    assert ",fd=" in netdev, netdev
    assert "ifname=" not in netdev, netdev
    volume = host.state / "volumes" / "web" / "data.img"
    assert volume.stat().st_uid == FIRST
    # the guest answers on its TAP, from the host side of the bridge in the test's namespace
    answer = subprocess.run(
        ["ip", "netns", "exec", host.ns.name, "curl", "-sS", "-m", "10", f"http://{vm['ip']}/health"],
        capture_output=True, text=True, timeout=30, check=False,
    )  # fmt: skip
    assert answer.returncode == 0, answer.stderr

    host.ok("down", "web")
    assert volume.stat().st_uid == os.getuid()  # given back; the data stays
    assert owned_by(host.state, FIRST) == []
    host.ok("down", "--purge", "web")
    assert not volume.exists()
    assert owned_by(host.root, FIRST) == []
    assert processes_of(FIRST) == []
    assert host.leftovers() == {"processes": [], "taps": [], "vms": [], "sockets": []}
