"""The health of running VMs as the worker last saw it: each VM's bundle checks, run once in a while.

Supervision acts on exits; this only observes, for the status page and `GET /status` (`details`): a
background thread runs every running VM's checks once per `every` seconds (a bounded pool; each probe is
bounded by its check's `timeoutSeconds`) and keeps the last result per VM. A paused VM is not probed.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from procurator import health, lifecycle
from procurator.errors import ProcuratorError
from procurator.models import Bundle, HealthCheck
from procurator.state import VmRecord

log = logging.getLogger("procurator.worker")

PROBE_EVERY = 10.0  # seconds between two rounds
PROBE_PARALLEL = 4


@dataclass(frozen=True, slots=True)
class Seen:
    ok: bool
    detail: str  # what failed, or "" when every check passed
    at: float  # wall clock
    pid: int  # of the hypervisor probed: a result says nothing of a later process of the VM

    def to_json(self) -> dict[str, object]:
        return {"ok": self.ok, "detail": self.detail, "at": round(self.at, 3)}


class HealthWatch:
    def __init__(
        self,
        host: lifecycle.Host,
        *,
        every: float = PROBE_EVERY,
        wall: Callable[[], float],
        probe: Callable[[HealthCheck, str, str | None], str | None] = health.probe,
        listing: Callable[[], Sequence[lifecycle.VmStatus]] | None = None,
    ) -> None:
        self.host = host
        # the daemon's listing, from records parsed again only when they changed (default: read again)
        self.listing = listing or (lambda: lifecycle.listing(host)[0])
        self.every = every
        self.wall = wall
        self.probe = probe
        self._seen: dict[str, Seen] = {}
        self._checks: dict[str, tuple[HealthCheck, ...]] = {}  # by bundle path: bundles never change
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def seen(self) -> Mapping[str, Seen]:
        return dict(self._seen)

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="health", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5.0)

    def _loop(self) -> None:
        while not self._stop.wait(self.every):
            try:
                self.round()
            except Exception:  # the page's health column must not end the daemon
                log.exception("health: a probe round failed")

    def round(self) -> None:
        """Probe every running VM once (bounded: each check by its own timeout, PROBE_PARALLEL at once)."""
        statuses = self.listing()
        running = [
            s.record
            for s in statuses
            if s.status is lifecycle.Status.RUNNING and not s.record.paused and s.record.ip
        ]
        names = {r.name for r in running}
        for name in list(self._seen):
            if name not in names:
                del self._seen[name]
        with ThreadPoolExecutor(max_workers=PROBE_PARALLEL, thread_name_prefix="health") as pool:
            for name, seen in zip([r.name for r in running], pool.map(self._probe_vm, running), strict=True):
                if seen is not None:
                    self._seen[name] = seen

    def _probe_vm(self, record: VmRecord) -> Seen | None:
        checks = self._checks_of(record.bundle)
        if not checks:
            return None
        problems = [p for c in checks if (p := self.probe(c, record.ip, self.host.net.netns)) is not None]
        return Seen(not problems, "; ".join(problems), self.wall(), record.pid)

    def _checks_of(self, bundle: str) -> tuple[HealthCheck, ...]:
        checks = self._checks.get(bundle)
        if checks is None:
            try:
                checks = Bundle.load(Path(bundle)).meta.health
            except ProcuratorError:
                checks = ()
            self._checks[bundle] = checks
        return checks
