"""`restart.fromSnapshot` with real QEMU guests: `procurator shutdown` (the host going down) snapshots web
(fromSnapshot) and stops it, stops api (without) as always; when the worker starts again it restores web
(a file web keeps in its tmpfs, written over its console, is served again) and cold-boots api. Then the
same through `procurator start`. A snapshot gone missing is no failed start: the VM boots instead."""

from __future__ import annotations

import json
import signal
import subprocess
import time
from collections.abc import Callable
from typing import Any

import pytest

from procurator.errors import ProcessError
from tests.integration.conftest import ExampleBuild, NixBuild
from tests.integration.test_worker import Daemon, start_daemon, wait_for
from tests.support.cli import PROCURATOR
from tests.support.host import VmHost

pytestmark = pytest.mark.e2e
__all__ = ["start_daemon"]  # the fixture, used by name

MARKER = "kept-in-guest-memory-42"
FROM_SNAPSHOT = "{ web = { restart = { fromSnapshot = true; }; }; }"


@pytest.fixture(scope="module")
def held(nix_build_example: NixBuild) -> ExampleBuild:
    web, api, deployment = nix_build_example(
        "web", "api", "deployment", args=["--arg", "overrides", FROM_SNAPSHOT]
    )
    return ExampleBuild(web=web, api=api, deployment=deployment)


def fetch(host: VmHost, ip: str, path: str) -> str:
    return host.ns.exec("curl", "-fsS", "--max-time", "5", f"http://{ip}{path}")


def served(host: VmHost, ip: str, path: str) -> str | None:
    try:
        return fetch(host, ip, path)
    except ProcessError:
        return None


def record(host: VmHost, name: str) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((host.state / "vms" / name / "record.json").read_text())
    return data


def write_marker(host: VmHost) -> None:
    """A file in web's /run/www, a tmpfs: it lives in guest memory only."""
    done = subprocess.run(
        [str(PROCURATOR), "console", "web"],
        input=f"echo {MARKER.replace('42', '$((6*7))')} > /run/www/marker\n",
        capture_output=True, text=True, timeout=60, env=host.env(), check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr


def shutdown(host: VmHost) -> dict[str, str]:
    """`procurator shutdown`: how each VM went down, as it says."""
    done = host.run("shutdown")
    assert done.returncode == 0, done.stderr
    lines = [line for line in done.stderr.splitlines() if ": shut down (" in line]
    return {line.split(":", 1)[0]: line.split("(", 1)[1].rstrip(")") for line in lines}


def test_a_host_shutdown_snapshots_and_the_next_start_restores(
    vm_host: VmHost, held: ExampleBuild, start_daemon: Callable[..., Daemon]
) -> None:
    host = vm_host
    daemon = start_daemon()
    assert daemon.apply(held.deployment)["success"]
    ips = {n: v["ip"] for n, v in daemon.vms().items()}
    wait_for("web to serve", lambda: served(host, ips["web"], "/health"), timeout=120)
    write_marker(host)
    assert wait_for("the marker", lambda: served(host, ips["web"], "/marker"), timeout=30).strip() == MARKER

    # The host goes down: the worker stops first (the VMs keep running), then `procurator shutdown`.
    daemon.proc.send_signal(signal.SIGTERM)
    assert daemon.proc.wait(timeout=30) == 0
    how = shutdown(host)
    taken = record(host, "web")["resume_from"]
    assert how == {"web": f"snapshot {taken} -> SIGKILL", "api": "graceful"}
    snaps = json.loads(host.ok("snapshots", "web", "--json"))["snapshots"]
    assert [s["id"] for s in snaps] == [taken]
    assert "resume_from" not in record(host, "api")
    assert {n: v["state"] for n, v in host.ps().items()} == {"web": "exited", "api": "exited"}

    # The host is back: the worker restores web (its tmpfs file is there) and boots api.
    daemon = start_daemon()

    def both_running() -> dict[str, dict[str, Any]] | None:
        now = daemon.vms()
        return now if now and all(v["state"] == "running" for v in now.values()) else None

    vms = wait_for("both VMs to run again", both_running, timeout=180)
    assert set(vms) == {"web", "api"}
    assert fetch(host, ips["web"], "/marker").strip() == MARKER
    assert record(host, "web")["last_exit"] == f"restored from snapshot {taken}"
    assert "resume_from" not in record(host, "web")  # the snapshot is spent: the guest ran since
    assert not record(host, "api")["last_exit"].startswith("restored")  # booted afresh

    # The same through `procurator start`, the worker stopped.
    daemon.proc.send_signal(signal.SIGTERM)
    assert daemon.proc.wait(timeout=30) == 0
    how = shutdown(host)
    second = record(host, "web")["resume_from"]
    assert second not in ("", taken)
    host.ok("start", "web", "--wait", "healthy")
    assert fetch(host, ips["web"], "/marker").strip() == MARKER
    assert record(host, "web")["last_exit"] == f"restored from snapshot {second}"

    # A snapshot gone missing: the start boots the VM instead (its tmpfs is empty then).
    shutdown(host)
    lost = record(host, "web")["resume_from"]
    for snap in json.loads(host.ok("snapshots", "web", "--json"))["snapshots"]:
        if snap["id"] == lost:
            subprocess.run(["rm", "-rf", snap["path"]], check=True)
    started = host.run("start", "web", "--wait", "healthy")
    assert started.returncode == 0, started.stderr
    assert f"cannot restore snapshot {lost} taken at the host shutdown" in started.stderr
    assert record(host, "web")["last_exit"] != f"restored from snapshot {lost}"
    assert "resume_from" not in record(host, "web")
    deadline = time.monotonic() + 30
    while served(host, ips["web"], "/health") is None:
        assert time.monotonic() < deadline
        time.sleep(0.5)
    assert served(host, ips["web"], "/marker") is None
