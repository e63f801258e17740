"""Attach a terminal to a VM's interactive console (virtio-console, hvc0): the pty cloud-hypervisor made
for it, or the UNIX socket the qemu backend serves.

Interactive (stdin is a terminal): raw mode, every key goes to the guest, Ctrl-] detaches. Otherwise
(a pipe, a script): stdin is sent, and after its end the guest's output is read until it has been quiet
for `quiet` seconds, never longer than `limit` seconds in all.
"""

from __future__ import annotations

import contextlib
import os
import select
import socket
import stat
import termios
import time
import tty
from collections.abc import Iterator
from pathlib import Path

from procurator.errors import NotFoundError, ProcuratorError

DETACH = b"\x1d"  # Ctrl-]
DETACH_NAME = "Ctrl-]"
CHUNK = 4096


class _Endpoint:
    """The console as a file descriptor: a connected socket or an open pty, read and written alike."""

    def __init__(self, fd: int, sock: socket.socket | None = None) -> None:
        self.fd = fd
        self._sock = sock

    def fileno(self) -> int:
        return self.fd

    def recv(self, size: int) -> bytes:
        try:
            return os.read(self.fd, size)
        except OSError:  # EIO: the hypervisor closed the pty (the VM stopped)
            return b""

    def sendall(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            view = view[os.write(self.fd, view) :]

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
        else:
            os.close(self.fd)

    def __enter__(self) -> _Endpoint:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def connect(path: Path, name: str) -> _Endpoint:
    """Open the console at `path`: a character device (a pty) or a UNIX socket."""
    try:
        is_tty = stat.S_ISCHR(path.stat().st_mode)
    except FileNotFoundError as exc:
        raise NotFoundError(
            f"VM {name!r} has no console at {path}; is it running? see `procurator ps`"
        ) from exc
    except OSError as exc:
        raise ProcuratorError(f"cannot attach to {name}'s console ({path}): {exc.strerror}") from exc
    if is_tty:
        try:
            return _Endpoint(os.open(path, os.O_RDWR | os.O_NOCTTY))
        except OSError as exc:
            raise ProcuratorError(f"cannot open {name}'s console ({path}): {exc.strerror}") from exc
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.connect(str(path))
    except FileNotFoundError as exc:
        sock.close()
        raise NotFoundError(
            f"VM {name!r} has no console socket ({path}); is it running? see `procurator ps`"
        ) from exc
    except OSError as exc:
        sock.close()
        raise ProcuratorError(
            f"cannot attach to {name}'s console ({path}): {exc.strerror}; another session may hold it"
        ) from exc
    return _Endpoint(sock.fileno(), sock)


@contextlib.contextmanager
def _raw(fd: int) -> Iterator[None]:
    saved = termios.tcgetattr(fd)
    try:
        tty.setraw(fd)
        yield
    finally:
        termios.tcsetattr(fd, termios.TCSADRAIN, saved)


def _pump(sock: _Endpoint, stdin: int, stdout: int, *, interactive: bool, quiet: float, limit: float) -> None:
    stdin_open = True
    deadline = None if interactive else time.monotonic() + limit
    last_output = time.monotonic()
    while True:
        now = time.monotonic()
        if deadline is not None and (now >= deadline or (not stdin_open and now - last_output >= quiet)):
            return
        wait = 0.2 if deadline is None else max(0.0, min(deadline - now, quiet))
        readers = [sock.fileno(), stdin] if stdin_open else [sock.fileno()]
        ready, _, _ = select.select(readers, [], [], wait)
        if sock.fileno() in ready:
            data = sock.recv(CHUNK)
            if not data:
                return  # the hypervisor closed the console: the VM stopped
            os.write(stdout, data)
            last_output = time.monotonic()
        if stdin in ready:
            data = os.read(stdin, CHUNK)
            if interactive and DETACH in data:
                data = data.split(DETACH, 1)[0]
                if data:
                    sock.sendall(data)
                return
            if not data:
                stdin_open = False
                last_output = time.monotonic()
                continue
            sock.sendall(data)


def attach(
    path: Path, name: str, *, stdin: int = 0, stdout: int = 1, quiet: float = 1.0, limit: float = 30.0
) -> None:
    """Bridge stdin/stdout and the console of VM `name` until detached (or the bounds above)."""
    with connect(path, name) as sock:
        interactive = os.isatty(stdin)
        if interactive:
            with _raw(stdin):
                _pump(sock, stdin, stdout, interactive=True, quiet=quiet, limit=limit)
        else:
            _pump(sock, stdin, stdout, interactive=False, quiet=quiet, limit=limit)
