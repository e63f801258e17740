"""The worker's status page in a real browser (headless Chromium over the DevTools protocol), with two
real QEMU guests: both shown with their addresses; a replace shows the new generation and its diff
without a reload by hand; a VM's page follows its serial log, and a guest's line holding `<script>` is
text, never markup. Screenshots are saved as test artefacts (tests/support/browser.py, `.artefacts/`)."""

from __future__ import annotations

import socket
import time
import uuid
from collections.abc import Callable
from typing import Any

import pytest

from tests.integration.conftest import ExampleBuild
from tests.integration.test_worker import Daemon, release2, start_daemon
from tests.support.browser import chromium
from tests.support.host import VmHost

pytestmark = pytest.mark.e2e
__all__ = ["release2", "start_daemon"]  # fixtures, used by name

PORT = 9478
ROWS = "[...document.querySelectorAll('tr[data-vm]')].map(r => [r.dataset.vm, "
ROWS += "r.querySelector('[data-field=ip]').textContent, r.querySelector('code').textContent])"


def guest_echo(host: VmHost, vm: str, line: str) -> None:
    """Have the guest write `line` to its serial port, through the shell on its console (hvc0)."""
    path = host.state / "vms" / vm / "console.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(10)
        sock.connect(str(path))
        sock.sendall(f"\necho '{line}' > /dev/ttyS0\n".encode())
        time.sleep(0.5)  # let the shell read it before the connection goes


def running(daemon: Daemon, names: set[str]) -> dict[str, dict[str, Any]]:
    vms = daemon.vms()
    return vms if set(vms) == names and all(v["state"] == "running" and v["ip"] for v in vms.values()) else {}


def test_the_status_page_in_a_browser(
    vm_host: VmHost, example_build: ExampleBuild, release2: ExampleBuild, start_daemon: Callable[..., Daemon]
) -> None:
    daemon = start_daemon("--status-listen", f"127.0.0.1:{PORT}")
    assert daemon.apply(example_build.deployment)["success"]
    vms = running(daemon, {"web", "api"})
    assert vms
    url = f"http://127.0.0.1:{PORT}"
    with chromium(vm_host.ns.name) as browser:
        # 1. Both VMs, with their addresses and generations.
        page = browser.open(f"{url}/")
        rows = {name: (ip, gen) for name, ip, gen in page.eval(ROWS)}
        assert rows == {name: (vm["ip"], vm["generation"][:12]) for name, vm in vms.items()}
        assert page.eval("document.title") == "procurator worker"
        page.screenshot("status-two-vms")

        # 2. A replace: the page notices the new apply by itself and shows the new generation and diff.
        report = daemon.apply(release2.deployment)
        assert report["success"], report
        new = daemon.vms()["web"]["generation"]
        assert new != vms["web"]["generation"]
        page.wait_for(
            "the new generation of web on the page",
            lambda: {n: g for n, _, g in page.eval(ROWS)}.get("web") == new[:12],
        )
        text = page.eval("document.body.innerText")
        assert "what changed in web" in text
        diff = page.eval("document.querySelector('pre.diff').textContent")
        assert "procurator.release=2" in diff
        page.screenshot("status-after-replace")

        # 3. web's page follows its serial log; a guest line holding markup stays text.
        page.goto(f"{url}/vm/web")
        log = "document.getElementById('log').textContent"
        before = page.wait_for(
            "web's boot on its page (the new generation was just started)",
            lambda: "procurator-guest: web up" in page.eval(log) and page.eval(log),
            120,
        )
        line = f"status-page-{uuid.uuid4().hex[:8]} <script>window.pwned = 1</script> <b>bold</b>"
        assert line not in before
        guest_echo(vm_host, "web", line)
        page.wait_for("the guest's new line on the log page",
                      lambda: line in page.eval(log))  # fmt: skip
        assert page.eval("window.pwned === undefined")
        assert page.eval("document.querySelectorAll('#log *').length") == 0  # no element: text only
        page.screenshot("status-log-followed")
        page.goto(f"{url}/vm/web")  # now rendered by the worker: escaped by the template
        assert line in page.eval(log)
        assert page.eval("window.pwned === undefined && document.querySelectorAll('#log *').length === 0")
        assert page.eval("document.querySelectorAll('script').length") == 1  # the page's own
        page.screenshot("status-log-rendered")
