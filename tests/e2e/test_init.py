"""What `procurator init --minimal` writes builds with the minimal builder and boots (real QEMU)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.support.host import VmHost

pytestmark = pytest.mark.e2e


def test_an_init_project_builds_and_boots(vm_host: VmHost, tmp_path: Path) -> None:
    project = tmp_path / "project"
    vm_host.ok("init", str(project), "--minimal", "--vm", "hello", "--name", "local")
    ref = f"{project}/default.nix#deployment"
    built = json.loads(vm_host.ok("build", ref, "--json"))
    assert [b["name"] for b in built["bundles"]] == ["hello"]
    vm_host.ok("up", ref, "--wait", "healthy", timeout=300)  # its /health check passed
    vm = vm_host.ps()["hello"]
    assert vm["state"] == "running"
    page = vm_host.ns.exec("curl", "-fsS", "--max-time", "5", f"http://{vm['ip']}/")
    assert "name=hello\n" in page
    vm_host.ok("down", "--purge", "hello")
    assert vm_host.leftovers() == {"processes": [], "taps": [], "vms": [], "sockets": []}
