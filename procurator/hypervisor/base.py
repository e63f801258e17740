"""The contract every hypervisor backend implements (docs/architecture.md).

A backend receives a `LaunchSpec`: the runtime VmConfig (cloud-hypervisor's `vm.create` body with the host
fields filled in: TAP names, writable disk paths, serial file) plus where the VM's files live. It returns a
`Handle` that is persisted in the VM's record, so that a later command (or a restarted daemon) can talk
to the same process again through `adopt`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Protocol

if TYPE_CHECKING:
    from procurator.config import HypervisorSettings


class VmState(StrEnum):
    """States as cloud-hypervisor's `VmInfo.state` names them, plus the process-level ones."""

    CREATED = "Created"
    RUNNING = "Running"
    SHUTDOWN = "Shutdown"
    PAUSED = "Paused"
    BREAKPOINT = "BreakPoint"
    GONE = "Gone"  # no hypervisor process any more


class GuestEnd(StrEnum):
    """How a guest ended, as its backend's own files tell (see `Hypervisor.guest_end`)."""

    SHUTDOWN = "shutdown"  # it powered off
    PANIC = "panic"  # it panicked (the pvpanic device)
    RESET = "reset"  # it reset: a reboot, or a panic under panic=-1


@dataclass(frozen=True)
class LaunchSpec:
    name: str
    vm_dir: Path  # <state>/vms/<name>: sockets, logs and the runtime config live here
    config: dict[str, Any]  # the runtime VmConfig, exactly what vm.create receives
    serial_log: Path
    shutdown_timeout: float = 30.0
    user: str | None = None  # run the hypervisor as this user (None: as ourselves)
    netns: str | None = None  # run it inside this named network namespace (None: the host's)
    # Called with the hypervisor's pid right after spawn, before its guest runs: joins the VM's cgroup.
    join: Callable[[int], None] | None = field(default=None, compare=False, repr=False)
    # Directories below which the hypervisor creates files while it runs (the VM's snapshots): a
    # landlocked cloud-hypervisor is granted them (procurator/hypervisor/landlock.py).
    writable: tuple[Path, ...] = ()
    # The VM's own uid (its gid, supplementary groups) from `vmUsers`; excludes `user` (None: neither).
    uid: int | None = None
    gid: int | None = None
    groups: tuple[int, ...] = ()
    # TAP name -> descriptors of its queues, opened by Procurator: the backend hands them to the
    # hypervisor instead of the TAP's name (empty: the hypervisor opens its TAPs by name). The caller
    # closes them after `start`/`restore`.
    tap_fds: Mapping[str, tuple[int, ...]] = field(default_factory=dict, compare=False, repr=False)

    @property
    def owner(self) -> tuple[int, int] | None:
        """(uid, gid) of a VM uid of its own; None otherwise."""
        return None if self.uid is None else (self.uid, self.uid if self.gid is None else self.gid)

    @property
    def api_socket(self) -> Path:
        return self.vm_dir / "api.sock"

    @property
    def events_path(self) -> Path:
        return self.vm_dir / "events"

    @property
    def hypervisor_log(self) -> Path:
        return self.vm_dir / "hypervisor.log"


@dataclass(frozen=True)
class Handle:
    """What identifies a running hypervisor process; persisted in the VM record."""

    backend: str
    pid: int
    start_time: int  # /proc/PID/stat start time, so a recycled pid is never taken for ours
    api_socket: Path
    vm_dir: Path


@dataclass(frozen=True)
class VmInfo:
    state: VmState
    details: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class StopResult:
    """How a VM went down: `graceful` when the guest powered off on the power button in time."""

    graceful: bool
    steps: tuple[str, ...]  # the ladder steps taken, e.g. ("power-button",) or (..., "SIGKILL")


@dataclass(frozen=True)
class Finding:
    """A backend's answer to one of `procurator doctor`'s questions (doctor.py): what it found, how
    serious it is, and the fix."""

    level: Literal["ok", "warn", "fail"]
    detail: str
    fix: str = ""


class Diagnosis(Protocol):
    """What `procurator doctor` asks the configured backend's module (hypervisor/registry.py
    `diagnosis`): the questions whose answers differ by backend."""

    def kvm_missing(self, problem: str) -> Finding:
        """/dev/kvm cannot be used (`problem` says why)."""
        ...

    def kvm_present(self, settings: HypervisorSettings, detail: str) -> Finding:
        """/dev/kvm opens (`detail` says so); anything this backend adds about it."""
        ...

    def binary_finding(self, settings: HypervisorSettings) -> Finding:
        """The hypervisor binary the settings name: found, runnable, a supported release."""
        ...


class Hypervisor(Protocol):
    name: str

    def start(self, spec: LaunchSpec) -> Handle:
        """Start the process, create and boot the VM. On any failure nothing is left running."""
        ...

    def info(self, handle: Handle) -> VmInfo: ...

    def counters(self, handle: Handle) -> dict[str, dict[str, int]]: ...

    def shutdown(self, handle: Handle, timeout: float) -> StopResult:
        """Graceful stop (power button, wait up to `timeout`), then harder steps, each bounded."""
        ...

    def kill(self, handle: Handle) -> None:
        """Stop the process at once (SIGKILL) and remove its sockets."""
        ...

    def pause(self, handle: Handle) -> None:
        """Pause the guest's vCPUs; the process, its memory and devices stay."""
        ...

    def resume(self, handle: Handle) -> None:
        """Run a paused guest again."""
        ...

    def snapshot(self, handle: Handle, directory: Path) -> None:
        """Write the paused guest's state (memory, devices, config) into the empty `directory`."""
        ...

    def restore(self, spec: LaunchSpec, directory: Path, *, paused: bool) -> Handle:
        """Start a fresh process for `spec` from the snapshot in `directory` (what `snapshot` wrote); the
        guest runs unless `paused`. `spec.config` is the runtime config the snapshot was taken with. On
        any failure nothing is left running."""
        ...

    def ping(self, handle: Handle, *, timeout: float | None = None) -> object:
        """Ask the hypervisor's API a question its main thread answers (the watchdog's ping), within
        `timeout` seconds; raises ProcuratorError when it does not answer in time or at all."""
        ...

    def adopt(self, handle: Handle) -> bool:
        """Whether the process in `handle` is still ours and answering (after our own restart)."""
        ...

    def console_path(self, handle: Handle) -> Path:
        """The interactive console (hvc0) of the running VM: a pty device or a UNIX socket."""
        ...

    def guest_end(self, vm_dir: Path) -> GuestEnd | None:
        """How the guest of the VM in `vm_dir` ended, as the backend's own files say, without an API
        call (supervision asks this of every VM at every pass); None while it runs, or if they do not
        say. A process that ended is reported by its exit status; this is for a guest that ended while
        its hypervisor may still run (a power-off under --no-shutdown, a reset served in-process)."""
        ...
