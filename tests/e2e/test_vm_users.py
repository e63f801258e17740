"""A real QEMU guest whose hypervisor runs as a uid of its own from the worker configuration's `vmUsers`
range, handed its TAP as an inherited descriptor (this host's /dev/net/tun is root's alone, so QEMU could
not open it by name): the process's uid and gid read from /proc, the guest answering HTTP on its TAP, its
volume handed over while it runs and given back by `down`, a snapshot restored as the same uid, and nothing
owned by that uid after `down --purge`."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from tests.integration.conftest import ExampleBuild
from tests.support.host import VmHost
from tests.support.users import ids_of, owned_by, processes_of, tun_queues, vm_range

pytestmark = pytest.mark.e2e

FIRST = vm_range()
USERS = {"vmUsers": {"first": FIRST, "count": 4}}


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
    assert set(tun_queues(vm["pid"])) == set(vm["taps"])  # the descriptor it inherited, on its TAP
    volume = host.state / "volumes" / "web" / "data.img"
    assert volume.stat().st_uid == FIRST
    # the guest answers on its TAP, from the host side of the bridge in the test's namespace
    answer = subprocess.run(
        ["ip", "netns", "exec", host.ns.name, "curl", "-sS", "-m", "10", f"http://{vm['ip']}/health"],
        capture_output=True, text=True, timeout=30, check=False,
    )  # fmt: skip
    assert answer.returncode == 0, answer.stderr

    # a snapshot is the worker's once written; the restored QEMU runs as the same uid on a new descriptor
    host.ok("snapshot", "web")
    assert owned_by(host.state / "snapshots", FIRST) == []
    host.ok("stop", "web")
    host.ok("restore", "web", "--wait", "healthy")
    vm = host.ps()["web"]
    assert ids_of(vm["pid"]) == (FIRST, FIRST, "")
    assert set(tun_queues(vm["pid"])) == set(vm["taps"])

    host.ok("down", "web")
    assert volume.stat().st_uid == os.getuid()  # given back; the data stays
    assert owned_by(host.state, FIRST) == []
    host.ok("down", "--purge", "web")
    assert not volume.exists()
    assert owned_by(host.root, FIRST) == []
    assert processes_of({FIRST}) == {}
    assert host.leftovers() == {"processes": [], "taps": [], "vms": [], "sockets": []}
