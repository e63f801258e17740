"""Sockets inside a named network namespace, for health checks of guests that live in one.

A socket belongs to the namespace it was created in, so we create it in a short-lived thread that has
entered the namespace (setns affects only the calling thread) and use it from anywhere afterwards.
"""

from __future__ import annotations

import ctypes
import os
import socket
import threading
from pathlib import Path

from procurator.errors import NetworkError

CLONE_NEWNET = 0x40000000
NETNS_RUN_DIR = Path("/run/netns")


def _setns(path: Path) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    fd = os.open(path, os.O_RDONLY)
    try:
        if libc.setns(fd, CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err))
    finally:
        os.close(fd)


def make_socket(
    netns: str | None, family: int = socket.AF_INET, kind: int = socket.SOCK_STREAM
) -> socket.socket:
    """A new socket in `netns` (None: the current namespace)."""
    if netns is None:
        return socket.socket(family, kind)
    path = NETNS_RUN_DIR / netns
    if not path.exists():
        raise NetworkError(
            f"network namespace {netns!r} does not exist ({path}); create it or fix the config"
        )
    made: list[socket.socket] = []
    failed: list[BaseException] = []

    def worker() -> None:
        try:
            _setns(path)
            made.append(socket.socket(family, kind))
        except OSError as exc:
            failed.append(exc)

    thread = threading.Thread(target=worker, name=f"netns-{netns}", daemon=True)
    thread.start()
    thread.join(timeout=5)
    if failed or not made:
        raise NetworkError(
            f"cannot open a socket in network namespace {netns!r}: {failed[0] if failed else 'timeout'}"
        )
    return made[0]


def connect_tcp(netns: str | None, host: str, port: int, timeout: float) -> socket.socket:
    sock = make_socket(netns)
    sock.settimeout(timeout)
    try:
        sock.connect((host, port))
    except OSError:
        sock.close()
        raise
    return sock
