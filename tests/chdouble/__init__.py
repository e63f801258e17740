"""A test double of the `cloud-hypervisor` binary (see double.py); `BINARY` is its executable."""

from __future__ import annotations

from pathlib import Path
from typing import Any

BINARY = Path(__file__).resolve().with_name("cloud-hypervisor")


def sample_config(vm_dir: Path, kernel: Path, *, tap: str | None = None) -> dict[str, Any]:
    """A runtime VmConfig that validates against our schema of the API and that the double can boot.

    Its net entry names no `tap` unless given one: the double then opens no TAP (it does not simulate
    cloud-hypervisor creating its own vmtapN), so a test in the host's network namespace touches none of
    the host's interfaces. With `tap`, the double opens that TAP at vm.boot as cloud-hypervisor does: run
    it in a throwaway namespace (tests/support/netns.py). Its disk is `store.img` in `vm_dir`, made here
    (1 MiB of zeros, sparse) when missing: the double opens, types and locks it at vm.boot."""
    store = vm_dir / "store.img"
    if not store.exists():
        with store.open("wb") as image:
            image.truncate(1 << 20)
    net: dict[str, Any] = {"id": "eth0", "mac": "02:00:00:00:00:01"}
    if tap is not None:
        net["tap"] = tap
    return {
        "cpus": {"boot_vcpus": 1, "max_vcpus": 1},
        "memory": {"size": 256 << 20},
        "payload": {"kernel": str(kernel), "cmdline": "console=ttyS0 panic=-1"},
        "disks": [{"id": "store", "path": str(store), "readonly": True}],
        "net": [net],
        "serial": {"mode": "File", "file": str(vm_dir / "serial.log")},
        "console": {"mode": "Off"},
    }
