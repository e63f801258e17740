"""The worker's watchdog (worker/watchdog.py) against the cloud-hypervisor double: a hypervisor that runs
but stopped answering its API (`CHDOUBLE_HANG_AFTER`: the VMM thread hangs for good) is killed and
restarted by its restart policy, paused or not; `ps` says why; the kill is counted in /metrics."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import pytest

from procurator import process
from tests.integration.conftest import ExampleBuild
from tests.integration.test_worker import CH, Daemon, record, restarted, start_daemon, wait_for
from tests.support.host import VmHost
from tests.unit.test_metrics import parse_exposition

__all__ = ["start_daemon"]  # the fixture, used by name

WATCHDOG = {**CH, "watchdog": {"interval": 0.5, "timeout": 0.5, "failures": 3}}
HANG_AFTER = 8.0  # seconds after each double serves its API: the apply is done by then


@pytest.mark.parametrize("vm_host", [WATCHDOG], indirect=True)
def test_a_hung_hypervisor_is_killed_and_restarted(
    vm_host: VmHost, example_build: ExampleBuild, start_daemon: Callable[..., Daemon]
) -> None:
    daemon = start_daemon(CHDOUBLE_HANG_AFTER=str(HANG_AFTER))
    assert daemon.apply(example_build.deployment)["success"]
    first = {n: (v["pid"], record(vm_host, n)["start_time"]) for n, v in daemon.vms().items()}
    with daemon.client() as client:
        client.pause("web")  # a paused VM is pinged too: its vCPUs stop, its VMM must answer
    assert vm_host.ps()["web"]["state"] == "paused"

    # api: on-failure (a watchdog kill is a crash); web: always. Each is restarted once; the new
    # processes answer for HANG_AFTER seconds, time enough to look.
    for name in ("api", "web"):

        def again(n: str = name) -> dict[str, Any] | None:
            return restarted(daemon, n, first[n][0], 1)

        wait_for(f"{name} to be restarted", again, timeout=60)
    ps = vm_host.ps()
    for name, (pid, start_time) in first.items():
        assert ps[name]["state"] == "running"
        assert ps[name]["restarts"] == 1
        assert ps[name]["last_exit"].startswith(
            "hypervisor stopped answering its API (3 pings of 0.5s failed"
        )
        assert not process.alive(pid, start_time)
        hypervisors = [p for p in vm_host.processes() if f"vms/{name}/" in p and "cloud-hypervisor" in p]
        assert len(hypervisors) == 1, hypervisors
    table = vm_host.ok("ps")
    assert "hypervisor stopped answering its API" in table

    assert parse_exposition(daemon.metrics()).one("procurator_watchdog_kills_total") == 2
    log = daemon.output()
    assert "did not answer ping 3 of 3" in log
    assert f"killed hypervisor pid {first['api'][0]}" in log


@pytest.mark.parametrize("vm_host", [WATCHDOG], indirect=True)
def test_an_answering_hypervisor_is_left_alone(
    vm_host: VmHost, example_build: ExampleBuild, start_daemon: Callable[..., Daemon]
) -> None:
    daemon = start_daemon()
    assert daemon.apply(example_build.deployment)["success"]
    pids = {n: v["pid"] for n, v in daemon.vms().items()}
    with daemon.client() as client:
        client.pause("web")
    time.sleep(3.0)  # six watchdog rounds
    assert {n: v["pid"] for n, v in daemon.vms().items()} == pids
    assert all(v["restarts"] == 0 for v in vm_host.ps().values())
    assert "did not answer ping" not in daemon.output()
