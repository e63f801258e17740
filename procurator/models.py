"""Frozen dataclasses parsed once, at the edge (docs/bundle.md).

`Bundle.load(path)` and `Deployment.load(path)` read a store path, parse and check both JSON contracts and
raise `ValidationError` naming the file and the field when anything is off (procurator/jsonread.py reads
them). Everything past this module works with these types, never with raw JSON, with one exception:
`Bundle.vm_config` is cloud-hypervisor's VmConfig (its contract, not ours), checked here against our schema
of its API (hypervisor/ch-api.schema.json) and in the fields Procurator relies on, then handed on as the
JSON body it is (runtime.py copies it and fills in the host's fields; the qemu backend translates it).
"""

from __future__ import annotations

import functools
import json
import os
import re
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any

from procurator import jsonread, limits
from procurator.errors import ValidationError
from procurator.jsonread import Reader

SCHEMA_VERSION = 1
VM_NAME_MAX = limits.VM_NAME_MAX

# Limits on what a bundle or deployment may say, each refused at load (so at `plan`, before anything is
# changed) with the field named. Those Nix checks at build too are in procurator/limits.json, one table
# both read (procurator/limits.py says why each value); the hypervisor's are cloud-hypervisor's (v40-v53):
MAX_INPUT_BYTES = 4 * 1024 * 1024  # procurator.json, vm-config.json, deployment.json
MAX_VCPUS = limits.MAX_VCPUS
PAGE_SIZE = 4096  # guest memory is mapped in pages: a size that is not a multiple is MisalignedMemorySize
MIN_MEMORY = 1024 * 1024
MAX_MEMORY = limits.MAX_MEMORY_MIB * 1024 * 1024
MAX_VOLUME_MIB = limits.MAX_VOLUME_MIB
MAX_SECONDS = limits.MAX_SECONDS  # health intervals and timeouts, restart backoff, shutdown timeout
MAX_HEALTH_RETRIES = limits.MAX_HEALTH_RETRIES
MAX_RESTARTS = limits.MAX_RESTARTS
# Resources (docs/bundle.md): the VM's cgroup (procurator/cgroup.py) and its vCPUs' host CPUs.
MIB = 1024 * 1024
# The default memory limit is guest RAM plus the VMM's own, by backend: cloud-hypervisor's is small (its
# devices and buffers); QEMU's, under TCG (software emulation), holds a translation cache of up to 1 GiB
# and was OOM-killed at 128 MiB here while booting a 256 MiB guest, so it gets more.
VMM_OVERHEAD_MIB = limits.VMM_OVERHEAD_MIB
VMM_OVERHEAD_MIB_BY_BACKEND = {"cloud-hypervisor": VMM_OVERHEAD_MIB, "qemu": 512}
MIN_MEMORY_MAX_MIB = limits.MIN_MEMORY_MAX_MIB  # below this no hypervisor starts at all
MAX_WEIGHT = limits.MAX_WEIGHT  # cgroup v2 cpu.weight and io.weight: 1-10000, 100 the default
MAX_HOST_CPU = limits.MAX_HOST_CPU  # a host CPU index (NR_CPUS on x86_64 distributions is at most 8192)
_DNS_LABEL = re.compile(r"^[a-z0-9]([a-z0-9-]*[a-z0-9])?$")
_IFACE_ID = re.compile(rf"^[a-z0-9]{{1,{limits.INTERFACE_ID_MAX}}}$")
_MAC = re.compile(r"^[0-9a-f]{2}(:[0-9a-f]{2}){5}$")
_STORE_NAME = re.compile(r"^([0-9a-df-np-sv-z]{32})-(.+)$")


def is_dns_label(name: str, max_len: int = limits.DNS_LABEL_MAX) -> bool:
    return len(name) <= max_len and bool(_DNS_LABEL.match(name))


def store_hash(path: Path) -> str:
    """The generation of a store path: its 32-character hash ('' if it is not a store path name)."""
    m = _STORE_NAME.match(path.name)
    return m.group(1) if m else ""


def _load_json(path: Path) -> Any:
    try:
        return jsonread.read_file(path, MAX_INPUT_BYTES)
    except FileNotFoundError as exc:
        raise ValidationError(str(path), "", "missing; is this a Procurator bundle/deployment?") from exc


def _versioned(source: str, data: Any, what: str) -> Reader:
    return Reader.versioned(source, data, SCHEMA_VERSION, what=what, fix="upgrade it")


class RestartPolicy(StrEnum):
    ALWAYS = "always"
    ON_FAILURE = "on-failure"
    NEVER = "never"


@dataclass(frozen=True)
class Interface:
    id: str
    mac: str | None = None


@dataclass(frozen=True)
class Volume:
    name: str
    size_mib: int
    fs_type: str = "ext4"
    mount_point: str = ""


@dataclass(frozen=True)
class Restart:
    policy: RestartPolicy = RestartPolicy.ALWAYS
    max_restarts: int = 5
    backoff_seconds: float = 1.0
    from_snapshot: bool = False  # host shutdown snapshots the VM, and its next start restores that snapshot


@dataclass(frozen=True)
class HealthCheck:
    type: str  # "tcp" | "http"
    port: int
    path: str = "/"
    expect_status: int = 200
    interval_seconds: float = 2.0
    timeout_seconds: float = 2.0
    retries: int = 30


@dataclass(frozen=True)
class Resources:
    """What the VM's hypervisor may use on the host: its cgroup's limits and its vCPUs' host CPUs."""

    memory_max_mib: int | None = None  # None: guest RAM + VMM_OVERHEAD_MIB
    cpu_quota_percent: int | None = None  # of one host CPU (150: one and a half); None: no quota
    cpu_weight: int = 100
    io_weight: int = 100
    cpu_affinity: tuple[int, ...] = ()  # host CPUs every vCPU may run on; (): any

    def memory_max(self, guest_bytes: int, overhead_mib: int = VMM_OVERHEAD_MIB) -> int:
        """The group's memory limit in bytes: the bundle's, or guest RAM plus the backend's overhead."""
        if self.memory_max_mib is not None:
            return self.memory_max_mib * MIB
        return guest_bytes + overhead_mib * MIB

    @classmethod
    def parse(cls, r: Reader) -> Resources:
        def optional(key: str, maximum: int) -> int | None:
            return None if r.data.get(key) is None else r.integer(key, maximum=maximum)

        memory = optional("memoryMaxMiB", MAX_MEMORY // MIB + VMM_OVERHEAD_MIB)
        if memory is not None and memory < MIN_MEMORY_MAX_MIB:
            raise r.fail("memoryMaxMiB", f"must be at least {MIN_MEMORY_MAX_MIB}, found {memory}")
        affinity = r.array("cpuAffinity")
        for index, cpu in enumerate(affinity):
            if isinstance(cpu, bool) or not isinstance(cpu, int) or not 0 <= cpu <= MAX_HOST_CPU:
                raise r.fail("cpuAffinity", f"[{index}] {cpu!r} is not a host CPU number 0-{MAX_HOST_CPU}")
        if len(set(affinity)) != len(affinity):
            raise r.fail("cpuAffinity", f"names a CPU more than once: {affinity}")
        return cls(
            memory_max_mib=memory,
            cpu_quota_percent=optional("cpuQuotaPercent", 100 * MAX_VCPUS),
            cpu_weight=r.integer("cpuWeight", 100, maximum=MAX_WEIGHT),
            io_weight=r.integer("ioWeight", 100, maximum=MAX_WEIGHT),
            cpu_affinity=tuple(sorted(affinity)),
        )


class ReplaceStrategy(StrEnum):
    RECREATE = "recreate"
    BLUE_GREEN = "blue-green"


@dataclass(frozen=True)
class Replace:
    """How an apply replaces the running generation (docs/architecture.md, "Blue-green replace")."""

    strategy: ReplaceStrategy = ReplaceStrategy.RECREATE
    drain_seconds: int = 5

    @classmethod
    def parse(cls, r: Reader) -> Replace:
        try:
            strategy = ReplaceStrategy(r.text("strategy", "recreate"))
        except ValueError as exc:
            raise r.fail("strategy", "must be recreate or blue-green") from exc
        return cls(strategy, r.integer("drainSeconds", 5, minimum=0, maximum=MAX_SECONDS))


@dataclass(frozen=True)
class VmMeta:
    """procurator.json: what Procurator needs beyond the hypervisor config."""

    name: str
    interfaces: tuple[Interface, ...]
    volumes: tuple[Volume, ...]
    restart: Restart
    health: tuple[HealthCheck, ...]
    shutdown_timeout: int
    resources: Resources = Resources()  # absent from bundles built before it: every default
    replace: Replace = Replace()  # absent from bundles built before it: recreate

    @classmethod
    def parse(cls, source: str, data: Any) -> VmMeta:
        r = _versioned(source, data, "a bundle's procurator.json")
        name = r.text("name")
        if not is_dns_label(name, VM_NAME_MAX):
            raise r.fail(
                "name", f"{name!r} is not a DNS label of at most {VM_NAME_MAX} characters (a-z, 0-9, '-')"
            )
        interfaces = []
        for item in r.items("interfaces"):
            iface = Interface(item.text("id"), item.opt_text("mac"))
            if not _IFACE_ID.match(iface.id):
                raise item.fail(
                    "id", f"{iface.id!r} must be 1-{limits.INTERFACE_ID_MAX} characters of a-z and 0-9"
                )
            if iface.mac is not None and not _MAC.match(iface.mac):
                raise item.fail("mac", f"{iface.mac!r} is not a lower-case MAC like 02:00:00:00:00:01")
            interfaces.append(iface)
        ids = [i.id for i in interfaces]
        if len(set(ids)) != len(ids):
            raise r.fail("interfaces", f"interface ids must be unique, found {ids}")
        volumes = []
        for item in r.items("volumes"):
            vol = Volume(
                name=item.text("name"),
                size_mib=item.integer("sizeMiB", maximum=MAX_VOLUME_MIB),
                fs_type=item.text("fsType", "ext4"),
                mount_point=item.text("mountPoint", ""),
            )
            label_max = limits.volume_name_max(vol.fs_type)
            if not is_dns_label(vol.name, label_max):
                raise item.fail(
                    "name",
                    f"{vol.name!r} is not a DNS label of at most {label_max} characters (it is the "
                    f"{vol.fs_type} label VM {name!r} mounts it by); rename the volume",
                )
            if vol.fs_type not in {"ext4", "ext2", "ext3", "xfs", "btrfs"}:
                raise item.fail("fsType", f"unsupported filesystem {vol.fs_type!r} (use ext4)")
            volumes.append(vol)
        vol_names = [v.name for v in volumes]
        if len(set(vol_names)) != len(vol_names):
            raise r.fail("volumes", f"volume names must be unique, found {vol_names}")
        rr = r.obj("restart")
        try:
            policy = RestartPolicy(rr.text("policy", "always"))
        except ValueError as exc:
            raise rr.fail("policy", "must be one of always, on-failure, never") from exc
        restart = Restart(
            policy,
            rr.integer("maxRestarts", 5, minimum=0, maximum=MAX_RESTARTS),
            float(rr.integer("backoffSeconds", 1, minimum=0, maximum=MAX_SECONDS)),
            rr.boolean("fromSnapshot", default=False),
        )
        health = []
        for item in r.items("health"):
            kind = item.text("type")
            if kind not in {"tcp", "http"}:
                raise item.fail("type", f"{kind!r} must be tcp or http")
            port = item.integer("port", maximum=65535)
            health.append(
                HealthCheck(
                    type=kind,
                    port=port,
                    path=item.text("path", "/"),
                    expect_status=item.integer("expectStatus", 200, minimum=100, maximum=599),
                    interval_seconds=float(item.integer("intervalSeconds", 2, maximum=MAX_SECONDS)),
                    timeout_seconds=float(item.integer("timeoutSeconds", 2, maximum=MAX_SECONDS)),
                    retries=item.integer("retries", 30, maximum=MAX_HEALTH_RETRIES),
                )
            )
        return cls(
            name=name,
            interfaces=tuple(interfaces),
            volumes=tuple(volumes),
            restart=restart,
            health=tuple(health),
            shutdown_timeout=r.integer("shutdownTimeout", 30, maximum=MAX_SECONDS),
            resources=Resources.parse(r.obj("resources")),
            replace=_replace(r, volumes, interfaces),
        )


def _replace(r: Reader, volumes: list[Volume], interfaces: list[Interface]) -> Replace:
    """`replace`, refused as mkSpec refuses it: blue-green runs two generations at once."""
    found = Replace.parse(r.obj("replace"))
    if found.strategy is ReplaceStrategy.BLUE_GREEN and volumes:
        names = ", ".join(v.name for v in volumes)
        raise r.fail(
            "replace.strategy",
            f"blue-green cannot be used with writable volumes ({names}): a volume allows one writer; "
            "rebuild with strategy recreate",
        )
    if found.strategy is ReplaceStrategy.BLUE_GREEN and any(i.mac for i in interfaces):
        raise r.fail("replace.strategy", "blue-green cannot be used with fixed interface MACs; drop them")
    return found


def _check_vm_config(source: str, data: Any, meta: VmMeta) -> dict[str, Any]:
    """The checks on vm-config.json that Procurator relies on (the spec itself is checked in the tests)."""
    r = Reader(source, data)
    payload = r.obj("payload", required=True)
    for key in ("kernel", "initramfs"):
        value = payload.opt_text(key)
        if value is not None and not Path(value).is_absolute():
            raise payload.fail(key, f"{value!r} must be an absolute store path")
    payload.text("kernel")
    unknown = _unknown_field(data)
    if unknown:
        raise ValidationError(
            source, unknown, "not a cloud-hypervisor setting Procurator passes on (a typo?); remove it"
        )
    cpus = r.obj("cpus", required=True)
    boot = cpus.integer("boot_vcpus", maximum=MAX_VCPUS)
    cpus.integer("max_vcpus", boot, minimum=boot, maximum=MAX_VCPUS)
    memory = r.obj("memory", required=True)
    size = memory.integer("size", minimum=MIN_MEMORY, maximum=MAX_MEMORY)
    if size % PAGE_SIZE:
        raise memory.fail("size", f"{size} bytes is not a multiple of the {PAGE_SIZE}-byte page")
    limit = meta.resources.memory_max_mib
    if limit is not None and limit * MIB <= size:
        raise ValidationError(
            source.replace("vm-config.json", "procurator.json"),
            "resources.memoryMaxMiB",
            f"{limit} MiB is not above the guest's {size // MIB} MiB of RAM; allow it and the VMM's "
            f"overhead (about {VMM_OVERHEAD_MIB} MiB), or leave it out for that default",
        )
    ids = [f"vol-{v.name}" for v in meta.volumes]  # the ids the host gives the volumes' disks
    for item in r.items("disks"):
        ids.append(_device_id(item))
        if not item.data.get("readonly", False):
            raise item.fail("readonly", "bundle disks must be read-only (writable disks are volumes)")
    net_ids = []
    for item in r.items("net"):
        net_ids.append(_device_id(item))
        for host_field in ("tap", "ip", "mask", "host_mac"):
            if host_field in item.data:
                raise item.fail(host_field, "belongs to the host, not the bundle; remove it")
    ids += net_ids
    if len(set(ids)) != len(ids):
        raise r.fail("disks", f"device ids must be unique (cloud-hypervisor's IdentifierNotUnique): {ids}")
    if net_ids != [i.id for i in meta.interfaces]:
        raise r.fail("net", f"ids {net_ids} do not match procurator.json interfaces")
    return r.data


def _device_id(item: Reader) -> str:
    value = item.text("id")
    if value.startswith("__"):  # reserved for cloud-hypervisor's own devices (InvalidIdentifier)
        raise item.fail("id", f"{value!r} must not start with '__'")
    return value


@functools.cache
def _schema_defs() -> dict[str, Any]:
    """`$defs` of Procurator's schema of cloud-hypervisor's API (shipped beside its client)."""
    path = Path(__file__).parent / "hypervisor" / "ch-api.schema.json"
    defs: dict[str, Any] = json.loads(path.read_text())["$defs"]
    return defs


def _unknown_field(config: Any) -> str:
    """The dotted path of the first field of `config` our VmConfig schema does not know; '' if none."""
    defs = _schema_defs()

    def walk(node: dict[str, Any], value: Any, where: str) -> str:
        while "$ref" in node:
            node = defs[node["$ref"].rsplit("/", 1)[1]]
        if isinstance(value, dict) and "properties" in node:
            known: dict[str, Any] = node["properties"]
            for key, inner in value.items():
                path = f"{where}.{key}" if where else key
                if key not in known:
                    if node.get("additionalProperties") is False:
                        return path
                    continue
                found = walk(known[key], inner, path)
                if found:
                    return found
        elif isinstance(value, list) and isinstance(node.get("items"), dict):
            for i, inner in enumerate(value):
                found = walk(node["items"], inner, f"{where}[{i}]")
                if found:
                    return found
        return ""

    return walk(defs["VmConfig"], config, "")


@dataclass(frozen=True)
class Bundle:
    """One VM's build output. Its store path is its generation."""

    path: Path
    meta: VmMeta
    # The VmConfig as built, checked by _check_vm_config; the one raw JSON past this module (see above).
    # Never mutated: copy it before filling in host fields (runtime.py).
    vm_config: dict[str, Any]

    @property
    def name(self) -> str:
        return self.meta.name

    @property
    def generation(self) -> str:
        return store_hash(self.path) or self.path.name

    @property
    def vcpus(self) -> int:
        return int(self.vm_config["cpus"]["boot_vcpus"])

    @classmethod
    def is_bundle(cls, path: Path) -> bool:
        try:
            return (path / "procurator.json").is_file() and (path / "vm-config.json").is_file()
        except (OSError, ValueError):  # a name too long, a NUL byte: not a bundle
            return False

    @classmethod
    def load(cls, path: Path) -> Bundle:
        meta_file = path / "procurator.json"
        meta = VmMeta.parse(str(meta_file), _load_json(meta_file))
        config_file = path / "vm-config.json"
        config = _check_vm_config(str(config_file), _load_json(config_file), meta)
        return cls(path=path, meta=meta, vm_config=config)

    def check_links(self) -> None:
        """A built bundle links what its payload boots (`kernel`, and `initrd` with an initramfs): the
        links keep them in the bundle's closure. Refused (naming the link) when one is missing or points
        elsewhere."""
        payload = self.vm_config["payload"]
        for link, key in (("kernel", "kernel"), ("initrd", "initramfs")):
            target = payload.get(key)
            if target is None:
                continue
            path = self.path / link
            try:
                found = os.readlink(path)
            except OSError as exc:
                raise ValidationError(
                    str(path), "", f"missing (a bundle links its {key}, {target}); rebuild the bundle"
                ) from exc
            if found != target:
                raise ValidationError(str(path), "", f"points at {found}, not at payload.{key} {target}")

    def to_json(self) -> dict[str, Any]:
        return {"kind": "bundle", "name": self.name, "path": str(self.path), "generation": self.generation}


@dataclass(frozen=True)
class Deployment:
    """What one worker host should run: VM name -> bundle store path."""

    path: Path
    host: str
    vms: dict[str, Path]

    @property
    def generation(self) -> str:
        return store_hash(self.path) or self.path.name

    @classmethod
    def is_deployment(cls, path: Path) -> bool:
        try:
            return (path / "deployment.json").is_file()
        except (OSError, ValueError):  # a name too long, a NUL byte: not a deployment
            return False

    @classmethod
    def load(cls, path: Path) -> Deployment:
        source = path / "deployment.json"
        r = _versioned(str(source), _load_json(source), "a deployment.json")
        host = r.text("host")
        if not is_dns_label(host):
            raise r.fail("host", f"{host!r} is not a DNS label")
        vms_r = r.obj("vms", required=True)
        vms: dict[str, Path] = {}
        for name in vms_r.data:
            if not is_dns_label(name, VM_NAME_MAX):
                raise vms_r.fail(name, f"VM names must be DNS labels of at most {VM_NAME_MAX} characters")
            target = vms_r.text(name)
            if not target.startswith("/") or "\0" in target or len(target) > 4096:
                raise vms_r.fail(name, f"{target[:80]!r} is not an absolute store path of a bundle")
            vms[name] = Path(target)
        return cls(path=path, host=host, vms=vms)

    def bundles(self) -> list[Bundle]:
        """Load every bundle the deployment names, checking each one's name matches its key."""
        out = []
        for name, bundle_path in sorted(self.vms.items()):
            bundle = Bundle.load(bundle_path)
            if bundle.name != name:
                raise ValidationError(
                    str(self.path / "deployment.json"),
                    f"vms.{name}",
                    f"points at a bundle named {bundle.name!r}; rename one of them",
                )
            out.append(bundle)
        return out

    def to_json(self) -> dict[str, Any]:
        return {
            "kind": "deployment",
            "host": self.host,
            "path": str(self.path),
            "generation": self.generation,
            "vms": {k: str(v) for k, v in sorted(self.vms.items())},
        }
