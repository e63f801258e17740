"""The runtime copy of a bundle's VmConfig: the bundle's config plus the host's fields (docs/bundle.md).

Pure: takes the bundle and what the host allocated, returns the body of `vm.create`. Both backends start
from this one dict, so cloud-hypervisor and QEMU boot the same machine.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from procurator.models import Bundle


@dataclass(frozen=True)
class NicBinding:
    id: str
    tap: str
    mac: str


@dataclass(frozen=True)
class GuestAddress:
    ip: str
    prefix: int
    gateway: str
    dns: str | None = None

    def tokens(self) -> list[str]:
        out = [f"procurator.ip={self.ip}/{self.prefix}", f"procurator.gw={self.gateway}"]
        if self.dns:
            out.append(f"procurator.dns={self.dns}")
        return out


def volume_disk_id(volume: str) -> str:
    return f"vol-{volume}"


def runtime_config(
    bundle: Bundle,
    *,
    nics: list[NicBinding],
    volumes: dict[str, Path],
    serial_log: Path,
    address: GuestAddress | None,
) -> dict[str, Any]:
    """Fill the host's fields into a copy of the bundle's VmConfig.

    The serial port (ttyS0) goes to `serial_log`, read by `procurator logs`. The virtio console (hvc0) is
    a `Pty`: cloud-hypervisor refuses `Socket` for the console device (NoSocketOptionSupportForConsoleDevice,
    vmm/src/console_devices.rs) and writes the pty's path back into `console.file`, which `procurator
    console` reads from vm.info; the qemu backend serves it as a UNIX socket instead.

    Every disk says `image_type: "Raw"`: from v51 a raw image whose type is detected gets its sector 0
    writes disabled (vmm/src/device_manager.rs); older releases ignore the unknown field (no config struct
    denies unknown fields).
    """
    config = copy.deepcopy(bundle.vm_config)
    by_id = {n.id: n for n in nics}
    for net in config.get("net", []):
        nic = by_id[net["id"]]
        net["tap"] = nic.tap
        net["mac"] = nic.mac
    disks = config.setdefault("disks", [])
    for volume in bundle.meta.volumes:
        disks.append(
            {"id": volume_disk_id(volume.name), "path": str(volumes[volume.name]), "readonly": False}
        )
    for disk in disks:
        disk.setdefault("image_type", "Raw")
    if not disks:
        del config["disks"]
    pinned = bundle.meta.resources.cpu_affinity
    if pinned:  # cloud-hypervisor's CpuAffinity (from v40.0); the qemu backend pins the vCPU threads itself
        cpus = config["cpus"]
        count = int(cpus.get("max_vcpus", cpus["boot_vcpus"]))
        cpus["affinity"] = [{"vcpu": i, "host_cpus": list(pinned)} for i in range(count)]
    config["serial"] = {"mode": "File", "file": str(serial_log)}
    config["console"] = {"mode": "Pty"}
    if address is not None and nics:
        payload = config["payload"]
        cmdline = payload.get("cmdline", "").split()
        cmdline = [
            t for t in cmdline if not t.startswith(("procurator.ip=", "procurator.gw=", "procurator.dns="))
        ]
        payload["cmdline"] = " ".join([*cmdline, *address.tokens()])
    return config
