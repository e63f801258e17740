"""Hypervisors as uids of their own (the worker configuration's `vmUsers`), through the cloud-hypervisor
double in the test's namespace: the double runs as its VM's uid and gid and gets its TAP as descriptors
over its API socket (vm.add-net with SCM_RIGHTS), so it needs no /dev/net/tun (root's alone here); uids are
distinct, kept across stop/start, given back on down; a full range is a one-line error that changes nothing;
a start killed -9 converges on one re-run."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from tests.integration.conftest import ExampleBuild
from tests.integration.test_up_faults import DOUBLE, hypervisors_of, kill_mid_start, leases, one_line_error
from tests.support.bundles import write_bundle, write_deployment
from tests.support.host import VmHost
from tests.support.users import ids_of, owned_by, processes_of, tun_queues, vm_range

FIRST = vm_range(10)
UIDS = range(FIRST, FIRST + 4)
CH = {"hypervisor": {"backend": "cloud-hypervisor", "binary": str(DOUBLE)}}
# As a VM uid the double cannot reach the virtualenv's interpreter (under /root here) and runs on the system
# python3 without jsonschema; spec validation is covered by the other tests.
ENV = {"CHDOUBLE_VALIDATE": "0"}


def uid_of_record(host: VmHost, name: str) -> int:
    return int(json.loads((host.state / "vms" / name / "record.json").read_text())["uid"])


@pytest.mark.parametrize("vm_host", [{**CH, "vmUsers": {"first": FIRST, "count": 4}}], indirect=True)
def test_the_double_runs_as_its_vm_uid_with_its_taps_as_descriptors(
    vm_host: VmHost, example_build: ExampleBuild
) -> None:
    host = vm_host
    host.ok("up", str(example_build.web), str(example_build.api), CHDOUBLE_VALIDATE="0")
    vms = host.ps()
    uids = {name: uid_of_record(host, name) for name in vms}
    assert sorted(uids.values()) == [FIRST, FIRST + 1]  # one each, from the range
    for name, vm in vms.items():
        assert ids_of(vm["pid"]) == (uids[name], uids[name], "")
        assert set(tun_queues(vm["pid"])) == set(vm["taps"])  # the descriptors it was sent (and its dups)
        tap = host.ns.link(vm["taps"][0])
        assert tap is not None
        assert tap["linkinfo"]["info_data"]["user"] == uids[name]
    log = (host.state / "vms" / "web" / "hypervisor.log").read_text()
    assert "Creating virtio-net device: NetConfig { tap: None, fds: Some([" in log
    runtime_log = (host.state / "vms" / "web" / "vm-config.runtime.json").read_text()
    assert json.loads(runtime_log)["net"][0]["tap"] == vms["web"]["taps"][0]  # the name stays ours
    volume = host.state / "volumes" / "web" / "data.img"
    assert volume.stat().st_uid == uids["web"]

    host.ok("stop", "web")
    host.ok("start", "web", CHDOUBLE_VALIDATE="0")
    assert uid_of_record(host, "web") == uids["web"]  # kept by the record
    assert ids_of(host.ps()["web"]["pid"])[0] == uids["web"]

    host.ok("down", "web")
    assert volume.stat().st_uid == os.getuid()
    host.ok("down", "--purge", "web")
    host.ok("down", "--purge", "api")
    assert owned_by(host.root, uids["web"]) == []
    assert owned_by(host.root, uids["api"]) == []
    assert processes_of(UIDS) == {}
    assert host.leftovers() == {"processes": [], "taps": [], "vms": [], "sockets": []}


@pytest.mark.parametrize("vm_host", [{**CH, "vmUsers": {"first": FIRST, "count": 1}}], indirect=True)
def test_a_full_range_is_one_line_and_changes_nothing(vm_host: VmHost, example_build: ExampleBuild) -> None:
    host = vm_host
    host.ok("up", str(example_build.web), CHDOUBLE_VALIDATE="0")
    record = host.state / "vms" / "web" / "record.json"
    before = (record.read_text(), sorted(host.taps()), leases(host), host.ns.link_names())
    line = one_line_error(host.run("up", str(example_build.api), CHDOUBLE_VALIDATE="0"))
    assert line == (
        f"error: no free uid for VM 'api': all 1 of vmUsers {FIRST}-{FIRST} are taken; raise vmUsers.count "
        "in the worker configuration or remove VMs (procurator down NAME)"
    )
    assert (record.read_text(), sorted(host.taps()), leases(host), host.ns.link_names()) == before
    assert not (host.state / "vms" / "api").exists()


@pytest.mark.parametrize("vm_host", [{**CH, "vmUsers": {"first": FIRST, "count": 4}}], indirect=True)
def test_kill_9_mid_start_as_a_vm_uid_converges_on_one_rerun(
    vm_host: VmHost, example_build: ExampleBuild, monkeypatch: pytest.MonkeyPatch
) -> None:
    host = vm_host
    for key, value in ENV.items():  # kill_mid_start runs the CLI in the host's environment
        monkeypatch.setenv(key, value)
    kill_mid_start(host, "web", "up", str(example_build.web))
    assert len(processes_of(UIDS)) == 1  # the orphaned hypervisor, as its VM uid
    done = host.run("up", str(example_build.web))
    assert done.returncode == 0, done.stderr
    vm = host.ps()["web"]
    assert vm["state"] == "running"
    assert len(hypervisors_of(host, "web")) == 1
    assert processes_of(UIDS) == {vm["pid"]: uid_of_record(host, "web")}  # the orphan is gone
    assert set(host.taps()) == set(vm["taps"])
    host.ok("down", "--purge", "web")
    for uid in UIDS:
        assert owned_by(host.root, uid) == []
    assert processes_of(UIDS) == {}


@pytest.mark.parametrize("release", ["40", "53"])
@pytest.mark.parametrize("vm_host", [{**CH, "vmUsers": {"first": FIRST, "count": 4}}], indirect=True)
def test_a_snapshot_of_a_vm_uid_is_restored_with_its_taps_handed_again(
    vm_host: VmHost, example_build: ExampleBuild, release: str
) -> None:
    """The snapshot's config.json keeps `fds` for the handed net; the restore sends `net_fds` and new
    descriptors (SCM_RIGHTS) to a fresh double running as the same uid, which still opens no /dev/net/tun."""
    host = vm_host
    host.ok("up", str(example_build.web), CHDOUBLE_VALIDATE="0", CHDOUBLE_VERSION=release)
    uid = uid_of_record(host, "web")
    host.ok("snapshot", "web", CHDOUBLE_VALIDATE="0", CHDOUBLE_VERSION=release)
    snapshots = host.state / "snapshots" / "web"
    assert owned_by(snapshots, uid) == []  # the worker's once written
    host.ok("stop", "web", CHDOUBLE_VALIDATE="0", CHDOUBLE_VERSION=release)
    host.ok("restore", "web", CHDOUBLE_VALIDATE="0", CHDOUBLE_VERSION=release)
    vm = host.ps()["web"]
    assert vm["state"] == "running"
    assert uid_of_record(host, "web") == uid
    assert ids_of(vm["pid"]) == (uid, uid, "")
    assert set(tun_queues(vm["pid"])) == set(vm["taps"])
    host.ok("down", "--purge", "web")
    assert owned_by(host.root, uid) == []
    assert processes_of(UIDS) == {}


def blue_green_bundle(root: Path, source: Path, release: str) -> Path:
    """`source`'s bundle with a blue-green replace, no volumes and no checks (the double serves no HTTP),
    added to the store as `procurator-vm-web`; `release` makes each one another generation."""
    meta = json.loads((source / "procurator.json").read_text())
    meta.update(volumes=[], health=[], replace={"strategy": "blue-green", "drainSeconds": 0})
    config = json.loads((source / "vm-config.json").read_text())
    config["payload"]["cmdline"] += f" release={release}"
    bundle = write_bundle(root, "web", config=config, meta_data=meta, dirname="procurator-vm-web")
    added = subprocess.run(["nix-store", "--add", str(bundle)], capture_output=True, text=True, check=True)
    return Path(added.stdout.strip())


@pytest.mark.parametrize("vm_host", [{**CH, "vmUsers": {"first": FIRST, "count": 4}}], indirect=True)
def test_a_blue_green_generation_runs_as_a_uid_of_its_own(
    vm_host: VmHost, example_build: ExampleBuild, tmp_path: Path
) -> None:
    host = vm_host
    first = blue_green_bundle(tmp_path / "1", example_build.web, "1")
    second = blue_green_bundle(tmp_path / "2", example_build.web, "2")
    host.ok("apply", str(write_deployment(tmp_path / "d1", "local", {"web": first})), CHDOUBLE_VALIDATE="0")
    old = uid_of_record(host, "web")
    done = host.run("apply", str(write_deployment(tmp_path / "d2", "local", {"web": second})), "--json",
                    CHDOUBLE_VALIDATE="0")  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["actions"][0]["strategy"] == "blue-green"
    new = uid_of_record(host, "web")
    assert new != old  # both ran at once, each as its own uid
    vm = host.ps()["web"]
    assert processes_of(UIDS) == {vm["pid"]: new}
    assert owned_by(host.state / "vms" / "web", old) == []  # the old generation's directory, taken back
    host.ok("down", "--purge", "web")
    for uid in UIDS:
        assert owned_by(host.root, uid) == []


@pytest.mark.parametrize("vm_host", [{**CH, "vmUsers": {"first": FIRST, "count": 4}}], indirect=True)
def test_down_of_a_damaged_record_still_takes_the_volumes_back(
    vm_host: VmHost, example_build: ExampleBuild
) -> None:
    """A damaged record does not say which uid the VM had: whatever of the range its volumes hold is taken
    back, and its hypervisor (running as that uid) is killed."""
    host = vm_host
    host.ok("up", str(example_build.web), CHDOUBLE_VALIDATE="0")
    uid = uid_of_record(host, "web")
    (host.state / "vms" / "web" / "record.json").write_text("{ not json")
    host.ok("down", "web")
    assert owned_by(host.state / "volumes", uid) == []
    assert processes_of(UIDS) == {}


@pytest.mark.parametrize("vm_host", [{**CH, "vmUsers": {"first": FIRST, "count": 4}}], indirect=True)
def test_doctor_checks_what_the_vm_uids_may_open(vm_host: VmHost) -> None:
    done = vm_host.run("doctor", "--json")
    checks = {c["name"]: c for c in json.loads(done.stdout)["checks"]}
    kvm = Path("/dev/kvm").stat()
    if kvm.st_mode & 0o006 == 0o006:  # others may: so may a VM uid in no group
        assert checks["kvm"]["status"] == "ok"
    else:  # this host's /dev/kvm is 0600 root:root, and the range has no extraGroups
        assert checks["kvm"]["status"] == "fail"
        assert checks["kvm"]["detail"] == (
            f"/dev/kvm opens (KVM API 12) but the uids of vmUsers {FIRST}-{FIRST + 3} may not open it"
        )
    assert checks["tap"]["status"] == "ok"  # a VM uid needs no /dev/net/tun: its TAPs are handed over
    assert checks["tap"]["detail"].endswith(
        f"owned by the first uid of vmUsers {FIRST}-{FIRST + 3} created and removed; hypervisors get their "
        "TAPs as descriptors"
    )
