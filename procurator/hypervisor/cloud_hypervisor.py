"""The cloud-hypervisor backend: one `cloud-hypervisor` process per VM, driven over its API.

Start-up is a list of steps, each with its undo, run in reverse on any failure so that nothing is left
behind (no process, no socket):

1. bind the API socket ourselves (AF_UNIX, 0600) and hand it over as `--api-socket fd=N`;
2. spawn the binary in its own session with `--event-monitor path=<vm_dir>/events`,
   `--log-file <vm_dir>/hypervisor.log` (its stdout and stderr go to the same file, so that errors
   printed before its logger exists are kept), `--seccomp true`, `--no-shutdown` and `-v`;
3. wait (bounded) for `vmm.ping`, watching for the process exiting meanwhile;
4. `vm.create` with the runtime VmConfig, then `vm.boot`. Where the release and the kernel have Landlock,
   the body also says `landlock_enable` with our `landlock_rules` (procurator/hypervisor/landlock.py): the
   VMM thread restricts itself at `vm.create` to the config's own paths and those rules.

Stopping is a ladder, each rung bounded: the power button (the guest shuts down; we see the `vm`
`shutdown` event in the events file or the VM leaving the running state), then `vm.shutdown`,
`vmm.shutdown`, SIGTERM and SIGKILL. With `--no-shutdown` the process outlives its guest, so a graceful
stop ends with `vmm.shutdown` too.

All HTTP goes through `procurator.hypervisor.api`: `ApiClient` for the steps of a boot, a stop or a
snapshot, `get_once` for the single reads (vmm.ping, vm.info, vm.counters: what a worker asks every
VM, without httpx's import); all processes through `procurator.process`.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from procurator import jsonread, logfiles, process, serial_keeper, sockets
from procurator.errors import (
    HypervisorError,
    HypervisorStartError,
    InvalidStateError,
    ProcessError,
    ProcuratorError,
    ValidationError,
    WaitTimeoutError,
)
from procurator.hypervisor import keepers, landlock
from procurator.hypervisor.api import ApiClient, get_once
from procurator.hypervisor.base import Finding, GuestEnd, Handle, LaunchSpec, StopResult, VmInfo, VmState
from procurator.hypervisor.keepers import Keepers, wire_serial
from procurator.jsonread import Reader
from procurator.snapshots import PARTIAL

if TYPE_CHECKING:
    from procurator.config import HypervisorSettings

log = logging.getLogger(__name__)

BACKEND = "cloud-hypervisor"
ENV_BINARY = "PROCURATOR_CLOUD_HYPERVISOR"
CONFIG_KEY = "hypervisor.binary"
LOG_TAIL_LINES = 6

_POLL_FIRST = 0.0005  # first sleep of a polling wait; grows by a quarter each round up to _POLL_MAX
_POLL_MAX = 0.02
_INFO_EVERY = 0.5  # while waiting for the guest to power off, also ask vm.info this often


def resolve_binary(configured: str | None) -> Path:
    """The cloud-hypervisor binary: $PROCURATOR_CLOUD_HYPERVISOR, else the worker config's value.

    A bare name is looked up on PATH. Raises HypervisorStartError naming where the value came from and
    how to fix it.
    """
    from_env = os.environ.get(ENV_BINARY, "").strip()
    value, source = (from_env, ENV_BINARY) if from_env else ((configured or "").strip(), CONFIG_KEY)
    if not value:
        raise HypervisorStartError(
            f"no cloud-hypervisor binary configured: set {CONFIG_KEY} in the worker configuration "
            f"or the environment variable {ENV_BINARY} to its path"
        )
    if "/" not in value:
        found = shutil.which(value)
        if found is None:
            raise HypervisorStartError(
                f"{value!r} (from {source}) is not on PATH: install cloud-hypervisor, or set {CONFIG_KEY} "
                f"in the worker configuration or {ENV_BINARY} to the binary's absolute path"
            )
        return Path(found)
    path = Path(value)
    if not path.is_file() or not os.access(path, os.X_OK):
        raise HypervisorStartError(
            f"{path} (from {source}) is not an executable file: install cloud-hypervisor or point {source} "
            "at its binary"
        )
    return path


class CloudHypervisor:
    """The `Hypervisor` protocol over cloud-hypervisor processes.

    `start_timeout` bounds the wait for the API to answer after spawning; `api_timeout` any single API
    call; `boot_timeout` the `vm.boot` call (cloud-hypervisor loads the kernel and initramfs inside it);
    `step_timeout` each escalation step of the stop ladder and the final wait for the process to exit;
    `snapshot_timeout` a `vm.snapshot` or `vm.restore` call (they write or read the guest's memory).
    """

    name = BACKEND

    def __init__(
        self,
        binary: Path,
        *,
        start_timeout: float = 10.0,
        api_timeout: float = 10.0,
        boot_timeout: float = 60.0,
        step_timeout: float = 5.0,
        serial_max_bytes: int = serial_keeper.DEFAULT_MAX_BYTES,
        snapshot_timeout: float = 300.0,
        landlock: bool = True,
    ) -> None:
        self.binary = binary
        self.landlock = landlock  # Landlock where supported (the worker configuration's hypervisor.landlock)
        self.snapshot_timeout = snapshot_timeout
        self.start_timeout = start_timeout
        self.api_timeout = api_timeout
        self.boot_timeout = boot_timeout
        self.step_timeout = step_timeout
        self.serial_max_bytes = serial_max_bytes
        self._keepers = Keepers(serial_max_bytes)  # serial keepers we spawned, by VM dir
        # Processes we spawned and their start times, kept so that they are reaped (and not reported as
        # leaked by the runtime), and so that checking on them costs a waitpid rather than /proc reads.
        self._children: dict[int, tuple[subprocess.Popen[bytes], int]] = {}
        self._guest_ends = _GuestEnds()

    # --- start ----------------------------------------------------------------------------------

    def version(self) -> Version:
        """The binary's release, asked once per binary path and modification (see `binary_version`)."""
        return binary_version(self.binary)

    def argv(self, spec: LaunchSpec, api_fd: int, version: Version | None = None) -> list[str]:
        """The command line for `spec`, with the API socket already bound as `api_fd`.

        Only what `version` accepts: `--no-shutdown` first appeared in v52.0 (cloud-hypervisor/src/main.rs);
        without it the VMM exits 0 when its guest powers off, which supervision takes as a clean stop.
        """
        version = version or self.version()
        argv = [
            str(self.binary),
            "--api-socket", f"fd={api_fd}",
            "--event-monitor", f"path={spec.events_path}",
            "--log-file", str(spec.hypervisor_log),
            "--seccomp", "true",
        ]  # fmt: skip
        if version >= NO_SHUTDOWN_SINCE:
            argv.append("--no-shutdown")
        argv.append("-v")
        return argv

    def start(self, spec: LaunchSpec) -> Handle:
        """Spawn cloud-hypervisor for `spec`, create and boot the VM; on any failure leave nothing behind."""
        self._check_binary()
        version = self.version()
        owner = spec.owner or _lookup_user(spec.user)
        spec.vm_dir.mkdir(parents=True, exist_ok=True)
        body, handed = split_handed_nets(wire_config(spec), spec.tap_fds)
        serial = body.get("serial", {}).get("mode") == "Socket"
        writable = spec.writable
        if serial:  # the VMM binds the socket there again at a guest reset: under Landlock it may write there
            writable = (*writable, keepers.prepare(spec.vm_dir, owner))
        if self.landlocks(version):
            body.update(landlock_fields(spec, body, version, writable))

        def steps(api: ApiClient, proc: subprocess.Popen[bytes], keep: bool) -> None:
            self._start_step(api, proc, spec, "vm.create", body=body, timeout=self.api_timeout)
            for net, fds in handed:
                self._start_step(api, proc, spec, "vm.add-net", body=net, timeout=self.api_timeout, fds=fds)
            # Before v53 the serial device drops what the guest writes while no client is connected, so
            # the guest boots only once the keeper is; from v53 it keeps it (up to 1 MiB) for the keeper
            if keep and version < SERIAL_BUFFERED_SINCE:
                self._keepers.connected(spec.name, spec.vm_dir, self.start_timeout)
            self._start_step(api, proc, spec, "vm.boot", body=None, timeout=self.boot_timeout)
            if keep and version >= SERIAL_BUFFERED_SINCE:
                self._keepers.connected(spec.name, spec.vm_dir, self.start_timeout)

        keeper_socket = Path(body["serial"]["socket"]) if serial else None
        return self._run(spec, owner, version, steps, "running", keeper_socket=keeper_socket)

    def landlocks(self, version: Version) -> bool:
        """Whether VMs of `version` run under Landlock: asked for, the release has it (v41+), and the kernel
        has the ABI it asks for (V3; a hard requirement from v48, so an older kernel would fail vm.create)."""
        if not self.landlock or version.major < landlock.LANDLOCK_SINCE:
            return False
        if landlock.host_abi() < landlock.NEEDED_ABI:
            log.warning(
                "this kernel has Landlock ABI %d, cloud-hypervisor needs %d: VMs run without Landlock",
                landlock.host_abi(),
                landlock.NEEDED_ABI,
            )
            return False
        return True

    def _run(
        self,
        spec: LaunchSpec,
        owner: tuple[int, int] | None,
        version: Version,
        steps: Callable[[ApiClient, subprocess.Popen[bytes], bool], None],
        done: str,
        *,
        keeper_socket: Path | None,
    ) -> Handle:
        """A fresh cloud-hypervisor process for `spec`, its API awaited, then `steps` (create and boot, or
        restore), told whether a serial keeper was started; on any failure nothing is left behind.

        With a `keeper_socket` (the serial socket the VMM will bind) the keeper is spawned right after the
        VMM, so that its interpreter starts while the VMM does; it connects once vm.create or vm.restore
        binds the socket, and `steps` await it (`Keepers.connected`) where the release needs it."""
        with contextlib.ExitStack() as undo:
            listener = _bind_api_socket(spec.api_socket)
            undo.callback(self._remove_sockets, spec.vm_dir)
            with listener:
                proc = self._spawn(spec, listener, owner, version)
            undo.callback(self._kill_child, proc)
            start_time = process.process_start_time(proc.pid)
            keep = False
            if keeper_socket is not None and start_time is not None:
                self._spawn_keeper(spec, proc.pid, start_time, keeper_socket)
                keep = True
            with ApiClient(spec.api_socket, timeout=self.api_timeout) as api:
                self._await_api(api, proc, spec)
                steps(api, proc, keep)
            if start_time is None or proc.poll() is not None:
                raise self._died(spec, proc)
            undo.pop_all()
        self._children[proc.pid] = (proc, start_time)
        log.info("vm %s: cloud-hypervisor %s as pid %d", spec.name, done, proc.pid)
        return Handle(BACKEND, proc.pid, start_time, spec.api_socket, spec.vm_dir)

    def _spawn_keeper(self, spec: LaunchSpec, pid: int, start_time: int, socket_path: Path) -> None:
        """The serial keeper (procurator/serial_keeper.py) of `socket_path`, started without waiting."""
        self._keepers.spawn(
            spec.name, spec.vm_dir, spec.serial_log, pid=pid, start_time=start_time, socket_path=socket_path
        )

    def _remove_sockets(self, vm_dir: Path) -> None:
        """After the process is gone: wait for its serial keeper to exit, remove the sockets it left."""
        self._keepers.gone(vm_dir, self.step_timeout)
        sockets.remove(vm_dir / "api.sock")

    def _check_binary(self) -> None:
        if not self.binary.is_file() or not os.access(self.binary, os.X_OK):
            raise HypervisorStartError(
                f"{self.binary}: cloud-hypervisor binary not found or not executable; install it and set "
                f"{CONFIG_KEY} in the worker configuration or {ENV_BINARY}"
            )

    def _spawn(
        self, spec: LaunchSpec, listener: socket.socket, owner: tuple[int, int] | None, version: Version
    ) -> subprocess.Popen[bytes]:
        with _open_log(spec.hypervisor_log) as log_file:
            if owner is not None:
                _hand_over(owner, spec.hypervisor_log, spec.events_path, spec.serial_log)
            try:
                return process.spawn(
                    self.argv(spec, listener.fileno(), version),
                    stdout=log_file,
                    stderr=log_file,
                    pass_fds=(listener.fileno(),),
                    user=spec.user,
                    uid=spec.uid,
                    gid=spec.gid,
                    groups=spec.groups,
                    netns=spec.netns,
                    join=spec.join,
                )
            except ProcessError as exc:
                raise HypervisorStartError(f"vm {spec.name!r}: cannot start cloud-hypervisor: {exc}") from exc

    def _await_api(self, api: ApiClient, proc: subprocess.Popen[bytes], spec: LaunchSpec) -> None:
        """Wait (bounded) until vmm.ping answers; fail at once if the process exits meanwhile."""
        deadline = time.monotonic() + self.start_timeout
        last = ""
        while True:
            if proc.poll() is not None:
                raise self._died(spec, proc)
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                waited = WaitTimeoutError(
                    f"cloud-hypervisor to answer vmm.ping on {spec.api_socket}", self.start_timeout, last
                )
                raise HypervisorStartError(f"vm {spec.name!r}: {waited}") from waited
            try:
                api.get("vmm.ping", timeout=min(remaining, 1.0))
            except HypervisorError as exc:
                last = str(exc)
                with contextlib.suppress(Exception):  # the process may be exiting: let it finish
                    proc.wait(timeout=min(0.05, max(remaining, 0.0)))
                continue
            return

    def _start_step(
        self,
        api: ApiClient,
        proc: subprocess.Popen[bytes],
        spec: LaunchSpec,
        endpoint: str,
        *,
        body: dict[str, Any] | None,
        timeout: float,
        fds: tuple[int, ...] = (),
    ) -> None:
        try:
            if fds and body is not None:
                api.put_with_fds(endpoint, body, fds, timeout=timeout)
            else:
                api.put(endpoint, body, timeout=timeout)
        except HypervisorError as exc:
            with contextlib.suppress(Exception):
                proc.wait(timeout=0.05)
            if proc.poll() is not None:
                raise self._died(spec, proc) from exc
            raise HypervisorStartError(f"vm {spec.name!r}: {exc}") from exc

    def _died(self, spec: LaunchSpec, proc: subprocess.Popen[bytes]) -> HypervisorStartError:
        code = proc.poll()
        if code is None:
            how = "vanished"
        elif code >= 0:
            how = f"exited with code {code}"
        else:
            try:
                how = f"was killed by {signal.Signals(-code).name}"
            except ValueError:
                how = f"was killed by signal {-code}"
        try:
            tail = " | ".join(logfiles.tail(spec.hypervisor_log, LOG_TAIL_LINES, nonblank=True))
        except OSError:
            tail = ""
        quoted = (
            f"; last lines of {spec.hypervisor_log}: {tail}" if tail else f"; {spec.hypervisor_log} is empty"
        )
        return HypervisorStartError(f"vm {spec.name!r}: cloud-hypervisor {how} while starting{quoted}")

    def _kill_child(self, proc: subprocess.Popen[bytes]) -> None:
        """Undo of the spawn step: SIGKILL and reap, bounded."""
        if proc.poll() is None:
            process.signal_process(proc.pid, signal.SIGKILL)
        try:
            proc.wait(timeout=self.step_timeout)
        except Exception:  # an undo step logs and carries on
            log.warning(
                "cloud-hypervisor pid %d did not exit within %.1fs of SIGKILL", proc.pid, self.step_timeout
            )

    # --- queries --------------------------------------------------------------------------------

    def ping(self, handle: Handle, *, timeout: float | None = None) -> dict[str, Any]:
        """vmm.ping: {build_version, version, pid, features}; bounded by `timeout` (default api_timeout).

        The VMM thread answers it (vmm/src/api/mod.rs `VmmPing`): a hung VMM does not, whatever its
        HTTP thread still accepts."""
        limit = self.api_timeout if timeout is None else timeout
        answer = get_once(handle.api_socket, "vmm.ping", timeout=limit)
        if not isinstance(answer, dict):
            raise HypervisorError(
                f"vmm.ping: expected a JSON object from {handle.api_socket}, got {answer!r}"
            )
        return answer

    def info(self, handle: Handle) -> VmInfo:
        """vm.info as a VmInfo; `VmState.GONE` when the process is no longer running."""
        if not self._alive(handle):
            return VmInfo(state=VmState.GONE)
        answer = get_once(handle.api_socket, "vm.info", timeout=self.api_timeout)
        if not isinstance(answer, dict) or "state" not in answer:
            raise HypervisorError(
                f"vm.info: expected a VmInfo object from {handle.api_socket}, got {answer!r}"
            )
        try:
            state = VmState(answer["state"])
        except ValueError as exc:
            raise HypervisorError(f"vm.info: unknown VM state {answer['state']!r}") from exc
        return VmInfo(state=state, details=answer)

    def counters(self, handle: Handle) -> dict[str, dict[str, int]]:
        """vm.counters: per device id, its counters."""
        answer = get_once(handle.api_socket, "vm.counters", timeout=self.api_timeout)
        if answer is None:
            return {}
        if not isinstance(answer, dict) or not all(
            isinstance(values, dict) and all(isinstance(v, int) for v in values.values())
            for values in answer.values()
        ):
            raise HypervisorError(f"vm.counters: expected {{device: {{counter: int}}}}, got {answer!r}")
        return {str(device): {str(k): int(v) for k, v in values.items()} for device, values in answer.items()}

    def pause(self, handle: Handle) -> None:
        with self._api(handle) as api:
            api.put("vm.pause")

    def resume(self, handle: Handle) -> None:
        with self._api(handle) as api:
            api.put("vm.resume")

    def snapshot(self, handle: Handle, directory: Path) -> None:
        """vm.snapshot into `directory` (which must exist and hold no config.json, state.json or
        memory-ranges: cloud-hypervisor creates them `create_new`). The VM must be paused (`Vm::snapshot`
        refuses a running one: "Trying to snapshot while VM is running"); it stays paused. A landlocked VMM
        that may not write `directory` writes below its snapshot directory, and the files are moved."""
        with self._api(handle, timeout=self.snapshot_timeout) as api:
            staging = _landlock_staging(api, directory)
            try:
                api.put("vm.snapshot", {"destination_url": f"file://{staging or directory}"})
            except BaseException:
                if staging is not None:
                    shutil.rmtree(staging, ignore_errors=True)
                    with contextlib.suppress(OSError):
                        staging.parent.rmdir()  # only when empty
                raise
        if staging is not None:
            _move_into(staging, directory)

    def restore(self, spec: LaunchSpec, directory: Path, *, paused: bool) -> Handle:
        """A fresh cloud-hypervisor process (no VM: `vm_restore` refuses a VMM that has one), then
        vm.restore from `directory`, then the guest runs unless `paused`.

        The restored VM takes the snapshot's config.json as it is: TAPs are opened again by their names
        (so they must exist), the disks are opened and locked (from v46) at their paths, the consoles made
        anew (the serial socket at the same path, which the serial keeper connects to before the guest
        runs). From v52 `vm.restore` takes `resume`; it is sent only from v53, whose serial device keeps
        what the guest writes before the keeper connects, else the guest resumes with `vm.resume` after.
        A net that was handed its TAP as descriptors (vm.add-net) is handed them again: `net_fds` in the
        body, the descriptors with the request (`_restored_net_fds`).
        """
        self._check_binary()
        version = self.version()
        owner = spec.owner or _lookup_user(spec.user)
        saved = _snapshot_config(directory)
        net_fds = _restored_net_fds(spec, saved, directory)
        saved_serial = saved.get("serial") or {}
        socket_serial = saved_serial.get("mode") == "Socket" and bool(saved_serial.get("socket"))
        resume_in_body = not paused and version >= RESTORE_RESUME_SINCE
        body: dict[str, Any] = {"source_url": f"file://{directory}"}
        if version >= RESTORE_MODE_SINCE:
            body["memory_restore_mode"] = "Copy"  # the default: OnDemand needs userfaultfd
        if resume_in_body:
            body["resume"] = True
        if net_fds:
            body["net_fds"] = [{"id": ident, "num_fds": len(fds)} for ident, fds in net_fds]
        passed = tuple(fd for _, fds in net_fds for fd in fds)
        spec.vm_dir.mkdir(parents=True, exist_ok=True)
        # the VMM binds the saved socket path: in our serial directory, or (a snapshot of an older
        # Procurator) in the VM directory itself
        if socket_serial:
            keepers.prepare(spec.vm_dir, owner)

        def steps(api: ApiClient, proc: subprocess.Popen[bytes], keep: bool) -> None:
            self._start_step(
                api, proc, spec, "vm.restore", body=body, timeout=self.snapshot_timeout, fds=passed
            )
            if keep:
                self._keepers.connected(spec.name, spec.vm_dir, self.start_timeout)
            if not paused and not resume_in_body:
                self._start_step(api, proc, spec, "vm.resume", body=None, timeout=self.api_timeout)

        keeper_socket = Path(str(saved_serial["socket"])) if socket_serial else None
        return self._run(spec, owner, version, steps, "restored", keeper_socket=keeper_socket)

    def console_path(self, handle: Handle) -> Path:
        """The pty of the virtio console: cloud-hypervisor writes its path into vm.info's `console.file`."""
        info = self.info(handle)
        console = info.details.get("config", {}).get("console") or {}
        path = console.get("file") if isinstance(console, dict) else None
        if not isinstance(path, str) or not path:
            raise HypervisorError(
                f"vm.info on {handle.api_socket} names no console pty (console: {console!r}); "
                "the VM was created without a Pty console: restart it with this Procurator"
            )
        return Path(path)

    def guest_end(self, vm_dir: Path) -> GuestEnd | None:
        """From the event monitor file: `vm`/`shutdown`, `guest`/`panic`, `vm`/`rebooting` (see
        `_event_verdict`); the file is read again only when it changed."""
        return self._guest_ends.verdict(f"{vm_dir}/events")

    def adopt(self, handle: Handle) -> bool:
        """Whether `handle` is a cloud-hypervisor process of ours, still running and answering."""
        if handle.backend != BACKEND or not self._alive(handle):
            return False
        try:
            pong = get_once(handle.api_socket, "vmm.ping", timeout=min(self.api_timeout, 2.0))
        except HypervisorError as exc:
            log.info("cannot adopt pid %d: %s", handle.pid, exc)
            return False
        # The API reports the pid serving it: the socket must belong to the very process recorded.
        return isinstance(pong, dict) and pong.get("pid") in (None, handle.pid)

    # --- stop -----------------------------------------------------------------------------------

    def shutdown(self, handle: Handle, timeout: float) -> StopResult:
        """Power button, up to `timeout` for the guest; then vm.shutdown, vmm.shutdown, SIGTERM, SIGKILL."""
        if not self._alive(handle):
            self._forget(handle)
            return StopResult(graceful=False, steps=("gone",))
        steps: list[str] = []
        graceful = False
        events = EventReader(handle.vm_dir / "events")
        with process.ExitWatch(handle.pid, handle.start_time) as watch:
            with self._api(handle, timeout=self.step_timeout) as api:
                steps.append("power-button")
                try:
                    api.put("vm.power-button")
                except InvalidStateError as exc:  # the guest is not running (it powered off already)
                    log.info("power button: %s", exc)
                    graceful = True
                except HypervisorError as exc:
                    log.warning("power button: %s", exc)
                else:
                    graceful = self._await_poweroff(api, watch, events, timeout)
                for rung in ("vmm.shutdown",) if graceful else ("vm.shutdown", "vmm.shutdown"):
                    if watch.exited():
                        break
                    steps.append(rung)
                    try:
                        api.put(rung)
                    except HypervisorError as exc:
                        log.warning("%s: %s", rung, exc)
                        continue
                    if rung == "vmm.shutdown":
                        watch.wait(self.step_timeout)
            for sig in (signal.SIGTERM, signal.SIGKILL):
                if watch.exited():
                    break
                steps.append(sig.name)
                process.signal_process(handle.pid, sig)
                watch.wait(self.step_timeout)
            if not watch.exited():
                raise HypervisorError(
                    f"cloud-hypervisor pid {handle.pid} still runs {self.step_timeout:.1f}s after SIGKILL "
                    f"(steps: {', '.join(steps)}); it is stuck in the kernel, see /proc/{handle.pid}/stack"
                )
        self._forget(handle)
        log.info("cloud-hypervisor pid %d stopped (graceful: %s; steps: %s)", handle.pid, graceful, steps)
        return StopResult(graceful=graceful, steps=tuple(steps))

    def _await_poweroff(
        self, api: ApiClient, watch: process.ExitWatch, events: EventReader, timeout: float
    ) -> bool:
        """After the power button: whether the guest powered off within `timeout`."""
        deadline = time.monotonic() + timeout
        next_info = time.monotonic() + _INFO_EVERY
        pause = _POLL_FIRST
        while True:
            if any(e.get("source") == "vm" and e.get("event") == "shutdown" for e in events.read()):
                return True
            now = time.monotonic()
            if now >= deadline:
                log.info(
                    "pid %d: guest did not power off within %.1fs of the power button", watch.pid, timeout
                )
                return False
            if now >= next_info:
                next_info = now + _INFO_EVERY
                try:
                    answer = api.get("vm.info")
                except HypervisorError:
                    answer = None
                # cloud-hypervisor drops the VM once its guest exits: vm.info says Created again.
                if isinstance(answer, dict) and answer.get("state") in (VmState.SHUTDOWN, VmState.CREATED):
                    return True
            if watch.wait(min(pause, max(deadline - now, 0.0))):
                # It exited on its own: graceful only if it said the VM shut down first.
                return any(e.get("event") == "shutdown" for e in events.read())
            pause = min(pause * 1.25, _POLL_MAX)

    def kill(self, handle: Handle) -> None:
        """SIGKILL the process (if it is still ours), wait for it, remove its socket."""
        if self._alive(handle):
            with process.ExitWatch(handle.pid, handle.start_time) as watch:
                process.signal_process(handle.pid, signal.SIGKILL)
                if not watch.wait(self.step_timeout):
                    raise HypervisorError(
                        f"cloud-hypervisor pid {handle.pid} still runs {self.step_timeout:.1f}s after "
                        f"SIGKILL; it is stuck in the kernel, see /proc/{handle.pid}/stack"
                    )
        self._forget(handle)

    # --- helpers --------------------------------------------------------------------------------

    def _api(self, handle: Handle, *, timeout: float | None = None) -> ApiClient:
        return ApiClient(handle.api_socket, timeout=self.api_timeout if timeout is None else timeout)

    def _child(self, handle: Handle) -> subprocess.Popen[bytes] | None:
        """Our own child process for `handle`, if it is one (same pid and start time)."""
        entry = self._children.get(handle.pid)
        return entry[0] if entry is not None and entry[1] == handle.start_time else None

    def _alive(self, handle: Handle) -> bool:
        child = self._child(handle)
        if child is not None and child.poll() is not None:  # reaped now: no zombie lingers
            return False
        return process.alive(handle.pid, handle.start_time)  # also false for a zombie not yet reapable

    def _forget(self, handle: Handle) -> None:
        """The process is gone: reap it if it is our child, remove its socket (unless another answers)."""
        child = self._child(handle)
        if child is not None:
            self._children.pop(handle.pid, None)
            # A killed multi-threaded process shows as a zombie before it can be reaped: wait, bounded.
            with contextlib.suppress(Exception):
                child.wait(timeout=self.step_timeout)
        if sockets.answers(handle.api_socket):  # a stale handle: the socket is a newer process's
            log.warning("%s: left in place, another process listens on it", handle.api_socket)
            return
        self._remove_sockets(handle.vm_dir)


MAX_SNAPSHOT_CONFIG = 4 * 1024 * 1024  # bytes of a snapshot's config.json (a VmConfig: a few KiB)


def _snapshot_config(directory: Path) -> dict[str, Any]:
    """The VmConfig a cloud-hypervisor snapshot holds (`config.json`, as `recv_vm_config` reads it)."""
    path = directory / "config.json"
    try:
        return Reader(str(path), jsonread.read_file(path, MAX_SNAPSHOT_CONFIG)).data
    except FileNotFoundError as exc:
        raise HypervisorStartError(f"{path} is missing; this is no cloud-hypervisor snapshot") from exc
    except ValidationError as exc:
        raise HypervisorStartError(f"{path}: cannot read the snapshot's config: {exc.problem}") from exc


def wire_config(spec: LaunchSpec) -> dict[str, Any]:
    """The `vm.create` body for cloud-hypervisor: the runtime config, with a `File` serial port turned into
    a `Socket` in the VM directory that the serial keeper copies into that file (see serial_keeper.py)."""
    body, _ = wire_serial(copy.deepcopy(spec.config), spec.vm_dir)  # copied whether or not changed
    return body


def landlock_fields(
    spec: LaunchSpec, body: dict[str, Any], version: Version, writable: tuple[Path, ...]
) -> dict[str, Any]:
    """`landlock_enable` and our `landlock_rules` for `body`, after checking that the VMM's own rules and
    ours give everything the VM opens after vm.create (landlock.needs). `writable` is the spec's
    directories plus the serial socket's. The directories we add are made first: a rule whose path does
    not exist is dropped by cloud-hypervisor without a word."""
    for path in writable:
        try:
            path.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise HypervisorStartError(
                f"{path}: cannot create it for the VM's Landlock rules: {exc.strerror}"
            ) from exc
    ours = landlock.extra_rules(body, writable)
    missing = landlock.uncovered(
        landlock.needs(body, writable), landlock.vmm_rules(body, version.major) + ours
    )
    if missing:
        raise HypervisorStartError(
            f"vm {spec.name!r}: under Landlock cloud-hypervisor {version} could not reach "
            f"{', '.join(f'{m.path} ({m.access})' for m in missing)}; set hypervisor.landlock to false in "
            "the worker configuration and report this"
        )
    return {"landlock_enable": True, "landlock_rules": [rule.to_json() for rule in ours]}


_STAGING = "landlock-staging"  # below the VM's snapshot directory; snapshots.prune removes what is left


def _landlock_staging(api: ApiClient, directory: Path) -> Path | None:
    """For a landlocked VMM (vm.info's config says so) that may not write `directory` (`snapshot --to`), a
    fresh directory below the first directory it may write (the VM's snapshot directory), else None."""
    answer = api.get("vm.info")
    config = answer.get("config") if isinstance(answer, dict) else None
    if not isinstance(config, dict) or not config.get("landlock_enable"):
        return None
    rules = [
        landlock.Rule(str(r.get("path")), str(r.get("access")))
        for r in config.get("landlock_rules") or []
        if isinstance(r, dict)
    ]
    if not landlock.uncovered([landlock.Rule(str(directory), "w")], rules):
        return None
    writable = [Path(r.path) for r in rules if "w" in r.access and Path(r.path).is_dir()]
    if not writable:
        raise HypervisorError(
            f"cloud-hypervisor runs under Landlock and may write no directory for a snapshot to {directory}; "
            "restart the VM with this Procurator"
        )
    staging = writable[0] / _STAGING / f"{time.time_ns()}{PARTIAL}"
    try:
        staging.mkdir(parents=True)
        st = directory.stat()
        os.chown(staging, st.st_uid, st.st_gid)
    except OSError as exc:
        raise HypervisorError(f"{staging}: cannot stage the snapshot there: {exc.strerror}") from exc
    return staging


def _move_into(staging: Path, directory: Path) -> None:
    """What cloud-hypervisor wrote into `staging`, moved into `directory`; `staging` removed."""
    try:
        for entry in sorted(staging.iterdir()):
            shutil.move(entry, directory / entry.name)
        staging.rmdir()
        with contextlib.suppress(OSError):
            staging.parent.rmdir()  # only when empty
    except OSError as exc:
        raise HypervisorError(f"{staging}: cannot move the snapshot into {directory}: {exc}") from exc


@dataclass(frozen=True, order=True)
class Version:
    """A cloud-hypervisor release, e.g. v48.0 as Version(48, 0)."""

    major: int
    minor: int = 0

    def __str__(self) -> str:
        return f"v{self.major}.{self.minor}"


OLDEST_SUPPORTED = Version(40)
NEWEST_KNOWN = Version(53)
NO_SHUTDOWN_SINCE = Version(52)
RESTORE_MODE_SINCE = Version(52)  # RestoreConfig.memory_restore_mode (vmm/src/config.rs)
RESTORE_RESUME_SINCE = Version(53)  # RestoreConfig.resume is v52's, but v53's serial buffers (see restore)
# vmm/src/serial_manager.rs v53.0: a Socket serial's output goes to a persistent buffer (serial_buffer
# MAX_BUFFER_SIZE, 1 MiB) while no client is connected and is replayed on connect; before, it was dropped
SERIAL_BUFFERED_SINCE = Version(53)
_VERSION_RE = re.compile(r"\bv?(\d+)\.(\d+)(?:\.\d+)?")
_versions: dict[tuple[str, int, int, int], Version] = {}


def parse_version(text: str) -> Version | None:
    """The release in `cloud-hypervisor --version` output ("cloud-hypervisor v48.0.0-dirty", ...)."""
    found = _VERSION_RE.search(text)
    return None if found is None else Version(int(found.group(1)), int(found.group(2)))


def binary_version(binary: Path) -> Version:
    """Ask `binary --version` once per path, inode, size and mtime; refuse releases older than v40.

    Raises HypervisorStartError naming the binary and the fix.
    """
    try:
        st = binary.stat()
    except OSError as exc:
        raise HypervisorStartError(
            f"{binary}: cannot read the cloud-hypervisor binary: {exc.strerror}"
        ) from exc
    key = (str(binary), st.st_ino, st.st_size, st.st_mtime_ns)
    cached = _versions.get(key)
    if cached is not None:
        return cached
    try:
        result = process.run([str(binary), "--version"], timeout=10.0)
    except ProcessError as exc:
        raise HypervisorStartError(f"{binary} --version failed: {exc}; is it cloud-hypervisor?") from exc
    version = parse_version(result.stdout)
    if version is None:
        raise HypervisorStartError(
            f"{binary} --version printed {result.stdout.strip()[:80]!r}, no release number; "
            "point hypervisor.binary at a cloud-hypervisor binary"
        )
    if version < OLDEST_SUPPORTED:
        raise HypervisorStartError(
            f"{binary} is cloud-hypervisor {version}; Procurator supports {OLDEST_SUPPORTED} to "
            f"{NEWEST_KNOWN}: install a newer cloud-hypervisor"
        )
    if version > NEWEST_KNOWN:
        log.warning(
            "%s is cloud-hypervisor %s, newer than the newest checked (%s)", binary, version, NEWEST_KNOWN
        )
    _versions[key] = version
    return version


class EventReader:
    """Reads cloud-hypervisor's event monitor file from where it stood when the reader was made.

    The file holds pretty-printed JSON objects separated by blank lines, each
    `{"timestamp": {"secs", "nanos"}, "source", "event", "properties"}`; a half-written one is left for
    the next read.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            self.offset = path.stat().st_size
        except OSError:
            self.offset = 0
        self._buffer = ""
        self._decoder = json.JSONDecoder()

    def read(self) -> list[dict[str, Any]]:
        """The events written since the last read."""
        try:
            with self.path.open("rb") as f:
                size = os.fstat(f.fileno()).st_size
                if size < self.offset:  # truncated: the process was restarted
                    self.offset, self._buffer = 0, ""
                f.seek(self.offset)
                chunk = f.read()
        except OSError:
            return []
        self.offset += len(chunk)
        self._buffer += chunk.decode("utf-8", errors="replace")
        found: list[dict[str, Any]] = []
        text, pos = self._buffer, 0
        while True:
            while pos < len(text) and text[pos].isspace():
                pos += 1
            if pos >= len(text):
                break
            try:
                value, end = self._decoder.raw_decode(text, pos)
            except json.JSONDecodeError:
                break  # incomplete: wait for the rest
            if isinstance(value, dict):
                found.append(value)
            pos = end
        self._buffer = text[pos:]
        return found


@dataclass
class _EventsSeen:
    key: tuple[int, int, int]  # inode, size, mtime
    verdict: GuestEnd | None


def _event_verdict(event: dict[str, object]) -> GuestEnd | None:
    """What one event-monitor event says of the guest, if anything.

    `vm`/`shutdown` is a power-off; `guest`/`panic` comes from the pvpanic device (devices/src/pvpanic.rs);
    `vm`/`rebooting` is a guest reset, which cloud-hypervisor serves inside the same process (vmm/src/lib.rs
    `vm_reboot`, v40 to v53): with the bundles' `reboot=t panic=-1` a kernel panic is such a reset.
    """
    source, name = event.get("source"), event.get("event")
    if source == "vm" and name == "shutdown":
        return GuestEnd.SHUTDOWN
    if name == "panic" and source in ("vm", "guest"):
        return GuestEnd.PANIC
    if source == "vm" and name in ("rebooting", "rebooted"):
        return GuestEnd.RESET
    return None


class _GuestEnds:
    """What a cloud-hypervisor's event monitor file says of its guest, re-read only when it changed.

    The file belongs to the current hypervisor process (each start truncates it). A `vm shutdown` event
    there while the VM should run means the guest powered off (under `--no-shutdown` the process stays);
    a `vm panic` event (pvpanic) means it crashed.
    """

    def __init__(self) -> None:
        self._seen: dict[str, _EventsSeen] = {}  # one entry per VM directory; a gone file drops it

    def verdict(self, path: str) -> GuestEnd | None:
        try:
            st = os.stat(path)
        except OSError:
            self._seen.pop(path, None)
            return None
        key = (st.st_ino, st.st_size, st.st_mtime_ns)
        seen = self._seen.get(path)
        if seen is not None and seen.key == key:
            return seen.verdict
        reader = EventReader(Path(path))
        reader.offset = 0
        verdict = None
        for event in reader.read():
            said = _event_verdict(event)
            if said is not None:
                verdict = said
                if said in (GuestEnd.PANIC, GuestEnd.RESET):
                    break
        self._seen[path] = _EventsSeen(key, verdict)
        return verdict


def _restored_net_fds(
    spec: LaunchSpec, saved: dict[str, Any], directory: Path
) -> list[tuple[str, tuple[int, ...]]]:
    """(net id, descriptors) for each net of the snapshot's config.json that was built from passed-in
    descriptors: those do not outlive the process, so vm.restore must be sent new ones (`net_fds`, with
    the descriptors as SCM_RIGHTS; vmm/src/config.rs `RestoreConfig::validate` refuses a restore that
    lacks one, v40.0-v53.0). They are the TAPs the runtime config names for the same net ids."""
    taps = {
        str(n.get("id")): str(n["tap"])
        for n in spec.config.get("net") or []
        if isinstance(n, dict) and isinstance(n.get("tap"), str)
    }
    out: list[tuple[str, tuple[int, ...]]] = []
    for index, net in enumerate(saved.get("net") or []):
        if not isinstance(net, dict) or net.get("fds") is None:
            continue
        ident = str(net.get("id"))
        fds = spec.tap_fds.get(taps.get(ident, ""))
        if fds is None or len(fds) != len(net["fds"]):
            raise HypervisorStartError(
                f"vm {spec.name!r}: {directory / 'config.json'} net[{index}] ({ident}) was handed its TAP as "
                f"{len(net['fds'])} descriptors, and this restore has {len(fds or ())} for it; restore it "
                "where its hypervisor runs as another user (vmUsers or user), as it was snapshotted"
            )
        out.append((ident, fds))
    return out


def split_handed_nets(
    body: dict[str, Any], tap_fds: Mapping[str, tuple[int, ...]]
) -> tuple[dict[str, Any], list[tuple[dict[str, Any], tuple[int, ...]]]]:
    """The vm.create body without the nets whose TAP is handed over as descriptors, and those nets as
    vm.add-net bodies (no `tap`: a net with a TAP name is opened by name, `make_virtio_net_device`) with
    their descriptors. vm.create drops any descriptor it is sent, v40 to v53 (http_endpoint.rs
    `VmCreate`); vm.add-net takes those sent with it (`VmAddNet`, `attach_fds_to_cfg` from v49) and, on a
    VM created but not booted, adds the net to its config (lib.rs `vm_add_net`): vm.boot then builds it
    `from_tap_fds`, one descriptor per queue pair (config.rs `VnetQueueFdMismatch`)."""
    if not tap_fds:
        return body, []
    kept: list[Any] = []
    handed: list[tuple[dict[str, Any], tuple[int, ...]]] = []
    for net in body.get("net") or []:
        fds = tap_fds.get(str(net.get("tap"))) if isinstance(net, dict) else None
        if fds is None:
            kept.append(net)
        else:
            handed.append(({k: v for k, v in net.items() if k not in ("tap", "fds")}, fds))
    out = {k: v for k, v in body.items() if k != "net"}
    if kept:
        out["net"] = kept
    return out, handed


def _lookup_user(user: str | None) -> tuple[int, int] | None:
    if user is None:
        return None
    try:
        entry = pwd.getpwnam(user)
    except KeyError as exc:
        raise HypervisorStartError(
            f"user {user!r} (the worker configuration's `user`) does not exist; create it or change `user`"
        ) from exc
    return entry.pw_uid, entry.pw_gid


def _hand_over(owner: tuple[int, int], *paths: Path) -> None:
    """Create the files the hypervisor writes and give them to the user it runs as."""
    for path in paths:
        try:
            path.touch(exist_ok=True)
            os.chown(path, *owner)
        except OSError as exc:
            raise HypervisorStartError(f"{path}: cannot hand it to uid {owner[0]}: {exc.strerror}") from exc


@contextlib.contextmanager
def _open_log(path: Path) -> Iterator[IO[bytes]]:
    """The hypervisor log, emptied, opened for appending: the process's stdout and stderr.

    cloud-hypervisor also opens it itself (`--log-file`) for its logger. Its own errors before the
    logger exists (bad flags) and its fatal error chain at exit go to stderr, hence here too. Both write
    sequentially, and stderr only at the end, so the two do not overwrite each other.
    """
    try:
        f = path.open("ab")
    except OSError as exc:
        raise HypervisorStartError(f"{path}: cannot open the hypervisor log: {exc.strerror}") from exc
    with f:
        f.truncate(0)
        yield f


def _bind_api_socket(path: Path) -> socket.socket:
    """A listening AF_UNIX socket at `path` (mode 0600), replacing a stale one; refuses a live one."""
    claimed = sockets.claim(path)
    if claimed is sockets.Claim.IN_USE:
        raise HypervisorStartError(
            f"{path}: a running process already listens on this API socket; stop that VM first"
        )
    if claimed is sockets.Claim.NOT_A_SOCKET:
        raise HypervisorStartError(f"{path}: exists and is not a socket; remove it")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(str(path))
        path.chmod(0o600)
        sock.listen(16)
    except OSError as exc:
        sock.close()
        sockets.remove(path)
        raise HypervisorStartError(f"{path}: cannot bind the API socket: {exc.strerror or exc}") from exc
    return sock


# --- `procurator doctor`'s questions (hypervisor/base.py `Diagnosis`) ---------------------------------


def kvm_missing(problem: str) -> Finding:
    return Finding(
        "fail", f"{problem}; cloud-hypervisor needs KVM", "enable virtualisation in the firmware and load "
        "kvm_intel or kvm_amd"
    )  # fmt: skip


def kvm_present(settings: HypervisorSettings, detail: str) -> Finding:  # noqa: ARG001 - the protocol's
    return Finding("ok", detail)


def binary_finding(settings: HypervisorSettings) -> Finding:
    try:
        binary = resolve_binary(settings.binary or "cloud-hypervisor")
        version = binary_version(binary)
    except ProcuratorError as exc:
        return Finding("fail", exc.message, f"install cloud-hypervisor {OLDEST_SUPPORTED} to {NEWEST_KNOWN}")
    supported = f"supported {OLDEST_SUPPORTED} to {NEWEST_KNOWN}"
    if version > NEWEST_KNOWN:
        return Finding(
            "warn",
            f"{binary} is cloud-hypervisor {version}, newer than checked ({supported})",
            f"run `procurator doctor --vm REF` to check it boots, or pin {NEWEST_KNOWN}",
        )
    flags = "with --no-shutdown" if version >= NO_SHUTDOWN_SINCE else "without --no-shutdown"
    landlocked = _landlock_state(settings, version)
    return Finding("ok", f"{binary}: cloud-hypervisor {version} ({supported}; runs {flags}); {landlocked}")


def _landlock_state(settings: HypervisorSettings, version: Version) -> str:
    """Whether the VMs of this cloud-hypervisor run under Landlock, and why not (hypervisor/landlock.py)."""
    if not settings.landlock:
        return "Landlock off (hypervisor.landlock)"
    if version.major < landlock.LANDLOCK_SINCE:
        return f"no Landlock (it came in v{landlock.LANDLOCK_SINCE}.0)"
    abi = landlock.host_abi()
    if abi < landlock.NEEDED_ABI:
        return f"no Landlock (the kernel has ABI {abi}, cloud-hypervisor needs {landlock.NEEDED_ABI})"
    return f"Landlock on (kernel ABI {abi})"
