"""A uid of its own for each VM's hypervisor, from the worker configuration's `vmUsers` range.

Each VM (each runtime name: a blue-green generation `<name>@<slot>` is a VM of its own while both run) gets
the lowest uid of the range that no recorded VM and no start in progress holds; its gid is the same number.
The record keeps it (`VmRecord.uid`), so a restart, a `start` after `stop` and an adopting worker keep the
same uid; it is free again once the VM is forgotten (`down`). Allocation runs under the state lock (one
process at a time) and `Host.shared` (one thread at a time), with the starts in progress of this process
held in `Reservations` until their record is written.

What the hypervisor needs is handed over to its uid before it starts (`hand_over`: its directory, the
writable volumes) and taken back when the VM goes down (`take_back`: whatever under a volume or
snapshot directory still belongs to the VM's uid returns to the worker's own uid), so that nothing is
owned by a VM uid once the VM is gone. Read-only store paths stay as they are (world-readable).
"""

from __future__ import annotations

import contextlib
import grp
import logging
import os
import threading
from collections.abc import Callable, Container, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from procurator.config import VmUsers
from procurator.errors import ConfigError, ConflictError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Owner:
    """Who a hypervisor runs as: uid, gid and supplementary groups."""

    uid: int
    gid: int
    groups: tuple[int, ...] = ()


@dataclass
class Reservations:
    """Uids handed to starts of this process whose record is not written yet (`held`), and the uids the
    records name (`recorded`, by runtime name), read once per hold of the state lock (`epoch`) and kept
    up to date by this process's own starts (`commit`) and removals (`release`) while it holds it."""

    held: dict[str, int] = field(default_factory=dict)
    recorded: dict[str, int] = field(default_factory=dict)
    epoch: int | None = None
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def hold(self, runtime: str, uid: int) -> None:
        """Keep `uid` taken for `runtime` while no record names it (a draining blue-green generation)."""
        with self.lock:
            self.held[runtime] = uid

    def commit(self, runtime: str) -> None:
        """`runtime`'s record now names the uid it was handed."""
        with self.lock:
            uid = self.held.pop(runtime, None)
            if uid is not None:
                self.recorded[runtime] = uid

    def release(self, runtime: str) -> None:
        """`runtime` is gone (or its start failed): its uid is free again."""
        with self.lock:
            self.held.pop(runtime, None)
            self.recorded.pop(runtime, None)


def allocate(
    users: VmUsers,
    runtime: str,
    records: Callable[[], Mapping[str, int | None]],
    reservations: Reservations,
    epoch: int | None = None,
) -> int:
    """The uid of `runtime`: its record's, its reservation's, else the lowest free one (reserved here).

    `records()` maps every recorded VM's runtime name to its record's uid; it is read again unless
    `epoch` (the state lock's, `StateDir.lock_epoch`) is the one it was last read under. Raises
    ConflictError in one line naming the range and the fix when every uid of it is taken."""
    with reservations.lock:
        if epoch is None or epoch != reservations.epoch:
            reservations.recorded = {name: uid for name, uid in records().items() if uid is not None}
            reservations.epoch = epoch
        recorded = reservations.recorded
        mine = recorded.get(runtime)
        if mine is not None and users.first <= mine <= users.last:
            reservations.held[runtime] = mine
            return mine
        held = reservations.held.get(runtime)
        if held is not None and users.first <= held <= users.last:
            return held
        taken = {uid for name, uid in recorded.items() if name != runtime}
        taken |= {uid for name, uid in reservations.held.items() if name != runtime}
        for uid in range(users.first, users.last + 1):
            if uid not in taken:
                reservations.held[runtime] = uid
                return uid
    raise ConflictError(
        f"no free uid for VM {runtime!r}: all {users.count} of {users.describe()} are taken; raise "
        "vmUsers.count in the worker configuration or remove VMs (procurator down NAME)"
    )


def owner(users: VmUsers, uid: int) -> Owner:
    """The Owner for `uid` of the range: gid the same number, plus the configured extra groups."""
    groups: list[int] = []
    for name in users.extra_groups:
        try:
            groups.append(grp.getgrnam(name).gr_gid)
        except KeyError as exc:
            raise ConfigError(
                f"group {name!r} (the worker configuration's vmUsers.extraGroups) does not exist; "
                "create it or remove it from extraGroups"
            ) from exc
    return Owner(uid, uid, tuple(groups))


def hand_over(paths: Iterable[Path], who: Owner) -> None:
    """Give each path (a file or a directory, not what a directory holds) to `who`."""
    for path in paths:
        os.chown(path, who.uid, who.gid)


def take_back(roots: Iterable[Path], uid: int | Container[int], to: tuple[int, int]) -> int:
    """Give everything under `roots` owned by `uid` (or any uid of a range) back to `to` (uid, gid); how
    many entries changed.

    Bounded by what the roots hold (a VM's volumes or snapshots); symlinks are changed, not followed."""
    uids: Container[int] = {uid} if isinstance(uid, int) else uid
    changed = 0
    for root in roots:
        if not root.exists():
            continue
        entries = [root, *_walk(root)] if root.is_dir() and not root.is_symlink() else [root]
        for path in entries:
            with contextlib.suppress(FileNotFoundError):
                if path.lstat().st_uid in uids:
                    os.lchown(path, *to)
                    changed += 1
    if changed:
        log.debug("took %d entries back from uid %s", changed, uid)
    return changed


def _walk(root: Path) -> list[Path]:
    found: list[Path] = []
    for directory, dirs, files in os.walk(root):
        found.extend(Path(directory) / name for name in (*dirs, *files))
    return found
