"""What the worker's API serves: its status, supervision state and Prometheus metrics, rendered from a
`Figures` snapshot the daemon takes (worker/daemon.py `Worker.figures`) and from the host's records."""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

from procurator import lifecycle, metrics
from procurator.lifecycle import Host
from procurator.models import Deployment
from procurator.state import Damaged, VmRecord
from procurator.supervision import Verdict, recent
from procurator.worker.exits import Tracked
from procurator.worker.probes import Seen


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


@dataclass(frozen=True)
class Figures:
    """What the daemon knows at one moment, for the views (read-only; taken under no lock)."""

    now: float  # the daemon's monotonic clock
    wall: float
    started_at: float
    api_socket: Path
    metrics_listen: str | None
    interval: float
    window: float  # the crash-loop window (Limits.window)
    desired: Deployment | None
    last_apply: ApplyReport | None
    reconciles: Mapping[tuple[str, str], int]
    durations: metrics.Histogram
    restarted_total: int
    watchdog_kills: int
    tracked: Mapping[str, Tracked]
    health: Mapping[str, Seen]


def supervision_json(fig: Figures) -> dict[str, Any]:
    now = fig.now
    out: dict[str, Any] = {}
    for name, tracked in sorted(fig.tracked.items()):
        entry: dict[str, Any] = {
            "restarts_in_window": len(recent(tracked.restarts, now, fig.window)),
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


def status_json(
    fig: Figures,
    host: Host,
    listing: Listing,
    processes: metrics.ProcessCache,
) -> dict[str, Any]:
    deployment = fig.desired
    return {
        "worker": {
            "pid": os.getpid(),
            "started_at": round(fig.started_at, 3),
            "uptime": round(fig.wall - fig.started_at, 1),
            "state_dir": str(host.state.root),
            "api_socket": str(fig.api_socket),
            "metrics_listen": fig.metrics_listen,
            "interval": fig.interval,
            "deployment": None
            if deployment is None
            else {"path": str(deployment.path), "generation": deployment.generation},
            "last_apply": None if fig.last_apply is None else fig.last_apply.to_json(),
            "reconciles": sum(fig.reconciles.values()),
            "restarts": fig.restarted_total,
            "watchdog_kills": fig.watchdog_kills,
        },
        "vms": vms_json(listing),
        "details": details_json(fig, listing, processes),
        "supervision": supervision_json(fig),
    }


@dataclass(frozen=True)
class Listing:
    """The VMs at one moment, as `lifecycle.listing` gives them (the daemon's from its record cache)."""

    statuses: Sequence[lifecycle.VmStatus]
    damaged: Sequence[Damaged] = ()

    @property
    def running(self) -> list[VmRecord]:
        return [s.record for s in self.statuses if s.status is lifecycle.Status.RUNNING]


def vms_json(listing: Listing) -> list[dict[str, Any]]:
    rows = [s.to_json() for s in listing.statuses] + [lifecycle.damaged_json(d) for d in listing.damaged]
    return sorted(rows, key=lambda row: str(row["name"]))


def details_json(
    fig: Figures, listing: Listing, processes: metrics.ProcessCache
) -> dict[str, dict[str, Any]]:
    """What the status page shows beside `ps --json`'s fields: per VM its last exit, the health the
    worker last saw (worker/probes.py), and its hypervisor's CPU time and resident memory (the figures
    /metrics reads too, from `processes`: /proc is read at most once per its ttl, not at every poll)."""
    figures = processes.get(listing.running)
    out: dict[str, dict[str, Any]] = {}
    for status in listing.statuses:
        r = status.record
        entry: dict[str, Any] = {
            "last_exit": r.last_exit,
            "health": None,
            "cpu_seconds": None,
            "memory_bytes": None,
        }
        seen = fig.health.get(r.name)
        running = status.status is lifecycle.Status.RUNNING
        if seen is not None and running and seen.pid == r.pid:
            entry["health"] = seen.to_json()
        got = figures.get(r.name) if running else None
        if got is not None:
            entry["cpu_seconds"] = round(got.cpu_seconds, 2)
            entry["memory_bytes"] = got.rss_bytes
        out[r.name] = entry
    return out


class WorkerCollector(Collector):
    """The worker's metrics as prometheus_client collects them: built from one `Figures` snapshot and
    one `Listing` at each scrape, one family at a time (a thousand VMs' samples are never all held)."""

    def __init__(
        self,
        fig: Figures,
        listing: Listing,
        counters: metrics.CountersCache,
        processes: metrics.ProcessCache,
    ) -> None:
        self.fig = fig
        self.listing = listing
        self.counters = counters
        self.processes = processes

    def collect(self) -> Iterator[Metric]:
        running = self.listing.running
        # The device counters (one API call per VM at most, when not cached) are fetched while the
        # per-VM families are built and written: the calls mostly wait for the hypervisors.
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="scrape") as one:
            counters = one.submit(self.counters.get, running)
            yield from vm_families(self.listing, self.processes.get(running))
            yield from metrics.device_families(counters.result())
        yield from worker_families(self.fig)


def metrics_text(
    fig: Figures, listing: Listing, counters: metrics.CountersCache, processes: metrics.ProcessCache
) -> str:
    """The Prometheus exposition (prometheus_client's text format)."""
    return metrics.exposition(WorkerCollector(fig, listing, counters, processes)).decode()


def worker_families(fig: Figures) -> Iterator[Metric]:
    total = metrics.counter(
        "reconcile_total", "Reconciles run, by trigger and result.", ("trigger", "result")
    )
    for (trigger, result), count in sorted(fig.reconciles.items()):
        total.add_metric((trigger, result), count)
    yield total
    duration = metrics.histogram("reconcile_duration_seconds", "How long reconciles took.")
    fig.durations.add_to(duration)
    yield duration
    success = metrics.gauge("last_apply_success", "Whether the last reconcile succeeded (1) or not (0).")
    stamp = metrics.gauge("last_apply_timestamp_seconds", "When the last reconcile started (Unix time).")
    if fig.last_apply is not None:
        success.add_metric((), 1 if fig.last_apply.success else 0)
        stamp.add_metric((), fig.last_apply.started_at)
    yield success
    yield stamp
    restarts = metrics.counter("worker_restarts_total", "VM restarts this daemon made after exits.")
    restarts.add_metric((), fig.restarted_total)
    yield restarts
    kills = metrics.counter(
        "watchdog_kills_total", "Hypervisors the worker killed because they stopped answering their API."
    )
    kills.add_metric((), fig.watchdog_kills)
    yield kills
    up = metrics.gauge("worker_start_time_seconds", "When the daemon started (Unix time).")
    up.add_metric((), fig.started_at)
    yield up


def vm_families(listing: Listing, figures: Mapping[str, metrics.ProcessFigures]) -> Iterator[Metric]:
    """The per-VM families, each built in its own pass over the VMs and yielded before the next."""
    statuses = listing.statuses
    running = [s for s in statuses if s.status is lifecycle.Status.RUNNING]
    up = metrics.gauge(
        "vm_up", "Whether the VM's hypervisor runs (1) or not (0).", ("vm", "generation", "backend")
    )
    for s in statuses:
        runs = 1 if s.status is lifecycle.Status.RUNNING else 0
        up.add_metric((s.record.name, s.record.generation, s.record.backend), runs)
    yield up
    state = metrics.gauge("vm_state", "The VM's state (1 for its current one).", ("vm", "state"))
    for s in statuses:
        state.add_metric((s.record.name, s.state), 1)
    for bad in listing.damaged:  # set aside: not supervised until `procurator down NAME`
        state.add_metric((bad.name, lifecycle.DAMAGED), 1)
    yield state
    uptime = metrics.gauge("vm_uptime_seconds", "Seconds since the VM's hypervisor started.", ("vm",))
    for s in running:
        if s.uptime is not None:
            uptime.add_metric((s.record.name,), max(0.0, s.uptime))
    yield uptime
    restarts = metrics.counter("vm_restarts_total", "Times the VM was restarted after an exit.", ("vm",))
    for s in statuses:
        restarts.add_metric((s.record.name,), s.record.restarts)
    yield restarts
    cpu = metrics.counter(
        "vm_cpu_seconds_total", "CPU time of the VM's hypervisor process (all threads).", ("vm",)
    )
    rss = metrics.gauge("vm_memory_rss_bytes", "Resident memory of the VM's hypervisor process.", ("vm",))
    for s in running:
        got = figures.get(s.record.name)
        if got is not None:
            cpu.add_metric((s.record.name,), got.cpu_seconds)
            rss.add_metric((s.record.name,), got.rss_bytes)
    yield cpu
    yield rss
    memory = metrics.gauge(
        "vm_cgroup_memory_bytes", "Memory the VM's cgroup uses (all its processes).", ("vm",)
    )
    limit = metrics.gauge("vm_cgroup_memory_limit_bytes", "The memory limit of the VM's cgroup.", ("vm",))
    ooms = metrics.counter("vm_oom_kills_total", "OOM kills inside the VM's cgroup.", ("vm",))
    for s in running:
        if s.usage is not None:  # from its cgroup
            memory.add_metric((s.record.name,), s.usage.memory_bytes)
            if s.usage.memory_max is not None:
                limit.add_metric((s.record.name,), s.usage.memory_max)
            ooms.add_metric((s.record.name,), s.usage.oom_kills)
    yield memory
    yield limit
    yield ooms
