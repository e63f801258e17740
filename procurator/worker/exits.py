"""How a supervised VM ended: its hypervisor's exit status, or what its backend says of the guest.

`observe_exit` costs no API call: it reads the exit status of our own exited child (without reaping it),
/proc, and the backend's `guest_end` (cloud-hypervisor's event monitor file, re-read only when it
changed). Which processes exited is `process.PidWatch`'s to tell, in one poll over their pidfds.
"""

from __future__ import annotations

import contextlib
import os
import signal
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

from procurator import process
from procurator.hypervisor.base import GuestEnd, Hypervisor
from procurator.state import VmRecord
from procurator.supervision import Decision, ExitKind

RESET_DETAIL = "guest reset (a reboot, or a panic under panic=-1)"


@dataclass(frozen=True)
class Exit:
    kind: ExitKind
    detail: str  # for people: "killed by SIGKILL", "guest powered off", ...
    process_gone: bool = True  # False: the hypervisor still runs (cloud-hypervisor idle after power-off)
    hung: bool = False  # the watchdog's: it runs and stopped answering its API (worker/watchdog.py)


def child_exit(pid: int) -> tuple[int, int] | None:
    """(si_code, si_status) of our own exited child `pid`, without reaping it; None if not ours."""
    try:
        info = os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
    except (ChildProcessError, OSError):
        return None
    if info is None:
        return None
    return info.si_code, info.si_status


def describe_exit(code: int, status: int) -> Exit:
    if code == os.CLD_EXITED:
        if status == 0:
            return Exit(ExitKind.POWERED_OFF, "hypervisor exited 0")
        return Exit(ExitKind.CRASHED, f"hypervisor exited {status}")
    try:
        name = signal.Signals(status).name
    except ValueError:
        name = f"signal {status}"
    return Exit(ExitKind.CRASHED, f"hypervisor killed by {name}")


def observe_exit(record: VmRecord, hypervisor: Hypervisor, *, alive: bool | None = None) -> Exit | None:
    """How the VM of `record` exited, or None while it runs. Costs no API call.

    `alive` is whether its process runs, when the caller knows (see `process.PidWatch`); else /proc is
    read. How the guest ended, when its hypervisor may outlive it, is the backend's to say (`guest_end`).
    """
    said = hypervisor.guest_end(Path(record.vm_dir))
    if alive is None:
        alive = record.pid > 0 and process.alive(record.pid, record.start_time)
    if alive:
        if said is GuestEnd.PANIC:
            return Exit(ExitKind.CRASHED, "guest panicked", process_gone=False)
        if said is GuestEnd.RESET:
            return Exit(ExitKind.CRASHED, RESET_DETAIL, process_gone=False)
        if said is GuestEnd.SHUTDOWN:
            return Exit(ExitKind.POWERED_OFF, "guest powered off", process_gone=False)
        return None
    if process.process_start_time(record.pid) == record.start_time:  # a zombie: ours, not reaped yet
        status = child_exit(record.pid)
        if status is not None:
            found = describe_exit(*status)
            if said is GuestEnd.PANIC:
                return Exit(ExitKind.CRASHED, f"guest panicked; {found.detail}")
            if said is GuestEnd.RESET:  # a landlocked cloud-hypervisor exits 1 at a reset (architecture.md)
                return Exit(ExitKind.CRASHED, RESET_DETAIL)
            return found
    if said is GuestEnd.PANIC:
        return Exit(ExitKind.CRASHED, "guest panicked")
    if said is GuestEnd.RESET:
        return Exit(ExitKind.CRASHED, RESET_DETAIL)
    if said is GuestEnd.SHUTDOWN:
        return Exit(ExitKind.POWERED_OFF, "guest powered off")
    return Exit(ExitKind.CRASHED, "hypervisor process vanished")


def reap(pid: int, start_time: int) -> None:
    """Collect our own exited child `pid` if it is still a zombie (a backend that kept no handle on it)."""
    if process.process_start_time(pid) == start_time:
        with contextlib.suppress(ChildProcessError, OSError):
            os.waitpid(pid, os.WNOHANG)


@dataclass
class Tracked:
    """What the daemon remembers of one supervised VM (in memory: a restarted daemon starts afresh)."""

    restarts: deque[float] = field(default_factory=lambda: deque(maxlen=64))  # monotonic times
    key: tuple[int, int] = (0, 0)  # (pid, start_time) of the exit being handled
    exit: Exit | None = None
    exited_at: float = 0.0
    decision: Decision | None = None
    unadopted_since: float | None = None  # alive after our restart but its hypervisor did not answer
