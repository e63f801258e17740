"""Synthetic bundle and deployment directories for tests that need no Nix build."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def vm_config(name: str = "web", *, kernel: str = "/nix/store/k-kernel", nets: int = 1) -> dict[str, Any]:
    return {
        "cpus": {"boot_vcpus": 1, "max_vcpus": 1},
        "memory": {"size": 256 * 1024 * 1024},
        "payload": {
            "kernel": kernel,
            "initramfs": "/nix/store/i-initrd",
            "cmdline": f"console=ttyS0 procurator.name={name}",
        },
        "disks": [{"id": "store", "path": "/nix/store/s-store.img", "readonly": True}],
        "net": [{"id": f"eth{i}"} for i in range(nets)],
        "serial": {"mode": "Tty"},
        "console": {"mode": "Off"},
    }


def meta(name: str = "web", *, nets: int = 1, **extra: Any) -> dict[str, Any]:
    data: dict[str, Any] = {
        "schema": 1,
        "name": name,
        "interfaces": [{"id": f"eth{i}"} for i in range(nets)],
        "volumes": [{"name": "data", "sizeMiB": 16, "fsType": "ext4", "mountPoint": "/mnt/data"}],
        "restart": {"policy": "always", "maxRestarts": 5, "backoffSeconds": 1},
        "health": [{"type": "http", "port": 80, "path": "/health"}],
        "shutdownTimeout": 10,
    }
    data.update(extra)
    return data


def write_bundle(
    root: Path,
    name: str = "web",
    *,
    config: dict[str, Any] | None = None,
    meta_data: dict[str, Any] | None = None,
    dirname: str | None = None,
) -> Path:
    path = root / (dirname or f"0123456789abcdfghijklmnpqrsvwxyz-procurator-vm-{name}")
    path.mkdir(parents=True)
    (path / "vm-config.json").write_text(json.dumps(config if config is not None else vm_config(name)))
    (path / "procurator.json").write_text(json.dumps(meta_data if meta_data is not None else meta(name)))
    return path


def write_deployment(root: Path, host: str, vms: dict[str, Path]) -> Path:
    path = root / f"abcdfghijklmnpqrsvwxyz0123456789-procurator-deployment-{host}"
    path.mkdir(parents=True)
    body = {"schema": 1, "host": host, "vms": {k: str(v) for k, v in vms.items()}}
    (path / "deployment.json").write_text(json.dumps(body))
    return path
