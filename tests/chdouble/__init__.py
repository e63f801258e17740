"""A test double of the `cloud-hypervisor` binary (see double.py); `BINARY` is its executable."""

from __future__ import annotations

from pathlib import Path
from typing import Any

BINARY = Path(__file__).resolve().with_name("cloud-hypervisor")


def sample_config(vm_dir: Path, kernel: Path) -> dict[str, Any]:
    """A runtime VmConfig that validates against our schema of the API and that the double can boot."""
    return {
        "cpus": {"boot_vcpus": 1, "max_vcpus": 1},
        "memory": {"size": 256 << 20},
        "payload": {"kernel": str(kernel), "cmdline": "console=ttyS0 panic=-1"},
        "disks": [{"id": "store", "path": str(kernel), "readonly": True}],
        "net": [{"id": "eth0", "tap": "pc-test-eth0", "mac": "02:00:00:00:00:01"}],
        "serial": {"mode": "File", "file": str(vm_dir / "serial.log")},
        "console": {"mode": "Off"},
    }
