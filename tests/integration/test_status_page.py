"""The worker's status page over HTTP (against the cloud-hypervisor double): what each listener serves,
and the page's actions, which need statusActions, the page's CSRF token and a trusted peer."""

from __future__ import annotations

import http.client
import re
import socket
from collections.abc import Callable
from pathlib import Path
from urllib.parse import urlencode

import pytest

from procurator.netns import connect_tcp
from tests.integration.conftest import ExampleBuild
from tests.integration.test_worker import CH, Daemon, start_daemon
from tests.support.host import VmHost

__all__ = ["start_daemon"]  # a fixture, used by name

PORT = 9479
ACTIONS = {**CH, "statusActions": True}


class _UnixConnection(http.client.HTTPConnection):
    def __init__(self, path: Path) -> None:
        super().__init__("localhost", timeout=60)
        self.path = path

    def connect(self) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(60)
        self.sock.connect(str(self.path))


class _NetnsConnection(http.client.HTTPConnection):
    def __init__(self, netns: str, port: int) -> None:
        super().__init__("127.0.0.1", port, timeout=60)
        self.netns = netns

    def connect(self) -> None:
        self.sock = connect_tcp(self.netns, "127.0.0.1", self.port or PORT, 10)


def request(
    conn: http.client.HTTPConnection, method: str, path: str, form: dict[str, str] | None = None
) -> tuple[int, dict[str, str], str]:
    body = urlencode(form).encode() if form is not None else None
    headers = {"Content-Type": "application/x-www-form-urlencoded"} if form is not None else {}
    conn.request(method, path, body=body, headers=headers)
    answer = conn.getresponse()
    text = answer.read().decode()
    conn.close()
    return answer.status, {k.lower(): v for k, v in answer.getheaders()}, text


def csrf_of(page: str) -> str:
    found = re.search(r'name="csrf" value="([^"]+)"', page)
    assert found, "the page has no form"
    return found.group(1)


@pytest.mark.parametrize("vm_host", [ACTIONS], indirect=True)
def test_pages_and_actions(
    vm_host: VmHost, example_build: ExampleBuild, start_daemon: Callable[..., Daemon]
) -> None:
    daemon = start_daemon("--status-listen", f"127.0.0.1:{PORT}")
    assert daemon.apply(example_build.deployment)["success"]
    unix = _UnixConnection(daemon.socket)
    tcp = _NetnsConnection(vm_host.ns.name, PORT)

    status, headers, page = request(unix, "GET", "/")
    assert (status, headers["content-type"]) == (200, "text/html; charset=utf-8")
    assert 'data-vm="web"' in page
    assert 'data-vm="api"' in page
    assert "restart</button>" in page  # statusActions: the forms are there
    status, _, over_tcp = request(tcp, "GET", "/")
    assert status == 200
    assert 'data-vm="web"' in over_tcp

    status, _, vm_page = request(tcp, "GET", "/vm/web")
    assert status == 200
    assert 'id="log"' in vm_page
    assert request(tcp, "GET", "/vm/ghost")[0] == 404
    status, _, log = request(tcp, "GET", "/vm/web/log?offset=0")
    assert status == 200
    assert '"offset"' in log
    assert request(tcp, "GET", "/vm/web/log?offset=-1")[0] == 400

    # the status listener serves the page and what it reads, not the rest of the API
    assert request(tcp, "GET", "/status")[0] == 200
    assert request(tcp, "GET", "/plan")[0] == 404

    # actions: the token is required, and then a restart restarts
    before = daemon.vms()["web"]["pid"]
    assert request(unix, "POST", "/actions/restart", {"vm": "web"})[0] == 400
    assert request(unix, "POST", "/actions/restart", {"vm": "web", "csrf": "stale"})[0] == 400
    status, headers, _ = request(unix, "POST", "/actions/restart", {"vm": "web", "csrf": csrf_of(page)})
    assert (status, headers["location"]) == (303, "/vm/web")
    after = daemon.vms()["web"]
    assert after["state"] == "running"
    assert after["pid"] != before
    # a loopback peer of the status listener may act too
    status, _, _ = request(tcp, "POST", "/actions/restart", {"vm": "api", "csrf": csrf_of(over_tcp)})
    assert status == 303


def test_actions_are_refused_when_off(
    vm_host: VmHost, example_build: ExampleBuild, start_daemon: Callable[..., Daemon]
) -> None:
    daemon = start_daemon()
    assert daemon.apply(example_build.deployment)["success"]
    unix = _UnixConnection(daemon.socket)
    status, _, page = request(unix, "GET", "/")
    assert status == 200
    assert "restart</button>" not in page
    assert 'name="csrf"' not in page
    status, _, body = request(unix, "POST", "/actions/restart", {"vm": "web", "csrf": "x"})
    assert status == 403
    assert "statusActions" in body
