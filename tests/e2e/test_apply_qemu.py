"""Reconciling real guests (QEMU) through the CLI in a throwaway network namespace: apply the example
deployment, plan and apply a change to one VM (replaced on its lease and volume, the other untouched),
then a change whose health check fails (rolled back to the running generation).

Boots: web and api once each, the new web once, the old web again after the rollback (four), plus the
unhealthy web's start, which is killed once its 2 s health budget runs out."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from procurator.errors import ProcessError
from tests.integration.conftest import ExampleBuild, NixBuild
from tests.support.host import VmHost

pytestmark = pytest.mark.e2e

MARKER = "written by the test before any boot\n"
PAGE_WAIT = 90.0


def overrides(web: str) -> list[str]:
    return ["--arg", "overrides", f"{{ web = {{ {web} }}; }}"]


def page(host: VmHost, ip: str) -> str:
    return host.ns.exec("curl", "-fsS", "--max-time", "5", f"http://{ip}/")


def wait_for_page(host: VmHost, ip: str, expect: str) -> str:
    """The guest page at `ip` once it contains `expect` (bounded: a TCG boot takes seconds)."""
    deadline = time.monotonic() + PAGE_WAIT
    last = ""
    while time.monotonic() < deadline:
        try:
            last = page(host, ip)
        except ProcessError as exc:
            last = exc.message
        if expect in last:
            return last
        time.sleep(1)
    pytest.fail(f"the page at {ip} did not show {expect!r} within {PAGE_WAIT:.0f}s (last: {last!r})")


def make_volume(path: Path) -> None:
    """web's data volume, made before the first boot, with a marker file on it (as the host makes them)."""
    path.parent.mkdir(parents=True)
    with open(path, "wb") as f:
        f.truncate(64 << 20)
    subprocess.run(["mkfs.ext4", "-q", "-F", "-L", "data", str(path)], check=True, timeout=60)
    marker = path.parent / "marker"
    marker.write_text(MARKER)
    subprocess.run(["debugfs", "-w", "-R", f"write {marker} marker", str(path)], check=True, timeout=60)
    marker.unlink()


def read_marker(path: Path) -> str:
    done = subprocess.run(
        ["debugfs", "-R", "cat /marker", str(path)], capture_output=True, text=True, check=True, timeout=60
    )
    return done.stdout


def apply(host: VmHost, deployment: Path, code: int = 0) -> dict[str, Any]:
    done = host.run("apply", str(deployment), "--json", timeout=300)
    assert done.returncode == code, done.stderr
    result: dict[str, Any] = json.loads(done.stdout)
    return result


def test_apply_replace_and_roll_back_real_guests(
    vm_host: VmHost, example_build: ExampleBuild, nix_build_example: NixBuild
) -> None:
    host = vm_host
    web2, dep2 = nix_build_example("web", "deployment", args=overrides('cmdline = "procurator.release=2";'))
    (unhealthy,) = nix_build_example(
        "deployment",
        args=overrides(
            'cmdline = "procurator.release=2"; '
            'health = [ { type = "tcp"; port = 9; retries = 2; intervalSeconds = 1; timeoutSeconds = 1; } ];'
        ),
    )
    volume = host.state / "volumes" / "web" / "data.img"
    make_volume(volume)

    # 1. The example deployment: both VMs created, healthy (their HTTP and TCP checks passed).
    first = apply(host, example_build.deployment)
    assert [(a["name"], a["kind"], a["outcome"]) for a in first["actions"]] == [
        ("api", "create", "ok"),
        ("web", "create", "ok"),
    ]
    vms = host.ps()
    assert f"bundle={example_build.web}\n" in page(host, vms["web"]["ip"])
    assert "volume data mounted at /mnt/data" in host.ok("logs", "web", "-n", "40")

    # 2. web changed: the plan shows one replace; apply replaces web only, on the same address.
    plan = host.ok("plan", str(dep2))
    assert [line for line in plan.splitlines() if line[:1] in "+~-=>"] == [
        f"= keep api ({example_build.api.name[:12]} running)",
        f"~ replace web ({example_build.web.name[:12]} -> {web2.name[:12]}: bundle hash changed) [recreate]",
    ]
    second = apply(host, dep2)
    assert [(a["name"], a["kind"], a["outcome"]) for a in second["actions"]] == [
        ("api", "keep", "ok"),
        ("web", "replace", "ok"),
    ]
    after = host.ps()
    assert after["api"]["pid"] == vms["api"]["pid"]
    assert after["web"]["pid"] != vms["web"]["pid"]
    assert after["web"]["ip"] == vms["web"]["ip"]
    text = page(host, after["web"]["ip"])
    assert f"bundle={web2}\n" in text
    assert "release=2\n" in text
    assert host.ok("logs", "web", "-n", "40").count("volume data mounted at /mnt/data") >= 1

    # 3. A generation whose health check cannot pass: rolled back, the running generation runs again.
    third = apply(host, unhealthy, code=1)
    web = next(a for a in third["actions"] if a["name"] == "web")
    assert (web["kind"], web["outcome"]) == ("replace", "rolled-back")
    assert f"health checks of {after['web']['ip']}" in web["error"]
    assert web["error"].endswith(f"old generation {web2.name[:12]} runs again")
    assert third["failed"] is True
    rolled = host.ps()
    assert (rolled["web"]["state"], rolled["web"]["bundle"]) == ("running", str(web2))
    assert rolled["api"]["pid"] == vms["api"]["pid"]
    wait_for_page(host, rolled["web"]["ip"], f"bundle={web2}\n")
    history = json.loads(host.ok("history", "--json"))["generations"]
    assert [(g["deployment"], g["current"]) for g in history] == [
        (str(example_build.deployment), False),
        (str(dep2), True),
    ]

    # The volume went through two replacements untouched: the marker is still on it.
    host.ok("down", "web", "api", timeout=120)
    assert read_marker(volume) == MARKER
    assert host.leftovers() == {"processes": [], "taps": [], "vms": [], "sockets": []}
