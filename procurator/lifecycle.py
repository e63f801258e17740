"""Start, stop and inspect VMs on this host: the core behind `up`, `down`, `stop`, `start`, `ps`, `logs`.

Every mutating entry point holds the state lock. Start-up is a list of steps whose cleanups run in reverse
on any failure, so a failed `up` leaves no process, TAP, socket or record behind.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import ipaddress
import logging
import os
import pwd
import shutil
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

from procurator import cgroup, network, process, snapshots, sweep, vmusers
from procurator.config import WorkerConfig
from procurator.errors import (
    CgroupError,
    ConfigError,
    ConflictError,
    DamagedStateError,
    HypervisorError,
    NotFoundError,
    ProcuratorError,
    StateError,
    ValidationError,
)
from procurator.health import wait_healthy
from procurator.hypervisor.base import Hypervisor, LaunchSpec, StopResult, VmState
from procurator.hypervisor.registry import factory
from procurator.models import VMM_OVERHEAD_MIB, VMM_OVERHEAD_MIB_BY_BACKEND, Bundle, Volume
from procurator.runtime import GuestAddress, NicBinding, runtime_config
from procurator.state import (
    LOCK_TIMEOUT,
    SLOT_MARK,
    Damaged,
    StateDir,
    VmRecord,
    atomic_write_json,
    read_json,
    runtime_name,
    write_problem,
)
from procurator.volumes import ensure_volumes, purge_volumes, volume_path

HypervisorFactory = Callable[[str], Hypervisor]
DAMAGED = "damaged"  # the state `ps` shows for a VM whose record cannot be read
log = logging.getLogger(__name__)


class WaitFor(StrEnum):
    NONE = "none"
    BOOTED = "booted"
    HEALTHY = "healthy"


class Status(StrEnum):
    RUNNING = "running"
    STOPPED = "stopped"
    EXITED = "exited"  # should run, but its process is gone
    FAILED = "failed"  # the worker gave up restarting it (crash loop); `start` boots it again


PAUSED = "paused"  # the state `ps` shows for a running VM whose guest is paused


@dataclass(frozen=True)
class VmStatus:
    record: VmRecord
    status: Status  # of the process: RUNNING while it runs, paused guest or not
    uptime: float | None
    usage: cgroup.Usage | None = None  # from the VM's cgroup while it runs (None: no group)

    @property
    def state(self) -> str:
        """What `ps` shows: the status, or `paused` for a running VM whose guest is paused."""
        return PAUSED if self.status is Status.RUNNING and self.record.paused else self.status.value

    def to_json(self) -> dict[str, Any]:
        r = self.record
        return {
            "name": r.name,
            "state": self.state,
            "generation": r.generation,
            "bundle": r.bundle,
            "backend": r.backend,
            "ip": r.ip or None,
            "service_ip": r.service_ip or r.ip or None,
            "taps": list(r.taps),
            "pid": r.pid if self.status is Status.RUNNING else None,
            "uptime": round(self.uptime, 1) if self.uptime is not None else None,
            "restarts": r.restarts,
            "last_exit": r.last_exit or None,
            "resources": None if self.usage is None else self.usage.to_json(),
        }


@dataclass
class Host:
    """This host's state, configuration and hypervisor backends.

    `shared` serialises, between threads of one process, the changes to what all VMs share: the lease
    table (one file, read-modified-written) and the bridge. The state lock is per process (a thread
    inside a locked apply re-enters it), so callers that run lifecycle steps in parallel rely on this.
    `network_ready` is set while a batch of starts runs under `network_once` (the bridge was just
    brought up), so that each start does not check it again.
    """

    state: StateDir
    config: WorkerConfig
    hypervisors: HypervisorFactory
    clock: Callable[[], float] = time.time
    shared: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)
    network_ready: bool = field(default=False, repr=False, compare=False)
    # uids of `vmUsers` handed to starts of this process whose record is not written yet (vmusers.py)
    reservations: vmusers.Reservations = field(
        default_factory=vmusers.Reservations, repr=False, compare=False
    )

    @classmethod
    def of(cls, config: WorkerConfig, state_dir: Path) -> Host:
        """The host a command runs on: the state in `state_dir`, the backends `config` names."""
        return cls(
            state=StateDir(state_dir),
            config=config,
            hypervisors=factory(config.hypervisor, serial_max_bytes=config.serial_log_max_bytes),
        )

    @property
    def net(self) -> network.NetworkConfig:
        return self.config.network

    def leases(self) -> network.Leases:
        """The lease table; when its file is gone, rebuilt first from the VM records' addresses, so no
        address a VM holds is handed to another (a live TAP without a record is the sweep's to remove)."""
        return network.Leases(self.state.leases_path, self.net, recorded=self._recorded_leases)

    def _recorded_leases(self) -> dict[str, str]:
        records, _ = self.state.scan()
        return {r.name: r.ip for r in records if r.ip}

    def owner(self) -> tuple[int, int] | None:
        """(uid, gid) of the user hypervisors run as; None when they run as ourselves."""
        if self.config.user is None:
            return None
        try:
            entry = pwd.getpwnam(self.config.user)
        except KeyError as exc:
            raise ConfigError(
                f"user {self.config.user!r} (the worker configuration's `user`) does not exist; create it"
            ) from exc
        return entry.pw_uid, entry.pw_gid

    def owner_uid(self) -> int:
        owner = self.owner()
        return 0 if owner is None else owner[0]

    def own_ids(self) -> tuple[int, int]:
        """(uid, gid) what a VM uid had is given back to: the worker's `user`, else ourselves."""
        return self.owner() or (os.getuid(), os.getgid())

    def vm_owner(self, runtime: str, undo: contextlib.ExitStack) -> vmusers.Owner | None:
        """The uid of its own VM `runtime`'s hypervisor runs as (`vmUsers`); None without a range. The
        reservation is dropped again if the start fails (`undo`)."""
        users = self.config.vm_users
        if users is None:
            return None

        def recorded() -> dict[str, int | None]:
            return {r.runtime: r.uid for r in self.state.scan()[0]}

        with self.shared:
            uid = vmusers.allocate(users, runtime, recorded, self.reservations, self.state.lock_epoch())
        undo.callback(self.reservations.release, runtime)
        return vmusers.owner(users, uid)


def _tap_queues(config: dict[str, Any]) -> dict[str, int]:
    """TAP name -> queue pairs of each net of a runtime config (what the hypervisor opens of it)."""
    return {
        str(net["tap"]): max(1, int(net.get("num_queues", 2)) // 2)
        for net in config.get("net") or []
        if isinstance(net, dict) and net.get("tap")
    }


def _hands_taps(host: Host, who: vmusers.Owner | None) -> bool:
    """Whether the hypervisor gets its TAPs as descriptors: when it does not run as us (a VM uid, or the
    worker's `user`), so that it needs no /dev/net/tun."""
    return who is not None or host.config.user is not None


@contextlib.contextmanager
def _handed_taps(host: Host, config: dict[str, Any], hand: bool) -> Iterator[dict[str, tuple[int, ...]]]:
    """With `hand`, descriptors of the runtime config's TAPs, closed here once the start has passed them on
    (the hypervisor holds its own copies); else none."""
    opened = network.open_taps(host.net, _tap_queues(config)) if hand else {}
    try:
        yield opened
    finally:
        network.close_fds(opened)


@contextlib.contextmanager
def _launch_spec(
    host: Host,
    name: str,
    *,
    vm_dir: Path,
    config: dict[str, Any],
    bundle: Bundle,
    box: Box,
    who: vmusers.Owner | None,
    snapshot_name: str,
) -> Iterator[LaunchSpec]:
    """The LaunchSpec of a start or a restore of `name` (its runtime name: `web@green` for a slot), its
    TAPs handed over as descriptors when the hypervisor is not us; valid inside the block only (the
    descriptors are closed after it). `snapshot_name` is the VM whose snapshot directory is granted."""
    with _handed_taps(host, config, _hands_taps(host, who)) as tap_fds:
        yield LaunchSpec(
            name=name,
            vm_dir=vm_dir,
            config=config,
            serial_log=vm_dir / "serial.log",
            shutdown_timeout=float(bundle.meta.shutdown_timeout),
            user=host.config.user,
            netns=host.net.netns,
            join=box.join,
            uid=None if who is None else who.uid,
            gid=None if who is None else who.gid,
            groups=() if who is None else who.groups,
            tap_fds=tap_fds,
            writable=(snapshots.vm_root(host.state, snapshot_name),),
        )


def _take_back(host: Host, name: str, record: VmRecord | None) -> None:
    """Give back to the worker what VM `name`'s own uid still owns of its volumes and snapshots: any uid
    of the range (a damaged record does not say which), else the record's."""
    users = host.config.vm_users
    uids: int | range | None = None if record is None else record.uid
    if users is not None:
        uids = range(users.first, users.last + 1)
    if uids is None:
        return
    roots = [host.state.volume_dir(name), snapshots.vm_root(host.state, name)]
    vmusers.take_back(roots, uids, host.own_ids())


def cgroups(host: Host) -> cgroup.Driver | None:
    """The cgroup driver for this host's hierarchy, as the configuration's `cgroups.mode` allows."""
    settings = host.config.cgroups
    if settings.mode == "off":
        return None
    found = cgroup.driver(settings.base, scope=cgroup.scope_of(host.state.root))
    if found is None and settings.mode == "required":
        raise CgroupError(
            "this host mounts neither cgroup v2 with the memory and cpu controllers nor cgroup v1's memory "
            "and cpu (see /proc/mounts); mount them, or set the worker configuration's cgroups.mode to auto"
        )
    return found


def limits(bundle: Bundle, backend: str = "cloud-hypervisor") -> cgroup.Limits:
    """The bundle's resources as its group's limits on `backend` (docs/bundle.md, `resources`)."""
    res = bundle.meta.resources
    quota = res.cpu_quota_percent
    overhead = VMM_OVERHEAD_MIB_BY_BACKEND.get(backend, VMM_OVERHEAD_MIB)
    return cgroup.Limits(
        memory_max=res.memory_max(int(bundle.vm_config["memory"]["size"]), overhead),
        cpu_quota_us=None if quota is None else quota * cgroup.CPU_PERIOD_US // 100,
        cpu_weight=res.cpu_weight,
        io_weight=res.io_weight,
    )


def unbox(host: Host, name: str) -> None:
    """Remove VM `name`'s cgroup once its hypervisor is gone (bounded; a group still holding a process
    is left, with a warning, for `down` or the sweep). For the worker when a hypervisor exited."""
    try:
        drv = cgroups(host)
    except CgroupError:  # `required` on a host without cgroups: no group was ever made
        return
    if drv is not None and not drv.remove(name):
        log.warning("%s: its cgroup still holds processes %s; left for the sweep", name, drv.pids(name))


@dataclass(frozen=True)
class Box:
    """A starting VM's cgroup, made before its hypervisor (which joins it before its guest runs), undone
    with the start; `check` verifies, once it runs, that it is in its group with the limits as set."""

    runtime: str
    limits: cgroup.Limits
    drv: cgroup.Driver | None = None
    group: cgroup.Group | None = None

    @classmethod
    def make(cls, host: Host, runtime: str, limits: cgroup.Limits, undo: contextlib.ExitStack) -> Box:
        drv = cgroups(host)
        if drv is None:
            if host.config.cgroups.mode == "auto":
                log.warning(
                    "%s: runs without a cgroup (this host mounts no memory and cpu controllers)", runtime
                )
            return cls(runtime, limits)
        group = drv.create(runtime, limits)
        undo.callback(drv.remove, runtime)
        return cls(runtime, limits, drv, group)

    @property
    def join(self) -> Callable[[int], None] | None:
        return (
            None if self.drv is None or self.group is None else functools.partial(self.drv.join, self.group)
        )

    def check(self, pid: int) -> None:
        if self.drv is not None and self.group is not None:
            for note in cgroup.check_joined(self.drv, self.group, pid, self.limits):
                log.warning("%s: %s", self.runtime, note)


def _check_affinity(bundle: Bundle) -> None:
    pinned = set(bundle.meta.resources.cpu_affinity)
    online = _online_cpus()
    if pinned and online is not None and not pinned <= online:
        raise ValidationError(
            str(bundle.path / "procurator.json"),
            "resources.cpuAffinity",
            f"names CPUs {sorted(pinned - online)}, which this host does not have (online: "
            f"{sorted(online)}); rebuild the VM with this host's CPUs",
        )


def _online_cpus() -> set[int] | None:
    try:
        text = Path("/sys/devices/system/cpu/online").read_text().strip()
    except OSError:
        return None
    cpus: set[int] = set()
    for part in filter(None, text.split(",")):
        low, _, high = part.partition("-")
        cpus.update(range(int(low), int(high or low) + 1))
    return cpus


def cgroup_base(host: Host) -> str | None:
    """Where this host's VM groups live (cgroup v2), None with cgroups off: what a sweep looks through."""
    return None if host.config.cgroups.mode == "off" else host.config.cgroups.base


def locked(host: Host, timeout: float = LOCK_TIMEOUT) -> contextlib.AbstractContextManager[None]:
    """The state lock, swept first when its previous holder died holding it (`sweep.locked`)."""
    return sweep.locked(host.state, host.net, timeout, cgroup_base=cgroup_base(host))


def oom_kills(host: Host, name: str) -> int:
    """How many times the kernel's OOM killer acted in VM `name`'s group (0 without one)."""
    try:
        drv = cgroups(host)
        usage = None if drv is None or name not in set(drv.leftovers()) else drv.usage(name)
    except CgroupError:
        return 0
    return 0 if usage is None else usage.oom_kills


def _running(record: VmRecord) -> bool:
    return record.pid > 0 and process.alive(record.pid, record.start_time)


def _guest_address(host: Host, ip: str) -> GuestAddress:
    subnet = ipaddress.ip_network(host.net.subnet)
    return GuestAddress(ip=ip, prefix=subnet.prefixlen, gateway=str(host.net.gateway_address))


def _forget(host: Host, name: str, record: VmRecord | None = None) -> None:
    """Remove what a VM that is no longer running left: its TAPs, cgroup and directory (not its volumes);
    of a blue-green generation also its own lease and the service DNAT (the VM's lease is kept)."""
    _detach(host, name, record)
    unbox(host, name if record is None else record.runtime)
    _take_back(host, name, record)
    host.state.remove_vm_dir(name)
    host.reservations.release(name if record is None else record.runtime)
    if record is not None and record.slot:
        _drop_runtime(host, record.runtime)
        apply_services(host)


def _end_strays(host: Host, name: str) -> list[int]:
    """Kill hypervisors still running in VM `name`'s directory though its record says it is not running
    (a record damaged or written by hand): one hypervisor per VM, and no TAP removed under a live guest."""
    return sweep.kill_strays(host.state, name)


def _detach(host: Host, name: str, record: VmRecord | None) -> None:
    """Remove the VM's TAPs: those its record names, or (no record of them) any carrying its alias."""
    vm = name if record is None else record.runtime
    network.detach_vm(
        host.net,
        vm,
        record.taps if record is not None and record.taps else None,
        ip=record.ip if record is not None else None,
    )


def services(host: Host) -> list[tuple[str, str]]:
    """The service DNATs the records ask for: (the VM's lease, its blue-green generation's address)."""
    records, _ = host.state.scan()
    return sorted((r.service_ip, r.ip) for r in records if r.slot and r.service_ip and r.ip)


def apply_services(host: Host) -> None:
    """Make the nftables table's service DNATs those of the records, in one transaction (measured first)."""
    wanted = services(host)
    if wanted or network.current_services(host.net):
        with host.shared:
            network.net_up(host.net, services=wanted)


def _drop_runtime(host: Host, runtime: str) -> None:
    """What a blue-green generation `runtime` (`<name>@<slot>`) had apart: its TAPs, cgroup, directory and
    its own lease (the VM's lease, the service address, is the VM's and stays)."""
    if SLOT_MARK not in runtime:
        return
    network.detach_vm(host.net, runtime)
    unbox(host, runtime)
    host.state.remove_vm_dir(runtime)
    _release_lease(host, runtime)
    host.reservations.release(runtime)


def _collapse(host: Host, record: VmRecord) -> VmRecord:
    """A blue-green record of a VM whose process is gone, made plain again: the next boot is on the VM's
    own lease (the service address) and directory, and the DNAT and the generation's lease go."""
    if not record.slot:
        return record
    _drop_runtime(host, record.runtime)
    plain = record.with_(
        slot="",
        service_ip="",
        ip=record.service_ip,
        vm_dir=str(host.state.vm_dir(record.name)),
        api_socket=str(host.state.vm_dir(record.name) / Path(record.api_socket).name),
        pid=0,
        start_time=0,
        taps=(),
    )
    host.state.save_record(plain)
    apply_services(host)
    return plain


def up(
    host: Host,
    bundle: Bundle,
    *,
    backend: str | None = None,
    wait: WaitFor = WaitFor.BOOTED,
    restarts: int = 0,
) -> VmRecord:
    """Boot `bundle` as a new VM. Refuses a name that is already running."""
    name = bundle.name
    with locked(host):
        existing = host.state.load_record(name)
        if existing is not None and _running(existing):
            raise ConflictError(
                f"VM {name!r} is already running (generation {existing.generation}); "
                f"run `procurator down {name}` first"
            )
        if existing is not None:
            _end_strays(host, name)
            _forget(host, name, existing)
        return _start(host, bundle, backend or host.config.hypervisor.backend, wait, restarts)


@dataclass(frozen=True)
class Switch:
    """What a blue-green replace did: both generations, the service address, and when it moved."""

    service_ip: str
    old: VmRecord
    new: VmRecord
    switched_at: float  # host.clock() at the nftables change
    drained: float  # seconds the old generation ran on after it

    def to_json(self) -> dict[str, Any]:
        def gen(r: VmRecord) -> dict[str, Any]:
            return {
                "bundle": r.bundle,
                "generation": r.generation,
                "pid": r.pid,
                "ip": r.ip,
                "taps": list(r.taps),
            }

        return {
            "strategy": "blue-green",
            "service_ip": self.service_ip,
            "old": gen(self.old),
            "new": gen(self.new),
            "switched_at": round(self.switched_at, 3),
            "drained_seconds": round(self.drained, 3),
        }


def blue_green(host: Host, bundle: Bundle, *, backend: str | None = None) -> Switch:
    """Replace the running generation of `bundle`'s VM without a gap (docs/architecture.md).

    The new generation boots as `<name>@<slot>` on a lease of its own and must pass its health checks
    (a failure removes it: the old generation never noticed). Then the record names it (the commit point),
    the VM's service address is DNATed to it in one nftables transaction, the old generation drains for
    `replace.drainSeconds` and is stopped, and what it had apart (its TAPs, its cgroup, its directory, its
    own lease when it was a blue-green generation too) goes. A kill -9 before the record is written leaves
    a stray the sweep removes; after it, an old generation the sweep stops, and the sweep writes the DNAT.
    """
    name = bundle.name
    with locked(host):
        old = _require(host, name)
        if not _running(old):
            raise ConflictError(f"VM {name!r} is not running; a blue-green replace needs the old generation")
        slot = "c" if old.slot == "b" else "b"
        service_ip = old.service_ip or old.ip
        # a generation an interrupted earlier try left in this slot (the sweep removes it too)
        sweep.kill_strays(host.state, runtime_name(name, slot))
        _drop_runtime(host, runtime_name(name, slot))
        new = _start(
            host,
            bundle,
            backend or host.config.hypervisor.backend,
            WaitFor.HEALTHY,
            0,
            slot=slot,
            service_ip=service_ip,
        )
        try:
            if old.uid is not None:  # the old generation runs on as its uid while it drains
                host.reservations.hold(old.runtime, old.uid)
            host.state.save_record(new)  # the switch is committed: this is the VM's generation now
            host.reservations.commit(new.runtime)
            network.step("blue-green-recorded")
            apply_services(host)
            switched = host.clock()
            mark = time.monotonic()
        except BaseException:
            if host.state.load_record(name) == new:  # the record was written: put the old one back
                host.state.save_record(old)
                with contextlib.suppress(ProcuratorError):
                    apply_services(host)
            host.hypervisors(new.backend).kill(new.handle)
            _drop_runtime(host, new.runtime)
            raise
        time.sleep(bundle.meta.replace.drain_seconds)  # bounded: at most 3600 s (models.MAX_SECONDS)
        network.step("blue-green-drained")
        _shutdown(host, old)
        network.detach_vm(host.net, old.runtime, old.taps or None)
        unbox(host, old.runtime)
        host.reservations.release(old.runtime)
        if old.slot:
            _drop_runtime(host, old.runtime)
        else:  # the old generation ran in the VM's own directory, which holds the record
            _clear_vm_dir(host, name)
            if old.uid is not None:  # its uid is free again: the directory is the worker's until a start
                vmusers.take_back([host.state.vm_dir(name)], old.uid, host.own_ids())
        return Switch(service_ip, old, new, switched, time.monotonic() - mark)


def _attach(
    host: Host, runtime: str, bundle: Bundle, undo: contextlib.ExitStack, *, ip: str, owner_uid: int
) -> list[network.TapInfo]:
    """The VM's TAPs (owned by `owner_uid`), and its lease pinned to its first interface's MAC; both
    undone by `undo`."""
    taps = network.attach_vm(
        host.net,
        runtime,
        [i.id for i in bundle.meta.interfaces],
        owner_uid,
        bundle.vcpus,
        ip=ip,
        mac=bundle.meta.interfaces[0].mac,
    )
    undo.callback(network.detach_vm, host.net, runtime, ip=ip)
    return taps


def _start(
    host: Host,
    bundle: Bundle,
    backend: str,
    wait: WaitFor,
    restarts: int,
    *,
    slot: str = "",
    service_ip: str = "",
) -> VmRecord:
    """Boot `bundle`. With `slot` (blue-green) it boots as `<name>@<slot>` beside the running generation,
    on a lease of its own, and its record is returned unsaved: the caller's switch writes it."""
    name = bundle.name
    runtime = runtime_name(name, slot)
    hv = host.hypervisors(backend)
    vm_dir = host.state.vm_dir(runtime)
    with contextlib.ExitStack() as undo:
        who = host.vm_owner(runtime, undo)  # first: a full range refuses the start before anything is made
        try:
            vm_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StateError(f"{vm_dir}: cannot create the VM's directory: {write_problem(exc)}") from exc
        if not slot and host.state.record_path(name).exists():  # a start of a recorded VM: its record stays
            undo.callback(_clear_vm_dir, host, name)
        else:
            undo.callback(host.state.remove_vm_dir, runtime)

        with host.shared:
            leases = host.leases()
            had_lease = leases.get(runtime) is not None
            lease = leases.acquire(runtime)
            if not had_lease:
                undo.callback(_release_lease, host, runtime)
            if bundle.meta.interfaces and not host.network_ready and network.net_up(host.net).created:
                undo.callback(_drop_network_if_unused, host, name)

        nics: list[NicBinding] = []
        if bundle.meta.interfaces:
            tap_owner = host.owner_uid() if who is None else who.uid
            taps = _attach(host, runtime, bundle, undo, ip=lease.ip, owner_uid=tap_owner)
            for iface, tap in zip(bundle.meta.interfaces, taps, strict=True):
                nics.append(NicBinding(iface.id, tap.name, iface.mac or tap.mac))

        fresh = [v for v in bundle.meta.volumes if not volume_path(host.state, name, v).exists()]
        undo.callback(_remove_volumes, host, name, fresh)  # only those this start made: never data
        volumes = ensure_volumes(host.state, name, bundle.meta.volumes)
        owner = host.owner() if who is None else (who.uid, who.gid)
        if owner is not None:  # the hypervisor, running as the VM user, writes here and opens these
            for path in (vm_dir, *volumes.values()):
                os.chown(path, *owner)
        serial_log = vm_dir / "serial.log"
        config = runtime_config(
            bundle,
            nics=nics,
            volumes=volumes,
            serial_log=serial_log,
            address=_guest_address(host, lease.ip) if nics else None,
        )
        atomic_write_json(vm_dir / "vm-config.runtime.json", config)
        _check_affinity(bundle)
        box = Box.make(host, runtime, limits(bundle, backend), undo)
        with _launch_spec(
            host, runtime, vm_dir=vm_dir, config=config, bundle=bundle, box=box, who=who, snapshot_name=name
        ) as spec:
            handle = hv.start(spec)
        undo.callback(hv.kill, handle)
        box.check(handle.pid)

        now = host.clock()
        record = VmRecord(
            name=name,
            bundle=str(bundle.path),
            generation=bundle.generation,
            backend=backend,
            pid=handle.pid,
            start_time=handle.start_time,
            api_socket=str(handle.api_socket),
            vm_dir=str(vm_dir),
            taps=tuple(n.tap for n in nics),
            ip=lease.ip if nics else "",
            mac=nics[0].mac if nics else "",
            netns=host.net.netns,
            created_at=now,
            started_at=now,
            restarts=restarts,
            shutdown_timeout=float(bundle.meta.shutdown_timeout),
            slot=slot,
            service_ip=service_ip if slot else "",
            uid=None if who is None else who.uid,
        )
        if not slot:
            host.state.save_record(record)
            host.reservations.commit(runtime)  # the record holds its uid now
        if wait is WaitFor.HEALTHY and nics:
            wait_healthy(
                bundle.meta.health,
                lease.ip,
                host.net.netns,
                cap=host.config.health_timeout,
                still_running=lambda: _running(record),
            )
        undo.pop_all()
        return record
    raise AssertionError("unreachable")  # pragma: no cover


@contextlib.contextmanager
def network_once(host: Host) -> Iterator[None]:
    """Bring the host network up once for a batch of starts (an apply), not again at each start; a
    bridge it had to make is taken down again when, after the batch, no VM is left to use it."""
    if host.network_ready:
        yield
        return
    created = network.net_up(host.net).created
    host.network_ready = True
    try:
        yield
    finally:
        host.network_ready = False
        if created:
            _drop_network_if_unused(host)


def _clear_vm_dir(host: Host, name: str) -> None:
    """What a failed start of a recorded VM made in its directory, the record and serial log aside."""
    for entry in host.state.vm_dir(name).iterdir():
        if entry.name in ("record.json", "serial.log"):
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            with contextlib.suppress(OSError):
                entry.unlink()


def _drop_network_if_unused(host: Host, starting: str = "") -> None:
    """Take down the bridge (and NAT) a failed start had just made, when no other VM is recorded."""
    records, damaged = host.state.scan()
    if any(r.name != starting for r in records) or damaged:
        return
    try:
        network.net_down(host.net)
    except ProcuratorError as exc:
        log.warning("cannot take down the bridge this start made: %s", exc)


def _remove_volumes(host: Host, name: str, volumes: list[Volume]) -> None:
    for volume in volumes:
        volume_path(host.state, name, volume).unlink(missing_ok=True)
    with contextlib.suppress(OSError):  # the VM's volume directory, when this start made it and it is empty
        host.state.volume_dir(name).rmdir()


def _shutdown(host: Host, record: VmRecord) -> StopResult | None:
    if not _running(record):
        return None
    hv = host.hypervisors(record.backend)
    if record.paused:  # a paused guest cannot answer the power button: it runs again first
        try:
            hv.resume(record.handle)
        except ProcuratorError as exc:
            log.warning("%s: cannot resume before stopping (%s); the stop will be forced", record.name, exc)
    return hv.shutdown(record.handle, record.shutdown_timeout)


def pause(host: Host, name: str) -> bool:
    """Pause a running VM's guest; False when it was paused already (nothing done).

    The record says so (`ps` shows `paused`, a worker restarted meanwhile keeps it paused), and the
    hypervisor is asked back for its state afterwards (measure, act, verify).
    """
    with locked(host):
        record = _require(host, name)
        if not _running(record):
            raise ConflictError(f"VM {name!r} is not running; only a running VM can be paused")
        if record.paused:
            return False
        hv = host.hypervisors(record.backend)
        hv.pause(record.handle)
        _expect_state(hv, record, VmState.PAUSED, "pause")
        host.state.save_record(record.with_(paused=True))
        return True


def resume(host: Host, name: str) -> bool:
    """Run a paused VM's guest again; False when it was not paused (nothing done)."""
    with locked(host):
        record = _require(host, name)
        if not _running(record):
            raise ConflictError(f"VM {name!r} is not running; start it with `procurator start {name}`")
        if not record.paused:
            return False
        hv = host.hypervisors(record.backend)
        hv.resume(record.handle)
        _expect_state(hv, record, VmState.RUNNING, "resume")
        host.state.save_record(record.with_(paused=False))
        return True


def _expect_state(hv: Hypervisor, record: VmRecord, want: VmState, what: str) -> None:
    found = hv.info(record.handle).state
    if found is not want:
        raise HypervisorError(f"VM {record.name!r}: {found.value} after {what}, not {want.value}")


def down(host: Host, name: str, *, purge: bool = False) -> StopResult | None:
    """Stop the VM (gracefully, bounded) and forget it. `purge` also drops its volumes, snapshots and
    lease."""
    with locked(host):
        try:
            record = host.state.load_record(name)
        except DamagedStateError:
            result = _down_damaged(host, name)
            record = None
        else:
            if record is None and not purge:
                raise NotFoundError(f"no VM named {name!r} on this host; see `procurator ps`")
            result = _shutdown(host, record) if record is not None else None
            if record is not None and result is None:
                _end_strays(host, name)
        _forget(host, name, record)
        if purge:
            purge_volumes(host.state, name)
            snapshots.forget(host.state, name)
            _release_lease(host, name)
        return result


def _down_damaged(host: Host, name: str) -> StopResult | None:
    """Stop what runs in the directory of a VM whose record is damaged, and move the record aside."""
    killed = _end_strays(host, name)
    aside = host.state.set_aside(name)
    log.warning("%s: the damaged record is kept as %s", name, aside)
    return StopResult(graceful=False, steps=("damaged record", "SIGKILL")) if killed else None


def _release_lease(host: Host, name: str) -> None:
    """Release `name`'s lease from a freshly read table (another thread may have changed the file)."""
    with host.shared:
        host.leases().release(name)


def stop(host: Host, name: str) -> StopResult | None:
    """Stop the VM but keep its record, lease and volumes, so `start` boots the same generation again."""
    with locked(host):
        record = _require(host, name)
        # The intent is written first: if it cannot be (a full disk), the VM is left running and the
        # record as it was; once written, nothing (the worker) starts the VM again behind the user's back.
        host.state.save_record(record.with_(desired="stopped", last_exit="stopped by user"))
        result = _shutdown(host, record)
        _detach(host, name, record)
        unbox(host, record.runtime)
        record = _collapse(host, record)
        host.state.save_record(
            record.with_(
                pid=0, start_time=0, taps=(), desired="stopped", last_exit="stopped by user", paused=False
            )
        )
        return result


def start(host: Host, name: str, *, wait: WaitFor = WaitFor.BOOTED) -> VmRecord:
    """Boot a stopped (or exited) VM's recorded generation again.

    A start that fails keeps the record (not running, `last_exit` saying why), so the VM is not
    forgotten: `start` can be tried again and `down` removes it.
    """
    with locked(host):
        record = _require(host, name)
        if _running(record):
            raise ConflictError(f"VM {name!r} is already running; nothing to start")
        if record.resume_from:
            resumed = _resume_held(host, record, wait)
            if resumed is not None:
                return resumed
            record = _require(host, name)
        bundle = Bundle.load(Path(record.bundle))
        _end_strays(host, name)
        network.detach_vm(host.net, name)
        record = _collapse(host, record)  # a blue-green generation boots again on the VM's own lease
        try:
            return _start(host, bundle, record.backend, wait, record.restarts)
        except ProcuratorError as exc:
            host.state.save_record(
                record.with_(pid=0, start_time=0, taps=(), last_exit=f"start failed: {exc}")
            )
            raise


def _resume_held(host: Host, record: VmRecord, wait: WaitFor) -> VmRecord | None:
    """Restore the snapshot a host shutdown took of this VM (`restart.fromSnapshot`); None when it
    cannot be (gone, damaged, refused, failed: logged), after which the caller boots the VM instead."""
    ident = record.resume_from
    try:
        return restore(host, record.name, ident=ident, wait=wait)[0]
    except ProcuratorError as exc:
        log.warning(
            "%s: cannot restore snapshot %s taken at the host shutdown (%s); booting it instead",
            record.name,
            ident,
            exc,
        )
    current = host.state.load_record(record.name)
    if current is not None and current.resume_from:
        host.state.save_record(current.with_(resume_from=""))
    return None


HOST_SHUTDOWN = "host shutdown"


def shutdown_all(host: Host, *, parallel: int = 8) -> dict[str, StopResult | None]:
    """Stop every running VM gracefully and in parallel, for a host shutdown.

    Unlike `stop`, the desired state is kept (the record says `last_exit` = HOST_SHUTDOWN), so the worker
    boots them again when the host comes back. Each stop is bounded by its VM's shutdown timeout.

    A VM whose bundle says `restart.fromSnapshot` is snapshotted first (paused, and left paused so that
    its disks do not change after the snapshot), then killed; its record keeps the snapshot's id
    (`resume_from`), which its next start restores. If the snapshot fails, it is stopped as the others.
    """
    with locked(host):
        records, damaged = host.state.scan()
        for bad in damaged:  # its process is unknown: left to run, the guest's own shutdown ends it
            log.warning("%s: not stopped: %s", bad.name, bad.error)
        running = [r for r in records if _running(r)]
        results: dict[str, StopResult | None] = {}
        errors: dict[str, ProcuratorError] = {}

        held: dict[str, str] = {}  # VM name -> the snapshot its next start restores

        def one(record: VmRecord) -> None:
            try:
                ident = _snapshot_for_shutdown(host, record)
                if ident:
                    host.hypervisors(record.backend).kill(record.handle)
                    held[record.name] = ident
                    results[record.name] = StopResult(graceful=False, steps=(f"snapshot {ident}", "SIGKILL"))
                else:
                    results[record.name] = _shutdown(host, record)
            except ProcuratorError as exc:
                errors[record.name] = exc

        with ThreadPoolExecutor(max_workers=max(1, parallel)) as pool:
            list(pool.map(host.state.lend(one), running))
        for record in running:
            network.detach_vm(host.net, record.runtime, ip=record.ip)
            if record.name not in errors:
                unbox(host, record.runtime)
                host.state.save_record(
                    record.with_(
                        pid=0,
                        start_time=0,
                        taps=(),
                        last_exit=HOST_SHUTDOWN,
                        paused=False,
                        resume_from=held.get(record.name, ""),
                    )
                )
        if errors:
            detail = "; ".join(f"{name}: {exc}" for name, exc in sorted(errors.items()))
            raise HypervisorError(f"some VMs did not stop: {detail}")
        return results


def _snapshot_for_shutdown(host: Host, record: VmRecord) -> str:
    """The id of the snapshot taken of `record`'s VM for a host shutdown, or "" when its bundle does not
    ask for one (`restart.fromSnapshot`) or it failed (logged: the VM is then stopped as the others)."""
    try:
        if not Bundle.load(Path(record.bundle)).meta.restart.from_snapshot:
            return ""
        taken = _take_snapshot(host, record, to=None, keep=host.config.snapshot_keep, stay_paused=True)
    except ProcuratorError as exc:
        log.warning("%s: no snapshot at the host shutdown (%s); stopping it instead", record.name, exc)
        return ""
    return taken.snapshot.id


def _require(host: Host, name: str) -> VmRecord:
    record = host.state.load_record(name)
    if record is None:
        raise NotFoundError(f"no VM named {name!r} on this host; see `procurator ps`")
    return record


def status(host: Host) -> list[VmStatus]:
    """Every recorded VM with its state, from the process table alone (no hypervisor calls).

    A damaged record stops it (DamagedStateError): for callers that act on every VM. `listing` reports
    the damaged ones apart instead.
    """
    statuses, damaged = listing(host)
    if damaged:
        raise damaged[0].error
    return statuses


def listing(host: Host) -> tuple[list[VmStatus], list[Damaged]]:
    """`status` of every readable record, and apart the VMs whose record is damaged."""
    now = host.clock()
    records, damaged = host.state.scan()
    return with_usage(host, [classify(record, _running(record), now) for record in records]), damaged


def with_usage(host: Host, statuses: list[VmStatus]) -> list[VmStatus]:
    """`statuses` with each running VM's usage read from its cgroup (`ps --json` `resources`, metrics)."""
    if not any(s.status is Status.RUNNING for s in statuses):
        return statuses
    try:  # no figures is no failed listing: a host without cgroups, or a group removed under us
        drv = cgroups(host)
        boxed = set() if drv is None else set(drv.leftovers())  # only existing groups are read
    except CgroupError as exc:
        log.debug("no usage: %s", exc)
        return statuses
    if drv is None:
        return statuses
    return [_with_usage(drv, s) if s.record.runtime in boxed else s for s in statuses]


def _with_usage(drv: cgroup.Driver, status: VmStatus) -> VmStatus:
    if status.status is not Status.RUNNING:
        return status
    try:
        usage = drv.usage(status.record.runtime)
    except CgroupError as exc:  # a group removed under us: no figures, not a failed listing
        log.debug("%s: no usage: %s", status.record.name, exc)
        usage = None
    return dataclasses.replace(status, usage=usage)


def damaged_json(bad: Damaged) -> dict[str, Any]:
    """A damaged VM as `ps --json` lists it: the keys of `VmStatus.to_json`, unknown ones null."""
    return {
        "name": bad.name,
        "state": DAMAGED,
        "generation": None,
        "bundle": None,
        "backend": None,
        "ip": None,
        "service_ip": None,
        "taps": [],
        "pid": None,
        "uptime": None,
        "restarts": None,
        "last_exit": None,
        "resources": None,
        "problem": bad.error.message,
    }


def classify(record: VmRecord, running: bool, now: float) -> VmStatus:
    """The status of a recorded VM whose process does (`running`) or does not run (`now`: host.clock())."""
    if running:
        return VmStatus(record, Status.RUNNING, now - record.started_at)
    if record.desired == "stopped":
        return VmStatus(record, Status.STOPPED, None)
    if record.desired == "failed":
        return VmStatus(record, Status.FAILED, None)
    return VmStatus(record, Status.EXITED, None)


def serial_log(host: Host, name: str) -> Path:
    """The VM's serial log; also of a VM whose record is damaged (the log may say what happened)."""
    if not host.state.record_path(name).exists():
        _require(host, name)
    return host.state.vm_dir(name) / "serial.log"


def console_path(host: Host, name: str) -> Path:
    """Where the VM's interactive console is served: a pty or a UNIX socket, as its backend says."""
    record = _require(host, name)
    if not _running(record):
        raise ConflictError(f"VM {name!r} is not running; start it with `procurator start {name}`")
    return host.hypervisors(record.backend).console_path(record.handle)


# --- snapshots (procurator/snapshots.py holds where they live) -----------------------------------


@dataclass(frozen=True)
class SnapshotResult:
    snapshot: snapshots.Snapshot
    pruned: tuple[snapshots.Snapshot, ...]  # older snapshots of the VM that retention removed
    paused: bool  # the guest is paused afterwards (it was before, or --stay-paused)


def snapshot(
    host: Host, name: str, *, to: Path | None = None, keep: int | None = None, stay_paused: bool = False
) -> SnapshotResult:
    """Snapshot a running VM: its guest paused (if it runs), its state written, the guest resumed unless
    it was paused before or `stay_paused`. Kept under the state directory (and the VM's oldest beyond
    `keep` removed, default the worker's `snapshotKeep`), or written to `to` only.

    Refused: a VM that does not run, one with virtio-fs shares (`fs`: their state lives in virtiofsd,
    which no snapshot holds). The guest's volumes are not copied: a restore finds them as they are then.
    """
    keep = host.config.snapshot_keep if keep is None else keep
    if keep < 1:
        raise ConfigError(f"--keep {keep}: keep at least 1 snapshot per VM")
    with locked(host):
        record = _require(host, name)
        if not _running(record):
            raise ConflictError(
                f"VM {name!r} is not running; only a running VM can be snapshotted "
                f"(start it with `procurator start {name}`)"
            )
        return _take_snapshot(host, record, to=to, keep=keep, stay_paused=stay_paused)


def _take_snapshot(
    host: Host, record: VmRecord, *, to: Path | None, keep: int, stay_paused: bool
) -> SnapshotResult:
    """`snapshot`'s work on a running VM, under the state lock its caller holds (or was lent)."""
    name = record.name
    config = _runtime_config(host, record)
    if config.get("fs"):
        raise ConflictError(
            f"VM {name!r} has virtio-fs shares (`fs`), whose state lives in virtiofsd and cannot be "
            "snapshotted; stop and start the VM instead"
        )
    hv = host.hypervisors(record.backend)
    created = host.clock()
    final = snapshots.new_dir(host.state, name, record.generation, created, to)
    data = snapshots.partial_of(final) / snapshots.DATA
    meta = snapshots.SnapshotMeta(
        vm=name,
        bundle=record.bundle,
        generation=record.generation,
        backend=record.backend,
        created=created,
        size=0,
        paused=record.paused,
        ip=record.ip,
    )
    paused_here = False
    try:
        if not record.paused:
            hv.pause(record.handle)
            paused_here = True
            _expect_state(hv, record, VmState.PAUSED, "pause")
            host.state.save_record(record.with_(paused=True))
        owner = host.owner() if record.uid is None else (record.uid, record.uid)
        if owner is not None:  # the hypervisor, as the VM user, writes the snapshot here
            os.chown(data, *owner)
        atomic_write_json(data / snapshots.CONFIG, config)
        hv.snapshot(record.handle, data)
        if record.uid is not None:  # kept by the worker; the VM's uid may go to another VM later
            vmusers.take_back([data], record.uid, host.own_ids())
        taken = snapshots.finish(final, meta)
    except BaseException:
        snapshots.discard(final)
        if paused_here:
            _resume_after_snapshot(host, hv, record)
        raise
    if paused_here and not stay_paused:
        _resume_after_snapshot(host, hv, record)
    pruned = snapshots.prune(host.state, name, keep) if to is None else []
    return SnapshotResult(taken, tuple(pruned), paused=record.paused or stay_paused)


def _resume_after_snapshot(host: Host, hv: Hypervisor, record: VmRecord) -> None:
    """Run the guest a snapshot paused again; a failure leaves the record saying paused (ps shows it,
    `procurator resume NAME` is the fix) and is logged, not raised over the snapshot's own outcome."""
    try:
        hv.resume(record.handle)
        _expect_state(hv, record, VmState.RUNNING, "resume")
    except ProcuratorError as exc:
        log.warning(
            "%s: cannot resume after the snapshot (%s); run `procurator resume %s`",
            record.name,
            exc,
            record.name,
        )
        return
    host.state.save_record(record.with_(paused=False))


def _runtime_config(host: Host, record: VmRecord) -> dict[str, Any]:
    path = host.state.vm_dir(record.name) / "vm-config.runtime.json"
    try:
        config = read_json(path, fix=f"stop and start VM {record.name!r} to write it again")
    except FileNotFoundError as exc:
        raise StateError(
            f"{path} is missing: VM {record.name!r} was started by an older Procurator; "
            f"stop and start it, then snapshot it"
        ) from exc
    if not isinstance(config, dict):
        raise DamagedStateError(path, "not a JSON object", f"stop and start VM {record.name!r}")
    return config


def restore(
    host: Host,
    name: str,
    *,
    source: Path | None = None,
    ident: str | None = None,
    paused: bool = False,
    wait: WaitFor = WaitFor.BOOTED,
) -> tuple[VmRecord, snapshots.Snapshot]:
    """Boot a stopped VM from a snapshot: the newest of its current generation, the one `ident` names
    (`procurator snapshots NAME`), or the directory `source` (`snapshot --to`).

    A running VM is refused (stop it first): the restore replaces the guest, and the running one holds
    its disks' locks. So are a snapshot of another VM, of another generation than the record names (the
    VM was replaced since), of another backend, or of a guest whose address is no longer the VM's lease.
    A failed restore keeps the record (not running, `last_exit` says why), as a failed `start` does; a
    restore killed midway is swept (its hypervisor, its TAPs) by the next command, and a re-run converges.
    """
    with locked(host):
        record = _require(host, name)
        if _running(record):
            raise ConflictError(
                f"VM {name!r} is running; stop it first (`procurator stop {name}`), then restore: "
                "the restore replaces its guest"
            )
        snap = _chosen_snapshot(host, record, source, ident)
        bundle = Bundle.load(Path(record.bundle))
        config = _snapshot_config(snap)
        _end_strays(host, name)
        network.detach_vm(host.net, name)
        try:
            restored = _restore(host, record, bundle, snap, config, paused=paused, wait=wait)
        except ProcuratorError as exc:
            host.state.save_record(
                record.with_(pid=0, start_time=0, taps=(), paused=False, last_exit=f"restore failed: {exc}")
            )
            raise
        return restored, snap


def _chosen_snapshot(
    host: Host, record: VmRecord, source: Path | None, ident: str | None
) -> snapshots.Snapshot:
    name = record.name
    if source is not None:
        snap = snapshots.read(source)
    elif ident is not None:
        snap = snapshots.find(host.state, name, ident)
    else:
        found = snapshots.latest(host.state, name, record.bundle)
        if found is None:
            raise NotFoundError(
                f"VM {name!r} has no snapshot of its generation {record.generation}; "
                f"take one with `procurator snapshot {name}` (see `procurator snapshots {name}`)"
            )
        snap = found
    meta = snap.meta
    if meta.vm != name:
        raise ConflictError(f"{snap.path} is a snapshot of VM {meta.vm!r}, not of {name!r}")
    if meta.bundle != record.bundle:
        raise ConflictError(
            f"snapshot {snap.id} of VM {name!r} is of generation {meta.generation} ({meta.bundle}), but the "
            f"VM is now generation {record.generation}; restore a snapshot of this generation "
            f"(`procurator snapshots {name}`) or take a new one"
        )
    if meta.backend != record.backend:
        raise ConflictError(
            f"snapshot {snap.id} of VM {name!r} was taken with {meta.backend}, but the VM runs with "
            f"{record.backend}; a snapshot restores only on the backend that took it"
        )
    if meta.ip and record.ip and meta.ip != record.ip:
        raise ConflictError(
            f"snapshot {snap.id} of VM {name!r} holds a guest configured for {meta.ip}, but the VM's "
            f"lease is now {record.ip}; take a new snapshot"
        )
    return snap


def _snapshot_config(snap: snapshots.Snapshot) -> dict[str, Any]:
    path = snap.data / snapshots.CONFIG
    try:
        config = read_json(path, fix=f"remove {snap.path} (it is no usable snapshot)")
    except FileNotFoundError as exc:
        raise DamagedStateError(path, "missing", f"remove {snap.path} (it is no usable snapshot)") from exc
    if not isinstance(config, dict):
        raise DamagedStateError(path, "not a JSON object", f"remove {snap.path}")
    return config


def _restore(
    host: Host,
    record: VmRecord,
    bundle: Bundle,
    snap: snapshots.Snapshot,
    config: dict[str, Any],
    *,
    paused: bool,
    wait: WaitFor,
) -> VmRecord:
    """`_start`'s steps with the hypervisor's restore instead of its boot, each undone on failure."""
    name = record.name
    hv = host.hypervisors(record.backend)
    vm_dir = host.state.vm_dir(name)
    with contextlib.ExitStack() as undo:
        vm_dir.mkdir(parents=True, exist_ok=True)
        undo.callback(_clear_vm_dir, host, name)
        with host.shared:
            lease = host.leases().acquire(name)
            if bundle.meta.interfaces and not host.network_ready and network.net_up(host.net).created:
                undo.callback(_drop_network_if_unused, host, name)
        if snap.meta.ip and lease.ip != snap.meta.ip:
            raise ConflictError(
                f"snapshot {snap.id} of VM {name!r} holds a guest configured for {snap.meta.ip}, but the "
                f"VM's lease is now {lease.ip}; take a new snapshot"
            )
        who = host.vm_owner(name, undo)
        taps: list[str] = []
        if bundle.meta.interfaces:
            tap_owner = host.owner_uid() if who is None else who.uid
            made = _attach(host, name, bundle, undo, ip=lease.ip, owner_uid=tap_owner)
            taps = [t.name for t in made]
        wanted = [str(n.get("tap")) for n in config.get("net") or [] if isinstance(n, dict) and n.get("tap")]
        if wanted != taps:  # TAP names derive from the VM's name and interface ids: the same every time
            raise ConflictError(
                f"snapshot {snap.id} of VM {name!r} names TAPs {wanted}, the VM's are {taps}; "
                "take a new snapshot"
            )
        volumes = ensure_volumes(host.state, name, bundle.meta.volumes)
        owner = host.owner() if who is None else (who.uid, who.gid)
        if owner is not None:
            for path in (vm_dir, *volumes.values()):
                os.chown(path, *owner)
        atomic_write_json(vm_dir / "vm-config.runtime.json", config)
        box = Box.make(host, name, limits(bundle, record.backend), undo)  # boxed as a booted VM is
        # QEMU gets the same command line again; cloud-hypervisor takes them for the nets its snapshot
        # says were built from descriptors (vm.restore `net_fds`) and reopens the others by name
        with _launch_spec(
            host, name, vm_dir=vm_dir, config=config, bundle=bundle, box=box, who=who, snapshot_name=name
        ) as spec:
            handle = hv.restore(spec, snap.data, paused=paused)
        undo.callback(hv.kill, handle)
        box.check(handle.pid)
        restored = record.with_(
            pid=handle.pid,
            start_time=handle.start_time,
            api_socket=str(handle.api_socket),
            vm_dir=str(vm_dir),
            taps=tuple(taps),
            ip=lease.ip if taps else "",
            netns=host.net.netns,
            started_at=host.clock(),
            desired="running",
            last_exit=f"restored from snapshot {snap.id}",
            paused=paused,
            resume_from="",
            uid=None if who is None else who.uid,
        )
        host.state.save_record(restored)
        host.reservations.commit(name)
        if wait is WaitFor.HEALTHY and taps and not paused:
            wait_healthy(
                bundle.meta.health,
                lease.ip,
                host.net.netns,
                cap=host.config.health_timeout,
                still_running=lambda: _running(restored),
            )
        undo.pop_all()
        return restored
    raise AssertionError("unreachable")  # pragma: no cover
