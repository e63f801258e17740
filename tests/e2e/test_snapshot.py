"""Snapshot and restore a real QEMU guest (migration to a file, `-incoming`): a file the guest keeps in its
tmpfs, written over its console and served over HTTP, is there again after the VM was stopped and restored
from the snapshot; a restore over a running VM and one of another generation are refused. Three boots:
the first, the restore, and the second generation's."""

from __future__ import annotations

import json
import subprocess

import pytest

from tests.integration.conftest import ExampleBuild, NixBuild
from tests.support.cli import PROCURATOR
from tests.support.host import VmHost

pytestmark = pytest.mark.e2e

MARKER = "kept-in-guest-memory-42"


def fetch(host: VmHost, ip: str, path: str) -> str:
    return host.ns.exec("curl", "-fsS", "--max-time", "5", f"http://{ip}{path}")


def test_snapshot_stop_restore_keeps_the_guest_memory(
    vm_host: VmHost, example_build: ExampleBuild, nix_build_example: NixBuild
) -> None:
    host = vm_host
    host.ok("up", str(example_build.web), "--wait", "healthy")
    web = host.ps()["web"]
    # The guest's /run/www is a tmpfs: what is written there lives in guest memory only.
    console = subprocess.run(
        [str(PROCURATOR), "console", "web"],
        input=f"echo {MARKER.replace('42', '$((6*7))')} > /run/www/marker\n",
        capture_output=True,
        text=True,
        timeout=60,
        env=host.env(),
        check=False,
    )
    assert console.returncode == 0, console.stderr
    assert fetch(host, web["ip"], "/marker").strip() == MARKER

    taken = json.loads(host.ok("snapshot", "web", "--json"))
    assert (taken["vm"], taken["backend"], taken["bundle"]) == ("web", "qemu", str(example_build.web))
    assert taken["guest_paused"] is False
    assert taken["size"] > 1 << 20
    assert host.ps()["web"]["state"] == "running"  # paused for the snapshot, resumed after
    assert fetch(host, web["ip"], "/marker").strip() == MARKER
    listed = json.loads(host.ok("snapshots", "web", "--json"))
    assert [s["id"] for s in listed["snapshots"]] == [taken["id"]]
    assert listed["schema"] == 1
    assert listed["damaged"] == []

    running = host.run("restore", "web")
    assert running.returncode == 1
    assert running.stderr.strip() == (
        "error: VM 'web' is running; stop it first (`procurator stop web`), then restore: "
        "the restore replaces its guest"
    )

    host.ok("stop", "web")
    assert host.taps() == set()
    restored = json.loads(host.ok("restore", "web", "--wait", "healthy", "--json"))
    assert [(v["name"], v["state"], v["ip"]) for v in restored] == [("web", "running", web["ip"])]
    assert restored[0]["pid"] != web["pid"]
    assert len(host.taps()) == 1
    assert fetch(host, web["ip"], "/marker").strip() == MARKER  # the guest's memory came back
    record = json.loads((host.state / "vms" / "web" / "record.json").read_text())
    assert (record["pid"], record["desired"], record["paused"]) == (restored[0]["pid"], "running", False)
    assert record["last_exit"] == f"restored from snapshot {taken['id']}"

    # The VM replaced by another generation: the old snapshot is refused.
    (second,) = nix_build_example(
        "web", args=["--arg", "overrides", '{ web.cmdline = "procurator.release=2"; }']
    )
    host.ok("down", "web")
    host.ok("up", str(second), "--wait", "healthy")
    host.ok("stop", "web")
    generation = host.ps()["web"]["generation"]
    refused = host.run("restore", "web", "--id", taken["id"])
    assert refused.returncode == 1
    assert refused.stderr.strip() == (
        f"error: snapshot {taken['id']} of VM 'web' is of generation {taken['generation']} "
        f"({example_build.web}), but the VM is now generation {generation}; restore a snapshot of this "
        "generation (`procurator snapshots web`) or take a new one"
    )
    none = host.run("restore", "web")
    assert none.stderr.strip() == (
        f"error: VM 'web' has no snapshot of its generation {generation}; take one with "
        "`procurator snapshot web` (see `procurator snapshots web`)"
    )
    assert host.ps()["web"]["state"] == "stopped"
