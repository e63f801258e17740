"""The worker configuration (docs/worker.md): JSON written by the NixOS worker module, or defaults.

{"stateDir": "/var/lib/procurator",
 "hypervisor": {"backend": "cloud-hypervisor", "binary": null, "accel": "auto", "landlock": true},
 "user": null,
 "network": {"bridge": "procurator0", "subnet": "10.100.0.0/16", "gateway": "10.100.0.1",
             "uplink": null, "nat": false, "isolate": false, "netns": null},
 "apiSocket": "/run/procurator/api.sock",
 "metricsListen": null,
 "healthTimeout": 600,
 "snapshotKeep": 3,
 "statusListen": null,
 "statusActions": false,
 "cgroups": {"mode": "auto", "base": "procurator.slice"},
 "watchdog": {"enable": true, "interval": 10, "timeout": 3, "failures": 3},
 "serialLogMaxBytes": 8388608,
 "vmUsers": null}

`schema` is 1 (the NixOS module writes it; a hand-written file may leave it out); every key and value is
checked (procurator/jsonread.py), a null section or optional string meaning unset. `user` is the user the
hypervisors run as (a user name; null: the worker's own), `hypervisor.binary` the hypervisor's path.
`metricsListen` ("127.0.0.1:9477", "[::1]:9477") also serves the worker's Prometheus metrics over TCP.
`statusListen` ("127.0.0.1:9478") serves the status page over TCP (it is always on the API socket);
`statusActions` enables its forms (restart, apply, rollback) for the socket and loopback peers.
`healthTimeout` caps, in seconds, how long one start waits for its health checks, whatever a bundle's
checks allow (their intervals times their retries). `snapshotKeep` is how many snapshots
`procurator snapshot` keeps per VM (the oldest beyond it are removed; `--keep` overrides it).
`cgroups.mode`: `auto` boxes each hypervisor in a cgroup of its own when the host mounts the memory and
cpu controllers (and runs it without one, with a warning, when not), `required` refuses to start a VM
without one, `off` never makes one. `cgroups.base` is where cgroup v2 groups go under the unified
hierarchy (the NixOS module points it at the worker unit's delegated subtree); v1 ignores it.
`watchdog`: the worker pings each running (or paused) VM's hypervisor every `interval` seconds
(cloud-hypervisor `vmm.ping`, QEMU QMP `query-status`), each ping bounded by `timeout` seconds; after
`failures` failed pings in a row it kills the hypervisor, and the restart policy decides what follows.
`serialLogMaxBytes` caps each VM's `serial.log` (both backends: a serial keeper writes it): past it the log
becomes `serial.log.1` (the previous one dropped), so a VM's serial output takes at most twice this.
`vmUsers` ({"first": 400000, "count": 1000, "extraGroups": ["kvm"]}) runs each VM's hypervisor as a uid
of its own from that range (its gid the same number, plus the supplementary `extraGroups`); see
procurator/vmusers.py. It excludes `user`; without either, hypervisors run as the worker (root).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from procurator import configfile, jsonread
from procurator.errors import ConfigError, ValidationError
from procurator.jsonread import Reader, shown
from procurator.net.config import NetworkConfig

CONFIG_SCHEMA = 1
BACKENDS = ("cloud-hypervisor", "qemu")
ACCELS = ("auto", "kvm", "tcg")
_USER_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_.-]{0,31}")  # useradd's NAME_REGEX, widened as systemd's
_KNOWN = (
    "vmUsers",
    "stateDir",
    "hypervisor",
    "user",
    "network",
    "apiSocket",
    "metricsListen",
    "healthTimeout",
    "snapshotKeep",
    "statusListen",
    "statusActions",
    "cgroups",
    "watchdog",
    "serialLogMaxBytes",
    "schema",
)
DEFAULT_API_SOCKET = Path(configfile.API_SOCKET)
DEFAULT_STATE_DIR = Path(configfile.STATE_DIR)  # state.py re-exports it
DEFAULT_HEALTH_TIMEOUT = 600.0
MAX_CONFIG_BYTES = configfile.MAX_BYTES
MAX_HEALTH_TIMEOUT = 86400.0
DEFAULT_SNAPSHOT_KEEP = 3
MAX_SNAPSHOT_KEEP = 1000
DEFAULT_SERIAL_LOG_MAX_BYTES = 8 << 20  # serial_keeper.DEFAULT_MAX_BYTES
SERIAL_LOG_MAX_BYTES = (4096, 1 << 40)


@dataclass(frozen=True)
class HypervisorSettings:
    backend: str = "cloud-hypervisor"
    binary: str | None = None
    accel: str = "auto"  # qemu only: auto | kvm | tcg
    landlock: bool = True  # cloud-hypervisor only: Landlock where the release and kernel have it


CGROUP_MODES = ("auto", "required", "off")


@dataclass(frozen=True)
class CgroupSettings:
    mode: str = "auto"
    base: str = "procurator.slice"  # v2: relative to the cgroup2 mount


@dataclass(frozen=True)
class WatchdogSettings:
    """The worker's pings of each hypervisor's API (see the module docstring)."""

    enable: bool = True
    interval: float = 10.0  # seconds between two pings of one VM
    timeout: float = 3.0  # seconds one ping may take
    failures: int = 3  # failed pings in a row that get the hypervisor killed


@dataclass(frozen=True)
class VmUsers:
    """The uid range each VM's hypervisor gets a uid of its own from (procurator/vmusers.py)."""

    first: int
    count: int
    extra_groups: tuple[str, ...] = ()

    @property
    def last(self) -> int:
        return self.first + self.count - 1

    def describe(self) -> str:
        return f"vmUsers {self.first}-{self.last}"


VM_UID_LIMITS = (1000, 2**32 - 2)  # below: system users; 2^32-1 is the kernel's "no uid"


@dataclass(frozen=True)
class WorkerConfig:
    state_dir: Path | None = None
    hypervisor: HypervisorSettings = field(default_factory=HypervisorSettings)
    user: str | None = None
    network: NetworkConfig = field(default_factory=NetworkConfig)
    api_socket: Path = DEFAULT_API_SOCKET
    metrics_listen: str | None = None  # host:port for the worker's /metrics over TCP
    health_timeout: float = DEFAULT_HEALTH_TIMEOUT  # seconds: the cap on one start's health wait
    snapshot_keep: int = DEFAULT_SNAPSHOT_KEEP  # snapshots kept per VM
    status_listen: str | None = None  # host:port for the status page over TCP
    status_actions: bool = False  # the status page's forms
    cgroups: CgroupSettings = field(default_factory=CgroupSettings)
    watchdog: WatchdogSettings = field(default_factory=WatchdogSettings)
    serial_log_max_bytes: int = DEFAULT_SERIAL_LOG_MAX_BYTES  # serial.log rotates to serial.log.1 past it
    vm_users: VmUsers | None = None  # a uid per VM from this range (None: all run as `user`, or as us)
    # configfile.digest of the file `load` read (None: the defaults); the worker's GET /vms names it
    digest: str | None = field(default=None, compare=False)

    @classmethod
    def parse(cls, source: str, data: Any) -> WorkerConfig:
        """The configuration in `data` (read from `source`), every setting checked. A null section or
        optional string is unset (NixOS writes null for those); `schema` may be left out by hand."""
        r = Reader(source, data)
        r.only(_KNOWN)
        if r.has("schema"):
            Reader.versioned(source, data, CONFIG_SCHEMA, what="a worker configuration", fix="upgrade it")
        hv = r.obj("hypervisor", nullable=True)
        hv.only(("backend", "binary", "accel", "landlock"))
        backend = hv.choice("backend", BACKENDS, "cloud-hypervisor")
        accel = hv.choice("accel", ACCELS, "auto")
        binary = hv.opt_text("binary", nonempty=True, what="a path as a string")
        if binary is not None and "\0" in binary:
            raise hv.fail("binary", f"{shown(binary)} is not a path")
        network = NetworkConfig.read(r.obj("network", nullable=True))
        state_dir = r.opt_text("stateDir", nonempty=True)
        api_socket = r.opt_text("apiSocket", nonempty=True)
        user = r.opt_text("user")
        if user is not None and not _USER_NAME.fullmatch(user):
            raise r.fail(
                "user",
                f"{shown(user)} is not a user name (1-32 letters, digits, '_', '.', '-', not a digit first)",
            )
        health_timeout = r.number(
            "healthTimeout",
            DEFAULT_HEALTH_TIMEOUT,
            minimum=1,
            maximum=MAX_HEALTH_TIMEOUT,
            what=f"seconds from 1 to {MAX_HEALTH_TIMEOUT:.0f}",
        )
        snapshot_keep = r.integer(
            "snapshotKeep",
            DEFAULT_SNAPSHOT_KEEP,
            maximum=MAX_SNAPSHOT_KEEP,
            what=f"a count of snapshots from 1 to {MAX_SNAPSHOT_KEEP}",
        )
        low, high = SERIAL_LOG_MAX_BYTES
        serial_max = r.integer(
            "serialLogMaxBytes",
            DEFAULT_SERIAL_LOG_MAX_BYTES,
            minimum=low,
            maximum=high,
            what=f"bytes from {low} to {high} (1 TiB)",
        )
        metrics_listen = r.opt_text("metricsListen")
        if metrics_listen is not None and ":" not in metrics_listen:
            raise r.fail("metricsListen", f"{metrics_listen!r} is not host:port")
        status_listen = r.opt_text("statusListen")
        if status_listen is not None and ":" not in status_listen:
            raise r.fail("statusListen", f"{status_listen!r} is not host:port, e.g. 127.0.0.1:9478")
        if status_listen is not None and status_listen == metrics_listen:
            raise r.fail("statusListen", "is metricsListen's address too; give it another port")
        vm_users = (
            _vm_users(
                r.obj("vmUsers", nullable=True, expected='an object like {"first": 400000, "count": 1000}')
            )
            if r.data.get("vmUsers") is not None
            else None
        )
        if vm_users is not None and user is not None:
            raise r.fail("vmUsers", "excludes `user` (each VM gets a uid of its own); set one of them")
        return cls(
            vm_users=vm_users,
            cgroups=_cgroups(r.obj("cgroups", nullable=True, expected='an object like {"mode": "auto"}')),
            watchdog=_watchdog(r.obj("watchdog", nullable=True, expected='an object like {"interval": 10}')),
            serial_log_max_bytes=serial_max,
            state_dir=Path(state_dir) if state_dir else None,
            hypervisor=HypervisorSettings(
                backend=backend, binary=binary, accel=accel, landlock=hv.boolean("landlock", True)
            ),
            user=user,
            network=network,
            api_socket=Path(api_socket) if api_socket else DEFAULT_API_SOCKET,
            metrics_listen=metrics_listen,
            health_timeout=health_timeout,
            snapshot_keep=snapshot_keep,
            status_listen=status_listen,
            status_actions=r.boolean("statusActions", False),
        )

    @classmethod
    def load(cls, path: Path | None) -> WorkerConfig:
        if path is None:
            return cls()
        try:
            raw = jsonread.read_bytes(path, MAX_CONFIG_BYTES)
            data = jsonread.parse_text(str(path), raw)
        except FileNotFoundError as exc:
            raise ConfigError(
                f"{path}: no such worker configuration; fix --config/PROCURATOR_CONFIG"
            ) from exc
        except ValidationError as exc:  # unreadable, too large, not UTF-8, not JSON
            where = f"{exc.field}: " if exc.field else ""
            raise ConfigError(f"{path}: cannot read the worker configuration: {where}{exc.problem}") from exc
        return replace(cls.parse(str(path), data), digest=configfile.digest(raw))


def _cgroups(r: Reader) -> CgroupSettings:
    r.only(("mode", "base"))
    mode = r.choice("mode", CGROUP_MODES, "auto")
    base = r.text("base", "procurator.slice")
    parts = base.split("/")
    if not parts or any(p in ("", ".", "..") or not p.isprintable() for p in parts):
        raise r.fail("base", f"{base!r} is not a relative cgroup path like procurator.slice")
    return CgroupSettings(mode=mode, base=base)


def _watchdog(r: Reader) -> WatchdogSettings:
    r.only(("enable", "failures", "interval", "timeout"))
    seconds = {
        key: r.number(key, default, minimum=0.1, maximum=3600, what="seconds from 0.1 to 3600")
        for key, default in (("interval", WatchdogSettings.interval), ("timeout", WatchdogSettings.timeout))
    }
    return WatchdogSettings(
        enable=r.boolean("enable", True),
        interval=seconds["interval"],
        timeout=seconds["timeout"],
        failures=r.integer("failures", WatchdogSettings.failures, maximum=100, what="a count from 1 to 100"),
    )


def _vm_users(r: Reader) -> VmUsers:
    r.only(("count", "extraGroups", "first"))
    low, high = VM_UID_LIMITS
    first = r.integer("first", minimum=low, maximum=high, what=f"a uid from {low} to {high}")
    count = r.integer(
        "count",
        minimum=1,
        maximum=high - first + 1,
        what=f"a count from 1 to {high - first + 1} (uids end at {high})",
    )
    groups = r.strings("extraGroups", nonempty=True)
    return VmUsers(first=first, count=count, extra_groups=groups)
