"""UNIX sockets that processes serve (hypervisor APIs, QMP, the worker's API): is one served, and removing
a stale one without ever removing anything that is not a socket."""

from __future__ import annotations

import logging
import socket
import stat
from pathlib import Path

log = logging.getLogger(__name__)


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
        log.warning("%s: cannot remove the socket: %s", path, exc.strerror)
