"""What a deploy is made of: the phases a host goes through, its result, the events `progress`
receives, the deploy's options."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from procurator.deploy.fleet import CONNECT_TIMEOUT
from procurator.models import SCHEMA_VERSION
from procurator.reconcile import ApplyResult, PlanReport


class Phase(StrEnum):
    QUEUED = "queued"
    CHECKING = "checking"
    WAITING = "waiting"  # pre-flight passed, waiting for a free slot
    BUILDING = "building"
    COPYING = "copying"
    PLANNING = "planning"
    APPLYING = "applying"
    ROLLING_BACK = "rolling-back"
    DONE = "done"


class Result(StrEnum):
    DEPLOYED = "deployed"  # applied; something changed
    UNCHANGED = "unchanged"  # applied; it already ran exactly this
    PLANNED = "planned"  # dry run: planned, nothing changed
    FAILED = "failed"  # nothing applied, or nothing to roll back to (see `stage` and `error`)
    ROLLED_BACK = "rolled-back"  # the apply failed; the host runs what it ran before
    ROLLBACK_FAILED = "rollback-failed"  # the apply failed and so did the rollback: look at this host
    UNREACHABLE = "unreachable"  # ssh could not connect or log in (pre-flight)
    INTERRUPTED = "interrupted"  # stopped by an interrupt (see `error` for what ran on the host)
    SKIPPED = "skipped"  # never started: interrupted before its turn


OK_RESULTS = frozenset({Result.DEPLOYED, Result.UNCHANGED, Result.PLANNED})
COUNTED = ("create", "replace", "start", "remove")


class Stage(StrEnum):
    PREFLIGHT = "preflight"
    BUILD = "build"
    COPY = "copy"
    PLAN = "plan"
    APPLY = "apply"
    ROLLBACK = "rollback"


# -- results ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class HostResult:
    """What happened on one host. Counts are the changes that stand (or would, for a dry run)."""

    name: str
    target: str
    result: Result
    stage: Stage | None = None  # where it failed
    error: str = ""
    deployment: str | None = None
    generation: int | None = None  # the deployment history generation it runs at the end, if known
    counts: dict[str, int] | None = None  # create / replace / start / remove
    duration: float = 0.0
    plan: PlanReport | None = None
    apply: ApplyResult | None = None
    rollback: ApplyResult | None = None

    @property
    def ok(self) -> bool:
        return self.result in OK_RESULTS

    def count(self, kind: str) -> int | None:
        return None if self.counts is None else self.counts.get(kind, 0)

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "target": self.target,
            "result": self.result.value,
            "ok": self.ok,
            "stage": None if self.stage is None else self.stage.value,
            "error": self.error or None,
            "deployment": self.deployment,
            "generation": self.generation,
            "created": self.count("create"),
            "replaced": self.count("replace"),
            "started": self.count("start"),
            "removed": self.count("remove"),
            "duration": round(self.duration, 3),
            "plan": None if self.plan is None else self.plan.to_json(),
            "apply": None if self.apply is None else self.apply.to_json(),
            "rollback": None if self.rollback is None else self.rollback.to_json(),
        }


@dataclass(frozen=True)
class DeployResult:
    ref: str
    dry_run: bool
    hosts: tuple[HostResult, ...]
    duration: float
    interrupted: bool = False

    @property
    def ok(self) -> bool:
        return not self.interrupted and all(h.ok for h in self.hosts)

    @property
    def failed(self) -> list[HostResult]:
        return [h for h in self.hosts if not h.ok]

    def to_json(self) -> dict[str, Any]:
        return {
            "schema": SCHEMA_VERSION,
            "ref": self.ref,
            "dryRun": self.dry_run,
            "ok": self.ok,
            "interrupted": self.interrupted,
            "duration": round(self.duration, 3),
            "hosts": [h.to_json() for h in self.hosts],
        }


@dataclass(frozen=True)
class Event:
    """A host changed phase (`result` is set when `phase` is DONE)."""

    host: str
    phase: Phase
    detail: str = ""
    result: HostResult | None = None


Progress = Callable[[Event], None]


def ignore(_event: Event) -> None:
    return None


@dataclass(frozen=True)
class Options:
    dry_run: bool = False
    parallel: int = 4
    wait: str = "healthy"  # what the remote apply waits for: booted | healthy
    substitute_on_destination: bool = False
    connect_timeout: int = CONNECT_TIMEOUT
    share_connections: bool = True  # one ssh connection per host for all of its commands
