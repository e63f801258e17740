"""The worker configuration (docs/worker.md): JSON written by the NixOS worker module, or defaults.

{"stateDir": "/var/lib/procurator",
 "hypervisor": {"backend": "cloud-hypervisor", "binary": null, "accel": "auto"},
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

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from procurator.errors import ConfigError, ValidationError
from procurator.net.config import NetworkConfig

BACKENDS = ("cloud-hypervisor", "qemu")
DEFAULT_API_SOCKET = Path("/run/procurator/api.sock")
DEFAULT_STATE_DIR = Path("/var/lib/procurator")  # state.py re-exports it
DEFAULT_HEALTH_TIMEOUT = 600.0
MAX_CONFIG_BYTES = 1024 * 1024
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

    @classmethod
    def parse(cls, source: str, data: Any) -> WorkerConfig:
        if not isinstance(data, dict):
            raise ValidationError(source, "", "expected a JSON object")
        known = {
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
            "vmUsers",
            "schema",
        }
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValidationError(source, unknown[0], f"unknown setting; known: {', '.join(sorted(known))}")
        hv = data.get("hypervisor") or {}
        if not isinstance(hv, dict):
            raise ValidationError(source, "hypervisor", "expected an object")
        backend = hv.get("backend", "cloud-hypervisor")
        if backend not in BACKENDS:
            raise ValidationError(
                source, "hypervisor.backend", f"{backend!r} is not one of {', '.join(BACKENDS)}"
            )
        accel = hv.get("accel", "auto")
        if accel not in ("auto", "kvm", "tcg"):
            raise ValidationError(source, "hypervisor.accel", f"{accel!r} is not one of auto, kvm, tcg")
        try:
            network = NetworkConfig.parse(data.get("network") or {}, source=source)
        except TypeError as exc:  # pragma: no cover - defensive
            raise ValidationError(source, "network", str(exc)) from exc
        for key in ("stateDir", "user", "apiSocket"):
            if data.get(key) is not None and not isinstance(data[key], str):
                raise ValidationError(source, key, f"expected a string, not {json.dumps(data[key])[:40]}")
        if hv.get("binary") is not None and not isinstance(hv["binary"], str):
            raise ValidationError(source, "hypervisor.binary", "expected a path as a string")
        health_timeout = data.get("healthTimeout", DEFAULT_HEALTH_TIMEOUT)
        if (
            not isinstance(health_timeout, int | float)
            or isinstance(health_timeout, bool)
            or not 1 <= health_timeout <= MAX_HEALTH_TIMEOUT
        ):
            raise ValidationError(
                source,
                "healthTimeout",
                f"expected seconds from 1 to {MAX_HEALTH_TIMEOUT:.0f}, not {health_timeout!r}",
            )
        snapshot_keep = data.get("snapshotKeep", DEFAULT_SNAPSHOT_KEEP)
        if (
            not isinstance(snapshot_keep, int)
            or isinstance(snapshot_keep, bool)
            or not 1 <= snapshot_keep <= MAX_SNAPSHOT_KEEP
        ):
            raise ValidationError(
                source,
                "snapshotKeep",
                f"expected a count of snapshots from 1 to {MAX_SNAPSHOT_KEEP}, not {snapshot_keep!r}",
            )
        serial_max = data.get("serialLogMaxBytes", DEFAULT_SERIAL_LOG_MAX_BYTES)
        low, high = SERIAL_LOG_MAX_BYTES
        if not isinstance(serial_max, int) or isinstance(serial_max, bool) or not low <= serial_max <= high:
            raise ValidationError(
                source,
                "serialLogMaxBytes",
                f"expected bytes from {low} to {high} (1 TiB), not {serial_max!r}",
            )
        state_dir = data.get("stateDir")
        api_socket = data.get("apiSocket")
        metrics_listen = data.get("metricsListen")
        if metrics_listen is not None and (not isinstance(metrics_listen, str) or ":" not in metrics_listen):
            raise ValidationError(source, "metricsListen", f"{metrics_listen!r} is not host:port")
        status_listen = data.get("statusListen")
        if status_listen is not None and (not isinstance(status_listen, str) or ":" not in status_listen):
            raise ValidationError(
                source, "statusListen", f"{status_listen!r} is not host:port, e.g. 127.0.0.1:9478"
            )
        if status_listen is not None and status_listen == metrics_listen:
            raise ValidationError(
                source, "statusListen", "is metricsListen's address too; give it another port"
            )
        status_actions = data.get("statusActions", False)
        if not isinstance(status_actions, bool):
            raise ValidationError(source, "statusActions", f"expected true or false, not {status_actions!r}")
        vm_users = _vm_users(source, data.get("vmUsers"))
        if vm_users is not None and data.get("user") is not None:
            raise ValidationError(
                source, "vmUsers", "excludes `user` (each VM gets a uid of its own); set one of them"
            )
        return cls(
            vm_users=vm_users,
            cgroups=_cgroups(source, data.get("cgroups") or {}),
            watchdog=_watchdog(source, data.get("watchdog") or {}),
            serial_log_max_bytes=serial_max,
            state_dir=Path(state_dir) if state_dir else None,
            hypervisor=HypervisorSettings(backend=backend, binary=hv.get("binary"), accel=accel),
            user=data.get("user"),
            network=network,
            api_socket=Path(api_socket) if api_socket else DEFAULT_API_SOCKET,
            metrics_listen=metrics_listen,
            health_timeout=float(health_timeout),
            snapshot_keep=snapshot_keep,
            status_listen=status_listen,
            status_actions=status_actions,
        )

    @classmethod
    def load(cls, path: Path | None) -> WorkerConfig:
        if path is None:
            return cls()
        try:
            data = json.loads(path.read_bytes()[: MAX_CONFIG_BYTES + 1].decode())
        except FileNotFoundError as exc:
            raise ConfigError(
                f"{path}: no such worker configuration; fix --config/PROCURATOR_CONFIG"
            ) from exc
        except (OSError, ValueError, RecursionError) as exc:  # unreadable, not UTF-8, not JSON
            raise ConfigError(f"{path}: cannot read the worker configuration: {exc}") from exc
        return cls.parse(str(path), data)


def _cgroups(source: str, data: Any) -> CgroupSettings:
    if not isinstance(data, dict):
        raise ValidationError(source, "cgroups", 'expected an object like {"mode": "auto"}')
    unknown = sorted(set(data) - {"mode", "base"})
    if unknown:
        raise ValidationError(source, f"cgroups.{unknown[0]}", "unknown setting; known: base, mode")
    mode = data.get("mode", "auto")
    if mode not in CGROUP_MODES:
        raise ValidationError(source, "cgroups.mode", f"{mode!r} is not one of {', '.join(CGROUP_MODES)}")
    base = data.get("base", "procurator.slice")
    parts = base.split("/") if isinstance(base, str) else []
    if not parts or any(p in ("", ".", "..") or not p.isprintable() for p in parts):
        raise ValidationError(
            source, "cgroups.base", f"{base!r} is not a relative cgroup path like procurator.slice"
        )
    return CgroupSettings(mode=mode, base=base)


def _watchdog(source: str, data: Any) -> WatchdogSettings:
    if not isinstance(data, dict):
        raise ValidationError(source, "watchdog", 'expected an object like {"interval": 10}')
    known = ("enable", "failures", "interval", "timeout")
    unknown = sorted(set(data) - set(known))
    if unknown:
        raise ValidationError(source, f"watchdog.{unknown[0]}", f"unknown setting; known: {', '.join(known)}")
    enable = data.get("enable", True)
    if not isinstance(enable, bool):
        raise ValidationError(source, "watchdog.enable", f"expected true or false, not {enable!r}")
    seconds = {}
    for key, default in (("interval", WatchdogSettings.interval), ("timeout", WatchdogSettings.timeout)):
        value = data.get(key, default)
        if not isinstance(value, int | float) or isinstance(value, bool) or not 0.1 <= value <= 3600:
            raise ValidationError(
                source, f"watchdog.{key}", f"expected seconds from 0.1 to 3600, not {value!r}"
            )
        seconds[key] = float(value)
    failures = data.get("failures", WatchdogSettings.failures)
    if not isinstance(failures, int) or isinstance(failures, bool) or not 1 <= failures <= 100:
        raise ValidationError(
            source, "watchdog.failures", f"expected a count from 1 to 100, not {failures!r}"
        )
    return WatchdogSettings(
        enable=enable, interval=seconds["interval"], timeout=seconds["timeout"], failures=failures
    )


def _vm_users(source: str, data: Any) -> VmUsers | None:
    if data is None:
        return None
    if not isinstance(data, dict):
        raise ValidationError(source, "vmUsers", 'expected an object like {"first": 400000, "count": 1000}')
    known = ("count", "extraGroups", "first")
    unknown = sorted(set(data) - set(known))
    if unknown:
        raise ValidationError(source, f"vmUsers.{unknown[0]}", f"unknown setting; known: {', '.join(known)}")
    low, high = VM_UID_LIMITS
    first, count = data.get("first"), data.get("count")
    if not isinstance(first, int) or isinstance(first, bool) or not low <= first <= high:
        raise ValidationError(source, "vmUsers.first", f"expected a uid from {low} to {high}, not {first!r}")
    if not isinstance(count, int) or isinstance(count, bool) or not 1 <= count <= high - first + 1:
        raise ValidationError(
            source, "vmUsers.count", f"expected a count from 1 to {high - first + 1} (uids end at {high})"
        )
    groups = data.get("extraGroups", [])
    if not isinstance(groups, list) or not all(isinstance(g, str) and g for g in groups):
        raise ValidationError(source, "vmUsers.extraGroups", 'expected a list of group names like ["kvm"]')
    return VmUsers(first=first, count=count, extra_groups=tuple(groups))
