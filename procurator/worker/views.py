"""What the worker's API serves: its status, supervision state and Prometheus metrics, rendered from a
`Figures` snapshot the daemon takes (worker/daemon.py `Worker.figures`) and from the host's records."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from procurator import lifecycle, metrics
from procurator.lifecycle import Host
from procurator.models import Deployment
from procurator.state import Damaged
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


def status_json(fig: Figures, host: Host) -> dict[str, Any]:
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
        "vms": vms_json(host),
        "details": details_json(fig, host),
        "supervision": supervision_json(fig),
    }


def vms_json(host: Host) -> list[dict[str, Any]]:
    statuses, damaged = lifecycle.listing(host)
    rows = [s.to_json() for s in statuses] + [lifecycle.damaged_json(d) for d in damaged]
    return sorted(rows, key=lambda row: str(row["name"]))


def details_json(fig: Figures, host: Host) -> dict[str, dict[str, Any]]:
    """What the status page shows beside `ps --json`'s fields: per VM its last exit, the health the
    worker last saw (worker/probes.py), and its hypervisor's CPU time and resident memory."""
    statuses, _ = lifecycle.listing(host)
    out: dict[str, dict[str, Any]] = {}
    for status in statuses:
        r = status.record
        entry: dict[str, Any] = {
            "last_exit": r.last_exit,
            "health": None,
            "cpu_seconds": None,
            "memory_bytes": None,
        }
        seen = fig.health.get(r.name)
        if seen is not None and status.status is lifecycle.Status.RUNNING and seen.pid == r.pid:
            entry["health"] = seen.to_json()
        if status.status is lifecycle.Status.RUNNING:
            figures = metrics.process_figures(r.pid, r.start_time)
            if figures is not None:
                entry["cpu_seconds"] = round(figures.cpu_seconds, 2)
                entry["memory_bytes"] = figures.rss_bytes
        out[r.name] = entry
    return out


def metrics_text(fig: Figures, host: Host, counters: metrics.CountersCache) -> str:
    """The Prometheus exposition: one API call per VM at most (device counters, cached)."""
    statuses, damaged = lifecycle.listing(host)
    running = [s.record for s in statuses if s.status is lifecycle.Status.RUNNING]
    families = vm_families(statuses, damaged)
    families += metrics.device_families(counters.get(running))
    families += worker_families(fig)
    return metrics.render(families)


def worker_families(fig: Figures) -> list[metrics.Family]:
    p = metrics.PREFIX
    total = metrics.Family(
        p + "reconcile_total", "Reconciles run, by trigger and result.", metrics.MetricType.COUNTER
    )
    for (trigger, result), count in sorted(fig.reconciles.items()):
        total.add(count, {"trigger": trigger, "result": result})
    duration = metrics.Family(
        p + "reconcile_duration_seconds", "How long reconciles took.", metrics.MetricType.HISTOGRAM
    )
    fig.durations.add_to(duration)
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
    if fig.last_apply is not None:
        success.add(1 if fig.last_apply.success else 0)
        stamp.add(fig.last_apply.started_at)
    restarts = metrics.Family(
        p + "worker_restarts_total",
        "VM restarts this daemon made after exits.",
        metrics.MetricType.COUNTER,
    )
    restarts.add(fig.restarted_total)
    kills = metrics.Family(
        p + "watchdog_kills_total",
        "Hypervisors the worker killed because they stopped answering their API.",
        metrics.MetricType.COUNTER,
    )
    kills.add(fig.watchdog_kills)
    up = metrics.Family(
        p + "worker_start_time_seconds", "When the daemon started (Unix time).", metrics.MetricType.GAUGE
    )
    up.add(fig.started_at)
    return [total, duration, success, stamp, restarts, kills, up]


def vm_families(
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
    memory = metrics.Family(p + "vm_cgroup_memory_bytes", "Memory the VM's cgroup uses (all its processes).",
                            kind.GAUGE)  # fmt: skip
    limit = metrics.Family(
        p + "vm_cgroup_memory_limit_bytes", "The memory limit of the VM's cgroup.", kind.GAUGE
    )
    ooms = metrics.Family(p + "vm_oom_kills_total", "OOM kills inside the VM's cgroup.", kind.COUNTER)
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
        if status.usage is not None:  # from its cgroup
            memory.add(status.usage.memory_bytes, vm)
            if status.usage.memory_max is not None:
                limit.add(status.usage.memory_max, vm)
            ooms.add(status.usage.oom_kills, vm)
    for bad in damaged:  # set aside: not supervised until `procurator down NAME`
        state.add(1, {"vm": bad.name, "state": lifecycle.DAMAGED})
    return [up, state, uptime, restarts, cpu, rss, memory, limit, ooms]
