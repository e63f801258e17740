"""The state directory (DESIGN.md §3): records, runtime files, volumes, leases and the lock.

Every write is atomic (temp file in the same directory, fsync, rename, fsync of the directory), so a crash
at any instant leaves either the old or the new file, never a torn one.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, TypeVar

from procurator.errors import LockBusyError, StateError, ValidationError
from procurator.hypervisor.base import Handle

DEFAULT_STATE_DIR = Path("/var/lib/procurator")
LOCK_TIMEOUT = 30.0
RECORD_SCHEMA = 1
A = TypeVar("A")
R = TypeVar("R")


def atomic_write(path: Path, data: bytes, mode: int = 0o644) -> None:
    """Replace `path` with `data` atomically and durably."""
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


def read_json(path: Path) -> Any:
    """Read a state file; a damaged one is a StateError that names it and says what to do."""
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise StateError(
            f"{path}: damaged state file ({exc}); move it aside and run the command again"
        ) from exc


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
    desired: str = "running"  # running | stopped
    last_exit: str = ""

    @property
    def handle(self) -> Handle:
        return Handle(self.backend, self.pid, self.start_time, Path(self.api_socket), Path(self.vm_dir))

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["taps"] = list(self.taps)
        data["schema"] = RECORD_SCHEMA
        return data

    @classmethod
    def parse(cls, source: str, data: Any) -> VmRecord:
        if not isinstance(data, dict) or data.get("schema") != RECORD_SCHEMA:
            raise ValidationError(source, "schema", f"expected a VM record of schema {RECORD_SCHEMA}")
        fields = {k: v for k, v in data.items() if k != "schema"}
        fields["taps"] = tuple(fields.get("taps", ()))
        try:
            return cls(**fields)
        except TypeError as exc:
            raise ValidationError(source, "", f"not a VM record: {exc}") from exc

    def with_(self, **changes: Any) -> VmRecord:
        return replace(self, **changes)


class _Holders:
    """Who holds a StateDir's lock in this process: the thread that took it and the threads it lent it to."""

    def __init__(self) -> None:
        self.mutex = threading.Lock()  # excludes the other threads of this process (flock does not)
        self.guard = threading.Lock()  # protects `threads`
        self.threads: set[int] = set()
        self.interrupted = False  # the last holder died holding the lock (valid while it is held)

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
            fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                self._flock(fd, deadline, timeout)
                holders.interrupted = bool(os.pread(fd, 32, 0).strip())
                os.ftruncate(fd, 0)
                os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
                with holders.guard:
                    holders.threads.add(threading.get_ident())
                try:
                    yield
                finally:
                    with holders.guard:
                        holders.threads.clear()
                    os.ftruncate(fd, 0)  # released, not abandoned
                    fcntl.flock(fd, fcntl.LOCK_UN)
            finally:
                os.close(fd)
        finally:
            holders.mutex.release()

    def _flock(self, fd: int, deadline: float, timeout: float) -> None:
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:
                if exc.errno not in (errno.EAGAIN, errno.EACCES):
                    raise StateError(f"{self.lock_path}: cannot lock: {exc.strerror}") from exc
                if time.monotonic() >= deadline:
                    raise LockBusyError(
                        f"{self.lock_path}: another procurator command holds the lock after "
                        f"{timeout:.0f}s; wait for it to finish and retry"
                    ) from exc
                time.sleep(0.05)
            else:
                return

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
        path = self.record_path(name)
        try:
            data = read_json(path)
        except FileNotFoundError:
            return None
        return VmRecord.parse(str(path), data)

    def save_record(self, record: VmRecord) -> None:
        atomic_write_json(self.record_path(record.name), record.to_json())

    def remove_vm_dir(self, name: str) -> None:
        shutil.rmtree(self.vm_dir(name), ignore_errors=True)

    def records(self) -> list[VmRecord]:
        if not self.vms_dir.is_dir():
            return []
        out = []
        for child in sorted(self.vms_dir.iterdir()):
            record = self.load_record(child.name)
            if record is not None:
                out.append(record)
        return out
