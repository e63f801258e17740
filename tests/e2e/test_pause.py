"""Pause and resume a real QEMU guest (QMP stop/cont): while paused its page does not answer and `ps`
says paused; resumed, the same process answers again; a paused VM stops gracefully (resumed first)."""

from __future__ import annotations

import json

import pytest

from procurator.errors import ProcuratorError
from tests.integration.conftest import ExampleBuild
from tests.support.host import VmHost

pytestmark = pytest.mark.e2e


def answers(host: VmHost, ip: str) -> bool:
    try:
        host.ns.exec("curl", "-fsS", "--max-time", "2", f"http://{ip}/")
    except ProcuratorError:  # curl failed: no answer within 2 s
        return False
    return True


def test_pause_resume_and_stop_a_paused_guest(vm_host: VmHost, example_build: ExampleBuild) -> None:
    host = vm_host
    host.ok("up", str(example_build.web), "--wait", "healthy")
    web = host.ps()["web"]
    assert answers(host, web["ip"])

    paused = json.loads(host.ok("pause", "--json", "web"))
    assert [(vm["name"], vm["state"], vm["pid"]) for vm in paused] == [("web", "paused", web["pid"])]
    assert not answers(host, web["ip"])  # its vCPUs stopped: nothing answers
    assert host.run("pause", "web").stderr.strip() == "web: already paused; nothing to do"

    host.ok("resume", "web")
    again = host.ps()["web"]
    assert (again["state"], again["pid"]) == ("running", web["pid"])  # the same process
    assert answers(host, web["ip"])

    host.ok("pause", "web")
    stopped = json.loads(host.ok("stop", "--json", "web"))
    assert stopped[0]["graceful"] is True  # resumed first, then the power button worked
    assert host.ps()["web"]["state"] == "stopped"
    line = host.run("pause", "web").stderr.strip()
    assert line == "error: VM 'web' is not running; only a running VM can be paused"
