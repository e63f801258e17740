"""The watchdog: a hypervisor that stops answering its API is killed, and its restart policy decides.

A process can run and not work: a VMM thread stuck on a lock or an ioctl, a QEMU main loop that never
returns. Exits (worker/exits.py) do not show it. A background thread asks every supervised VM's
hypervisor, once per `interval` seconds, a question its main thread must answer (cloud-hypervisor
`vmm.ping`, QEMU QMP `query-status`; `Hypervisor.ping`), each bounded by `timeout`, `PING_PARALLEL` at
once. A paused VM is asked too: its guest's vCPUs stop, its VMM must not. After `failures` failed
pings in a row of the same process (pid and start time) `hung` names it; the supervision loop turns it
into a crash (`Exit(..., hung=True)`), asks once more under the state lock (a command such as a long
snapshot may have kept the VMM busy), and only then kills it. A successful ping clears the count.

Pings are only asked and counted here; the kill is the daemon's, like every other action.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from procurator import lifecycle, process
from procurator.config import WatchdogSettings
from procurator.errors import ProcuratorError
from procurator.state import VmRecord

log = logging.getLogger("procurator.worker")

PING_PARALLEL = 4  # more only contend for the interpreter's lock
DETAIL = "hypervisor stopped answering its API"

Key = tuple[str, int, int]  # (name, pid, start time): counts belong to one process


@dataclass(frozen=True, slots=True)
class Failing:
    count: int  # failed pings in a row
    since: float  # monotonic time of the first of them
    problem: str  # what the last one said


class Watchdog:
    def __init__(
        self,
        host: lifecycle.Host,
        settings: WatchdogSettings,
        *,
        clock: Callable[[], float],
        records: Callable[[], list[VmRecord]] | None = None,
    ) -> None:
        self.host = host
        self.settings = settings
        self.clock = clock
        # the daemon's records, parsed again only when they changed (default: every record read again)
        self.records = records or (lambda: host.state.scan()[0])
        self._failing: dict[Key, Failing] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        if not self.settings.enable:
            return
        self._thread = threading.Thread(target=self._loop, name="watchdog", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=self.settings.timeout + 5.0)

    def _loop(self) -> None:
        while not self._stop.wait(self.settings.interval):
            try:
                self.round()
            except Exception:  # the watchdog must not end the daemon
                log.exception("watchdog: a ping round failed")

    def round(self) -> None:
        """Ping every supervised VM's hypervisor once (each within `timeout`)."""
        records = self.records()
        watched = [
            r for r in records if r.desired == "running" and r.pid > 0 and process.alive(r.pid, r.start_time)
        ]
        keys = {_key(r) for r in watched}
        with self._lock:
            for key in list(self._failing):
                if key not in keys:
                    del self._failing[key]
        if not watched:
            return
        with ThreadPoolExecutor(max_workers=PING_PARALLEL, thread_name_prefix="watchdog") as pool:
            for record, problem in zip(watched, pool.map(self.ping, watched), strict=True):
                self._count(record, problem)

    def ping(self, record: VmRecord) -> str | None:
        """None when the hypervisor answered within `timeout`, else what went wrong."""
        try:
            self.host.hypervisors(record.backend).ping(record.handle, timeout=self.settings.timeout)
        except ProcuratorError as exc:
            return str(exc)
        return None

    def _count(self, record: VmRecord, problem: str | None) -> None:
        key = _key(record)
        with self._lock:
            before = self._failing.get(key)
            if problem is None:
                if before is not None:
                    log.info(
                        "%s: its hypervisor answers again after %d failed ping(s)", record.name, before.count
                    )
                    del self._failing[key]
                return
            now = self.clock()
            failing = (
                Failing(1, now, problem)
                if before is None
                else Failing(before.count + 1, before.since, problem)
            )
            self._failing[key] = failing
        log.warning(
            "%s: hypervisor pid %d did not answer ping %d of %d: %s",
            record.name,
            record.pid,
            failing.count,
            self.settings.failures,
            problem,
        )

    def hung(self, record: VmRecord) -> str | None:
        """The detail of an exit when `record`'s hypervisor failed `failures` pings in a row, else None."""
        with self._lock:
            failing = self._failing.get(_key(record))
        if failing is None or failing.count < self.settings.failures:
            return None
        return (
            f"{DETAIL} ({failing.count} pings of {self.settings.timeout:g}s failed over "
            f"{self.clock() - failing.since + self.settings.timeout:.0f}s; last: {_short(failing.problem)})"
        )

    def forget(self, record: VmRecord) -> None:
        with self._lock:
            self._failing.pop(_key(record), None)


def _key(record: VmRecord) -> Key:
    return (record.name, record.pid, record.start_time)


def _short(text: str, limit: int = 160) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."
