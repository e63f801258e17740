"""`procurator doctor` on a throwaway host: every check passes on a working host, through the
cloud-hypervisor double acting as v40, v48 and v53 (one VM booted, no guest to health-check) and through
real QEMU (the example bundle booted until its health check answers); every failure is one line with its
fix, a non-zero exit, and nothing left behind."""

from __future__ import annotations

import json
import os
import stat
import subprocess
from pathlib import Path
from typing import Any

import pytest

from tests.integration.conftest import ExampleBuild
from tests.support.bundles import meta, write_bundle
from tests.support.host import REPO, VmHost

DOUBLE = REPO / "tests" / "chdouble" / "cloud-hypervisor"
CH = {"hypervisor": {"backend": "cloud-hypervisor", "binary": str(DOUBLE)}}
NOTHING: dict[str, list[str]] = {"processes": [], "taps": [], "vms": [], "sockets": []}


def report(done: subprocess.CompletedProcess[str]) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(done.stdout)
    assert data["schema"] == 1
    return data


def statuses(data: dict[str, Any]) -> dict[str, str]:
    return {c["name"]: c["status"] for c in data["checks"]}


def check(data: dict[str, Any], name: str) -> dict[str, Any]:
    found: dict[str, Any] = next(c for c in data["checks"] if c["name"] == name)
    return found


def quiet_bundle(tmp_path: Path, example_build: ExampleBuild) -> Path:
    """The example web VM's hypervisor config under another name, with a NIC but no health check: the
    double runs no guest that could answer one."""
    config = json.loads((example_build.web / "vm-config.json").read_text())
    return write_bundle(
        tmp_path / "bundles", "probe", config=config, meta_data=meta("probe", volumes=[], health=[])
    )


@pytest.mark.parametrize("release", ["40", "48", "53"])
@pytest.mark.parametrize("vm_host", [CH], indirect=True)
def test_doctor_passes_on_the_double(
    vm_host: VmHost, example_build: ExampleBuild, tmp_path: Path, release: str
) -> None:
    bundle = quiet_bundle(tmp_path, example_build)
    done = vm_host.run("doctor", "--vm", str(bundle), "--json", CHDOUBLE_VERSION=release)
    assert done.returncode == 0, done.stdout + done.stderr
    data = report(done)
    assert data["ok"] is True
    assert data["backend"] == "cloud-hypervisor"
    assert statuses(data) == {
        "state": "ok",
        "kvm": "ok",
        "hypervisor": "ok",
        "tap": "ok",
        "network": "ok",
        "nftables": "skip",
        "boot": "ok",
    }
    flag = "with" if int(release) >= 52 else "without"
    assert (
        f"cloud-hypervisor v{release}.0 (supported v40.0 to v53.0; runs {flag} --no-shutdown)"
        in (check(data, "hypervisor")["detail"])
    )
    landlock = "Landlock on (kernel ABI " if int(release) >= 41 else "no Landlock (it came in v41.0)"
    assert landlock in check(data, "hypervisor")["detail"]
    assert check(data, "boot")["detail"].startswith("probe (cloud-hypervisor) booted (no health checks) in ")
    assert check(data, "boot")["detail"].endswith("nothing left behind")
    # The VM, its TAP and lease are gone, and so is the bridge the boot had to make.
    assert vm_host.leftovers() == NOTHING
    assert json.loads((vm_host.state / "leases.json").read_text())["leases"] == {}
    assert vm_host.ns.link_names() == {"lo"}


@pytest.mark.e2e
def test_doctor_boots_a_real_guest_under_qemu(vm_host: VmHost, example_build: ExampleBuild) -> None:
    vm_host.ok("net", "up")  # a bridge that was there before stays
    done = vm_host.run("doctor", "--vm", str(example_build.web))
    assert done.returncode == 0, done.stdout + done.stderr
    lines = done.stdout.splitlines()
    assert [line.split()[:2] for line in lines] == [
        ["ok", "state"],
        ["ok", "kvm"],
        ["ok", "hypervisor"],
        ["ok", "tap"],
        ["ok", "network"],
        ["skip", "nftables"],
        ["ok", "boot"],
    ]
    assert "qemu-system-x86_64: QEMU emulator version" in lines[2]
    assert f"bridge pcbr0 in netns {vm_host.ns.name} up, 10.124.0.1/24" in lines[4]
    assert "web (qemu) healthy (http :80) in " in lines[6]
    assert "stopped gracefully" in lines[6]
    assert vm_host.leftovers() == NOTHING
    assert "pcbr0" in vm_host.ns.link_names()


@pytest.mark.parametrize("vm_host", [CH], indirect=True)
def test_failures_name_their_fix(vm_host: VmHost, example_build: ExampleBuild, tmp_path: Path) -> None:
    old = tmp_path / "old" / "cloud-hypervisor"
    old.parent.mkdir()
    old.write_text("#!/bin/sh\necho 'cloud-hypervisor v39.0.0'\n")
    old.chmod(0o755)
    done = vm_host.run("doctor", PROCURATOR_CLOUD_HYPERVISOR=str(old))
    assert done.returncode == 1
    assert done.stderr.strip() == "error: doctor: 1 check(s) failed: hypervisor"
    lines = done.stdout.splitlines()
    failed = [i for i, line in enumerate(lines) if line.startswith("fail")]
    assert len(failed) == 1
    assert lines[failed[0]].split()[1] == "hypervisor"
    assert f"{old} is cloud-hypervisor v39.0; Procurator supports v40.0 to v53.0" in lines[failed[0]]
    assert lines[failed[0] + 1].split() == ["fix:", "install", "cloud-hypervisor", "v40.0", "to", "v53.0"]

    missing = report(vm_host.run("doctor", "--json", PROCURATOR_CLOUD_HYPERVISOR="/nope/ch"))
    assert missing["ok"] is False
    assert check(missing, "hypervisor")["detail"].startswith("/nope/ch (from PROCURATOR_CLOUD_HYPERVISOR)")

    # A state directory that is a file; a VM name in use; a deployment where one VM is wanted.
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("")
    state = report(vm_host.run("--state-dir", str(blocker / "state"), "doctor", "--json"))
    assert statuses(state)["state"] == "fail"
    assert check(state, "state")["fix"] == "point stateDir (or --state-dir) at a writable local directory"

    vm_host.ok("up", str(example_build.web))
    taken = report(vm_host.run("doctor", "--json", "--vm", str(example_build.web)))
    assert check(taken, "boot") == {
        "name": "boot",
        "status": "fail",
        "detail": "a VM named 'web' already exists on this host; doctor boots its VM beside the others",
        "fix": "give --vm a bundle with a name no VM here uses",
        "seconds": check(taken, "boot")["seconds"],
    }
    assert vm_host.ps()["web"]["state"] == "running"

    usage = vm_host.run("doctor", "--vm", str(example_build.deployment))
    assert usage.returncode == 2
    assert (
        usage.stderr.strip()
        == f"error: {example_build.deployment} is a deployment; give `doctor --vm` one VM's bundle"
    )


@pytest.mark.parametrize("vm_host", [{**CH, "network": {"uplink": "up0", "nat": True}}], indirect=True)
def test_nat_is_checked_against_the_configuration(vm_host: VmHost) -> None:
    vm_host.ns.exec("ip", "link", "add", "up0", "type", "veth", "peer", "name", "up0p")
    before = report(vm_host.run("doctor", "--json"))
    assert statuses(before)["nftables"] == "ok"
    assert statuses(before)["network"] == "ok"  # no bridge yet: nothing to compare
    vm_host.ok("net", "up")
    after = report(vm_host.run("doctor", "--json"))
    assert check(after, "network")["status"] == "ok", check(after, "network")
    assert "masquerade on" in check(after, "network")["detail"]
    vm_host.ns.exec("nft", "delete", "table", "inet", "procurator")
    broken = report(vm_host.run("doctor", "--json"))
    assert check(broken, "network")["status"] == "warn"
    assert check(broken, "network")["fix"] == "run `procurator net up` (idempotent)"
    assert broken["ok"] is True  # a warning does not fail the host


def others_may_read_write(path: str) -> bool:
    mode = os.stat(path).st_mode
    return mode & (stat.S_IROTH | stat.S_IWOTH) == stat.S_IROTH | stat.S_IWOTH


@pytest.mark.parametrize("vm_host", [{**CH, "user": "nobody"}], indirect=True)
def test_the_hypervisor_user_must_reach_the_devices(vm_host: VmHost) -> None:
    # nobody is in no group that owns a device: it gets at /dev/kvm and /dev/net/tun only through the
    # mode's bits for others (0666 on NixOS through udev; 0600 on some hosts, this one among them).
    data = report(vm_host.run("doctor", "--json"))
    if others_may_read_write("/dev/kvm"):
        assert statuses(data)["kvm"] == "ok"
    else:
        assert check(data, "kvm")["detail"] == "/dev/kvm opens (KVM API 12) but user 'nobody' may not open it"
        assert check(data, "kvm")["fix"] == (
            "add 'nobody' to group 'root' (users.users.nobody.extraGroups on NixOS)"
        )
    tap = check(data, "tap")  # the worker opens the TAPs and hands them over: nobody needs no /dev/net/tun
    assert tap["status"] == "ok"
    assert tap["detail"].endswith(
        "owned by user 'nobody' (uid 65534) created and removed; hypervisors get their TAPs as descriptors"
    )
    assert data["ok"] is others_may_read_write("/dev/kvm")
