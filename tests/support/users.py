"""Observers for VMs run as uids of their own (procurator/vmusers.py): who a process is, what a uid owns."""

from __future__ import annotations

import os
from pathlib import Path

from procurator import process


def vm_range(offset: int = 0) -> int:
    """The first uid of a test's vmUsers range: one no other test run on this host uses at once."""
    return 400000 + (os.getpid() % 1000) * 20 + offset


def ids_of(pid: int) -> tuple[int, int, str]:
    """(real uid, real gid, supplementary groups) of a process, from /proc/PID/status."""
    fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines())
    return int(fields["Uid"].split()[0]), int(fields["Gid"].split()[0]), fields["Groups"].strip()


def owned_by(root: Path, uid: int) -> list[str]:
    """Every path under `root` (itself included) owned by `uid`."""
    if not root.exists():
        return []
    found = [str(root)] if root.lstat().st_uid == uid else []
    for directory, dirs, files in os.walk(root):
        paths = [Path(directory) / n for n in (*dirs, *files)]
        found += [str(p) for p in paths if p.lstat().st_uid == uid]
    return found


def processes_of(uids: range | set[int]) -> dict[int, int]:
    """pid -> uid of the live processes of `uids` (a zombie has ended; whoever inherited it reaps it)."""
    found: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                uid = ids_of(int(entry.name))[0]
            except (OSError, KeyError, ValueError):
                continue
            if uid in uids and process.alive(int(entry.name), None):
                found[int(entry.name)] = uid
    return found


def tun_queues(pid: int) -> list[str]:
    """The TAP each /dev/net/tun descriptor of `pid` is attached to (its fdinfo's `iff:` line)."""
    names = []
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            if os.readlink(fd) != "/dev/net/tun":
                continue
            info = Path(f"/proc/{pid}/fdinfo/{fd.name}").read_text()
        except OSError:
            continue
        names += [line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("iff:")]
    return names
