"""The serial keeper: one small process per cloud-hypervisor VM that owns the VM's serial log.

cloud-hypervisor creates a `File` serial anew, emptied, at every guest reboot (`pre_create_console_devices`
in vmm/src/lib.rs `vm_reboot`), so the panic that caused a reset would be lost, and the file grows without
bound. Instead the VM's serial port is a `Socket` (the serial device accepts one client: a new connection
replaces the old one, vmm/src/serial_manager.rs) and this process, connected before the guest boots,
appends what it reads to `serial.log`. It says "connected" on its stdout once connected, so that the
guest boots only then (before v53 the serial device drops what is written while no client is connected).
When the socket is re-created at a reboot it connects again and writes a marker line. When the log passes
`max_bytes` it becomes `serial.log.1` (one old file kept), so a guest flooding its console uses at most
twice `max_bytes` of disk.

It holds an exclusive flock on `serial.lock` (its pid inside), so there is one keeper per VM, and it exits
when the hypervisor process exits (a pidfd), after reading what is left. It imports only the standard
library and `procurator.process`: started as `python -m procurator.serial_keeper`, it starts fast and stays
small (about 10 MB of memory per VM).
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import os
import select
import socket
import sys
import time
from pathlib import Path

from procurator import process

DEFAULT_MAX_BYTES = 8 << 20
RECONNECT = b"\n-- procurator: serial port re-created (guest reset) --\n"
_RETRY = 0.01  # seconds between connection attempts while the socket is not there


class _Log:
    def __init__(self, path: Path, max_bytes: int) -> None:
        self.path = path
        self.max_bytes = max_bytes
        self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)
        self.size = os.fstat(self._fd).st_size

    def write(self, data: bytes) -> None:
        """Append `data`; the file never passes `max_bytes`: what does not fit goes to a fresh file, the
        full one becoming `.1` (replacing the previous `.1`)."""
        view = memoryview(data)
        while view:
            room = self.max_bytes - self.size
            if room <= 0:
                self._rotate()
                room = self.max_bytes
            chunk = view[:room]
            while chunk:
                written = os.write(self._fd, chunk)
                chunk, view = chunk[written:], view[written:]
                self.size += written

    def _rotate(self) -> None:
        """The full log becomes `.1` and a fresh one takes its name, each by one rename, so that a reader
        (`procurator logs -f`, the status page) never finds no `serial.log`."""
        old = self.path.with_name(self.path.name + ".1")
        linked = self.path.with_name(self.path.name + ".1.new")
        fresh = self.path.with_name(self.path.name + ".new")
        linked.unlink(missing_ok=True)
        os.link(self.path, linked)
        os.replace(linked, old)
        fd = os.open(fresh, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_TRUNC, 0o640)
        os.replace(fresh, self.path)
        os.close(self._fd)
        self._fd = fd
        self.size = 0


def _connect(path: Path) -> socket.socket | None:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.connect(str(path))
    except OSError:
        sock.close()
        return None
    return sock


def keep(socket_path: Path, log_path: Path, pid: int, start_time: int, max_bytes: int) -> int:
    """Copy the serial socket of hypervisor `pid` into `log_path` until that process exits."""
    lock = os.open(log_path.with_name("serial.lock"), os.O_RDWR | os.O_CREAT, 0o640)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return 0  # another keeper has this VM
    os.ftruncate(lock, 0)
    os.write(lock, f"{os.getpid()}\n".encode())
    try:
        pidfd = os.pidfd_open(pid)
    except ProcessLookupError:
        return 0
    if (
        process.process_start_time(pid) != start_time
    ):  # checked after opening: the pidfd is of the very process
        return 0
    log = _Log(log_path, max_bytes)
    poller = select.poll()
    poller.register(pidfd, select.POLLIN)
    sock: socket.socket | None = None
    connected_before = False
    while True:
        if sock is None:
            sock = _connect(socket_path)
            if sock is None:
                if poller.poll(int(_RETRY * 1000)):
                    return 0  # the hypervisor exited
                continue
            if connected_before:
                log.write(RECONNECT)
            else:  # tell whoever started us that the guest may boot now, then let go of stdout
                with contextlib.suppress(OSError):
                    os.write(1, b"connected\n")
                devnull = os.open(os.devnull, os.O_WRONLY)
                os.dup2(devnull, 1)
                os.close(devnull)
            connected_before = True
            poller.register(sock, select.POLLIN)
        ready = dict(poller.poll(1000))
        if sock.fileno() in ready:
            try:
                data = sock.recv(65536)
            except OSError:
                data = b""
            if data:
                log.write(data)
                continue
            poller.unregister(sock)
            sock.close()
            sock = None
            continue
        if pidfd in ready:
            sock.setblocking(False)
            with contextlib.suppress(OSError):
                while data := sock.recv(65536):
                    log.write(data)
            return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="procurator-serial-keeper")
    parser.add_argument("--socket", type=Path, required=True)
    parser.add_argument("--log", type=Path, required=True)
    parser.add_argument("--pid", type=int, required=True)
    parser.add_argument("--start-time", type=int, required=True)
    parser.add_argument("--max-bytes", type=int, default=DEFAULT_MAX_BYTES)
    args = parser.parse_args(argv)
    return keep(args.socket, args.log, args.pid, args.start_time, args.max_bytes)


def wait_gone(vm_dir: Path, timeout: float) -> None:
    """Wait (bounded) until nobody holds the VM's keeper lock: its keeper has exited."""
    deadline = time.monotonic() + timeout
    try:
        fd = os.open(vm_dir / "serial.lock", os.O_RDWR)
    except OSError:
        return
    try:
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    return
                time.sleep(0.005)
                continue
            fcntl.flock(fd, fcntl.LOCK_UN)
            return
    finally:
        os.close(fd)


if __name__ == "__main__":
    sys.exit(main())
