"""Starting and collecting serial keepers (procurator/serial_keeper.py), for both backends.

A backend whose runtime config has a `File` serial port serves it as a UNIX socket in the VM directory
(`SERIAL_SOCKET`) instead and starts a keeper on it before the guest runs: the keeper appends what it
reads to the serial log and rotates it at `max_bytes` (the worker configuration's `serialLogMaxBytes`),
so a guest flooding its serial port uses at most twice that much disk. `wire_serial` is the config
change, `Keepers` the processes.
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

SERIAL_SOCKET = "serial.sock"


def wire_serial(config: dict[str, Any], vm_dir: Path) -> tuple[dict[str, Any], bool]:
    """`config` with a `File` serial port turned into a `Socket` at `vm_dir`/SERIAL_SOCKET, and whether
    it was (then a keeper is to copy that socket into the VM's serial log)."""
    serial = config.get("serial") or {}
    if not isinstance(serial, dict) or serial.get("mode") != "File":
        return config, False
    wired = copy.deepcopy(config)
    wired["serial"] = {"mode": "Socket", "socket": str(vm_dir / SERIAL_SOCKET)}
    return wired, True


class Keepers:
    """The serial keepers one backend instance started, by VM directory, so that it reaps them."""

    def __init__(self, max_bytes: int = serial_keeper.DEFAULT_MAX_BYTES) -> None:
        self.max_bytes = max_bytes
        self._running: dict[Path, subprocess.Popen[bytes]] = {}

    def start(self, name: str, vm_dir: Path, log: Path, *, pid: int, start_time: int, timeout: float) -> None:
        """Start the keeper of hypervisor `pid` and wait (bounded) until it is connected to the socket."""
        env = {"PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
        argv = [
            sys.executable, "-m", "procurator.serial_keeper",
            "--socket", str(vm_dir / SERIAL_SOCKET),
            "--log", str(log),
            "--pid", str(pid),
            "--start-time", str(start_time),
            "--max-bytes", str(self.max_bytes),
        ]  # fmt: skip
        try:
            keeper = process.spawn(argv, env=env, stdout=subprocess.PIPE)
        except ProcessError as exc:
            raise HypervisorStartError(f"vm {name!r}: cannot start its serial keeper: {exc}") from exc
        self._running[vm_dir] = keeper
        if keeper.stdout is None:  # pragma: no cover - spawned with stdout=PIPE
            raise HypervisorStartError(f"vm {name!r}: its serial keeper has no stdout")
        with keeper.stdout:
            ready, _, _ = select.select([keeper.stdout], [], [], timeout)
            said = keeper.stdout.readline() if ready else b""
        if said != b"connected\n":
            raise HypervisorStartError(
                f"vm {name!r}: its serial keeper did not connect to {vm_dir / SERIAL_SOCKET} "
                f"within {timeout:.0f}s (exit status {keeper.poll()})"
            )

    def gone(self, vm_dir: Path, timeout: float) -> None:
        """After the hypervisor is gone: wait (bounded) for its keeper to exit, reap it if it is ours, and
        remove the serial socket."""
        serial_keeper.wait_gone(vm_dir, timeout)
        keeper = self._running.pop(vm_dir, None)
        if keeper is not None:
            with contextlib.suppress(Exception):
                keeper.wait(timeout=timeout)
        sockets.remove(vm_dir / SERIAL_SOCKET)
