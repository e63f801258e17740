"""The VM commands (`up`, `down`, `stop`, `start`, `pause`, `resume`, `snapshot`, `restore`) as one
interface with two sides.

`Here` does the work in this process (lifecycle.py), as a command does when no worker runs and as the
daemon does for its API under its own lock; `WorkerClient` (worker/client.py) asks a running worker to
do it. Both return the same frozen results, and a result crosses the worker's socket as its `to_json()`
with a `schema` number, read back by `from_json`: so a command prints the same lines and the same
`--json` whichever side did the work. `Routed` is what a command uses when a worker answers: the worker,
and `Here` only for a worker of an older release that lacks the command's route.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, TypeVar

from procurator import lifecycle
from procurator.errors import UsageError, ValidationError, WorkerApiError
from procurator.hypervisor.base import StopResult
from procurator.lifecycle import Host, WaitFor
from procurator.models import VM_NAME_MAX, Bundle, is_dns_label

log = logging.getLogger(__name__)
_T = TypeVar("_T")

COMMAND_SCHEMA = 1  # of the documents below, as POST /up and /vm/NAME/VERB answer (worker/api.py)


def check_name(name: str) -> str:
    """A VM name as the commands take it (a bundle's name: a DNS label), else a UsageError."""
    if not is_dns_label(name, VM_NAME_MAX):
        shown = name if len(name) <= 40 else f"{name[:37]}..."
        raise UsageError(
            f"VM name {shown!r}: not a DNS label of at most {VM_NAME_MAX} characters (a-z, 0-9, '-'); "
            "see `procurator ps`"
        )
    return name


class _Doc:
    """Typed reads of one command document another process sent; a wrong one names source and field."""

    def __init__(self, source: str, data: Any) -> None:
        if not isinstance(data, dict):
            raise ValidationError(source, "", f"expected an object, found {type(data).__name__}")
        if data.get("schema") != COMMAND_SCHEMA:
            raise ValidationError(
                source,
                "schema",
                f"{data.get('schema')!r}, not {COMMAND_SCHEMA}: the worker runs another procurator release; "
                "restart it after an upgrade",
            )
        self.source, self.data = source, data

    def get(self, key: str, kinds: type | tuple[type, ...], what: str, *, optional: bool = False) -> Any:
        value = self.data.get(key)
        if optional and value is None:
            return None
        if key not in self.data or isinstance(value, bool) != (kinds is bool) or not isinstance(value, kinds):
            raise ValidationError(self.source, key, f"expected {what}, found {json.dumps(value)[:40]}")
        return value


@dataclass(frozen=True)
class Stopped:
    """How one VM went down (`stop`, `down`): the row `stop --json` / `down --json` prints."""

    name: str
    was_running: bool
    graceful: bool | None  # None: it was not running
    steps: tuple[str, ...]
    purged: bool | None = None  # `down` only

    @classmethod
    def of(cls, name: str, result: StopResult | None, *, purged: bool | None = None) -> Stopped:
        if result is None:
            return cls(name, False, None, (), purged)
        return cls(name, True, result.graceful, tuple(result.steps), purged)

    @property
    def how(self) -> str:
        """How it went down, for people: graceful, or the stop ladder's steps."""
        if not self.was_running:
            return "was not running"
        return "graceful" if self.graceful else " -> ".join(self.steps)

    def row(self) -> dict[str, Any]:
        row: dict[str, Any] = {
            "name": self.name,
            "was_running": self.was_running,
            "graceful": self.graceful,
            "steps": list(self.steps),
        }
        if self.purged is not None:
            row["purged"] = self.purged
        return row

    def to_json(self) -> dict[str, Any]:
        return {"schema": COMMAND_SCHEMA, **self.row()}

    @classmethod
    def from_json(cls, data: Any, source: str) -> Stopped:
        d = _Doc(source, data)
        steps = d.get("steps", list, "a list of strings")
        if not all(isinstance(s, str) for s in steps):
            raise ValidationError(source, "steps", "expected a list of strings")
        return cls(
            name=d.get("name", str, "a string"),
            was_running=d.get("was_running", bool, "true or false"),
            graceful=d.get("graceful", bool, "true, false or null", optional=True),
            steps=tuple(steps),
            purged=d.get("purged", bool, "true, false or null", optional=True),
        )


@dataclass(frozen=True)
class Started:
    """One VM after `up`, `start`, `pause` or `resume`: its `ps --json` row, and whether anything was done
    (`pause` of a paused VM: nothing)."""

    vm: dict[str, Any]  # the row as `ps --json` prints it (lifecycle.VmStatus.to_json)
    changed: bool = True

    @property
    def name(self) -> str:
        return str(self.vm["name"])

    @property
    def pid(self) -> int | None:
        pid = self.vm.get("pid")
        return pid if isinstance(pid, int) else None

    def to_json(self) -> dict[str, Any]:
        return {"schema": COMMAND_SCHEMA, "changed": self.changed, "vm": self.vm}

    @classmethod
    def from_json(cls, data: Any, source: str) -> Started:
        d = _Doc(source, data)
        vm = d.get("vm", dict, "the VM as `ps --json` shows it")
        for key in ("name", "state", "backend"):
            if not isinstance(vm.get(key), str):
                raise ValidationError(
                    source, f"vm.{key}", f"expected a string, found {json.dumps(vm.get(key))[:40]}"
                )
        for key in ("pid", "ip"):
            if vm.get(key) is not None and not isinstance(vm[key], int if key == "pid" else str):
                raise ValidationError(source, f"vm.{key}", f"unexpected {json.dumps(vm[key])[:40]}")
        return cls(vm=vm, changed=d.get("changed", bool, "true or false"))


@dataclass(frozen=True)
class Snapshotted:
    """A snapshot taken (`snapshot`): the object `snapshot --json` prints, and what its lines say."""

    doc: dict[str, Any]  # the snapshot's own JSON (snapshots.Snapshot.to_json), guest_paused, pruned
    id: str
    path: str
    size: int
    guest_paused: bool
    pruned: tuple[str, ...]

    @classmethod
    def of(cls, result: lifecycle.SnapshotResult) -> Snapshotted:
        doc = {
            **result.snapshot.to_json(),
            "guest_paused": result.paused,
            "pruned": [s.id for s in result.pruned],
        }
        return cls._of(doc, "snapshot")

    @classmethod
    def _of(cls, doc: dict[str, Any], source: str) -> Snapshotted:
        wanted = {"id": str, "path": str, "size": int, "guest_paused": bool, "pruned": list}
        for key, kind in wanted.items():
            value = doc.get(key)
            if isinstance(value, bool) != (kind is bool) or not isinstance(value, kind):
                raise ValidationError(source, f"snapshot.{key}", f"unexpected {json.dumps(value)[:40]}")
        if not all(isinstance(p, str) for p in doc["pruned"]):
            raise ValidationError(source, "snapshot.pruned", "expected a list of snapshot ids")
        return cls(doc, doc["id"], doc["path"], doc["size"], doc["guest_paused"], tuple(doc["pruned"]))

    def to_json(self) -> dict[str, Any]:
        return {"schema": COMMAND_SCHEMA, "snapshot": self.doc}

    @classmethod
    def from_json(cls, data: Any, source: str) -> Snapshotted:
        return cls._of(
            _Doc(source, data).get("snapshot", dict, "the snapshot as `snapshot --json` shows it"), source
        )


@dataclass(frozen=True)
class Restored:
    """A VM booted from a snapshot (`restore`): its `ps --json` row and the snapshot's id."""

    vm: dict[str, Any]
    snapshot: str

    @property
    def pid(self) -> int | None:
        return Started(self.vm).pid

    def to_json(self) -> dict[str, Any]:
        return {"schema": COMMAND_SCHEMA, "snapshot": self.snapshot, "vm": self.vm}

    @classmethod
    def from_json(cls, data: Any, source: str) -> Restored:
        ident = _Doc(source, data).get("snapshot", str, "a snapshot id")
        return cls(Started.from_json({**data, "changed": True}, source).vm, ident)


def check_snapshot_id(ident: str) -> str:
    """A snapshot id as `procurator snapshots` lists it (a directory name: no path), else a UsageError."""
    if not ident or len(ident) > 64 or "/" in ident or ident.startswith(".") or "\0" in ident:
        shown = ident if len(ident) <= 40 else f"{ident[:37]}..."
        raise UsageError(f"snapshot id {shown!r}: not an id that `procurator snapshots NAME` lists")
    return ident


def rows_of(rows: Sequence[dict[str, Any]], names: Sequence[str]) -> list[dict[str, Any]]:
    """The rows of the VMs `names`, in the listing's order (by name)."""
    wanted = set(names)
    return [row for row in rows if row.get("name") in wanted]


class Commands(Protocol):
    """What the VM commands call: `Here` (this process) or a `WorkerClient` (a running worker)."""

    def vm_up(self, bundle: Bundle, *, backend: str | None, wait: WaitFor) -> Started: ...

    def vm_stop(self, name: str) -> Stopped: ...

    def vm_start(self, name: str, *, wait: WaitFor) -> Started: ...

    def vm_down(self, name: str, *, purge: bool) -> Stopped: ...

    def vm_pause(self, name: str, *, pause: bool) -> Started: ...

    def vm_snapshot(self, name: str, *, keep: int | None, stay_paused: bool) -> Snapshotted: ...

    def vm_restore(self, name: str, *, ident: str | None, paused: bool, wait: WaitFor) -> Restored: ...

    def vm_rows(self, names: Sequence[str]) -> list[dict[str, Any]]: ...


class Here:
    """The commands done in this process, on `host` (lifecycle.py; it takes the state lock itself)."""

    def __init__(self, host: Host) -> None:
        self.host = host

    def _row(self, name: str) -> dict[str, Any]:
        statuses, _ = lifecycle.listing(self.host)  # another VM's damaged record is not this one's error
        return next(s.to_json() for s in statuses if s.record.name == name)

    def vm_up(self, bundle: Bundle, *, backend: str | None, wait: WaitFor) -> Started:
        record = lifecycle.up(self.host, bundle, backend=backend, wait=wait)
        return Started(self._row(record.name))

    def vm_stop(self, name: str) -> Stopped:
        return Stopped.of(name, lifecycle.stop(self.host, check_name(name)))

    def vm_start(self, name: str, *, wait: WaitFor) -> Started:
        lifecycle.start(self.host, check_name(name), wait=wait)
        return Started(self._row(name))

    def vm_down(self, name: str, *, purge: bool) -> Stopped:
        return Stopped.of(name, lifecycle.down(self.host, check_name(name), purge=purge), purged=purge)

    def vm_pause(self, name: str, *, pause: bool) -> Started:
        changed = (lifecycle.pause if pause else lifecycle.resume)(self.host, check_name(name))
        return Started(self._row(name), changed=changed)

    def vm_snapshot(
        self, name: str, *, keep: int | None, stay_paused: bool, to: Path | None = None
    ) -> Snapshotted:
        result = lifecycle.snapshot(self.host, check_name(name), to=to, keep=keep, stay_paused=stay_paused)
        return Snapshotted.of(result)

    def vm_restore(
        self, name: str, *, ident: str | None, paused: bool, wait: WaitFor, source: Path | None = None
    ) -> Restored:
        if ident is not None:
            check_snapshot_id(ident)
        _, snap = lifecycle.restore(
            self.host, check_name(name), source=source, ident=ident, paused=paused, wait=wait
        )
        return Restored(self._row(name), snap.id)

    def vm_rows(self, names: Sequence[str]) -> list[dict[str, Any]]:
        return rows_of([s.to_json() for s in lifecycle.status(self.host)], names)


class Routed:
    """The commands through a running worker, and here when that worker is of a release without the
    command's route (it answers 404 `NotFound` for the path: a worker not yet restarted after an
    upgrade). Doing it here is what every release before the routes did beside a worker."""

    def __init__(self, worker: Commands, here: Here, where: str) -> None:
        self.worker, self.here, self.where = worker, here, where

    def _either(self, what: str, remote: Callable[[Commands], _T]) -> _T:
        try:
            return remote(self.worker)
        except WorkerApiError as exc:
            if (exc.status, exc.kind) != (404, "NotFound"):
                raise
            log.warning(
                "the worker on %s has no %s route (an older release); doing it here", self.where, what
            )
            return remote(self.here)

    def vm_up(self, bundle: Bundle, *, backend: str | None, wait: WaitFor) -> Started:
        return self._either("up", lambda c: c.vm_up(bundle, backend=backend, wait=wait))

    def vm_stop(self, name: str) -> Stopped:
        return self._either("stop", lambda c: c.vm_stop(name))

    def vm_start(self, name: str, *, wait: WaitFor) -> Started:
        return self._either("start", lambda c: c.vm_start(name, wait=wait))

    def vm_down(self, name: str, *, purge: bool) -> Stopped:
        return self._either("down", lambda c: c.vm_down(name, purge=purge))

    def vm_pause(self, name: str, *, pause: bool) -> Started:
        return self._either("pause" if pause else "resume", lambda c: c.vm_pause(name, pause=pause))

    def vm_snapshot(self, name: str, *, keep: int | None, stay_paused: bool) -> Snapshotted:
        return self._either("snapshot", lambda c: c.vm_snapshot(name, keep=keep, stay_paused=stay_paused))

    def vm_restore(self, name: str, *, ident: str | None, paused: bool, wait: WaitFor) -> Restored:
        return self._either("restore", lambda c: c.vm_restore(name, ident=ident, paused=paused, wait=wait))

    def vm_rows(self, names: Sequence[str]) -> list[dict[str, Any]]:
        return self.worker.vm_rows(names)
