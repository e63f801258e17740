"""Starting and collecting serial keepers (procurator/serial_keeper.py), for both backends.

A backend whose runtime config has a `File` serial port serves it as a UNIX socket instead, spawns a
keeper on it with the hypervisor (`spawn`) and waits for it to connect (`connected`) before the guest's
first output could be lost: the keeper appends what it reads to the serial log and rotates it at
`max_bytes` (the worker configuration's `serialLogMaxBytes`), so a guest flooding its serial port uses at
most twice that much disk. `wire_serial` is the config change, `Keepers` the processes.

The socket lives in a directory of its own below the VM directory (`serial_socket`): cloud-hypervisor
removes and binds it again at every guest reset (vmm/src/serial_manager.rs `Drop` removes the file,
vmm/src/console_devices.rs `pre_create_console_devices` binds it, from vmm/src/lib.rs `vm_reboot`),
which needs RemoveFile and MakeSock on its directory; a landlocked VMM is granted that one directory
(hypervisor/landlock.py `extra_rules`), not the VM directory with its records and logs.
"""

from __future__ import annotations

import contextlib
import copy
import os
import select
import subprocess
import sys
from pathlib import Path
from typing import Any

from procurator import process, serial_keeper, sockets
from procurator.errors import HypervisorStartError, ProcessError

SERIAL_DIR = "serial"
SERIAL_SOCKET = "serial.sock"
# the socket's place before it had a directory (the VM directory itself), kept by older snapshots
_OLD_SOCKET = "serial.sock"


def serial_dir(vm_dir: Path) -> Path:
    """The directory of the VM's serial socket, and nothing else."""
    return vm_dir / SERIAL_DIR


def serial_socket(vm_dir: Path) -> Path:
    return serial_dir(vm_dir) / SERIAL_SOCKET


def wire_serial(config: dict[str, Any], vm_dir: Path) -> tuple[dict[str, Any], bool]:
    """`config` with a `File` serial port turned into a `Socket` at `serial_socket(vm_dir)`, and whether
    it was (then a keeper is to copy that socket into the VM's serial log; `prepare` makes its directory)."""
    serial = config.get("serial") or {}
    if not isinstance(serial, dict) or serial.get("mode") != "File":
        return config, False
    wired = copy.deepcopy(config)
    wired["serial"] = {"mode": "Socket", "socket": str(serial_socket(vm_dir))}
    return wired, True


def prepare(vm_dir: Path, owner: tuple[int, int] | None) -> Path:
    """Make the serial socket's directory (empty: a socket left by a killed run is removed), owned by
    `owner` (uid, gid), the user the hypervisor runs as, or else by the VM directory's owner (lifecycle
    gives the VM directory to the hypervisor's user); the directory."""
    directory = serial_dir(vm_dir)
    try:
        directory.mkdir(mode=0o700, exist_ok=True)
        sockets.remove(directory / SERIAL_SOCKET)
        if owner is None:
            st = vm_dir.stat()
            owner = st.st_uid, st.st_gid
        if directory.stat().st_uid != owner[0]:
            os.chown(directory, *owner)
    except OSError as exc:
        raise HypervisorStartError(
            f"{directory}: cannot prepare the serial socket's directory: {exc.strerror}"
        ) from exc
    return directory


class Keepers:
    """The serial keepers one backend instance started, by VM directory, so that it reaps them."""

    def __init__(self, max_bytes: int = serial_keeper.DEFAULT_MAX_BYTES) -> None:
        self.max_bytes = max_bytes
        self._running: dict[Path, tuple[subprocess.Popen[bytes], Path]] = {}  # each with its socket

    def spawn(
        self,
        name: str,
        vm_dir: Path,
        log: Path,
        *,
        pid: int,
        start_time: int,
        socket_path: Path | None = None,
    ) -> None:
        """Start the keeper of hypervisor `pid` without waiting: it connects once the socket exists (it
        tries every 2 ms), while the hypervisor starts up; `connected` waits for it. A keeper costs an
        interpreter's start without `site` (`-S`: every path it imports from is in PYTHONPATH), about 18
        ms, which so overlaps the hypervisor's own."""
        socket_path = socket_path or serial_socket(vm_dir)
        env = {"PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
        argv = [
            sys.executable, "-S", "-m", "procurator.serial_keeper",
            "--socket", str(socket_path),
            "--log", str(log),
            "--pid", str(pid),
            "--start-time", str(start_time),
            "--max-bytes", str(self.max_bytes),
        ]  # fmt: skip
        try:
            keeper = process.spawn(argv, env=env, stdout=subprocess.PIPE)
        except ProcessError as exc:
            raise HypervisorStartError(f"vm {name!r}: cannot start its serial keeper: {exc}") from exc
        self._running[vm_dir] = keeper, socket_path

    def connected(self, name: str, vm_dir: Path, timeout: float) -> None:
        """Wait (bounded) until the keeper `spawn` started for `vm_dir` says it is connected."""
        keeper, socket_path = self._running.get(vm_dir) or (None, None)
        if keeper is None or keeper.stdout is None:
            raise HypervisorStartError(f"vm {name!r}: no serial keeper was started")
        with keeper.stdout:
            ready, _, _ = select.select([keeper.stdout], [], [], timeout)
            said = keeper.stdout.readline() if ready else b""
        if said != b"connected\n":
            raise HypervisorStartError(
                f"vm {name!r}: its serial keeper did not connect to {socket_path} "
                f"within {timeout:.0f}s (exit status {keeper.poll()})"
            )

    def gone(self, vm_dir: Path, timeout: float) -> None:
        """After the hypervisor is gone: wait (bounded) for its keeper to exit, reap it if it is ours, and
        remove the serial socket and its directory."""
        serial_keeper.wait_gone(vm_dir, timeout)
        keeper, _ = self._running.pop(vm_dir, None) or (None, None)
        if keeper is not None:
            if keeper.stdout is not None:  # open still when the start failed before `connected`
                keeper.stdout.close()
            with contextlib.suppress(Exception):
                keeper.wait(timeout=timeout)
        sockets.remove(serial_socket(vm_dir))
        sockets.remove(vm_dir / _OLD_SOCKET)
        with contextlib.suppress(OSError):
            serial_dir(vm_dir).rmdir()
