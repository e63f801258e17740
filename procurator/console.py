"""Attach a terminal to a VM's interactive console: the hypervisor's virtio-console (hvc0) socket.

Interactive (stdin is a terminal): raw mode, every key goes to the guest, Ctrl-] detaches. Otherwise
(a pipe, a script): stdin is sent, and after its end the guest's output is read until it has been quiet
for `quiet` seconds, never longer than `limit` seconds in all.
"""

from __future__ import annotations

import contextlib
import os
import select
import socket
import termios
import time
import tty
from collections.abc import Iterator
from pathlib import Path

from procurator.errors import NotFoundError, ProcuratorError

DETACH = b"\x1d"  # Ctrl-]
DETACH_NAME = "Ctrl-]"
CHUNK = 4096


def connect(path: Path, name: str) -> socket.socket:
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
    return sock


@contextlib.contextmanager
def _raw(fd: int) -> Iterator[None]:
    saved = termios.tcgetattr(fd)
    try:
        tty.setraw(fd)
        yield
    finally:
        termios.tcsetattr(fd, termios.TCSADRAIN, saved)


def _pump(
    sock: socket.socket, stdin: int, stdout: int, *, interactive: bool, quiet: float, limit: float
) -> None:
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
    """Bridge stdin/stdout and the console socket of VM `name` until detached (or the bounds above)."""
    with connect(path, name) as sock:
        interactive = os.isatty(stdin)
        if interactive:
            with _raw(stdin):
                _pump(sock, stdin, stdout, interactive=True, quiet=quiet, limit=limit)
        else:
            _pump(sock, stdin, stdout, interactive=False, quiet=quiet, limit=limit)
