"""The watchdog's counting (procurator/worker/watchdog.py): N failed pings in a row of one process make it
hung, one answer clears the count, a new process of the VM starts afresh, a paused VM is pinged too."""

from __future__ import annotations

import os
from pathlib import Path

from procurator import lifecycle, process
from procurator.config import WatchdogSettings, WorkerConfig
from procurator.errors import HypervisorError
from procurator.hypervisor.base import Handle, Hypervisor
from procurator.state import StateDir
from procurator.worker.watchdog import DETAIL, Watchdog
from tests.unit.test_metrics import FakeHypervisor, fake_record


class Pinged(FakeHypervisor):
    def __init__(self) -> None:
        super().__init__()
        self.pinged: list[tuple[int, float | None]] = []
        self.silent = False

    def ping(self, handle: Handle, *, timeout: float | None = None) -> object:
        self.pinged.append((handle.pid, timeout))
        if self.silent:
            raise HypervisorError(f"vmm.ping on {handle.api_socket}: timed out after {timeout}s")
        return {"pid": handle.pid}


def test_three_failed_pings_in_a_row_make_a_hung_hypervisor(tmp_path: Path) -> None:
    state = StateDir(tmp_path)
    state.ensure()
    me, started = os.getpid(), process.process_start_time(os.getpid()) or 0
    record = fake_record("web", me, started, tmp_path, paused=True)  # paused: still pinged
    state.save_record(record)
    state.save_record(fake_record("gone", 0, 0, tmp_path))  # no process: not pinged
    hv = Pinged()
    factory: dict[str, Hypervisor] = {"cloud-hypervisor": hv}
    host = lifecycle.Host(state=state, config=WorkerConfig(), hypervisors=factory.__getitem__)
    now = [100.0]
    dog = Watchdog(host, WatchdogSettings(interval=10, timeout=2, failures=3), clock=lambda: now[0])

    dog.round()
    assert hv.pinged == [(me, 2.0)]
    hv.silent = True
    for _ in range(2):
        dog.round()
        now[0] += 10
    assert dog.hung(record) is None  # two of three
    hv.silent = False
    dog.round()  # an answer clears the count
    hv.silent = True
    for _ in range(3):
        dog.round()
        now[0] += 10
    said = dog.hung(record)
    assert said is not None
    assert said.startswith(f"{DETAIL} (3 pings of 2s failed over 32s; last: vmm.ping on ")
    assert dog.hung(record.with_(start_time=started + 1)) is None  # another process of the VM
    dog.forget(record)
    assert dog.hung(record) is None
