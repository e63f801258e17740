"""`procurator doctor`: what a fresh worker host needs, checked one thing at a time, each with its fix.

Checks run in order and never stop at the first failure: the state directory, /dev/kvm, the hypervisor
binary (and for cloud-hypervisor its release against the supported range), a throwaway TAP owned by the
hypervisors' user, the bridge and NAT as configured, nftables when NAT needs it; then, given a bundle,
one VM booted end to end through the configured backend, health-checked, stopped and purged. Nothing is
left behind: the probe TAP is never persistent, the VM is removed with its lease and volumes, and a
bridge that the boot had to create is taken down again when no other VM exists.

The result is a `Report` (JSON schema 1) that the CLI renders; a failed check makes the command fail.
"""

from __future__ import annotations

import contextlib
import grp
import os
import pwd
import shutil
import stat
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Any

from procurator import history, lifecycle, network
from procurator.errors import DamagedStateError, ProcuratorError, StateError
from procurator.hypervisor import registry
from procurator.hypervisor.base import Finding
from procurator.lifecycle import Host, WaitFor
from procurator.models import Bundle

if TYPE_CHECKING:
    pass

SCHEMA = 1
KVM_DEVICE = Path("/dev/kvm")
TUN_DEVICE = Path("/dev/net/tun")
LOW_DISK_BYTES = 1 << 30  # below this much free space in the state directory: a warning


class Status(StrEnum):
    OK = "ok"
    WARN = "warn"  # works, but not as it should on a production host
    FAIL = "fail"
    SKIP = "skip"  # not applicable to this configuration, or not asked for


@dataclass(frozen=True)
class Check:
    name: str
    status: Status
    detail: str
    fix: str = ""
    seconds: float = 0.0

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "status": self.status.value,
            "detail": self.detail,
            "fix": self.fix or None,
            "seconds": round(self.seconds, 3),
        }


@dataclass(frozen=True)
class Report:
    backend: str
    checks: tuple[Check, ...]

    @property
    def ok(self) -> bool:
        return all(c.status is not Status.FAIL for c in self.checks)

    def to_json(self) -> dict[str, Any]:
        return {
            "schema": SCHEMA,
            "backend": self.backend,
            "ok": self.ok,
            "checks": [c.to_json() for c in self.checks],
        }


class _CheckFailedError(Exception):
    """A check's failure: what is wrong and how to fix it."""

    def __init__(self, detail: str, fix: str) -> None:
        super().__init__(detail)
        self.detail = detail
        self.fix = fix


@dataclass(frozen=True)
class _Outcome:
    status: Status
    detail: str
    fix: str = ""


def _timed(name: str, body: Callable[[], _Outcome]) -> Check:
    began = time.monotonic()
    try:
        outcome = body()
    except _CheckFailedError as failed:
        outcome = _Outcome(Status.FAIL, failed.detail, failed.fix)
    except ProcuratorError as exc:
        outcome = _Outcome(
            Status.FAIL, exc.message, "see the message; `procurator --debug doctor` shows more"
        )
    return Check(name, outcome.status, outcome.detail, outcome.fix, time.monotonic() - began)


def run(host: Host, bundle: Bundle | None, *, on_check: Callable[[Check], None] | None = None) -> Report:
    """Every check in order (each reported to `on_check` as it ends), then the boot when `bundle` is given."""
    backend = host.config.hypervisor.backend
    steps: list[tuple[str, Callable[[], _Outcome]]] = [
        ("state", lambda: _state_dir(host)),
        ("kvm", lambda: _kvm(host)),
        ("hypervisor", lambda: _hypervisor(host)),
        ("tap", lambda: _tap(host)),
        ("network", lambda: _network(host)),
        ("nftables", lambda: _nftables(host)),
        ("boot", lambda: _boot(host, bundle)),
    ]
    checks = []
    for name, body in steps:
        check = _timed(name, body)
        if on_check is not None:
            on_check(check)
        checks.append(check)
    return Report(backend, tuple(checks))


# --- the host ---------------------------------------------------------------------------------------


def _state_dir(host: Host) -> _Outcome:
    root = host.state.root
    try:
        host.state.ensure()
        with tempfile.NamedTemporaryFile(dir=root, prefix=".doctor-") as probe:
            probe.write(b"doctor\n")
            probe.flush()
            os.fsync(probe.fileno())
    except (OSError, ProcuratorError) as exc:
        raise _CheckFailedError(
            f"{root}: not writable: {getattr(exc, 'strerror', None) or exc}",
            "point stateDir (or --state-dir) at a writable local directory",
        ) from exc
    problems = _state_files(host)
    if problems:
        more = f" (and {len(problems) - 1} more damaged file(s))" if len(problems) > 1 else ""
        raise _CheckFailedError(f"{problems[0][0]}{more}", problems[0][1])
    free = shutil.disk_usage(root).free
    detail = f"{root} writable, its files readable, {free / (1 << 30):.1f} GiB free"
    if free < LOW_DISK_BYTES:
        return _Outcome(Status.WARN, detail, "free space there: volumes and serial logs live in it")
    return _Outcome(Status.OK, detail)


def _state_files(host: Host) -> list[tuple[str, str]]:
    """(problem, fix) of each state file the strict readers refuse: records, leases, the deployment
    profile. Only read: no lease file is rebuilt, nothing is written."""
    _, damaged = host.state.scan()
    found = [(f"{d.error.path}: {d.error.problem}", d.error.fix) for d in damaged]
    try:
        network.Leases(host.state.leases_path, host.net)
    except DamagedStateError as exc:
        found.append((f"{exc.path}: {exc.problem}", exc.fix))
    try:
        history.current(host.state)
    except StateError as exc:
        found.append((exc.message, "see the problem"))
    return found


def _user_may(path: Path, user: str | None, mode: int) -> bool:
    """Whether `user` (None: we ourselves, root here) has `mode` (a mask of R_OK/W_OK) on `path`, by its
    owner, group and permission bits; raises OSError when `path` cannot be read."""
    st = path.stat()
    if user is None:
        return os.access(path, mode)
    entry = pwd.getpwnam(user)
    groups = set(os.getgrouplist(user, entry.pw_gid))
    want = {os.R_OK: 4, os.W_OK: 2, os.R_OK | os.W_OK: 6}[mode]
    if entry.pw_uid == 0:
        return True
    if st.st_uid == entry.pw_uid:
        bits = (st.st_mode >> 6) & 7
    elif st.st_gid in groups:
        bits = (st.st_mode >> 3) & 7
    else:
        bits = st.st_mode & 7
    return bits & want == want


def _group_name(gid: int) -> str:
    try:
        return grp.getgrgid(gid).gr_name
    except KeyError:
        return str(gid)


def _vm_uids_may(path: Path, groups: tuple[str, ...]) -> bool:
    """Whether a VM uid of `vmUsers` (owning nothing, in `groups` only) may read and write `path`."""
    st = path.stat()
    in_group = _group_name(st.st_gid) in groups
    bits = (st.st_mode >> 3) & 7 if in_group else st.st_mode & 7
    return bits & 6 == 6


def _found(finding: Finding) -> _Outcome:
    if finding.level == "fail":
        raise _CheckFailedError(finding.detail, finding.fix)
    return _Outcome(Status.OK if finding.level == "ok" else Status.WARN, finding.detail, finding.fix)


def _kvm(host: Host) -> _Outcome:
    from procurator.hypervisor import qemu  # noqa: PLC0415 - the probe lives with the backend that uses it

    settings = host.config.hypervisor
    backend = registry.diagnosis(settings.backend)
    problem = qemu.kvm_device_problem(KVM_DEVICE)
    if problem:
        return _found(backend.kvm_missing(problem))
    user = host.config.user
    if user is not None and not _user_may(KVM_DEVICE, user, os.R_OK | os.W_OK):
        group = _group_name(KVM_DEVICE.stat().st_gid)
        raise _CheckFailedError(
            f"{KVM_DEVICE} opens (KVM API 12) but user {user!r} may not open it",
            f"add {user!r} to group {group!r} (users.users.{user}.extraGroups on NixOS)",
        )
    users = host.config.vm_users
    if users is not None and not _vm_uids_may(KVM_DEVICE, users.extra_groups):
        st = KVM_DEVICE.stat()
        group = _group_name(st.st_gid)
        fix = (
            f"add {group!r} to vmUsers.extraGroups in the worker configuration (the NixOS module adds kvm)"
            if (st.st_mode >> 3) & 6 == 6
            else f"give {KVM_DEVICE} a group of its own with mode 0660 (udev's: kvm) and add that group to "
            "vmUsers.extraGroups"
        )
        raise _CheckFailedError(
            f"{KVM_DEVICE} opens (KVM API 12) but the uids of {users.describe()} may not open it", fix
        )
    return _found(backend.kvm_present(settings, f"{KVM_DEVICE} opens, KVM API 12"))


def _hypervisor(host: Host) -> _Outcome:
    settings = host.config.hypervisor
    return _found(registry.diagnosis(settings.backend).binary_finding(settings))


def _tap(host: Host) -> _Outcome:
    owner = host.owner()
    uid = 0 if owner is None else owner[0]
    user = host.config.user
    who = f"user {user!r} (uid {uid})" if user is not None else f"uid {uid}"
    users = host.config.vm_users
    if users is not None:
        uid, who = users.first, f"the first uid of {users.describe()}"
    # A hypervisor that runs as another user gets its TAPs as descriptors the worker opened
    # (docs/architecture.md, "Users"): then only the worker itself must open /dev/net/tun.
    handed = user is not None or users is not None
    try:
        may_open = _user_may(TUN_DEVICE, None if handed else user, os.R_OK | os.W_OK)
    except OSError as exc:
        raise _CheckFailedError(
            f"{TUN_DEVICE}: {exc.strerror}", "load the tun module (`modprobe tun`)"
        ) from exc
    if not may_open:
        raise _CheckFailedError(
            f"{who} may not open {TUN_DEVICE} (mode {stat.filemode(TUN_DEVICE.stat().st_mode)})",
            f"make {TUN_DEVICE} mode 0666 (the kernel's default) or give {who} access to it",
        )
    where = f" in netns {host.net.netns}" if host.net.netns else ""
    try:
        network.probe_tap(host.net, uid)
    except ProcuratorError as exc:
        raise _CheckFailedError(
            exc.message, "run the worker as root (it needs CAP_NET_ADMIN to create TAPs)"
        ) from exc
    done = f"a multi-queue TAP{where} owned by {who} created and removed"
    return _Outcome(Status.OK, f"{done}; hypervisors get their TAPs as descriptors" if handed else done)


def _network(host: Host) -> _Outcome:
    cfg = host.net
    status = network.net_status(cfg)
    bridge = status.bridge
    where = f" in netns {cfg.netns}" if cfg.netns else ""
    problems = []
    if not bridge.present:
        detail = (
            f"bridge {cfg.bridge}{where} not there yet (made at the first VM start or `procurator net up`)"
        )
    else:
        addresses = " ".join(bridge.addresses) or "no address"
        detail = f"bridge {cfg.bridge}{where} {'up' if bridge.up else 'down'}, {addresses}"
        gateway = f"{cfg.gateway_address}/{cfg.network.prefixlen}"
        if not bridge.up or gateway not in bridge.addresses:
            problems.append(f"bridge {cfg.bridge} should be up with {gateway}")
    if cfg.uplink is None:
        detail += "; no uplink, so no NAT (guests reach only the host)"
    else:
        nat = status.nat
        detail += f"; uplink {cfg.uplink}, ip_forward {'on' if nat.ip_forward else 'off'}"
        detail += f", table inet procurator {'present' if nat.table_present else 'absent'}"
        if cfg.nat:
            detail += f", masquerade {'on' if nat.masquerade else 'off'}"
        if bridge.present and not (nat.table_present and nat.ip_forward and (nat.masquerade or not cfg.nat)):
            problems.append("forwarding/NAT is not as configured")
    if problems:
        return _Outcome(
            Status.WARN, f"{detail}; {'; '.join(problems)}", "run `procurator net up` (idempotent)"
        )
    return _Outcome(Status.OK, detail)


def _nftables(host: Host) -> _Outcome:
    from procurator.net import nft  # noqa: PLC0415

    cfg = host.net
    if cfg.uplink is None:
        present = "installed" if nft.available() else "not installed"
        return _Outcome(Status.SKIP, f"not needed without an uplink (nft {present})")
    if not nft.available():
        raise _CheckFailedError(
            "nft: not found; NAT for the uplink needs it",
            "install nftables (networking.nftables.enable on NixOS; Debian: nftables)",
        )
    try:
        tables = nft.list_tables(cfg.netns)
    except ProcuratorError as exc:
        raise _CheckFailedError(exc.message, "load nf_tables (`modprobe nf_tables`); run as root") from exc
    return _Outcome(Status.OK, f"nft works ({len(tables)} tables)")


# --- the boot ---------------------------------------------------------------------------------------


def _boot(host: Host, bundle: Bundle | None) -> _Outcome:
    if bundle is None:
        return _Outcome(
            Status.SKIP,
            "no VM given, none booted",
            "run `procurator doctor --vm REF` with a small bundle to boot one end to end",
        )
    name = bundle.name
    if host.state.load_record(name) is not None:
        raise _CheckFailedError(
            f"a VM named {name!r} already exists on this host; doctor boots its VM beside the others",
            "give --vm a bundle with a name no VM here uses",
        )
    bridge_before = network.net_status(host.net).bridge.present
    checks = bundle.meta.health if bundle.meta.interfaces else ()
    began = time.monotonic()
    try:
        try:
            record = lifecycle.up(host, bundle, wait=WaitFor.HEALTHY if checks else WaitFor.BOOTED)
        except ProcuratorError as exc:
            raise _CheckFailedError(
                f"{name}: {exc.message}",
                f"boot it by hand (`procurator up {bundle.path} --wait healthy`), read "
                f"`procurator logs {name}`, then `procurator down --purge {name}`",
            ) from exc
        booted = time.monotonic() - began
        running = [s for s in lifecycle.status(host) if s.record.name == name and s.record.pid == record.pid]
        if not running or running[0].status is not lifecycle.Status.RUNNING:
            raise _CheckFailedError(
                f"VM {name!r} is not running right after its start",
                f"read its boot log: `procurator logs {name}` while it starts",
            )
        stopping = time.monotonic()
        result = lifecycle.down(host, name, purge=True)
        stopped = time.monotonic() - stopping
    finally:
        leftovers = _leftovers(host, name)
        if leftovers:  # a failure above: take the VM away, then look again
            with contextlib.suppress(ProcuratorError):
                lifecycle.down(host, name, purge=True)
            leftovers = _leftovers(host, name)
        if not bridge_before and not host.state.records():
            network.net_down(host.net)
    if leftovers:
        raise _CheckFailedError(
            f"VM {name!r} left {', '.join(leftovers)} behind", "remove them with `procurator down --purge`"
        )
    gate = (
        f"healthy ({', '.join(f'{c.type} :{c.port}' for c in checks)})"
        if checks
        else "booted (no health checks)"
    )
    how = "gracefully" if result is not None and result.graceful else "by force"
    return _Outcome(
        Status.OK,
        f"{name} ({host.config.hypervisor.backend}) {gate} in {booted:.1f}s, "
        f"stopped {how} in {stopped:.1f}s, nothing left behind",
    )


def _leftovers(host: Host, name: str) -> list[str]:
    found = []
    if host.state.vm_dir(name).exists():
        found.append(f"its directory {host.state.vm_dir(name)}")
    if host.state.volume_dir(name).exists():
        found.append(f"its volumes {host.state.volume_dir(name)}")
    if host.leases().get(name) is not None:
        found.append("its lease")
    taps = [t.name for t in network.list_taps(host.net) if t.vm == name]
    if taps:
        found.append(f"TAPs {', '.join(taps)}")
    return found
