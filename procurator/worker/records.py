"""The VM records as the daemon reads them at every pass: parsed again only when their file changed."""

from __future__ import annotations

import logging
import os

from procurator.errors import DamagedStateError
from procurator.state import Damaged, StateDir, VmRecord

log = logging.getLogger("procurator.worker")


class RecordCache:
    """The VM records, parsed again only when their file changed (every write replaces the file)."""

    def __init__(self, state: StateDir, *, log_damage: bool = True, share: RecordCache | None = None) -> None:
        self.state = state
        self.log_damage = log_damage  # one cache of the daemon's says so: a damage is logged once
        self.share = share  # another cache whose record of the same file is taken rather than parsed again
        self._seen: dict[str, tuple[tuple[int, int, int], VmRecord]] = {}
        self.damaged: dict[str, Damaged] = {}  # VMs set aside: their record cannot be read

    def records(self) -> list[VmRecord]:
        """The readable records; a damaged one is set aside in `damaged` (logged once) and skipped."""
        try:
            entries = sorted(e.name for e in os.scandir(self.state.vms_dir) if e.is_dir())
        except FileNotFoundError:
            return []
        out = []
        base = str(self.state.vms_dir)
        for name in entries:
            try:
                st = os.stat(f"{base}/{name}/record.json")
            except OSError:
                self._seen.pop(name, None)
                continue
            key = (st.st_ino, st.st_size, st.st_mtime_ns)
            cached = self._seen.get(name)
            if cached is None or cached[0] != key:
                cached = self.share._seen.get(name) if self.share is not None else None
            if cached is not None and cached[0] == key:  # records are frozen: shared between threads
                self._seen[name] = cached
                out.append(cached[1])
                continue
            try:
                record = self.state.load_record(name)
            except DamagedStateError as exc:
                self._seen.pop(name, None)
                self._set_aside(Damaged(name, exc))
                continue
            self.damaged.pop(name, None)
            if record is None:
                continue
            self._seen[name] = (key, record)
            out.append(record)
        for name in set(self._seen) - set(entries):
            del self._seen[name]
        for name in set(self.damaged) - set(entries):
            del self.damaged[name]
        return out

    def _set_aside(self, bad: Damaged) -> None:
        known = self.damaged.get(bad.name)
        if self.log_damage and (known is None or known.error.message != bad.error.message):  # once
            log.error("%s: not supervised: %s", bad.name, bad.error)
        self.damaged[bad.name] = bad
