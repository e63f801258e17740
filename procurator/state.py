"""The state directory (docs/worker.md): records, runtime files, volumes, leases and the lock.

Every write is atomic (temp file in the same directory, fsync, rename, fsync of the directory), so a crash
at any instant leaves either the old or the new file, never a torn one.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import math
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field, replace
from enum import StrEnum
from pathlib import Path
from typing import Any, TypeVar

from procurator import jsonread, waits
from procurator.config import DEFAULT_STATE_DIR as DEFAULT_STATE_DIR  # noqa: PLC0414 - re-exported
from procurator.errors import DamagedStateError, LockBusyError, StateError, ValidationError
from procurator.hypervisor.base import Handle
from procurator.jsonread import Reader

log = logging.getLogger(__name__)

LOCK_TIMEOUT = 30.0
RECORD_SCHEMA = 1
A = TypeVar("A")
R = TypeVar("R")


def atomic_write(path: Path, data: bytes, mode: int = 0o644) -> None:
    """Replace `path` with `data` atomically and durably.

    A failure (a full or read-only file system, no permission) is a StateError that says which; the old
    file is then left whole, as it was.
    """
    try:
        _atomic_write(path, data, mode)
    except OSError as exc:
        raise StateError(f"{path}: cannot write: {write_problem(exc)}") from exc


def write_problem(exc: OSError) -> str:
    """What an OSError from a write means to an operator, with what to do."""
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return "the file system is full (or over quota); free space there and retry"
    if exc.errno == errno.EROFS:
        return "the file system is read-only; remount it read-write and retry"
    if exc.errno in (errno.EACCES, errno.EPERM):
        return "permission denied; run as root (or as the owner of the state directory)"
    return str(exc.strerror or exc)


def _atomic_write(path: Path, data: bytes, mode: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


MAX_STATE_FILE = 16 * 1024 * 1024  # bytes; a state file larger than this is damage, not state
_MOVE_ASIDE = "move it aside and run the command again"


def read_json(path: Path, *, fix: str = _MOVE_ASIDE) -> Any:
    """Read a state file. A missing one is FileNotFoundError; one that is there but is no JSON (torn,
    not UTF-8, nested too deep, a directory, too large) is a DamagedStateError naming it and `fix`."""
    try:
        return jsonread.read_file(path, MAX_STATE_FILE)
    except ValidationError as exc:
        if isinstance(exc.__cause__, OSError) and not isinstance(exc.__cause__, IsADirectoryError):
            raise StateError(exc.message) from exc  # unreadable (permissions, I/O), not damaged
        problem = f"{exc.field}: {exc.problem}" if exc.field else exc.problem
        raise DamagedStateError(path, problem, fix) from exc


class Desired(StrEnum):
    """What the VM's record asks for (a StrEnum: it compares equal to, and is written as, its value)."""

    RUNNING = "running"
    STOPPED = "stopped"  # `procurator stop`
    FAILED = "failed"  # the worker gave up restarting it (a crash loop); `procurator start` boots it again


@dataclass(frozen=True)
class VmRecord:
    """What Procurator knows about one VM on this host; `vms/<name>/record.json`."""

    name: str
    bundle: str  # store path of the running generation
    generation: str
    backend: str
    pid: int
    start_time: int
    api_socket: str
    vm_dir: str
    taps: tuple[str, ...] = ()
    ip: str = ""
    mac: str = ""
    netns: str | None = None
    created_at: float = 0.0
    started_at: float = 0.0
    restarts: int = 0
    shutdown_timeout: float = 30.0
    desired: Desired = Desired.RUNNING
    last_exit: str = ""
    paused: bool = False  # the guest is paused (`procurator pause`); its process runs
    # Blue-green (docs/architecture.md): the generation runs as `<name>@<slot>` (its directory, TAPs,
    # cgroup and lease), on `ip`, and `service_ip` (the VM's own lease) is DNATed to it. "" for neither.
    slot: str = ""
    service_ip: str = ""

    @property
    def runtime(self) -> str:
        """The name the running generation's directory, TAPs, cgroup and lease go by."""
        return runtime_name(self.name, self.slot)

    # The id of the snapshot a host shutdown took (restart.fromSnapshot): the next start restores it, as
    # long as the VM did not run since (any boot or other restore clears it). "" for none.
    resume_from: str = ""
    # The uid (and gid) its hypervisor runs as, from the worker configuration's `vmUsers` (None: none of its
    # own). Kept while the VM is recorded, so a restart or an adopting worker keeps the same one.
    uid: int | None = None

    def __post_init__(self) -> None:
        given: Any = self.desired  # with_(desired="stopped") passes the value
        if not isinstance(given, Desired):
            object.__setattr__(self, "desired", Desired(given))  # a wrong value is a ValueError

    @property
    def handle(self) -> Handle:
        return Handle(self.backend, self.pid, self.start_time, Path(self.api_socket), Path(self.vm_dir))

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["taps"] = list(self.taps)
        if not self.resume_from:  # only when set: records without it stay readable by older releases
            del data["resume_from"]
        if self.uid is None:
            del data["uid"]
        data["schema"] = RECORD_SCHEMA
        return data

    @classmethod
    def parse(cls, source: str, data: Any, *, directory: str | None = None) -> VmRecord:
        """The record in `data` (read from `source`), every field checked; a damaged one is refused.

        `directory` is the name of the VM directory it was read from: the record's `name` must be it (a
        record is found by its directory, and a name that says otherwise is damage, never a rename).
        """
        fast = _well_formed(data)
        if fast is not None and (directory is None or fast["name"] == directory):
            return cls(**fast)
        r = Reader.versioned(source, data, RECORD_SCHEMA, what="a VM record")
        r.only([*_RECORD_FIELDS, "schema"], what="field of a VM record", listed=_RECORD_FIELDS)
        missing = [k for k in _RECORD_REQUIRED if not r.has(k)]
        if missing:
            raise r.fail(missing[0], "missing from the VM record")
        fields = {key: _FIELD_READERS[_RECORD_FIELDS[key]](r, key) for key in r.data if key != "schema"}
        if directory is not None and fields["name"] != directory:
            raise r.fail("name", f"{fields['name']!r} is not the name of its directory {directory!r}")
        return cls(**fields)

    def with_(self, **changes: Any) -> VmRecord:
        return replace(self, **changes)


RECORD_DESIRED = tuple(d.value for d in Desired)
_DESIRED_VALUES = frozenset(RECORD_DESIRED)
SLOT_MARK = "@"  # never in a VM name (a DNS label): `web@b` cannot be another VM


def runtime_name(name: str, slot: str) -> str:
    return f"{name}{SLOT_MARK}{slot}" if slot else name


_RECORD_FIELDS: dict[str, str] = {
    "name": "str",
    "bundle": "str",
    "generation": "str",
    "backend": "str",
    "pid": "count",
    "start_time": "count",
    "api_socket": "str",
    "vm_dir": "str",
    "taps": "strs",
    "ip": "str",
    "mac": "str",
    "netns": "str?",
    "created_at": "seconds",
    "started_at": "seconds",
    "restarts": "count",
    "shutdown_timeout": "seconds",
    "desired": "desired",
    "last_exit": "str",
    "paused": "bool",
    "slot": "str",
    "service_ip": "str",
    "resume_from": "str",
    "uid": "count",
}
_RECORD_REQUIRED = ("name", "bundle", "generation", "backend", "pid", "start_time", "api_socket", "vm_dir")
_MAX_COUNT = 2**63 - 1


# How each kind of _RECORD_FIELDS is read (a value of another kind is refused, naming the field).
_FIELD_READERS: dict[str, Callable[[Reader, str], Any]] = {
    "str": Reader.text,
    "str?": Reader.opt_text,
    "bool": Reader.boolean,
    "strs": Reader.strings,
    "count": lambda r, key: r.integer(key, minimum=0, maximum=_MAX_COUNT, what="a whole number from 0"),
    "seconds": lambda r, key: r.number(key, minimum=0, what="a number of seconds from 0"),
    "desired": lambda r, key: r.enum(key, Desired),
}


def _well_formed(data: Any) -> dict[str, Any] | None:
    """The fields of a record that passes every check `VmRecord.parse` makes through its Reader, read in
    one pass (`ps` and the reconcile read every record); None for anything else, which the Reader then
    reads again, accepting or refusing it with its one wording. It accepts nothing the Reader refuses:
    each kind below is the Reader's own check of that kind, no looser."""
    if type(data) is not dict or data.get("schema") != RECORD_SCHEMA or type(data["schema"]) is not int:
        return None
    fields: dict[str, Any] = {}
    for key, raw in data.items():
        value = raw
        kind = _RECORD_FIELDS.get(key)
        if kind is None:
            if key == "schema":
                continue
            return None
        kind_of = type(value)
        if kind == "str":
            if kind_of is not str:
                return None
        elif kind == "count":
            if kind_of is not int or not 0 <= value <= _MAX_COUNT:
                return None
        elif kind == "seconds":
            if (kind_of is not int and kind_of is not float) or not 0 <= value < math.inf:
                return None
            value = float(raw)
        elif kind == "strs":
            if kind_of is not list or not all(type(v) is str for v in value):
                return None
            value = tuple(raw)
        elif kind == "str?":
            if value is not None and kind_of is not str:
                return None
        elif kind == "bool":
            if kind_of is not bool:
                return None
        elif kind == "desired":
            if kind_of is not str or value not in _DESIRED_VALUES:
                return None
            value = Desired(raw)
        else:  # a kind this pass does not know: the Reader's
            return None
        fields[key] = value
    if not all(key in fields for key in _RECORD_REQUIRED):
        return None
    return fields


class _Holders:
    """Who holds a StateDir's lock in this process: the thread that took it and the threads it lent it to."""

    def __init__(self) -> None:
        self.mutex = threading.Lock()  # excludes the other threads of this process (flock does not)
        self.guard = threading.Lock()  # protects `threads`
        self.threads: set[int] = set()
        self.interrupted = False  # the last holder died holding the lock (valid while it is held)
        self.epoch = 0  # counts this process's acquisitions: what was read under one holds until the next

    def holds(self) -> bool:
        with self.guard:
            return threading.get_ident() in self.threads


@dataclass(frozen=True)
class StateDir:
    root: Path
    _holders: _Holders = field(default_factory=_Holders, compare=False, repr=False)

    @property
    def vms_dir(self) -> Path:
        return self.root / "vms"

    def vm_dir(self, name: str) -> Path:
        return self.vms_dir / name

    def record_path(self, name: str) -> Path:
        return self.vm_dir(name) / "record.json"

    def volume_dir(self, vm: str) -> Path:
        return self.root / "volumes" / vm

    @property
    def leases_path(self) -> Path:
        return self.root / "leases.json"

    @property
    def lock_path(self) -> Path:
        return self.root / "lock"

    def ensure(self) -> None:
        try:
            self.vms_dir.mkdir(parents=True, exist_ok=True)
            (self.root / "volumes").mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StateError(f"{self.root}: cannot create the state directory: {exc.strerror}") from exc

    def held(self) -> bool:
        """Whether this thread holds the state lock (or was lent it)."""
        return self._holders.holds()

    def interrupted(self) -> bool:
        """Whether the lock's previous holder died holding it (killed mid-operation); only while held.

        The holder's pid is written into the lock file when the lock is taken and removed when it is
        released, so a pid found there on taking it was left by a process that never released it.
        """
        return self.held() and self._holders.interrupted

    @contextlib.contextmanager
    def lock(self, timeout: float = LOCK_TIMEOUT) -> Iterator[None]:
        """Hold the state lock: one holder across processes (flock) and across threads (a mutex).

        Re-entrant for the thread that holds it and for threads it lent it to (`lend`). The wait is
        bounded; past `timeout` it raises LockBusyError.
        """
        holders = self._holders
        if holders.holds():
            yield
            return
        deadline = time.monotonic() + timeout
        if not holders.mutex.acquire(timeout=max(0.0, timeout)):
            raise LockBusyError(
                f"{self.lock_path}: another thread of this process holds the lock after {timeout:.0f}s; "
                "wait for it to finish and retry"
            )
        try:
            self.ensure()
            fd = self._open_lock()
            try:
                self._flock(fd, deadline, timeout)
                holders.interrupted = self._mark_held(fd)
                holders.epoch += 1
                with holders.guard:
                    holders.threads.add(threading.get_ident())
                try:
                    yield
                finally:
                    with holders.guard:
                        holders.threads.clear()
                    with contextlib.suppress(OSError):
                        os.ftruncate(fd, 0)  # released, not abandoned
                    fcntl.flock(fd, fcntl.LOCK_UN)
            finally:
                os.close(fd)
        finally:
            holders.mutex.release()

    def _open_lock(self) -> int:
        path = self.lock_path
        try:
            return os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o644)
        except IsADirectoryError as exc:
            raise StateError(f"{path}: a directory, not the lock file; remove it (rmdir) and retry") from exc
        except OSError as exc:
            if exc.errno == errno.EROFS:
                fix = "the state directory is on a read-only file system; remount it read-write"
            elif exc.errno in (errno.EACCES, errno.EPERM):
                fix = "run as root (or as the owner of the state directory)"
            elif exc.errno == errno.ELOOP:
                fix = "it is a symlink; remove it and retry"
            else:
                fix = "check the state directory"
            raise StateError(f"{path}: cannot open the state lock: {exc.strerror}; {fix}") from exc

    @staticmethod
    def _mark_held(fd: int) -> bool:
        """Write our pid into the lock file; whether a previous holder's pid was still there."""
        try:
            interrupted = bool(os.pread(fd, 32, 0).strip())
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        except OSError as exc:  # a full disk: the lock holds all the same, only the mark is lost
            log.info("cannot mark the state lock as held: %s", exc.strerror or exc)
            return False
        return interrupted

    def _flock(self, fd: int, deadline: float, timeout: float) -> None:
        def locked() -> bool:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:
                if exc.errno not in (errno.EAGAIN, errno.EACCES):
                    raise StateError(f"{self.lock_path}: cannot lock: {exc.strerror}") from exc
                return False
            return True

        if not waits.poll_until(locked, max(0.0, deadline - time.monotonic())):
            raise LockBusyError(
                f"{self.lock_path}: another procurator command holds the lock after "
                f"{timeout:.0f}s; wait for it to finish and retry"
            )

    def lend(self, fn: Callable[[A], R]) -> Callable[[A], R]:
        """Wrap `fn` so that, run on another thread (a pool's), it acts under the lock this thread holds."""
        if not self._holders.holds():
            raise StateError("lend() needs the state lock held by the calling thread")
        holders = self._holders

        def run(arg: A) -> R:
            me = threading.get_ident()
            with holders.guard:
                holders.threads.add(me)
            try:
                return fn(arg)
            finally:
                with holders.guard:
                    holders.threads.discard(me)

        return run

    # --- records -----------------------------------------------------------------------------------
    def load_record(self, name: str) -> VmRecord | None:
        """The record of VM `name`; None when it has none. A damaged one is a DamagedStateError."""
        path = self.record_path(name)
        fix = record_fix(name)
        try:
            data = read_json(path, fix=fix)
        except FileNotFoundError:
            return None
        return parse_record(path, data, name)

    def save_record(self, record: VmRecord) -> None:
        atomic_write_json(self.record_path(record.name), record.to_json())

    def remove_vm_dir(self, name: str) -> None:
        shutil.rmtree(self.vm_dir(name), ignore_errors=True)

    def lock_epoch(self) -> int | None:
        """Which acquisition of the state lock this thread works under (no other process changes records
        until it is released); None when it does not hold it."""
        return self._holders.epoch if self._holders.holds() else None

    def scan(self) -> tuple[list[VmRecord], list[Damaged]]:
        """Every VM directory's record, and apart the VMs whose record is damaged (by name)."""
        if not self.vms_dir.is_dir():
            return [], []
        out: list[VmRecord] = []
        damaged: list[Damaged] = []
        for child in sorted(self.vms_dir.iterdir()):
            try:
                record = self.load_record(child.name)
            except DamagedStateError as exc:
                damaged.append(Damaged(child.name, exc))
                continue
            if record is not None:
                out.append(record)
        return out, damaged

    def records(self) -> list[VmRecord]:
        """Every record; a damaged one stops the caller (a command that needs them all)."""
        records, damaged = self.scan()
        if damaged:
            raise damaged[0].error
        return records

    def set_aside(self, name: str) -> Path | None:
        """Move VM `name`'s record out of the way (to `damaged/`), kept for reading; where it went."""
        path = self.record_path(name)
        if not path.exists() and not path.is_symlink():
            return None
        aside = self.root / "damaged" / f"{name}.{time.strftime('%Y%m%dT%H%M%S', time.gmtime())}.record"
        try:
            aside.parent.mkdir(parents=True, exist_ok=True)
            os.replace(path, aside)
        except OSError as exc:
            raise StateError(f"{path}: cannot move the damaged record aside: {exc.strerror or exc}") from exc
        return aside


@dataclass(frozen=True)
class Damaged:
    """A VM directory whose record cannot be read: `error` says why and what to do."""

    name: str
    error: DamagedStateError


def record_fix(name: str) -> str:
    return (
        f"run `procurator down {name}` (it stops what runs in that VM's directory and moves the record "
        "aside; volumes and lease are kept), then apply again"
    )


def parse_record(path: Path | str, data: Any, name: str) -> VmRecord:
    """`VmRecord.parse` of the record read from VM directory `name`; refused as damaged state."""
    try:
        return VmRecord.parse(str(path), data, directory=name)
    except ValidationError as exc:
        problem = f"{exc.field}: {exc.problem}" if exc.field else exc.problem
        raise DamagedStateError(path, problem, record_fix(name)) from exc
