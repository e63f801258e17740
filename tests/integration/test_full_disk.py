"""A full state disk: the state directory is a small tmpfs in a mount namespace of the test's own (held by
a `sleep` started with `unshare --mount`; every command runs in it through `nsenter`), with the
cloud-hypervisor double. The host's own mounts are never touched.

On a full disk a command fails with one line that says the disk is full, the old state stays whole (no
record lost, none saying running for a VM that is gone), and once space is freed one re-run converges."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.integration.conftest import ExampleBuild
from tests.support.cli import PROCURATOR
from tests.support.host import REPO, VmHost

DOUBLE = REPO / "tests" / "chdouble" / "cloud-hypervisor"
CH = {"hypervisor": {"backend": "cloud-hypervisor", "binary": str(DOUBLE)}}
FULL = "the file system is full (or over quota); free space there and retry"

pytestmark = pytest.mark.parametrize("vm_host", [CH], indirect=True)


@dataclass(frozen=True)
class MountNs:
    """A private mount namespace with a tmpfs on the host's state directory."""

    host: VmHost
    pid: int

    @property
    def state(self) -> Path:
        """The state directory as the namespace sees it, reached from outside through /proc."""
        return Path(f"/proc/{self.pid}/root{self.host.state}")

    def run(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["nsenter", "-t", str(self.pid), "-m", "--", str(PROCURATOR), *args],
            capture_output=True, text=True, timeout=120, check=False, env=self.host.env(),
        )  # fmt: skip

    def ok(self, *args: str) -> str:
        done = self.run(*args)
        assert done.returncode == 0, f"procurator {' '.join(args)}: {done.stderr}"
        return done.stdout

    def ps(self) -> dict[str, dict[str, Any]]:
        return {vm["name"]: vm for vm in json.loads(self.ok("ps", "--json"))}

    def record(self, name: str) -> dict[str, Any]:
        data: dict[str, Any] = json.loads((self.state / "vms" / name / "record.json").read_text())
        return data

    def fill(self) -> Path:
        """Fill the tmpfs to the last page; the filler file, to delete to free it again."""
        filler = self.state / "filler"
        fd = os.open(filler, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        try:
            for size in (1 << 20, 4096, 512):  # unbuffered: each write lands or fails whole
                with contextlib.suppress(OSError):
                    while True:
                        os.write(fd, b"\0" * size)
        finally:
            os.close(fd)
        return filler


@contextlib.contextmanager
def small_state_disk(host: VmHost, size: str) -> Iterator[MountNs]:
    host.state.mkdir(parents=True, exist_ok=True)
    holder = subprocess.Popen(["unshare", "--mount", "--propagation", "private", "sleep", "600"])
    try:
        mine = os.readlink("/proc/self/ns/mnt")
        deadline = time.monotonic() + 10
        while os.readlink(f"/proc/{holder.pid}/ns/mnt") == mine:
            assert time.monotonic() < deadline, "unshare did not make a mount namespace"
            time.sleep(0.01)
        subprocess.run(
            ["nsenter", "-t", str(holder.pid), "-m", "--", "mount", "-t", "tmpfs", "-o", f"size={size}",
             "procurator-test", str(host.state)],
            check=True, timeout=30,
        )  # fmt: skip
        ns = MountNs(host, holder.pid)
        try:
            yield ns
        finally:
            filler = ns.state / "filler"
            filler.unlink(missing_ok=True)
            for name in ns.ps():
                ns.run("down", "--purge", name)
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=30)


def one_line(done: subprocess.CompletedProcess[str]) -> str:
    assert done.returncode == 1, done.stderr
    assert "Traceback" not in done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    return lines[0]


def test_a_full_state_disk_loses_nothing_and_one_rerun_converges(
    vm_host: VmHost, example_build: ExampleBuild
) -> None:
    with small_state_disk(vm_host, "24m") as ns:
        ns.ok("up", str(example_build.web))
        before = ns.record("web")
        filler = ns.fill()

        # stop: the intent cannot be written, so the VM is left running and its record as it was.
        line = one_line(ns.run("stop", "web"))
        assert line == f"error: {ns.host.state}/vms/web/record.json: cannot write: {FULL}"
        assert ns.ps()["web"]["state"] == "running"
        assert ns.record("web") == before

        # A new VM cannot start: nothing of it is left (no record, TAP, process or lease).
        line = one_line(ns.run("up", str(example_build.api)))
        assert line == f"error: {ns.host.state}/leases.json: cannot write: {FULL}"
        assert set(ns.ps()) == {"web"}
        assert vm_host.taps() == {before["taps"][0]}

        # Space again: the stop works; a start that fails on a full disk keeps the record.
        filler.unlink()
        ns.ok("stop", "web")
        assert ns.ps()["web"]["state"] == "stopped"
        filler = ns.fill()
        one_line(ns.run("start", "web"))
        assert ns.ps()["web"]["state"] == "stopped"  # still known, still stopped: not forgotten
        assert ns.record("web")["bundle"] == before["bundle"]
        assert vm_host.taps() == set()

        filler.unlink()
        ns.ok("start", "web")
        ns.ok("apply", str(example_build.deployment), "--wait", "booted")
        vms = ns.ps()
        assert {n: v["state"] for n, v in vms.items()} == {"web": "running", "api": "running"}
        assert len(vm_host.taps()) == 2


def test_a_read_only_state_disk_changes_nothing_and_says_so(
    vm_host: VmHost, example_build: ExampleBuild
) -> None:
    with small_state_disk(vm_host, "24m") as ns:
        ns.ok("up", str(example_build.web))
        before = ns.record("web")
        # A read-only bind mount over the state directory (the hypervisors keep their open files).
        inside = ["nsenter", "-t", str(ns.pid), "-m", "--"]
        state = str(vm_host.state)
        subprocess.run([*inside, "mount", "--bind", state, state], check=True, timeout=30)
        subprocess.run([*inside, "mount", "-o", "remount,bind,ro", state], check=True, timeout=30)
        try:
            for argv in (("stop", "web"), ("up", str(example_build.api)), ("down", "web")):
                line = one_line(ns.run(*argv))
                assert "read-only" in line, (argv, line)
            assert ns.ps()["web"]["state"] == "running"
            assert ns.record("web") == before
        finally:
            subprocess.run([*inside, "umount", state], check=True, timeout=30)
        ns.ok("stop", "web")
        assert ns.ps()["web"]["state"] == "stopped"
