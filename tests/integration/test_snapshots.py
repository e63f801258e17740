"""`procurator snapshot`, `snapshots` and `restore` through the CLI with the cloud-hypervisor double and a
real Nix build, in a throwaway network namespace: the layout under the state directory, the record and TAP
after a restore (the double opens the TAP by the name in the snapshot's config), retention, the refusals,
and a `restore` killed midway that one re-run converges from."""

from __future__ import annotations

import json
import signal
import subprocess
import time

import pytest

from tests.integration.conftest import ExampleBuild, NixBuild
from tests.support.cli import PROCURATOR
from tests.support.host import REPO, VmHost

DOUBLE = REPO / "tests" / "chdouble" / "cloud-hypervisor"
CH = {"hypervisor": {"backend": "cloud-hypervisor", "binary": str(DOUBLE)}}

pytestmark = pytest.mark.parametrize("vm_host", [CH], indirect=True)


def hypervisors(host: VmHost) -> list[str]:
    return [p for p in host.processes() if "vms/web/" in p and "cloud-hypervisor" in p]


def test_snapshot_restore_and_retention(vm_host: VmHost, example_build: ExampleBuild) -> None:
    host = vm_host
    host.ok("up", str(example_build.web))
    web = host.ps()["web"]
    (tap,) = host.taps()

    ids = []
    for _ in range(3):
        taken = json.loads(host.ok("snapshot", "web", "--keep", "2", "--json"))
        ids.append(taken["id"])
    assert taken["pruned"] == [ids[0]]  # the third snapshot removed the first
    base = host.state / "snapshots" / "web" / web["generation"]
    assert sorted(p.name for p in base.iterdir()) == ids[1:]
    snap = base / ids[2]
    assert sorted(p.name for p in (snap / "data").iterdir()) == [
        "config.json",
        "memory-ranges",
        "state.json",
        "vm-config.json",
    ]
    meta = json.loads((snap / "snapshot.json").read_text())
    assert meta == {
        "schema": 1,
        "vm": "web",
        "bundle": str(example_build.web),
        "generation": web["generation"],
        "backend": "cloud-hypervisor",
        "created": meta["created"],
        "size": meta["size"],
        "paused": False,
        "ip": web["ip"],
    }
    listed = json.loads(host.ok("snapshots", "web", "--json"))
    assert [s["id"] for s in listed["snapshots"]] == ids[1:]
    table = host.ok("snapshots", "web").splitlines()
    assert table[0].split() == ["ID", "GENERATION", "BACKEND", "CREATED", "SIZE"]
    assert host.ps()["web"]["state"] == "running"  # resumed after each snapshot

    host.ok("snapshot", "web", "--stay-paused")
    assert host.ps()["web"]["state"] == "paused"
    assert len(json.loads(host.ok("snapshots", "web", "--json"))["snapshots"]) == 3  # snapshotKeep: 3
    host.ok("stop", "web")
    assert host.taps() == set()

    done = host.run("restore", "web", "--id", ids[1])
    assert done.returncode == 0, done.stderr
    assert done.stderr.strip().startswith(f"web: restored from snapshot {ids[1]} (pid ")
    vm = host.ps()["web"]
    assert (vm["state"], vm["ip"], vm["generation"]) == ("running", web["ip"], web["generation"])
    assert vm["pid"] != web["pid"]
    assert host.taps() == {tap}  # the same name: the double opened it by the name in config.json
    assert len(hypervisors(host)) == 1
    assert len(host.keepers()) == 1
    record = json.loads((host.state / "vms" / "web" / "record.json").read_text())
    assert record["taps"] == [tap]
    assert record["paused"] is False
    log = (host.state / "vms" / "web" / "hypervisor.log").read_text()
    assert "API request event: VmRestore" in log

    running = host.run("restore", "web")
    assert running.returncode == 1
    assert "error: VM 'web' is running; stop it first (`procurator stop web`)" in running.stderr
    host.ok("down", "web")
    assert host.leftovers() == {"processes": [], "taps": [], "vms": [], "sockets": []}
    assert base.is_dir()  # `down` keeps the snapshots, as it keeps the volumes
    host.ok("down", "--purge", "web")
    assert not (host.state / "snapshots" / "web").exists()


def test_what_cannot_be_snapshotted_or_restored_is_one_line(
    vm_host: VmHost, example_build: ExampleBuild
) -> None:
    host = vm_host
    host.ok("up", str(example_build.web))
    runtime = host.state / "vms" / "web" / "vm-config.runtime.json"
    config = json.loads(runtime.read_text())
    runtime.write_text(json.dumps({**config, "fs": [{"tag": "share", "socket": "/run/virtiofsd.sock"}]}))
    fs = host.run("snapshot", "web")
    assert (fs.returncode, fs.stderr.strip()) == (
        1,
        "error: VM 'web' has virtio-fs shares (`fs`), whose state lives in virtiofsd and cannot be "
        "snapshotted; stop and start the VM instead",
    )
    runtime.write_text(json.dumps(config))
    assert host.ps()["web"]["state"] == "running"
    # nothing was written: the VM's snapshot directory, made at start for its Landlock rule, stays empty
    assert list((host.state / "snapshots" / "web").iterdir()) == []

    host.ok("stop", "web")
    none = host.run("restore", "web")
    assert none.returncode == 1
    assert none.stderr.strip().startswith("error: VM 'web' has no snapshot of its generation ")
    stopped = host.run("snapshot", "web")
    assert stopped.stderr.strip() == (
        "error: VM 'web' is not running; only a running VM can be snapshotted "
        "(start it with `procurator start web`)"
    )
    missing = host.run("restore", "web", "--from", str(host.root / "nowhere"))
    assert missing.stderr.strip() == (
        f"error: {host.root / 'nowhere'}: no such snapshot directory; see `procurator snapshots NAME`"
    )
    torn = host.root / "torn"
    (torn / "data").mkdir(parents=True)
    (torn / "snapshot.json").write_text('{"schema": 1, "vm": ')
    damaged = host.run("restore", "web", "--from", str(torn))
    assert damaged.returncode == 1
    assert damaged.stderr.strip().startswith(f"error: {torn / 'snapshot.json'}: damaged state file: not JSON")
    assert "Traceback" not in damaged.stderr
    assert host.ps()["web"]["state"] == "stopped"


def test_a_restore_killed_midway_converges_on_a_rerun(vm_host: VmHost, example_build: ExampleBuild) -> None:
    host = vm_host
    host.ok("up", str(example_build.web))
    host.ok("snapshot", "web", "--to", str(host.root / "kept"))
    host.ok("stop", "web")
    cli = subprocess.Popen(
        [str(PROCURATOR), "restore", "web", "--from", str(host.root / "kept")],
        env=host.env(CHDOUBLE_RESTORE_DELAY="3"),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 30
    try:
        while not hypervisors(host):  # the restore's hypervisor runs; the record does not name it yet
            assert cli.poll() is None, "procurator restore ended before its hypervisor ran"
            assert time.monotonic() < deadline, "the restore's hypervisor never started"
            time.sleep(0.02)
    finally:
        cli.send_signal(signal.SIGKILL)
        cli.wait(timeout=10)
    assert host.ps()["web"]["state"] == "stopped"  # the record was not written: the orphan is a stray

    host.ok("restore", "web", "--from", str(host.root / "kept"))
    vm = host.ps()["web"]
    assert vm["state"] == "running"
    assert len(hypervisors(host)) == 1, hypervisors(host)
    assert len(host.taps()) == 1
    assert len(host.keepers()) == 1
    host.ok("down", "web")
    assert host.leftovers() == {"processes": [], "taps": [], "vms": [], "sockets": []}


def test_restart_from_snapshot_through_a_host_shutdown(vm_host: VmHost, nix_build_example: NixBuild) -> None:
    """cloud-hypervisor: `procurator shutdown` snapshots a fromSnapshot VM (vm.pause, vm.snapshot, then
    SIGKILL: the guest never runs after its snapshot), `start` restores that very snapshot, once."""
    host = vm_host
    (web,) = nix_build_example("web", args=["--arg", "overrides", "{ web.restart.fromSnapshot = true; }"])
    host.ok("up", str(web))
    old = json.loads((host.state / "vms" / "web" / "record.json").read_text())
    host.ok("snapshot", "web")  # an older snapshot: never the one restored after a shutdown
    down = host.run("shutdown")
    assert down.returncode == 0, down.stderr
    record = json.loads((host.state / "vms" / "web" / "record.json").read_text())
    taken = record["resume_from"]
    assert down.stderr.splitlines() == [f"web: shut down (snapshot {taken} -> SIGKILL)"]
    assert (record["pid"], record["last_exit"], record["desired"]) == (0, "host shutdown", "running")
    assert hypervisors(host) == []

    host.ok("start", "web")
    record = json.loads((host.state / "vms" / "web" / "record.json").read_text())
    assert record["last_exit"] == f"restored from snapshot {taken}"
    assert "resume_from" not in record
    assert record["pid"] != old["pid"]
    assert len(hypervisors(host)) == 1
    # A stop and start boot it cold: the snapshot was spent when the restored guest ran.
    host.ok("stop", "web")
    host.ok("start", "web")
    assert json.loads((host.state / "vms" / "web" / "record.json").read_text())["last_exit"] == ""
