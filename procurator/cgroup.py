"""The only place Procurator touches cgroupfs: one group per hypervisor, its limits and its usage.

Each VM's hypervisor runs in a group of its own, named for Procurator and the VM:

- cgroup v2 (the unified hierarchy holds the controllers): `<mount>/<base>/vm-<name>`, `base` being
  `procurator.slice` or, under the NixOS worker module, the worker unit's delegated subtree
  (`procurator.slice/procurator-worker.service`, the daemon itself in its `supervisor` leaf);
- cgroup v1 (controllers mounted one by one): `<mount of each controller>/procurator/vm-<name>` for
  memory, cpu, cpuacct and blkio (a controller mounted jointly, `cpu,cpuacct`, is one directory).

`driver()` picks the driver from what the host mounts (/proc/mounts). A `Group` is created (idempotent:
made, or found and its limits written again) before the hypervisor starts, the hypervisor's pid is
written into it right after spawn and before its guest runs (`join`), its limits are read back
(`verify`), its usage read for `ps` and the metrics (`usage`), and it is removed after the hypervisor
ends (`remove`, bounded). `leftovers` lists the groups of the VMs, for the sweep.

`Limits` is parsed from the bundle (procurator/models.py, `Resources`) and translated here, once per
hierarchy: v2 `memory.max`, `cpu.max`, `cpu.weight`, `io.weight`; v1 `memory.limit_in_bytes`,
`cpu.cfs_quota_us`/`cpu.cfs_period_us`, `cpu.shares` (weight x 1024 / 100), and `blkio.bfq.weight` or
`blkio.weight` when the host's I/O scheduler offers one (otherwise the I/O weight is not applied, and
`verify` says so in its result rather than failing).
"""

from __future__ import annotations

import errno
import functools
import hashlib
import logging
import os
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from procurator.errors import CgroupError

log = logging.getLogger(__name__)

MOUNTS = Path("/proc/mounts")
ROOT = Path("/sys/fs/cgroup")
V1_PARENT = "procurator"  # v1: <controller mount>/procurator/vm-<name>
DEFAULT_V2_BASE = "procurator.slice"
PREFIX = "vm-"
# A group's directory is vm-<name> for the state directory /var/lib/procurator and vm-<name>.<scope>
# for any other (`scope_of`): two Procurator states on one host (tests, a second worker) never share a
# VM's group. "." is in no VM name (a DNS label), so the two never collide.
SCOPE_SEP = "."


def scope_of(state_root: Path, default: Path = Path("/var/lib/procurator")) -> str:
    """The scope of the VM groups of the state directory `state_root` ("" for the default one)."""
    root = state_root.resolve()
    if root == default:
        return ""
    return hashlib.sha256(str(root).encode()).hexdigest()[:10]


def _group_dir(name: str, scope: str) -> str:
    return PREFIX + name + (SCOPE_SEP + scope if scope else "")


V1_CONTROLLERS = ("memory", "cpu", "cpuacct", "blkio")
V2_CONTROLLERS = ("memory", "cpu", "io")
V2_OPTIONAL = frozenset({"memory.swap.max", "io.weight"})  # a kernel may lack them (swap, iocost)
CPU_PERIOD_US = 100_000
REMOVE_TIMEOUT = 5.0  # seconds a group gets to empty after its hypervisor exited (zombie reaping, exit)
CPU_WEIGHT_DEFAULT = 100
IO_WEIGHT_DEFAULT = 100


@dataclass(frozen=True)
class Limits:
    """What a VM's group enforces (bytes, microseconds, v2 weights 1-10000)."""

    memory_max: int
    cpu_quota_us: int | None = None  # per CPU_PERIOD_US; None: no quota ("max")
    cpu_period_us: int = CPU_PERIOD_US
    cpu_weight: int = CPU_WEIGHT_DEFAULT
    io_weight: int = IO_WEIGHT_DEFAULT


@dataclass(frozen=True)
class Usage:
    """What a VM's group has used: `ps --json` (`resources`) and the worker's metrics."""

    memory_bytes: int
    memory_max: int | None  # None: no limit
    cpu_usec: int
    oom_kills: int

    def to_json(self) -> dict[str, Any]:
        return {
            "memory_bytes": self.memory_bytes,
            "memory_max": self.memory_max,
            "cpu_usec": self.cpu_usec,
            "oom_kills": self.oom_kills,
        }


@dataclass(frozen=True)
class Group:
    """One VM's group: one directory (v2) or one per controller hierarchy (v1)."""

    name: str  # the VM's
    dirs: tuple[Path, ...]

    @property
    def leaf(self) -> str:
        return PREFIX + self.name


class Driver(Protocol):
    @property
    def version(self) -> int: ...

    def dirs(self, name: str) -> tuple[Path, ...]: ...

    def create(self, name: str, limits: Limits) -> Group: ...

    def join(self, group: Group, pid: int) -> None: ...

    def verify(self, group: Group, limits: Limits) -> tuple[str, ...]: ...

    def usage(self, name: str) -> Usage | None: ...

    def pids(self, name: str) -> list[int]: ...

    def remove(self, name: str, timeout: float = REMOVE_TIMEOUT) -> bool: ...

    def leftovers(self) -> list[str]: ...


# --- file access: every read and write of cgroupfs ---------------------------------------------------


def _read(path: Path) -> str:
    try:
        return path.read_text()
    except OSError as exc:
        raise CgroupError(f"{path}: cannot read: {exc.strerror}; is the cgroup hierarchy mounted?") from exc


def _write(path: Path, value: str) -> None:
    try:
        fd = os.open(path, os.O_WRONLY)
    except OSError as exc:
        raise CgroupError(f"{path}: cannot open for writing: {exc.strerror}; {_fix(exc)}") from exc
    try:
        os.write(fd, value.encode())
    except OSError as exc:
        refused = value.strip()
        raise CgroupError(f"{path}: the kernel refused {refused!r}: {exc.strerror}; {_fix(exc)}") from exc
    finally:
        os.close(fd)


def _fix(exc: OSError) -> str:
    if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return "run as root, or give the worker a delegated cgroup (docs/worker.md)"
    if exc.errno == errno.EBUSY:
        return "a v2 group with processes cannot enable controllers: move them into a leaf first"
    return "see docs/architecture.md, Resources"


def _mkdir(path: Path) -> None:
    try:
        path.mkdir(exist_ok=True)
    except OSError as exc:
        raise CgroupError(f"{path}: cannot create the group: {exc.strerror}; {_fix(exc)}") from exc


def _rmdir(path: Path) -> bool:
    """Remove an empty group; True when gone (or never there), False while it still holds processes."""
    try:
        path.rmdir()
    except FileNotFoundError:
        return True
    except OSError as exc:
        if exc.errno in (errno.EBUSY, errno.ENOTEMPTY):
            return False
        raise CgroupError(f"{path}: cannot remove the group: {exc.strerror}; {_fix(exc)}") from exc
    return True


def _int_file(path: Path) -> int:
    text = _read(path).strip()
    try:
        return int(text)
    except ValueError as exc:
        raise CgroupError(f"{path}: expected a number, found {text[:40]!r}") from exc


def _keyed(path: Path) -> dict[str, int]:
    """A flat keyed file (`key value` per line: memory.events, cpu.stat, memory.oom_control)."""
    out: dict[str, int] = {}
    for line in _read(path).splitlines():
        key, _, value = line.partition(" ")
        if value.strip().lstrip("-").isdigit():
            out[key] = int(value)
    return out


def _procs(directory: Path) -> list[int]:
    try:
        text = (directory / "cgroup.procs").read_text()
    except FileNotFoundError:
        return []
    except OSError as exc:
        raise CgroupError(f"{directory / 'cgroup.procs'}: cannot read: {exc.strerror}") from exc
    return [int(p) for p in text.split()]


def _wait_removed(dirs: Iterable[Path], timeout: float) -> bool:
    """rmdir each directory, retrying (bounded) while the exiting hypervisor still counts as in it."""
    pending = list(dirs)
    deadline = time.monotonic() + timeout
    while True:
        pending = [d for d in pending if not _rmdir(d)]
        if not pending or time.monotonic() >= deadline:
            return not pending
        time.sleep(0.01)


# --- v2 ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class V2:
    """The unified hierarchy: `<mount>/<base>/vm-<name>`, memory, cpu and io enabled in `base`."""

    mount: Path
    base: str = DEFAULT_V2_BASE
    scope: str = ""  # scope_of(the state directory)
    version: int = field(default=2, init=False)

    @property
    def base_dir(self) -> Path:
        return self.mount / self.base

    def _dir(self, name: str) -> Path:
        return self.base_dir / _group_dir(name, self.scope)

    def dirs(self, name: str) -> tuple[Path, ...]:
        return (self._dir(name),)

    def prepare(self) -> None:
        """Make `base` (and the slices above it) and enable the controllers down to it (idempotent)."""
        parts = Path(self.base).parts
        node = self.mount
        for part in parts:
            self._enable(node)
            node = node / part
            _mkdir(node)
        self._enable(node)

    def _enable(self, node: Path) -> None:
        available = set(_read(node / "cgroup.controllers").split())
        missing = [c for c in V2_CONTROLLERS if c not in available]
        if missing:
            raise CgroupError(
                f"{node}/cgroup.controllers lacks {', '.join(missing)}; enable them in the parent's "
                "cgroup.subtree_control (systemd: Delegate=yes on the worker unit)"
            )
        enabled = set(_read(node / "cgroup.subtree_control").split())
        wanted = [c for c in V2_CONTROLLERS if c not in enabled]
        if wanted:
            _write(node / "cgroup.subtree_control", " ".join(f"+{c}" for c in wanted))

    def create(self, name: str, limits: Limits) -> Group:
        self.prepare()
        directory = self._dir(name)
        _mkdir(directory)
        for file, value in self._values(limits).items():
            if file in V2_OPTIONAL and not (directory / file).exists():
                continue  # no swap accounting, or no weight-based I/O control (iocost) on this kernel
            _write(directory / file, value)
        return Group(name, (directory,))

    @staticmethod
    def _values(limits: Limits) -> dict[str, str]:
        quota = "max" if limits.cpu_quota_us is None else str(limits.cpu_quota_us)
        return {
            "memory.max": str(limits.memory_max),
            "memory.swap.max": "0",
            "cpu.max": f"{quota} {limits.cpu_period_us}",
            "cpu.weight": str(limits.cpu_weight),
            "io.weight": f"default {limits.io_weight}",
        }

    def join(self, group: Group, pid: int) -> None:
        for directory in group.dirs:
            _write(directory / "cgroup.procs", str(pid))

    def verify(self, group: Group, limits: Limits) -> tuple[str, ...]:
        directory = group.dirs[0]
        values = self._values(limits)
        for file in ("memory.max", "cpu.max", "cpu.weight"):
            want = values[file]
            found = _read(directory / file).strip()
            if found != want:
                raise CgroupError(f"{directory / file}: reads {found!r} after writing {want!r}")
        if not (directory / "io.weight").exists():
            if limits.io_weight == IO_WEIGHT_DEFAULT:
                return ()
            return ("io weight: no io.weight on this host (its kernel has no iocost)",)
        io = " ".join(_read(directory / "io.weight").split()[:2])
        wrote = values["io.weight"]
        if io != wrote:
            raise CgroupError(f"{directory / 'io.weight'}: reads {io!r} after writing {wrote!r}")
        return ()

    def usage(self, name: str) -> Usage | None:
        directory = self._dir(name)
        if not directory.is_dir():
            return None
        limit = _read(directory / "memory.max").strip()
        return Usage(
            memory_bytes=_int_file(directory / "memory.current"),
            memory_max=None if limit == "max" else int(limit),
            cpu_usec=_keyed(directory / "cpu.stat").get("usage_usec", 0),
            oom_kills=_keyed(directory / "memory.events").get("oom_kill", 0),
        )

    def pids(self, name: str) -> list[int]:
        return _procs(self._dir(name))

    def remove(self, name: str, timeout: float = REMOVE_TIMEOUT) -> bool:
        return _wait_removed([self._dir(name)], timeout)

    def leftovers(self) -> list[str]:
        return _vm_groups([self.base_dir], self.scope)


# --- v1 ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class V1:
    """Controllers mounted apart: `<mount>/procurator/vm-<name>` in each of memory, cpu, cpuacct, blkio."""

    mounts: Mapping[str, Path]  # controller -> its hierarchy's mount point (joint mounts repeat one)
    scope: str = ""  # scope_of(the state directory)
    version: int = field(default=1, init=False)

    def dirs(self, name: str) -> tuple[Path, ...]:
        seen: list[Path] = []
        for controller in V1_CONTROLLERS:
            mount = self.mounts.get(controller)
            if mount is not None and mount not in seen:
                seen.append(mount)
        return tuple(m / V1_PARENT / _group_dir(name, self.scope) for m in seen)

    def _at(self, controller: str, name: str) -> Path | None:
        mount = self.mounts.get(controller)
        return None if mount is None else mount / V1_PARENT / _group_dir(name, self.scope)

    def create(self, name: str, limits: Limits) -> Group:
        for controller in ("memory", "cpu"):
            if controller not in self.mounts:
                raise CgroupError(
                    f"the cgroup v1 {controller} controller is not mounted (see /proc/mounts); mount it "
                    f"at {ROOT / controller}"
                )
        dirs = self.dirs(name)
        for directory in dirs:
            _mkdir(directory.parent)
            _mkdir(directory)
        for path, value in self._values(name, limits).items():
            _write(path, value)
        return Group(name, dirs)

    def _values(self, name: str, limits: Limits) -> dict[Path, str]:
        memory = self._at("memory", name)
        cpu = self._at("cpu", name)
        if memory is None or cpu is None:
            raise CgroupError("the cgroup v1 memory and cpu controllers must both be mounted (/proc/mounts)")
        values = {
            memory / "memory.limit_in_bytes": str(limits.memory_max),
            cpu / "cpu.cfs_period_us": str(limits.cpu_period_us),
            cpu / "cpu.cfs_quota_us": "-1" if limits.cpu_quota_us is None else str(limits.cpu_quota_us),
            cpu / "cpu.shares": str(v1_shares(limits.cpu_weight)),
        }
        io = self._io_weight_file(name)
        if io is not None:
            values[io] = str(v1_io_weight(limits.io_weight, io.name))
        return values

    def _io_weight_file(self, name: str) -> Path | None:
        blkio = self._at("blkio", name)
        if blkio is None:
            return None
        for file in ("blkio.bfq.weight", "blkio.weight"):
            if (blkio.parent.parent / file).exists() or (blkio / file).exists():
                return blkio / file
        return None

    def join(self, group: Group, pid: int) -> None:
        for directory in group.dirs:
            _write(directory / "cgroup.procs", str(pid))

    def verify(self, group: Group, limits: Limits) -> tuple[str, ...]:
        """Read every limit back; what could not be applied on this host (no I/O weight file)."""
        name = group.name
        page = os.sysconf("SC_PAGE_SIZE")
        for path, written in self._values(name, limits).items():
            found = _read(path).strip().split()[-1]
            want = written
            if path.name == "memory.limit_in_bytes":  # the kernel rounds down to whole pages
                want = str(int(written) // page * page)
            if found != want:
                raise CgroupError(f"{path}: reads {found!r} after writing {want!r}")
        if self._io_weight_file(name) is None and limits.io_weight != IO_WEIGHT_DEFAULT:
            return ("io weight: no blkio.weight or blkio.bfq.weight on this host (its I/O scheduler)",)
        return ()

    def usage(self, name: str) -> Usage | None:
        memory = self._at("memory", name)
        if memory is None or not memory.is_dir():
            return None
        cpuacct = self._at("cpuacct", name)
        limit = _int_file(memory / "memory.limit_in_bytes")
        return Usage(
            memory_bytes=_int_file(memory / "memory.usage_in_bytes"),
            memory_max=None if limit >= 1 << 62 else limit,
            cpu_usec=0 if cpuacct is None else _int_file(cpuacct / "cpuacct.usage") // 1000,
            oom_kills=_keyed(memory / "memory.oom_control").get("oom_kill", 0),
        )

    def pids(self, name: str) -> list[int]:
        found: set[int] = set()
        for directory in self.dirs(name):
            found.update(_procs(directory))
        return sorted(found)

    def remove(self, name: str, timeout: float = REMOVE_TIMEOUT) -> bool:
        dirs = self.dirs(name)
        gone = _wait_removed(dirs, timeout)
        for directory in dirs:  # the shared `procurator` parent goes with the last VM's group
            _rmdir(directory.parent)
        return gone

    def leftovers(self) -> list[str]:
        return _vm_groups([d.parent for d in self.dirs("x")], self.scope)


def _vm_groups(parents: Iterable[Path], scope: str) -> list[str]:
    """The VM names of the groups of `scope` under `parents`."""
    names: set[str] = set()
    for parent in parents:
        try:
            entries = list(parent.iterdir())
        except FileNotFoundError:
            continue
        except OSError as exc:
            raise CgroupError(f"{parent}: cannot list: {exc.strerror}") from exc
        for entry in entries:
            if not entry.is_dir() or not entry.name.startswith(PREFIX):
                continue
            name, sep, its = entry.name[len(PREFIX) :].partition(SCOPE_SEP)
            if its == scope and bool(sep) == bool(scope):
                names.add(name)
    return sorted(names)


# --- the weights' translation to v1 ------------------------------------------------------------------


def v1_shares(weight: int) -> int:
    """cpu.shares for a v2 cpu.weight: 100 (the default) is 1024, scaled linearly, at least 2."""
    return max(2, weight * 1024 // 100)


def v1_io_weight(weight: int, file: str) -> int:
    """blkio.bfq.weight (1-1000) or blkio.weight (10-1000) for a v2 io.weight (1-10000)."""
    low = 1 if file == "blkio.bfq.weight" else 10
    return max(low, min(1000, weight))


# --- choosing the driver -----------------------------------------------------------------------------


def parse_mounts(text: str) -> tuple[Path | None, dict[str, Path]]:
    """(the cgroup2 mount holding controllers or None, {v1 controller: its mount}) from /proc/mounts."""
    v2: Path | None = None
    v1: dict[str, Path] = {}
    for line in text.splitlines():
        fields = line.split()
        if len(fields) < 4:
            continue
        where, kind, options = Path(fields[1].replace("\\040", " ")), fields[2], fields[3].split(",")
        if kind == "cgroup2" and v2 is None:
            v2 = where
        elif kind == "cgroup":
            for option in options:
                if option in V1_CONTROLLERS and option not in v1:
                    v1[option] = where
    return v2, v1


def _v2_has_controllers(mount: Path) -> bool:
    try:
        available = set((mount / "cgroup.controllers").read_text().split())
    except OSError:
        return False
    return {"memory", "cpu"} <= available


@functools.cache
def _detect(mounts_text: str, v2_base: str, scope: str = "") -> Driver | None:
    v2, v1 = parse_mounts(mounts_text)
    if v2 is not None and _v2_has_controllers(v2):
        return V2(v2, v2_base, scope)
    if "memory" in v1 and "cpu" in v1:
        return V1(v1, scope)
    return None


def driver(v2_base: str = DEFAULT_V2_BASE, *, mounts: Path = MOUNTS, scope: str = "") -> Driver | None:
    """The driver for what this host mounts (v2 when its unified hierarchy holds memory and cpu, else
    v1 when memory and cpu are mounted); None when neither is. `scope`: see `scope_of`."""
    try:
        text = mounts.read_text()
    except OSError as exc:
        raise CgroupError(f"{mounts}: cannot read: {exc.strerror}") from exc
    return _detect(text, v2_base, scope)


def check_joined(drv: Driver, group: Group, pid: int, limits: Limits) -> tuple[str, ...]:
    """After start: the hypervisor's pid is in its group and the limits read back as written (what
    this host could not apply, e.g. an I/O weight without a weight file, is returned, not raised)."""
    if pid not in drv.pids(group.name):
        where = group.dirs[0]
        raise CgroupError(f"VM {group.name!r}: its hypervisor (pid {pid}) is not in {where} after start")
    return drv.verify(group, limits)
