"""Persistent volumes: `<state>/volumes/<vm>/<volume>.img`, formatted with the volume's name as label.

They survive stops, restarts and replacements; only `down --purge` removes them.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from procurator import process
from procurator.errors import ProcuratorError, StateError
from procurator.models import Volume
from procurator.state import StateDir

MIB = 1024 * 1024
# How each mkfs is told to be quiet and to format a regular file without asking.
_FORCE = {
    "ext2": ("-q", "-F"),
    "ext3": ("-q", "-F"),
    "ext4": ("-q", "-F"),
    "xfs": ("-q", "-f"),
    "btrfs": ("-q", "-f"),
}


def volume_path(state: StateDir, vm: str, volume: Volume) -> Path:
    return state.volume_dir(vm) / f"{volume.name}.img"


def ensure_volume(state: StateDir, vm: str, volume: Volume) -> Path:
    """Create and format the volume if it does not exist yet; an existing one is left as it is."""
    path = volume_path(state, vm, volume)
    if path.exists():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.new")
    try:
        with open(tmp, "wb") as f:
            f.truncate(volume.size_mib * MIB)
        process.run(
            [f"mkfs.{volume.fs_type}", *_FORCE[volume.fs_type], "-L", volume.name, str(tmp)], timeout=120
        )
        os.replace(tmp, path)
    except (OSError, ProcuratorError) as exc:
        tmp.unlink(missing_ok=True)
        raise StateError(f"volume {vm}/{volume.name}: cannot create {path}: {exc}") from exc
    return path


def ensure_volumes(state: StateDir, vm: str, volumes: tuple[Volume, ...]) -> dict[str, Path]:
    return {v.name: ensure_volume(state, vm, v) for v in volumes}


def purge_volumes(state: StateDir, vm: str) -> None:
    shutil.rmtree(state.volume_dir(vm), ignore_errors=True)
