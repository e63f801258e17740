"""The whole lifecycle through the real CLI with real QEMU boots of the minimal bundles, inside a
throwaway network namespace: up two VMs, reach each page at its leased address, ps, logs, a refused
second up, stop/start on the same lease, down gracefully, nothing left behind."""

from __future__ import annotations

import subprocess

import pytest

from tests.integration.conftest import ExampleBuild
from tests.support.cli import PROCURATOR
from tests.support.host import VmHost

pytestmark = pytest.mark.e2e


def page(host: VmHost, ip: str, path: str = "/") -> str:
    return host.ns.exec("curl", "-fsS", "--max-time", "5", f"http://{ip}{path}")


def test_up_ps_logs_down(vm_host: VmHost, example_build: ExampleBuild) -> None:
    host = vm_host
    done = host.run("up", str(example_build.deployment), "--wait", "healthy")
    assert done.returncode == 0, done.stderr
    assert "api: up (qemu" in done.stderr
    assert "web: up (qemu" in done.stderr

    vms = host.ps()
    assert set(vms) == {"api", "web"}
    for name, vm in vms.items():
        assert vm["state"] == "running"
        assert vm["backend"] == "qemu"
        assert vm["bundle"] == str(example_build.bundles[name])
        assert vm["ip"].startswith("10.124.0.")
        text = page(host, vm["ip"])
        assert f"name={name}\n" in text
        assert f"bundle={example_build.bundles[name]}\n" in text
    assert vms["api"]["ip"] != vms["web"]["ip"]
    assert len(host.taps()) == 2

    table = host.ok("ps").splitlines()
    assert table[0].split() == [
        "NAME",
        "STATE",
        "GENERATION",
        "BACKEND",
        "IP",
        "PID",
        "UPTIME",
        "RESTARTS",
        "LAST",
        "EXIT",
    ]
    assert [row.split()[:2] for row in table[1:]] == [["api", "running"], ["web", "running"]]

    logs = host.ok("logs", "web", "-n", "20")
    assert "procurator-guest: web up ip=" + vms["web"]["ip"] in logs
    assert "volume data mounted at /mnt/data" in logs

    # The interactive console (hvc0) takes input and shows the guest's answer.
    console = subprocess.run(
        [str(PROCURATOR), "console", "web"],
        input="echo console-$((6*7))\n",
        capture_output=True,
        text=True,
        timeout=60,
        env=host.env(),
        check=False,
    )
    assert console.returncode == 0, console.stderr
    assert "console-42" in console.stdout
    assert "detach with Ctrl-]" in console.stderr

    # A second up of a running name is refused and changes nothing.
    again = host.run("up", str(example_build.web))
    assert again.returncode == 1
    assert again.stderr.strip() == (
        f"error: VM 'web' is already running (generation {vms['web']['generation']}); "
        "run `procurator down web` first"
    )
    assert host.ps()["web"]["pid"] == vms["web"]["pid"]

    # stop keeps the VM (lease, volume); start boots the same generation on the same address.
    stop = host.run("stop", "web")
    assert stop.returncode == 0, stop.stderr
    assert "web: stopped (graceful)" in stop.stderr
    assert host.ps()["web"]["state"] == "stopped"
    refused = host.run("console", "web")
    assert refused.returncode == 1
    assert refused.stderr.strip() == "error: VM 'web' is not running; start it with `procurator start web`"
    assert len(host.taps()) == 1
    host.ok("start", "web", "--wait", "healthy")
    restarted = host.ps()["web"]
    assert restarted["state"] == "running"
    assert restarted["ip"] == vms["web"]["ip"]
    assert restarted["pid"] != vms["web"]["pid"]
    assert "name=web" in page(host, restarted["ip"], "/")

    down = host.run("down", "web", "api")
    assert down.returncode == 0, down.stderr
    assert down.stderr.splitlines() == ["web: down (graceful)", "api: down (graceful)"]
    assert host.ps() == {}
    assert host.leftovers() == {"processes": [], "taps": [], "vms": [], "sockets": []}
    # Leases and volumes outlive down; purge drops them.
    assert (host.state / "volumes" / "web" / "data.img").exists()
    host.ok("down", "--purge", "web")
    assert not (host.state / "volumes" / "web").exists()
