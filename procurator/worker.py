"""The worker daemon (docs/architecture.md): `procurator worker`.

It reconciles this host with its desired deployment (the current generation of the deployment profile
`<state>/profiles/deployment`) on start, whenever that generation changes or a `POST /apply` arrives,
and on a timer; it supervises the VMs, restarting crashed ones by their restart policy; and it serves
its HTTP API (worker_api.py) with status, plans, history and Prometheus metrics.

Supervision is `decide`, a pure function of a VM's restart policy, how it exited, when, and when the
daemon restarted it before (unit-tested with a fake clock), driven by a thin loop:

- policies: `always` restarts after any exit of a VM that should run, `on-failure` only after a crash
  (a hypervisor killed by a signal, exiting non-zero, vanishing without a shutdown, or a guest panic),
  `never` leaves it exited. A VM the user stopped (`procurator stop`, desired "stopped") or removed is
  not supervised at all: a stop someone asked for is never undone.
- backoff: the n-th restart within the crash-loop window waits `backoffSeconds * 2^n` after the exit
  (n from 0), capped at `Limits.max_backoff`.
- crash loop: once `maxRestarts` restarts happened within `Limits.window`, the daemon gives up: the
  VM's record gets desired "failed" and `last_exit` says why; `procurator start` boots it again.

The daemon holds the state lock only while it mutates (one restart, one give-up, the start-up sweep;
reconcile takes it itself), never while it sleeps, so CLI commands keep working beside it; before it
acts it reads the record again under the lock and does nothing if a command changed the VM meanwhile.

Hypervisors run in their own sessions: killing the daemon, even with SIGKILL, stops no VM. SIGTERM (see
`Worker.stop`) ends the loop and the API and leaves the VMs running. A restarted daemon first sweeps
what a daemon killed mid-operation may have left (hypervisors without a record, TAPs of VMs without a
record), then adopts the VMs whose pid and start time are alive and whose hypervisor answers `adopt`
(keeping their pids), then reconciles.
"""

from __future__ import annotations

import contextlib
import logging
import os
import resource
import select
import signal
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from procurator import history, lifecycle, metrics, network, notify, process, reconcile, sweep, worker_api
from procurator.errors import DamagedStateError, NotFoundError, ProcuratorError, UsageError, WaitTimeoutError
from procurator.hypervisor.cloud_hypervisor import EventReader
from procurator.lifecycle import Host, WaitFor
from procurator.models import Bundle, Deployment, Restart
from procurator.state import Damaged, StateDir, VmRecord
from procurator.supervision import (
    DEFAULT_INTERVAL,
    DEFAULT_POLL,
    Decision,
    ExitKind,
    Limits,
    Verdict,
    decide,
    recent,
)

log = logging.getLogger(__name__)

STOP_GRACE = 10.0  # how long SIGTERM waits for a reconcile or restart in progress
ADOPT_PARALLEL = 8  # hypervisors asked at once when adopting
WORK_WAIT = 900.0  # how long a POST /apply waits for the work in progress before it gives up


# --- supervision: observing exits ----------------------------------------------------------------------


@dataclass(frozen=True)
class Exit:
    kind: ExitKind
    detail: str  # for people: "killed by SIGKILL", "guest powered off", ...
    process_gone: bool = True  # False: the hypervisor still runs (cloud-hypervisor idle after power-off)


def _child_exit(pid: int) -> tuple[int, int] | None:
    """(si_code, si_status) of our own exited child `pid`, without reaping it; None if not ours."""
    try:
        info = os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
    except (ChildProcessError, OSError):
        return None
    if info is None:
        return None
    return info.si_code, info.si_status


def _describe_exit(code: int, status: int) -> Exit:
    if code == os.CLD_EXITED:
        if status == 0:
            return Exit(ExitKind.POWERED_OFF, "hypervisor exited 0")
        return Exit(ExitKind.CRASHED, f"hypervisor exited {status}")
    try:
        name = signal.Signals(status).name
    except ValueError:
        name = f"signal {status}"
    return Exit(ExitKind.CRASHED, f"hypervisor killed by {name}")


@dataclass
class _EventsSeen:
    key: tuple[int, int, int]  # inode, size, mtime
    verdict: str | None  # "shutdown", "panic", "reset" or None


RESET_DETAIL = "guest reset (a reboot, or a panic under panic=-1)"


def _event_verdict(event: dict[str, object]) -> str | None:
    """What one event-monitor event says of the guest: "shutdown", "panic", "reset" or nothing.

    `vm`/`shutdown` is a power-off; `guest`/`panic` comes from the pvpanic device (devices/src/pvpanic.rs);
    `vm`/`rebooting` is a guest reset, which cloud-hypervisor serves inside the same process (vmm/src/lib.rs
    `vm_reboot`, v40 to v53): with the bundles' `reboot=t panic=-1` a kernel panic is such a reset.
    """
    source, name = event.get("source"), event.get("event")
    if source == "vm" and name == "shutdown":
        return "shutdown"
    if name == "panic" and source in ("vm", "guest"):
        return "panic"
    if source == "vm" and name in ("rebooting", "rebooted"):
        return "reset"
    return None


class EventsWatch:
    """What a cloud-hypervisor's event monitor file says of its guest, re-read only when it changed.

    The file belongs to the current hypervisor process (each start truncates it). A `vm shutdown` event
    there while the VM should run means the guest powered off (under `--no-shutdown` the process stays);
    a `vm panic` event (pvpanic) means it crashed.
    """

    def __init__(self) -> None:
        self._seen: dict[str, _EventsSeen] = {}

    def verdict(self, path: str) -> str | None:
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
                if said in ("panic", "reset"):
                    break
        self._seen[path] = _EventsSeen(key, verdict)
        return verdict

    def forget(self, keep: set[str]) -> None:
        for path in list(self._seen):
            if path not in keep:
                del self._seen[path]


class PidWatch:
    """Which of many processes have exited, in one poll() over their pidfds.

    A pidfd refers to one process for good (a recycled pid is never taken for it) and becomes readable
    when that process exits, so a pass over a thousand VMs costs one system call. A process whose pidfd
    cannot be had (no pidfd support, out of descriptors) is looked up in /proc instead.
    """

    def __init__(self) -> None:
        self._fds: dict[tuple[int, int], int] = {}
        self._keys: dict[int, tuple[int, int]] = {}
        self._poller = select.poll()

    def exited(self, keys: Iterable[tuple[int, int]]) -> set[tuple[int, int]]:
        """The (pid, start time) pairs among `keys` whose process is gone (or a zombie)."""
        wanted = set(keys)
        for key in [k for k in self._fds if k not in wanted]:
            self._drop(key)
        gone: set[tuple[int, int]] = set()
        for key in wanted - self._fds.keys():
            pid, start_time = key
            try:
                fd = os.pidfd_open(pid)
            except ProcessLookupError:
                gone.add(key)
                continue
            except OSError:
                if not process.alive(pid, start_time):
                    gone.add(key)
                continue
            if process.process_start_time(pid) != start_time:  # checked after opening: the very process
                os.close(fd)
                gone.add(key)
                continue
            self._fds[key] = fd
            self._keys[fd] = key
            self._poller.register(fd, select.POLLIN)
        if self._fds:
            gone.update(self._keys[fd] for fd, _ in self._poller.poll(0) if fd in self._keys)
        return gone

    def _drop(self, key: tuple[int, int]) -> None:
        fd = self._fds.pop(key)
        del self._keys[fd]
        self._poller.unregister(fd)
        os.close(fd)

    def close(self) -> None:
        for key in list(self._fds):
            self._drop(key)


class RecordCache:
    """The VM records, parsed again only when their file changed (every write replaces the file)."""

    def __init__(self, state: StateDir) -> None:
        self.state = state
        self._seen: dict[str, tuple[tuple[int, int, int], VmRecord]] = {}
        self.damaged: dict[str, Damaged] = {}  # VMs set aside: their record cannot be read

    def records(self) -> list[VmRecord]:
        """The readable records; a damaged one is set aside in `damaged` (logged once) and skipped."""
        try:
            entries = sorted(e.name for e in os.scandir(self.state.vms_dir) if e.is_dir())
        except FileNotFoundError:
            return []
        out = []
        base = str(self.state.vms_dir)
        for name in entries:
            try:
                st = os.stat(f"{base}/{name}/record.json")
            except OSError:
                self._seen.pop(name, None)
                continue
            key = (st.st_ino, st.st_size, st.st_mtime_ns)
            cached = self._seen.get(name)
            if cached is not None and cached[0] == key:
                out.append(cached[1])
                continue
            try:
                record = self.state.load_record(name)
            except DamagedStateError as exc:
                self._seen.pop(name, None)
                self._set_aside(Damaged(name, exc))
                continue
            self.damaged.pop(name, None)
            if record is None:
                continue
            self._seen[name] = (key, record)
            out.append(record)
        for name in set(self._seen) - set(entries):
            del self._seen[name]
        for name in set(self.damaged) - set(entries):
            del self.damaged[name]
        return out

    def _set_aside(self, bad: Damaged) -> None:
        known = self.damaged.get(bad.name)
        if known is None or known.error.message != bad.error.message:  # once per damage, not every pass
            log.error("%s: not supervised: %s", bad.name, bad.error)
        self.damaged[bad.name] = bad


def observe_exit(record: VmRecord, events: EventsWatch, *, alive: bool | None = None) -> Exit | None:
    """How the VM of `record` exited, or None while it runs. Costs no API call.

    `alive` is whether its process runs, when the caller knows (see PidWatch); else /proc is read.
    """
    said = events.verdict(f"{record.vm_dir}/events") if record.backend == "cloud-hypervisor" else None
    if alive is None:
        alive = record.pid > 0 and process.alive(record.pid, record.start_time)
    if alive:
        if said == "panic":
            return Exit(ExitKind.CRASHED, "guest panicked", process_gone=False)
        if said == "reset":
            return Exit(ExitKind.CRASHED, RESET_DETAIL, process_gone=False)
        if said == "shutdown":
            return Exit(ExitKind.POWERED_OFF, "guest powered off", process_gone=False)
        return None
    if process.process_start_time(record.pid) == record.start_time:  # a zombie: ours, not reaped yet
        status = _child_exit(record.pid)
        if status is not None:
            found = _describe_exit(*status)
            if said == "panic":
                return Exit(ExitKind.CRASHED, f"guest panicked; {found.detail}")
            return found
    if said == "panic":
        return Exit(ExitKind.CRASHED, "guest panicked")
    if said == "reset":
        return Exit(ExitKind.CRASHED, RESET_DETAIL)
    if said == "shutdown":
        return Exit(ExitKind.POWERED_OFF, "guest powered off")
    return Exit(ExitKind.CRASHED, "hypervisor process vanished")


# --- supervision: the loop's bookkeeping ---------------------------------------------------------------


@dataclass
class Tracked:
    """What the daemon remembers of one supervised VM (in memory: a restarted daemon starts afresh)."""

    restarts: deque[float] = field(default_factory=lambda: deque(maxlen=64))  # monotonic times
    key: tuple[int, int] = (0, 0)  # (pid, start_time) of the exit being handled
    exit: Exit | None = None
    exited_at: float = 0.0
    decision: Decision | None = None
    unadopted_since: float | None = None  # alive after our restart but its hypervisor did not answer


# --- the daemon --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Settings:
    api_socket: Path
    metrics_listen: str | None = None  # "host:port" for an extra TCP listener serving /metrics only
    interval: float = DEFAULT_INTERVAL  # seconds between timer reconciles
    poll: float = DEFAULT_POLL  # seconds between supervision passes
    limits: Limits = field(default_factory=Limits)
    parallel: int = 4
    wait: WaitFor = WaitFor.HEALTHY  # what reconciles wait for (POST /apply may say otherwise)
    adopt_grace: float = 30.0  # an alive hypervisor that does not answer this long is treated as crashed
    counters_ttl: float = 10.0


@dataclass(frozen=True)
class ApplyReport:
    """One reconcile as the daemon saw it."""

    trigger: str  # start | change | timer | api
    deployment: str
    generation: str
    started_at: float  # wall clock
    duration: float
    success: bool
    result: dict[str, Any] | None  # reconcile's ApplyResult.to_json()
    error: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "trigger": self.trigger,
            "deployment": self.deployment,
            "generation": self.generation,
            "started_at": round(self.started_at, 3),
            "duration_seconds": round(self.duration, 3),
            "success": self.success,
            "result": self.result,
            "error": self.error,
        }


class Worker:
    """The daemon. `run()` blocks until `stop()` (call it from a signal handler or another thread)."""

    def __init__(
        self,
        host: Host,
        settings: Settings,
        *,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
    ) -> None:
        self.host = host
        self.settings = settings
        self.clock = clock
        self.wall = wall
        self.started_at = wall()
        self._stopping = threading.Event()
        self._work = threading.Lock()  # one reconcile or supervision action at a time
        self._tracked: dict[str, Tracked] = {}
        self._events = EventsWatch()
        self._pids = PidWatch()
        self._records = RecordCache(host.state)
        self._profile_seen: tuple[int, Path] | None = None
        self._profile_problem = ""
        self._desired: Deployment | None = None
        self._last_apply: ApplyReport | None = None
        self._reconciles: dict[tuple[str, str], int] = {}
        self._durations = metrics.Histogram()
        self._restarted_total = 0
        self.counters = metrics.CountersCache(host.hypervisors, ttl=settings.counters_ttl)
        self._servers: list[worker_api.Server] = []

    # --- running ---------------------------------------------------------------------------------

    def run(self) -> None:
        """Serve the API, sweep, adopt and reconcile, then supervise until `stop()`."""
        self.host.state.ensure()
        _raise_open_files_limit()
        self._servers = worker_api.serve(self, self.settings.api_socket, self.settings.metrics_listen)
        try:
            log.info("worker: serving on %s", self.settings.api_socket)
            with self._working():
                self.sweep()
                adopted = self.adopt()
            notify.notify(
                "READY=1", f"STATUS=serving on {self.settings.api_socket}; {len(adopted)} VM(s) adopted"
            )
            self._profile_seen = self._profile_target()
            self._reconcile_profile("start")
            next_reconcile = self.clock() + self.settings.interval
            while not self._stopping.is_set():
                try:
                    target = self._profile_target()
                    if target != self._profile_seen:
                        self._profile_seen = target
                        self._reconcile_profile("change")
                        next_reconcile = self.clock() + self.settings.interval
                    elif self.clock() >= next_reconcile:
                        self._reconcile_profile("timer")
                        next_reconcile = self.clock() + self.settings.interval
                    self.supervise()
                except ProcuratorError as exc:
                    log.warning("worker: %s", exc)
                except Exception:  # a bug must not stop the supervision of every VM
                    log.exception("worker: unexpected error; carrying on")
                pause = min(self.settings.poll, max(0.0, next_reconcile - self.clock()))
                due = self._next_due()
                if due is not None:
                    pause = min(pause, max(0.0, due - self.clock()))
                self._stopping.wait(max(pause, 0.01))
        finally:
            notify.notify("STOPPING=1")
            for server in self._servers:
                server.close()
            self._servers = []
            # Let a reconcile or restart that is under way finish (bounded); the VMs keep running.
            if self._work.acquire(timeout=STOP_GRACE):
                self._work.release()
            self._pids.close()
            log.info("worker: stopped; VMs keep running")

    def stop(self) -> None:
        """Ask `run()` to return: the loop and the API end, the VMs keep running."""
        self._stopping.set()

    @property
    def stopping(self) -> bool:
        return self._stopping.is_set()

    @contextlib.contextmanager
    def _working(self, timeout: float | None = None) -> Iterator[None]:
        if timeout is None:
            self._work.acquire()
        elif not self._work.acquire(timeout=timeout):
            raise WaitTimeoutError("the worker's reconcile or restart in progress", timeout)
        try:
            yield
        finally:
            self._work.release()

    def _next_due(self) -> float | None:
        dues = [
            t.decision.due
            for t in self._tracked.values()
            if t.decision is not None and t.decision.verdict is Verdict.WAIT and t.decision.due is not None
        ]
        return min(dues) if dues else None

    # --- start-up: sweep and adopt ---------------------------------------------------------------

    def sweep(self) -> list[str]:
        """Remove what a daemon or command killed mid-operation left (see `procurator.sweep`)."""
        return sweep.sweep(self.host.state, self.host.net)

    def adopt(self) -> list[str]:
        """Adopt the recorded VMs still running: alive (pid and start time) and answering their backend."""
        alive = [
            r
            for r in self._records.records()
            if r.desired == "running" and process.alive(r.pid, r.start_time)
        ]
        adopted = []
        with ThreadPoolExecutor(max_workers=ADOPT_PARALLEL, thread_name_prefix="adopt") as pool:
            for record, answered in zip(alive, pool.map(self._adopt_one, alive), strict=True):
                if answered:
                    adopted.append(record.name)
                else:
                    self._track(record.name).unadopted_since = self.clock()
        if adopted:
            log.info("adopted %d running VM(s): %s", len(adopted), ", ".join(adopted))
        return adopted

    def _adopt_one(self, record: VmRecord) -> bool:
        try:
            return self.host.hypervisors(record.backend).adopt(record.handle)
        except ProcuratorError as exc:
            log.warning("%s: cannot adopt pid %d: %s", record.name, record.pid, exc)
            return False

    # --- reconciling -----------------------------------------------------------------------------

    def profile_path(self) -> Path:
        return history.profile_path(self.host.state)

    def _profile_target(self) -> tuple[int, Path] | None:
        """(generation, deployment) the profile points at now: two readlinks, no subprocess."""
        try:
            return history.current(self.host.state)
        except ProcuratorError as exc:
            if str(exc) != self._profile_problem:  # once, not at every pass
                log.warning("%s", exc)
                self._profile_problem = str(exc)
            return None

    def desired(self) -> Deployment | None:
        """The current generation of the deployment profile, loaded; None when there is none."""
        current = history.current(self.host.state)
        return None if current is None else _load_deployment(current[1])

    def _reconcile_profile(self, trigger: str) -> ApplyReport | None:
        """Reconcile to the profile's current deployment, if there is one.

        A new generation ("change") is applied as it is. The daemon's own reconciles ("start", "timer")
        leave to supervision the VMs whose generation is right but whose process is not running (the
        plan's `start` actions): those exited, crashed or were stopped, and their restart policy, backoff
        and crash-loop limit decide, not the timer; `procurator stop` is not undone behind the user's
        back. They run only when something else differs (a VM missing, of another generation, or not
        in the deployment).
        """
        try:
            deployment = self.desired()
        except ProcuratorError as exc:
            log.warning("%s: %s", self.profile_path(), exc)
            return None
        if deployment is None:
            return None
        with self._working():
            if trigger != "change":
                try:
                    the_plan = reconcile.make_plan(self.host, deployment, diffs=False)
                except ProcuratorError as exc:
                    log.warning("plan (%s) of %s failed: %s", trigger, deployment.path, exc)
                    return None
                # VMs the host's shutdown stopped (`procurator shutdown`) come back with the host,
                # whatever their restart policy says about exits.
                held = {r.name for r in self._records.records() if r.last_exit == lifecycle.HOST_SHUTDOWN}
                drift = [
                    a
                    for a in the_plan.actions
                    if a.changes and (a.kind is not reconcile.ActionKind.START or a.name in held)
                ]
                if not drift:
                    self._desired = deployment
                    return None
            return self._reconcile(trigger, deployment, self.settings.wait)

    def apply(self, deployment_path: Path, *, wait: WaitFor | None = None) -> ApplyReport:
        """POST /apply: reconcile to `deployment_path`; on success (of a deployment in the Nix store)
        reconcile makes it the current generation of the deployment profile."""
        deployment = _load_deployment(deployment_path)
        with self._working(timeout=WORK_WAIT):
            report = self._reconcile("api", deployment, wait or self.settings.wait)
            self._profile_seen = self._profile_target()  # our own switch is no change to react to
            return report

    def pause(self, name: str, *, pause: bool) -> dict[str, Any]:
        """POST /pause, /resume: pause or resume one VM's guest; the VM as `ps --json` shows it after."""
        with self._working(timeout=WORK_WAIT):
            (lifecycle.pause if pause else lifecycle.resume)(self.host, name)
        return next(s.to_json() for s in lifecycle.status(self.host) if s.record.name == name)

    def _reconcile(self, trigger: str, deployment: Deployment, wait: WaitFor) -> ApplyReport:
        started, began = self.wall(), self.clock()
        result: dict[str, Any] | None = None
        error = None
        try:
            outcome = reconcile.apply(self.host, deployment, parallel=self.settings.parallel, wait=wait)
        except ProcuratorError as exc:
            success, error = False, str(exc)
            log.warning("reconcile (%s) of %s failed: %s", trigger, deployment.path, exc)
        else:
            success = not outcome.failed
            result = outcome.to_json()
            for action in outcome.actions:
                if action.action.changes:
                    self._tracked.pop(action.action.name, None)  # a new process: supervision starts afresh
        duration = self.clock() - began
        self._desired = deployment
        report = ApplyReport(
            trigger=trigger,
            deployment=str(deployment.path),
            generation=deployment.generation,
            started_at=started,
            duration=duration,
            success=success,
            result=result,
            error=error,
        )
        self._last_apply = report
        key = (trigger, "success" if success else "failure")
        self._reconciles[key] = self._reconciles.get(key, 0) + 1
        self._durations.observe(duration)
        log.info("reconcile (%s) of %s: %s in %.2fs", trigger, deployment.generation, key[1], duration)
        return report

    def plan(self, deployment_path: Path | None) -> Any:
        """GET /plan: what a reconcile to `deployment_path` (default: the desired one) would do."""
        if deployment_path is None:
            deployment = self.desired()
            if deployment is None:
                raise NotFoundError(
                    f"no desired deployment: {self.profile_path()} does not exist yet; "
                    "ask for ?deployment=PATH"
                )
        else:
            deployment = _load_deployment(deployment_path)
        return reconcile.PlanReport.of(deployment, reconcile.make_plan(self.host, deployment)).to_json()

    def history(self) -> Any:
        """GET /history: the generations of the deployment profile, oldest first."""
        return history.read(self.host.state).to_json()

    # --- supervising -----------------------------------------------------------------------------

    def _track(self, name: str) -> Tracked:
        tracked = self._tracked.get(name)
        if tracked is None:
            tracked = self._tracked[name] = Tracked()
        return tracked

    def supervise(self) -> None:
        """One pass: look at every VM that should run and act on the ones that exited.

        Skipped while a reconcile runs: it stops and starts VMs itself, and its transient states (a
        guest powering off before its replacement boots) are not exits to act on.
        """
        if self._work.locked():
            return
        records = self._records.records()
        now = self.clock()
        self._events.forget({f"{r.vm_dir}/events" for r in records})
        supervised = {r.name for r in records if r.desired == "running" and r.pid > 0}
        exited = self._pids.exited((r.pid, r.start_time) for r in records if r.name in supervised)
        for name in list(self._tracked):
            if name not in supervised:
                del self._tracked[name]
        for record in records:
            if record.name not in supervised or self._stopping.is_set():
                continue
            tracked = self._tracked.get(record.name)
            if tracked is not None and tracked.unadopted_since is not None:
                exit_ = self._retry_adopt(record, tracked, now)
            else:
                exit_ = observe_exit(
                    record, self._events, alive=(record.pid, record.start_time) not in exited
                )
            if exit_ is None:
                if tracked is not None:
                    tracked.exit = tracked.decision = None
                continue
            tracked = self._track(record.name)
            key = (record.pid, record.start_time)
            if tracked.exit is None or tracked.key != key:
                tracked.key, tracked.exit, tracked.exited_at = key, exit_, now
                log.info("%s: %s (pid %d)", record.name, exit_.detail, record.pid)
            decision = decide(
                self._restart_policy(record),
                (tracked.exit or exit_).kind,
                exited_at=tracked.exited_at,
                restarts=tracked.restarts,
                now=now,
                limits=self.settings.limits,
            )
            tracked.decision = decision
            if decision.verdict is Verdict.WAIT:
                continue
            with self._working():
                self._act(record, tracked, decision)

    def _retry_adopt(self, record: VmRecord, tracked: Tracked, now: float) -> Exit | None:
        if not process.alive(record.pid, record.start_time):
            tracked.unadopted_since = None
            return observe_exit(record, self._events)
        if self._adopt_one(record):
            tracked.unadopted_since = None
            log.info("%s: adopted pid %d", record.name, record.pid)
            return None
        since = tracked.unadopted_since if tracked.unadopted_since is not None else now
        if now - since < self.settings.adopt_grace:
            return None
        tracked.unadopted_since = None
        return Exit(
            ExitKind.CRASHED,
            f"hypervisor did not answer for {self.settings.adopt_grace:g}s after the worker restarted",
            process_gone=False,
        )

    def _restart_policy(self, record: VmRecord) -> Restart:
        try:
            return Bundle.load(Path(record.bundle)).meta.restart
        except ProcuratorError as exc:
            log.warning("%s: cannot read its bundle (%s); restarting by the default policy", record.name, exc)
            return Restart()

    def _act(self, seen: VmRecord, tracked: Tracked, decision: Decision) -> None:
        """Carry out RESTART, GIVE_UP or LEAVE under the state lock, if the VM is still as it was seen."""
        exit_ = tracked.exit
        if exit_ is None:  # pragma: no cover - supervise sets it before deciding
            return
        with self.host.state.lock():
            record = self.host.state.load_record(seen.name)
            if (
                record is None
                or record.desired != "running"
                or (record.pid, record.start_time) != (seen.pid, seen.start_time)
            ):
                log.info("%s: changed meanwhile (by a command); leaving it", seen.name)
                self._tracked.pop(seen.name, None)
                return
            hv = self.host.hypervisors(record.backend)
            try:
                hv.kill(record.handle)  # an idle hypervisor after a power-off; removes its socket
            except ProcuratorError as exc:
                log.warning("%s: cannot stop its hypervisor pid %d: %s", record.name, record.pid, exc)
                return
            _reap(record.pid, record.start_time)
            if decision.verdict is Verdict.RESTART:
                self._restart(record, tracked, exit_)
                return
            with contextlib.suppress(ProcuratorError):
                network.detach_vm(self.host.net, record.name)
            if decision.verdict is Verdict.GIVE_UP:
                log.error("%s: giving up: %s", record.name, decision.reason)
                failed = record.with_(
                    pid=0,
                    start_time=0,
                    taps=(),
                    desired="failed",
                    last_exit=f"{exit_.detail}; {decision.reason}",
                )
            else:
                log.info("%s: left down: %s", record.name, decision.reason)
                failed = record.with_(
                    pid=0, start_time=0, taps=(), last_exit=f"{exit_.detail}; {decision.reason}"
                )
            self.host.state.save_record(failed)
            self._tracked.pop(record.name, None)

    def _restart(self, record: VmRecord, tracked: Tracked, exit_: Exit) -> None:
        now = self.clock()
        tracked.restarts.append(now)
        self._restarted_total += 1
        try:
            new = lifecycle.start(self.host, record.name, wait=WaitFor.BOOTED)
        except ProcuratorError as exc:
            # A failed start removes the VM's directory: put the record back (same dead pid), so the
            # next pass sees the exit again and backs off further.
            log.warning("%s: restart failed: %s", record.name, exc)
            self.host.state.save_record(
                record.with_(restarts=record.restarts + 1, last_exit=f"{exit_.detail}; restart failed: {exc}")
            )
            tracked.exited_at = now
            tracked.exit = Exit(ExitKind.CRASHED, f"restart failed: {exc}")
            return
        self.host.state.save_record(new.with_(restarts=record.restarts + 1, last_exit=exit_.detail))
        log.warning("%s: restarted (pid %d) after: %s", record.name, new.pid, exit_.detail)
        tracked.exit = tracked.decision = None

    # --- what the API serves ---------------------------------------------------------------------

    def supervision_json(self) -> dict[str, Any]:
        now = self.clock()
        out: dict[str, Any] = {}
        for name, tracked in sorted(self._tracked.items()):
            entry: dict[str, Any] = {
                "restarts_in_window": len(recent(tracked.restarts, now, self.settings.limits.window)),
            }
            if tracked.unadopted_since is not None:
                entry["state"] = "unadopted"
            if tracked.exit is not None:
                entry["exit"] = {"kind": tracked.exit.kind.value, "detail": tracked.exit.detail}
            if tracked.decision is not None:
                entry["state"] = tracked.decision.verdict.value
                entry["reason"] = tracked.decision.reason
                if tracked.decision.verdict is Verdict.WAIT and tracked.decision.due is not None:
                    entry["restart_in"] = round(max(0.0, tracked.decision.due - now), 3)
            out[name] = entry
        return out

    def status_json(self) -> dict[str, Any]:
        deployment = self._desired
        return {
            "worker": {
                "pid": os.getpid(),
                "started_at": round(self.started_at, 3),
                "uptime": round(self.wall() - self.started_at, 1),
                "state_dir": str(self.host.state.root),
                "api_socket": str(self.settings.api_socket),
                "metrics_listen": self.settings.metrics_listen,
                "interval": self.settings.interval,
                "deployment": None
                if deployment is None
                else {"path": str(deployment.path), "generation": deployment.generation},
                "last_apply": None if self._last_apply is None else self._last_apply.to_json(),
                "reconciles": sum(self._reconciles.values()),
                "restarts": self._restarted_total,
            },
            "vms": self._vms_json(),
            "supervision": self.supervision_json(),
        }

    def _vms_json(self) -> list[dict[str, Any]]:
        statuses, damaged = lifecycle.listing(self.host)
        rows = [s.to_json() for s in statuses] + [lifecycle.damaged_json(d) for d in damaged]
        return sorted(rows, key=lambda row: str(row["name"]))

    def metrics_text(self) -> str:
        """The Prometheus exposition: one API call per VM at most (device counters, cached)."""
        statuses, damaged = lifecycle.listing(self.host)
        running = [s.record for s in statuses if s.status is lifecycle.Status.RUNNING]
        counters = self.counters.get(running)
        families = _vm_families(statuses, damaged)
        families += metrics.device_families(counters)
        families += self._worker_families()
        return metrics.render(families)

    def _worker_families(self) -> list[metrics.Family]:
        p = metrics.PREFIX
        total = metrics.Family(
            p + "reconcile_total", "Reconciles run, by trigger and result.", metrics.MetricType.COUNTER
        )
        for (trigger, result), count in sorted(self._reconciles.items()):
            total.add(count, {"trigger": trigger, "result": result})
        duration = metrics.Family(
            p + "reconcile_duration_seconds", "How long reconciles took.", metrics.MetricType.HISTOGRAM
        )
        self._durations.add_to(duration)
        success = metrics.Family(
            p + "last_apply_success",
            "Whether the last reconcile succeeded (1) or not (0).",
            metrics.MetricType.GAUGE,
        )
        stamp = metrics.Family(
            p + "last_apply_timestamp_seconds",
            "When the last reconcile started (Unix time).",
            metrics.MetricType.GAUGE,
        )
        if self._last_apply is not None:
            success.add(1 if self._last_apply.success else 0)
            stamp.add(self._last_apply.started_at)
        restarts = metrics.Family(
            p + "worker_restarts_total",
            "VM restarts this daemon made after exits.",
            metrics.MetricType.COUNTER,
        )
        restarts.add(self._restarted_total)
        up = metrics.Family(
            p + "worker_start_time_seconds", "When the daemon started (Unix time).", metrics.MetricType.GAUGE
        )
        up.add(self.started_at)
        return [total, duration, success, stamp, restarts, up]


def _vm_families(
    statuses: Sequence[lifecycle.VmStatus], damaged: Sequence[Damaged] = ()
) -> list[metrics.Family]:
    p, kind = metrics.PREFIX, metrics.MetricType
    up = metrics.Family(p + "vm_up", "Whether the VM's hypervisor runs (1) or not (0).", kind.GAUGE)
    state = metrics.Family(p + "vm_state", "The VM's state (1 for its current one).", kind.GAUGE)
    uptime = metrics.Family(p + "vm_uptime_seconds", "Seconds since the VM's hypervisor started.", kind.GAUGE)
    restarts = metrics.Family(
        p + "vm_restarts_total", "Times the VM was restarted after an exit.", kind.COUNTER
    )
    cpu = metrics.Family(
        p + "vm_cpu_seconds_total", "CPU time of the VM's hypervisor process (all threads).", kind.COUNTER
    )
    rss = metrics.Family(
        p + "vm_memory_rss_bytes", "Resident memory of the VM's hypervisor process.", kind.GAUGE
    )
    for status in statuses:
        r = status.record
        vm = {"vm": r.name}
        up.add(
            1 if status.status is lifecycle.Status.RUNNING else 0,
            {**vm, "generation": r.generation, "backend": r.backend},
        )
        state.add(1, {**vm, "state": status.state})
        restarts.add(r.restarts, vm)
        if status.status is not lifecycle.Status.RUNNING:
            continue
        if status.uptime is not None:
            uptime.add(max(0.0, status.uptime), vm)
        figures = metrics.process_figures(r.pid, r.start_time)
        if figures is not None:
            cpu.add(figures.cpu_seconds, vm)
            rss.add(figures.rss_bytes, vm)
    for bad in damaged:  # set aside: not supervised until `procurator down NAME`
        state.add(1, {"vm": bad.name, "state": lifecycle.DAMAGED})
    return [up, state, uptime, restarts, cpu, rss]


def _reap(pid: int, start_time: int) -> None:
    """Collect our own exited child `pid` if it is still a zombie (a backend that kept no handle on it)."""
    if process.process_start_time(pid) == start_time:
        with contextlib.suppress(ChildProcessError, OSError):
            os.waitpid(pid, os.WNOHANG)


def _raise_open_files_limit() -> None:
    """Lift the soft limit on open files to the hard one: the daemon holds a pidfd per VM."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def _load_deployment(path: Path) -> Deployment:
    if not Deployment.is_deployment(path):
        text = str(path)
        shown = text if len(text) <= 120 else f"{text[:60]}...{text[-40:]}"
        raise UsageError(f"{shown}: not a deployment (no deployment.json); build one with lib.mkDeployment")
    return Deployment.load(path)
