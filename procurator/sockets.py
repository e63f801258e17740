"""UNIX sockets that processes serve (hypervisor APIs, QMP, the worker's API): is one served, claiming a
path for a new listener, and removing a stale socket without ever removing anything that is not one."""

from __future__ import annotations

import socket
import stat
from enum import StrEnum
from pathlib import Path


def answers(path: Path, timeout: float = 0.5) -> bool:
    """Whether a process accepts connections on the UNIX socket `path`."""
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(timeout)
    try:
        probe.connect(str(path))
    except OSError:
        return False
    finally:
        probe.close()
    return True


def remove(path: Path) -> None:
    """Remove `path` if it is a socket (never anything else); a failure is logged, not raised."""
    try:
        if stat.S_ISSOCK(path.lstat().st_mode):
            path.unlink()
    except FileNotFoundError:
        pass
    except OSError as exc:
        import logging  # noqa: PLC0415 - here only: `ps` answered by a worker imports this module, not logging

        logging.getLogger(__name__).warning("%s: cannot remove the socket: %s", path, exc.strerror)


class Claim(StrEnum):
    FREE = "free"  # nothing is there (any more): bind it
    IN_USE = "in use"  # a process accepts connections there: left alone
    NOT_A_SOCKET = "not a socket"  # something else is there: left alone


def claim(path: Path, timeout: float = 0.5) -> Claim:
    """Make `path` free for a new listener: a stale socket (nobody accepts on it) is removed; a served one
    and anything that is not a socket are left, and the caller says what to do about them."""
    if not path.is_symlink() and not path.exists():
        return Claim.FREE
    if answers(path, timeout):
        return Claim.IN_USE
    remove(path)
    if path.is_symlink() or path.exists():
        return Claim.NOT_A_SOCKET
    return Claim.FREE
