"""The worker daemon (docs/architecture.md): `procurator worker`.

It reconciles this host with its desired deployment (the current generation of the deployment profile
`<state>/profiles/deployment`) on start, whenever that generation changes or a `POST /apply` arrives,
and on a timer; it supervises the VMs, restarting crashed ones by their restart policy; and it serves
its HTTP API (worker/api.py) with status, plans, history and Prometheus metrics.

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

The VM commands (`up`, `stop`, `start`, `down`, `pause`, `resume`, `snapshot`, `restore`) come to a running
daemon over its API (worker/commands.py) and run under its work lock, so no supervision pass acts on a
VM a command is changing; a command run without the daemon is kept apart by the state lock as below.

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
import ctypes
import logging
import resource
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from procurator import history, lifecycle, logfiles, metrics, network, notify, process, reconcile, sweep
from procurator.config import WatchdogSettings
from procurator.errors import NotFoundError, ProcuratorError, UsageError, WaitTimeoutError
from procurator.lifecycle import Host, WaitFor
from procurator.models import Bundle, Deployment, Restart
from procurator.state import VmRecord
from procurator.supervision import DEFAULT_INTERVAL, DEFAULT_POLL, Decision, ExitKind, Limits, Verdict, decide
from procurator.worker import api, commands, probes, status, views
from procurator.worker.exits import Exit, Tracked, observe_exit, reap
from procurator.worker.records import RecordCache
from procurator.worker.views import ApplyReport, Figures
from procurator.worker.watchdog import Watchdog

log = logging.getLogger("procurator.worker")

STOP_GRACE = 10.0  # how long SIGTERM waits for a reconcile or restart in progress
ADOPT_PARALLEL = 8  # hypervisors asked at once when adopting
WORK_WAIT = 900.0  # how long a POST /apply waits for the work in progress before it gives up


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
    status_listen: str | None = None  # "host:port" for a TCP listener serving the status page (read-only)
    status_actions: bool = False  # the page's forms (restart, apply, rollback), over the socket or loopback
    health_every: float = probes.PROBE_EVERY  # seconds between two rounds of health probes (the page)
    watchdog: WatchdogSettings = field(default_factory=WatchdogSettings)  # pings of each hypervisor's API


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
        self._pids = process.PidWatch()
        self._records = RecordCache(host.state)
        # GET /vms, /status and /metrics's own (the API's threads, under its lock)
        self._listing = RecordCache(host.state, log_damage=False, share=self._records)
        self._listing_lock = threading.Lock()
        # the reconciles' own (each under the work lock): a no-op plan stats the records, not parse them
        self._planning = RecordCache(host.state, log_damage=False, share=self._records)
        self._profile_seen: tuple[int, Path] | None = None
        self._profile_problem = ""
        self._desired: Deployment | None = None
        self._last_apply: ApplyReport | None = None
        self._reconciles: dict[tuple[str, str], int] = {}
        self._durations = metrics.Histogram()
        self._restarted_total = 0
        self._watchdog_kills = 0
        self.watchdog = Watchdog(host, settings.watchdog, clock=clock, records=self._listed)
        self.counters = metrics.CountersCache(host.hypervisors, ttl=settings.counters_ttl)
        self.processes = metrics.ProcessCache(clock=clock)  # /proc figures of /metrics and GET /status
        self._servers: list[api.Server] = []
        self.health = probes.HealthWatch(
            host, every=settings.health_every, wall=wall, listing=lambda: self.listing().statuses
        )
        self.csrf = status.Csrf()

    # --- running ---------------------------------------------------------------------------------

    def run(self) -> None:
        """Serve the API, sweep, adopt and reconcile, then supervise until `stop()`."""
        self.host.state.ensure()
        _raise_open_files_limit()
        _tune_malloc()
        self._servers = api.serve(
            self, self.settings.api_socket, self.settings.metrics_listen, self.settings.status_listen
        )
        self.health.start()
        self.watchdog.start()
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
            self.health.stop()
            self.watchdog.stop()
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
        return sweep.sweep(self.host.state, self.host.net, cgroup_base=lifecycle.cgroup_base(self.host))

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
                    the_plan = reconcile.make_plan(self.host, deployment, diffs=False, records=self._planning)
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

    # --- the VM commands (worker/commands.py; POST /up, /vm/NAME/VERB) ---------------------------------
    #
    # Each runs under the work lock (no supervision pass or reconcile meanwhile) and, inside lifecycle,
    # the state lock; then supervision of that VM starts afresh. `stop` and `down` write the VM's desired
    # state before it goes down, so supervision never restarts it; `start` boots it and supervision takes
    # it from there (a VM the worker gave up on, desired "failed", is supervised again).

    def up_vm(self, bundle_path: Path, *, backend: str | None, wait: WaitFor | None) -> dict[str, Any]:
        bundle = Bundle.load(bundle_path)
        with self._working(timeout=WORK_WAIT):
            started = commands.Here(self.host).vm_up(bundle, backend=backend, wait=wait or WaitFor.BOOTED)
            self._tracked.pop(started.name, None)
        return started.to_json()

    def stop_vm(self, name: str) -> dict[str, Any]:
        with self._working(timeout=WORK_WAIT):
            stopped = commands.Here(self.host).vm_stop(name)
            self._tracked.pop(name, None)
        return stopped.to_json()

    def start_vm(self, name: str, *, wait: WaitFor | None) -> dict[str, Any]:
        with self._working(timeout=WORK_WAIT):
            started = commands.Here(self.host).vm_start(name, wait=wait or WaitFor.BOOTED)
            self._tracked.pop(name, None)
        return started.to_json()

    def down_vm(self, name: str, *, purge: bool) -> dict[str, Any]:
        with self._working(timeout=WORK_WAIT):
            stopped = commands.Here(self.host).vm_down(name, purge=purge)
            self._tracked.pop(name, None)
        return stopped.to_json()

    def pause_vm(self, name: str, *, pause: bool) -> dict[str, Any]:
        with self._working(timeout=WORK_WAIT):
            return commands.Here(self.host).vm_pause(name, pause=pause).to_json()

    def snapshot_vm(self, name: str, *, keep: int | None, stay_paused: bool) -> dict[str, Any]:
        with self._working(timeout=WORK_WAIT):
            return commands.Here(self.host).vm_snapshot(name, keep=keep, stay_paused=stay_paused).to_json()

    def restore_vm(
        self, name: str, *, ident: str | None, paused: bool, wait: WaitFor | None
    ) -> dict[str, Any]:
        with self._working(timeout=WORK_WAIT):
            restored = commands.Here(self.host).vm_restore(
                name, ident=ident, paused=paused, wait=wait or WaitFor.BOOTED
            )
            self._tracked.pop(name, None)
        return restored.to_json()

    def _reconcile(self, trigger: str, deployment: Deployment, wait: WaitFor) -> ApplyReport:
        started, began = self.wall(), self.clock()
        result: dict[str, Any] | None = None
        error = None
        try:
            outcome = reconcile.apply(
                self.host, deployment, parallel=self.settings.parallel, wait=wait, records=self._planning
            )
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
                    record,
                    self.host.hypervisors(record.backend),
                    alive=(record.pid, record.start_time) not in exited,
                )
                if exit_ is None and (hung := self.watchdog.hung(record)) is not None:
                    exit_ = Exit(ExitKind.CRASHED, hung, process_gone=False, hung=True)
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
            return observe_exit(record, self.host.hypervisors(record.backend))
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
            if exit_.hung and self._answers(record):
                return
            try:
                hv.kill(record.handle)  # an idle hypervisor after a power-off; removes its socket
            except ProcuratorError as exc:
                log.warning("%s: cannot stop its hypervisor pid %d: %s", record.name, record.pid, exc)
                return
            reap(record.pid, record.start_time)
            if exit_.hung:
                self._watchdog_kills += 1
                self.watchdog.forget(record)
                log.error("%s: killed hypervisor pid %d: %s", record.name, record.pid, exit_.detail)
            if lifecycle.oom_kills(self.host, record.runtime) > 0:  # read before the group goes or is reused
                exit_ = tracked.exit = Exit(
                    exit_.kind, f"{exit_.detail}; OOM-killed (memory limit)", exit_.process_gone
                )
            if decision.verdict is Verdict.RESTART:
                self._restart(record, tracked, exit_)
                return
            with contextlib.suppress(ProcuratorError):
                network.detach_vm(self.host.net, record.name, ip=record.ip)
            lifecycle.unbox(self.host, record.runtime)  # not restarted: its (empty) group goes
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

    def _answers(self, record: VmRecord) -> bool:
        """The watchdog's last word before a kill, under the state lock (no command is using the VMM):
        one more ping; if it answers now, the failures are forgotten and nothing is done."""
        if self.watchdog.ping(record) is not None:
            return False
        log.info("%s: its hypervisor answers again; not killed", record.name)
        self.watchdog.forget(record)
        self._tracked.pop(record.name, None)
        return True

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

    # --- what the API serves (worker/views.py renders it) -------------------------------------------

    def figures(self) -> Figures:
        return Figures(
            now=self.clock(),
            wall=self.wall(),
            started_at=self.started_at,
            api_socket=self.settings.api_socket,
            metrics_listen=self.settings.metrics_listen,
            interval=self.settings.interval,
            window=self.settings.limits.window,
            desired=self._desired,
            last_apply=self._last_apply,
            reconciles=dict(self._reconciles),
            durations=self._durations,
            restarted_total=self._restarted_total,
            watchdog_kills=self._watchdog_kills,
            tracked=dict(self._tracked),
            health=self.health.seen(),
        )

    def status_json(self) -> dict[str, Any]:
        return views.status_json(self.figures(), self.host, self.listing(), self.processes)

    def _listed(self) -> list[VmRecord]:
        with self._listing_lock:
            return self._listing.records()

    def listing(self) -> views.Listing:
        """`lifecycle.listing` from records parsed again only when they changed (GET /vms, /status and
        /metrics, the watchdog's and the health probes' rounds: a thousand records are not read and
        parsed again at every request and round)."""
        with self._listing_lock:
            records = self._listing.records()
            damaged = list(self._listing.damaged.values())
        now = self.host.clock()
        statuses = [
            lifecycle.classify(r, r.pid > 0 and process.alive(r.pid, r.start_time), now) for r in records
        ]
        return views.Listing(lifecycle.with_usage(self.host, statuses), damaged)

    def vms_json(self) -> dict[str, Any]:
        """GET /vms: the VMs exactly as `procurator ps --json` lists them (the answer `ps` asks a running
        worker for)."""
        return {
            "schema": 1,
            "state_dir": str(self.host.state.root),
            "config": self.host.config.digest,
            "vms": views.vms_json(self.listing()),
        }

    def supervision_json(self) -> dict[str, Any]:
        return views.supervision_json(self.figures())

    def metrics_text(self) -> str:
        return views.metrics_text(self.figures(), self.listing(), self.counters, self.processes)

    # --- the status page (worker/status.py) --------------------------------------------------------

    @property
    def status_actions(self) -> bool:
        return self.settings.status_actions

    def page(self) -> str:
        return status.index(
            self.status_json(), self.history(), actions=self.status_actions, csrf=self.csrf.token
        )

    def vm_page(self, name: str) -> str:
        now = self.status_json()
        vm = next((v for v in now["vms"] if v["name"] == name), None)
        if vm is None:
            raise NotFoundError(f"no VM named {name!r} on this host")
        path = lifecycle.serial_log(self.host, name)
        lines = logfiles.tail(path, status.LOG_LINES)
        offset = path.stat().st_size if path.exists() else 0
        return status.vm_page(
            vm,
            now["details"].get(name, {}),
            lines,
            offset,
            actions=self.status_actions,
            csrf=self.csrf.token,
            now=self.wall(),
        )

    def vm_log(self, name: str, offset: int) -> dict[str, Any]:
        return status.log_since(lifecycle.serial_log(self.host, name), offset)

    def restart_vm(self, name: str) -> None:
        """The page's restart: stop the VM (its record, lease and volumes kept) and boot it again."""
        with self._working(timeout=WORK_WAIT):
            lifecycle.stop(self.host, name)
            lifecycle.start(self.host, name, wait=WaitFor.BOOTED)
            self._tracked.pop(name, None)

    def apply_desired(self) -> ApplyReport:
        """The page's apply: reconcile to the deployment profile's current generation now."""
        deployment = self.desired()
        if deployment is None:
            raise NotFoundError(f"no desired deployment: {self.profile_path()} does not exist yet")
        with self._working(timeout=WORK_WAIT):
            return self._reconcile("api", deployment, self.settings.wait)

    def rollback(self, to: int | None = None, wait: WaitFor | None = None) -> Any:
        """POST /rollback and the page's rollback: generation `to` (default the one before the current),
        as `procurator rollback` does; the ApplyResult as JSON."""
        with self._working(timeout=WORK_WAIT):
            result = reconcile.rollback(
                self.host, to=to, parallel=self.settings.parallel, wait=wait or self.settings.wait
            )
            self._profile_seen = self._profile_target()
            for action in result.actions:
                if action.action.changes:
                    self._tracked.pop(action.action.name, None)
            return result.to_json()


def _raise_open_files_limit() -> None:
    """Lift the soft limit on open files to the hard one: the daemon holds a pidfd per VM."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


# glibc's mallopt parameters (<malloc.h>)
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD, _M_ARENA_MAX = -1, -3, -8
MALLOC_ARENAS = 2
MALLOC_THRESHOLD = 128 * 1024


def _tune_malloc() -> None:
    """Keep the daemon's resident memory from ratcheting up with every request (glibc only).

    Each request runs on a new thread and builds megabyte-sized answers (/metrics, /status): with
    glibc's defaults each thread may get an arena of its own, and once a large block is freed the
    mmap threshold rises to its size, so later ones come from the arenas and their freed pages stay
    resident. A fixed threshold (large blocks mapped and unmapped), trimming at that size and two
    arenas keep a daemon with a thousand VMs megabytes smaller. Without glibc this does nothing.
    """
    try:
        libc = ctypes.CDLL(None)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return
    for param, value in (
        (_M_ARENA_MAX, MALLOC_ARENAS),
        (_M_MMAP_THRESHOLD, MALLOC_THRESHOLD),
        (_M_TRIM_THRESHOLD, MALLOC_THRESHOLD),
    ):
        if mallopt(param, value) != 1:
            log.debug("mallopt(%d, %d) refused", param, value)


def _load_deployment(path: Path) -> Deployment:
    if not Deployment.is_deployment(path):
        text = str(path)
        shown = text if len(text) <= 120 else f"{text[:60]}...{text[-40:]}"
        raise UsageError(f"{shown}: not a deployment (no deployment.json); build one with lib.mkDeployment")
    return Deployment.load(path)
