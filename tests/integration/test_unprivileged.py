"""Hypervisors run as the worker's unprivileged user, on TAPs owned by that user (docs/architecture.md)."""

from __future__ import annotations

import pwd
import subprocess
from pathlib import Path

import pytest

from tests.integration.conftest import ExampleBuild
from tests.support.cli import PROCURATOR
from tests.support.host import REPO, VmHost
from tests.support.tundev import in_private_mounts, open_tun_for_everyone

DOUBLE = REPO / "tests" / "chdouble" / "cloud-hypervisor"
USER = "nobody"  # present on every Debian system; the worker module creates its own user instead


def owner_of_process(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Uid:"):
            return int(line.split()[1])  # real uid
    raise AssertionError(f"no Uid line for {pid}")


@pytest.mark.parametrize(
    "vm_host",
    [{"hypervisor": {"backend": "cloud-hypervisor", "binary": str(DOUBLE)}, "user": USER}],
    indirect=True,
)
def test_cloud_hypervisor_runs_as_the_vm_user(vm_host: VmHost, example_build: ExampleBuild) -> None:
    uid = pwd.getpwnam(USER).pw_uid
    # As `nobody` the double cannot reach the virtualenv's interpreter (it lives under /root here) and
    # runs on the system python3 without jsonschema; spec validation is covered by the other tests.
    # The double opens its TAP at vm.boot as cloud-hypervisor does, which needs /dev/net/tun open to all, as
    # udev makes it; this machine has no udev, so `up` runs where it is (tests/support/tundev.py).
    scratch = vm_host.root / "dev"
    scratch.mkdir()
    argv = in_private_mounts(open_tun_for_everyone(scratch, [str(PROCURATOR), "up", str(example_build.web)]))
    done = subprocess.run(
        argv, capture_output=True, text=True, timeout=180, check=False, env=vm_host.env(CHDOUBLE_VALIDATE="0")
    )
    assert done.returncode == 0, f"procurator up failed:\n{done.stderr}"
    vm = vm_host.ps()["web"]
    assert owner_of_process(vm["pid"]) == uid
    tap = vm_host.ns.link(next(iter(vm_host.taps())))
    assert tap is not None
    assert tap["linkinfo"]["info_data"]["user"] == USER
    volume = vm_host.state / "volumes" / "web" / "data.img"
    assert volume.stat().st_uid == uid
    vm_host.ok("down", "web")
    assert vm_host.leftovers() == {"processes": [], "taps": [], "vms": [], "sockets": []}
