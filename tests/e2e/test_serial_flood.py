"""A real QEMU guest flooding its serial port (`yes flood > /dev/ttyS0`, started through the shell on its
console) cannot fill the disk: the serial keeper rotates serial.log to serial.log.1 at the worker
config's `serialLogMaxBytes`, each file stays at or under it, the VM keeps running and answering its
health check, and `procurator logs` and `procurator console` still work."""

from __future__ import annotations

import subprocess
import time

import pytest

from tests.integration.conftest import ExampleBuild
from tests.support.cli import PROCURATOR
from tests.support.host import VmHost

pytestmark = pytest.mark.e2e

CAP = 256 * 1024  # bytes: small, so that the flood rotates the log several times within seconds


def console(host: VmHost, vm: str, text: str) -> None:
    done = subprocess.run(
        [str(PROCURATOR), "console", vm], input=text, capture_output=True, text=True, timeout=60,
        env=host.env(), check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr


@pytest.mark.parametrize("vm_host", [{"serialLogMaxBytes": CAP}], indirect=True)
def test_a_flooding_guest_keeps_its_serial_log_bounded(vm_host: VmHost, example_build: ExampleBuild) -> None:
    host = vm_host
    host.ok("up", str(example_build.web), "--wait", "healthy")
    web = host.ps()["web"]
    vm_dir = host.state / "vms" / "web"
    log, old = vm_dir / "serial.log", vm_dir / "serial.log.1"
    assert "procurator-guest: web up ip=" in host.ok(
        "logs", "web", "-n", "200"
    )  # the keeper has the boot log

    console(host, "web", "yes flood > /dev/ttyS0 &\n")
    rotations, size = 0, log.stat().st_size  # a rotation is serial.log starting again, smaller
    deadline = time.monotonic() + 180
    while rotations < 4:
        assert time.monotonic() < deadline, f"serial.log rotated only {rotations} times in 180 s"
        now = log.stat().st_size
        assert now <= CAP
        if now < size:
            rotations += 1
            assert old.stat().st_size <= CAP
        size = now
        time.sleep(0.02)

    # The VM kept running, the same process; the console still takes input: the flood ends.
    assert host.ps()["web"]["state"] == "running"
    assert host.ps()["web"]["pid"] == web["pid"]
    console(host, "web", "kill %1; pkill yes; echo flood-over > /dev/ttyS0\n")
    deadline = time.monotonic() + 60
    while "flood-over" not in host.ok("logs", "web", "-n", "3"):
        assert time.monotonic() < deadline, "the guest's line after the flood never reached serial.log"
        time.sleep(0.2)

    # Bounded: at most the cap in each of the two files, whatever the guest wrote (four caps and more).
    assert log.stat().st_size <= CAP
    assert old.stat().st_size <= CAP
    assert sorted(p.name for p in vm_dir.iterdir() if p.name.startswith("serial.log")) == [
        "serial.log",
        "serial.log.1",
    ]
    assert "flood\nflood\n" in old.read_text(errors="replace")
    assert host.ns.exec("curl", "-fsS", "--max-time", "10", f"http://{web['ip']}/health")
