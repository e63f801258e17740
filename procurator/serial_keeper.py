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
when the hypervisor process exits (a pidfd), after reading what is left. A VM's start waits for it, so it
starts fast: besides a few modules of the standard library it imports only `procurator.procstat` (no
argparse, pathlib or `procurator.process`, each of which would cost more than the interpreter's own
start), is run with `python -S`, and exits by `os._exit` once it has let go of its lock, skipping the
interpreter's teardown. It stays small (about 10 MB of memory per VM, 4 MB of it its own).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import select
import socket
import sys
import time

from procurator import procstat

DEFAULT_MAX_BYTES = 8 << 20
RECONNECT = b"\n-- procurator: serial port re-created (guest reset) --\n"
_RETRY_FAST = 0.002  # seconds between connection attempts while the socket is not there, at first
_RETRY_SLOW = 0.02  # ... and after the first second (a restore, a slow hypervisor)
_FAST_FOR = 1.0
_USAGE = "usage: python -m procurator.serial_keeper --socket PATH --log PATH --pid PID --start-time TICKS"
LOCK = "serial.lock"


class _Log:
    def __init__(self, path: str | os.PathLike[str], max_bytes: int) -> None:
        self.path = os.fspath(path)
        self.max_bytes = max_bytes
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)
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
        old, linked, fresh = self.path + ".1", self.path + ".1.new", self.path + ".new"
        with contextlib.suppress(FileNotFoundError):
            os.unlink(linked)
        os.link(self.path, linked)
        os.replace(linked, old)
        fd = os.open(fresh, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_TRUNC, 0o640)
        os.replace(fresh, self.path)
        os.close(self._fd)
        self._fd = fd
        self.size = 0


def _connect(path: str) -> socket.socket | None:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.connect(path)
    except OSError:
        sock.close()
        return None
    return sock


def _started() -> None:
    """Tell whoever started us that the guest may boot now, then let go of stdout."""
    with contextlib.suppress(OSError):
        os.write(1, b"connected\n")
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 1)
    os.close(devnull)


def _drain(sock: socket.socket, log: _Log) -> None:
    sock.setblocking(False)
    with contextlib.suppress(OSError):
        while data := sock.recv(65536):
            log.write(data)


def keep(socket_path: str, log_path: str, pid: int, start_time: int, max_bytes: int) -> int:
    """Copy the serial socket of hypervisor `pid` into `log_path` until that process exits."""
    lock_path = os.path.join(os.path.dirname(log_path), LOCK)
    lock = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o640)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return 0  # another keeper has this VM
    try:
        os.ftruncate(lock, 0)
        os.write(lock, f"{os.getpid()}\n".encode())
        return _keep(socket_path, log_path, pid, start_time, max_bytes)
    finally:
        os.close(lock)  # let go of the VM at once: `wait_gone` waits for this, not for our exit


def _keep(socket_path: str, log_path: str, pid: int, start_time: int, max_bytes: int) -> int:
    try:
        pidfd = os.pidfd_open(pid)
    except ProcessLookupError:
        return 0
    stat = procstat.read(pid)  # checked after opening: the pidfd is of the very process
    if stat is None or stat[1] != start_time:
        return 0
    log = _Log(log_path, max_bytes)
    poller = select.poll()
    poller.register(pidfd, select.POLLIN)
    sock: socket.socket | None = None
    connected_before = False
    fast_until = time.monotonic() + _FAST_FOR
    while True:
        if sock is None:
            sock = _connect(socket_path)
            if sock is None:
                retry = _RETRY_FAST if time.monotonic() < fast_until else _RETRY_SLOW
                if poller.poll(int(retry * 1000)):
                    return 0  # the hypervisor exited
                continue
            if connected_before:
                log.write(RECONNECT)
            else:
                _started()
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
            fast_until = time.monotonic() + _FAST_FOR  # the socket is re-created at a guest reset
            continue
        if pidfd in ready:
            _drain(sock, log)
            return 0


def _arguments(argv: list[str]) -> tuple[str, str, int, int, int]:
    """The keeper's flags, each given once as `--flag value` (it is started by procurator, not by hand)."""
    given: dict[str, str] = {}
    if len(argv) % 2:
        raise ValueError("every flag takes one value")
    for flag, value in zip(argv[::2], argv[1::2], strict=True):
        if flag not in {"--socket", "--log", "--pid", "--start-time", "--max-bytes"} or flag in given:
            raise ValueError(f"unknown or repeated flag {flag!r}")
        given[flag] = value
    missing = {"--socket", "--log", "--pid", "--start-time"} - given.keys()
    if missing:
        raise ValueError(f"missing {', '.join(sorted(missing))}")
    max_bytes = int(given.get("--max-bytes", DEFAULT_MAX_BYTES))
    return given["--socket"], given["--log"], int(given["--pid"]), int(given["--start-time"]), max_bytes


def main(argv: list[str] | None = None) -> int:
    try:
        socket_path, log_path, pid, start_time, max_bytes = _arguments(sys.argv[1:] if argv is None else argv)
    except ValueError as exc:
        print(f"procurator-serial-keeper: {exc}\n{_USAGE}", file=sys.stderr)
        return 2
    return keep(socket_path, log_path, pid, start_time, max_bytes)


def wait_gone(vm_dir: str | os.PathLike[str], timeout: float) -> None:
    """Wait (bounded) until nobody holds the VM's keeper lock: its keeper has let go of the VM."""
    deadline = time.monotonic() + timeout
    try:
        fd = os.open(os.path.join(vm_dir, LOCK), os.O_RDWR | os.O_CLOEXEC)
    except OSError:
        return
    try:
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    return
                time.sleep(0.002)
                continue
            fcntl.flock(fd, fcntl.LOCK_UN)
            return
    finally:
        os.close(fd)


if __name__ == "__main__":
    status = main()
    sys.stderr.flush()
    os._exit(status)  # nothing is buffered (the log is written by os.write): skip the teardown
