"""Reconciling (docs/architecture.md): a pure plan from desired and observed state, and an apply that runs it.

`plan(desired, observed)` compares, VM by VM, the deployment (name -> bundle store path) with what this
host has (records and the process table, as `lifecycle.status` reports them). It does no I/O of its own:
the bundle diffs of replacements come from a loader passed in. One action per VM name, sorted by name:

  create   the deployment names a VM this host has no record of
  replace  the recorded generation differs from the deployment's (the bundle's store hash changed):
           stop the old generation, start the new one on the same lease and volumes; or, when the new
           bundle's `replace.strategy` is blue-green, boot it beside the old one and move the address
           (`lifecycle.blue_green`). `with_strategies` puts the strategy on each replace for the plan.
  start    the recorded generation is the deployment's but its process is gone: it exited (crashed,
           killed) or was stopped with `procurator stop`. The deployment decides: it runs again.
           (To keep a VM off, take it out of the deployment.)
  remove   this host runs a VM the deployment does not name: it is stopped and forgotten; its volumes
           and IP lease are kept (data survives until `procurator down --purge NAME`)
  keep     the deployment's generation is running: nothing is done, nothing is called. Also a VM whose
           restarts the worker gave up on (status `failed`, a crash loop): an apply does not undo that
           decision (`procurator start NAME` does); a new generation of it is a replace as usual.

`apply(host, deployment)` holds the state lock throughout, observes, plans, checks every bundle it will
start (before changing anything), and runs the actions in parallel (bounded) as idempotent steps:
measure (should it run?), act, verify. A replacement whose new generation does not start, or does not
pass its health checks within their budget, starts the old generation again and is reported
`rolled-back` (the old generation comes back even if it was not running before the apply: the
deployment wants the VM running, and its last known good generation is the closest to that). The old
generation is not gated on its health checks when it comes back. A replacement never touches the VM's
volumes or lease. A successful apply of a deployment in the Nix store becomes the current generation
of the deployment profile (`procurator.history`); one outside the store is applied but not recorded.

Observation costs, per recorded VM, one read of its record and one of /proc/PID/stat: an unchanged VM
costs no subprocess, no hypervisor call and no bundle load.
"""

from __future__ import annotations

import contextlib
import difflib
import json
import logging
import os
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from enum import StrEnum
from pathlib import Path
from typing import Any, Protocol

from procurator import history, jsonread, lifecycle, process
from procurator.errors import NotFoundError, ProcuratorError, StateError, UsageError, ValidationError
from procurator.jsonread import Reader
from procurator.lifecycle import Host, Status, VmStatus, WaitFor
from procurator.models import MAX_INPUT_BYTES, Bundle, Deployment, ReplaceStrategy, store_hash
from procurator.state import LOCK_TIMEOUT, VmRecord, parse_record

log = logging.getLogger(__name__)

BUNDLE_FILES = ("vm-config.json", "procurator.json")
SHORT = 12  # characters of a store hash shown to people


class ActionKind(StrEnum):
    CREATE = "create"
    REPLACE = "replace"
    START = "start"
    REMOVE = "remove"
    KEEP = "keep"


SYMBOLS = {
    ActionKind.CREATE: "+",
    ActionKind.REPLACE: "~",
    ActionKind.START: ">",
    ActionKind.REMOVE: "-",
    ActionKind.KEEP: "=",
}


@dataclass(frozen=True)
class Action:
    """What to do about one VM. `old`/`new` are bundle store paths (None where there is none)."""

    kind: ActionKind
    name: str
    old: str | None
    new: str | None
    reason: str
    diff: str = ""  # replace only, when a loader was given: unified diff of the bundle's JSON files
    strategy: str = ""  # replace only, once the new bundle is read (`with_strategies`): recreate | blue-green

    @property
    def changes(self) -> bool:
        return self.kind is not ActionKind.KEEP

    def line(self) -> str:
        """`~ replace web (a1b2... -> c3d4...: bundle hash changed) [blue-green]`."""
        tail = f" [{self.strategy}]" if self.strategy else ""
        return f"{SYMBOLS[self.kind]} {self.kind.value} {self.name} ({self.reason}){tail}"

    def to_json(self) -> dict[str, Any]:
        return {
            "kind": self.kind.value,
            "name": self.name,
            "old": self.old,
            "new": self.new,
            "reason": self.reason,
            "diff": self.diff,
            "strategy": self.strategy or None,
        }

    @classmethod
    def from_json(cls, data: Any, source: str, where: str) -> Action:
        r = Reader(source, data, where)
        return cls(
            kind=r.enum("kind", ActionKind),
            name=r.text("name"),
            old=r.opt_text("old"),
            new=r.opt_text("new"),
            reason=r.text("reason"),
            diff=r.opt_text("diff") or "",
            strategy=r.opt_text("strategy") or "",
        )


WIRE_SCHEMA = 1  # of the plan, apply/rollback and history documents that cross processes and hosts


def _wire(source: str, data: Any) -> Reader:
    """A reader of a wire document another process or host sent: of WIRE_SCHEMA, or refused."""
    return Reader.versioned(
        source,
        data,
        WIRE_SCHEMA,
        what="a procurator document",
        fix="the other side runs another procurator release; install the same release on both",
    )


@dataclass(frozen=True)
class Plan:
    actions: tuple[Action, ...]

    @property
    def changed(self) -> bool:
        return any(a.changes for a in self.actions)

    def count(self, kind: ActionKind) -> int:
        return sum(1 for a in self.actions if a.kind is kind)

    def summary(self) -> str:
        parts = [f"{self.count(k)} to {k.value}" for k in ActionKind if k is not ActionKind.KEEP]
        return ", ".join(parts) + f", {self.count(ActionKind.KEEP)} unchanged"

    def to_json(self) -> dict[str, Any]:
        return {"changed": self.changed, "actions": [a.to_json() for a in self.actions]}


@dataclass(frozen=True)
class PlanReport:
    """A plan of one deployment, as `plan --json` and the worker's GET /plan send it."""

    deployment: str
    generation: str
    plan: Plan

    @classmethod
    def of(cls, deployment: Deployment, the_plan: Plan) -> PlanReport:
        return cls(str(deployment.path), deployment.generation, the_plan)

    def to_json(self) -> dict[str, Any]:
        return {
            "schema": WIRE_SCHEMA,
            "deployment": self.deployment,
            "generation": self.generation,
            **self.plan.to_json(),
        }

    @classmethod
    def from_json(cls, data: Any, source: str = "plan --json") -> PlanReport:
        r = _wire(source, data)
        actions = tuple(
            Action.from_json(a, source, f"actions[{i}]")
            for i, a in enumerate(r.array("actions", required=True))
        )
        return cls(r.text("deployment"), r.text("generation"), Plan(actions))


BundleFiles = Mapping[str, Any]  # file name -> its parsed JSON
FilesLoader = Callable[[str], BundleFiles]
Desired = Deployment | Mapping[str, Bundle] | Mapping[str, Path] | Mapping[str, str]


def _short(path: str) -> str:
    """The first characters of a store path's hash (of its last component, for anything else)."""
    name = path.rpartition("/")[2]
    return name[:SHORT]


def _desired_paths(desired: Desired) -> dict[str, str]:
    items = desired.vms.items() if isinstance(desired, Deployment) else desired.items()
    out: dict[str, str] = {}
    for name, value in items:
        if isinstance(value, Bundle):
            if value.name != name:
                raise ValidationError("deployment", f"vms.{name}", f"is a bundle named {value.name!r}")
            out[name] = str(value.path)
        else:
            out[name] = str(value)
    return out


def plan(desired: Desired, observed: Sequence[VmStatus], *, files: FilesLoader | None = None) -> Plan:
    """The actions that turn `observed` into `desired`, one per VM name, sorted by name. Pure.

    `desired` is a deployment or a mapping of VM name -> bundle (or its store path); `observed` is
    what `lifecycle.status` reports. With `files` (store path -> {file name: parsed JSON}), each
    replacement carries a diff of the two generations' vm-config.json and procurator.json.
    """
    want = _desired_paths(desired)
    have = {s.record.name: s for s in observed}
    actions = []
    for name in sorted(want.keys() | have.keys()):
        new = want.get(name)
        seen = have.get(name)
        if seen is None:
            if new is not None:  # (the name is in one of the two)
                actions.append(Action(ActionKind.CREATE, name, None, new, f"not on this host: {_short(new)}"))
            continue
        old = seen.record.bundle
        if new is None:
            actions.append(
                Action(
                    ActionKind.REMOVE,
                    name,
                    old,
                    None,
                    f"{_short(old)} not in the deployment; volumes and lease kept",
                )
            )
        elif old != new:
            reason = f"{_short(old)} -> {_short(new)}: bundle hash changed"
            if seen.status is not Status.RUNNING:
                reason += f"; the old generation is {seen.status.value}"
            diff = _diff(old, new, files) if files is not None else ""
            actions.append(Action(ActionKind.REPLACE, name, old, new, reason, diff))
        elif seen.status is Status.RUNNING:
            actions.append(Action(ActionKind.KEEP, name, old, new, f"{_short(new)} running"))
        elif seen.status is Status.FAILED:
            # The worker gave up restarting it (a crash loop): an apply does not undo that decision.
            why = seen.record.last_exit or "crash loop"
            reason = f"{_short(new)} failed ({why}): left down; `procurator start {name}` retries it"
            actions.append(Action(ActionKind.KEEP, name, old, new, reason))
        else:
            why = seen.record.last_exit or seen.status.value
            reason = f"{_short(new)} {seen.status.value} ({why}): start it"
            actions.append(Action(ActionKind.START, name, old, new, reason))
    return Plan(tuple(actions))


def _pretty(doc: Any) -> list[str]:
    if doc is None:
        return []
    return json.dumps(doc, indent=2, sort_keys=True).splitlines()


def bundle_diff(old: str, new: str, old_files: BundleFiles, new_files: BundleFiles) -> str:
    """A unified diff of the two bundles' JSON files, pretty-printed with sorted keys. Pure."""
    lines: list[str] = []
    for fname in BUNDLE_FILES:
        lines += difflib.unified_diff(
            _pretty(old_files.get(fname)),
            _pretty(new_files.get(fname)),
            f"{old}/{fname}",
            f"{new}/{fname}",
            lineterm="",
        )
    return "\n".join(lines)


def _diff(old: str, new: str, files: FilesLoader) -> str:
    try:
        return bundle_diff(old, new, files(old), files(new))
    except ProcuratorError as exc:
        return f"(no diff: {exc})"


def read_bundle_files(path: str) -> dict[str, Any]:
    """The loader `plan` takes for diffs: a bundle's JSON files, parsed (impure: reads the store)."""
    out: dict[str, Any] = {}
    for fname in BUNDLE_FILES:
        source = Path(path) / fname
        try:
            out[fname] = jsonread.read_file(source, MAX_INPUT_BYTES)
        except FileNotFoundError as exc:
            raise NotFoundError(f"{source} is not in the store any more") from exc
    return out


# -- the impure layer ----------------------------------------------------------------------------------


class RecordSource(Protocol):
    """Records read again only when their file changed: the worker's `RecordCache`, whose `records` are
    the readable ones and `damaged` the VMs whose record could not be read."""

    @property
    def damaged(self) -> Mapping[str, object]: ...

    def records(self) -> list[VmRecord]: ...


def observe(host: Host, records: RecordSource | None = None) -> list[VmStatus]:
    """What `lifecycle.status` reports, read with the fewest system calls: per VM, one read of its record
    (or with `records`, one stat of the files that did not change) and one of /proc/PID/stat. No
    subprocess, no hypervisor. A record that cannot be read or parsed is read again through the state
    module, which raises its own error naming the file and the fix."""
    if records is not None:
        return _observe_cached(host, records)
    vms_dir = host.state.vms_dir
    try:
        names = sorted(os.listdir(vms_dir))
    except FileNotFoundError:
        return []
    except OSError as exc:
        raise StateError(f"{vms_dir}: cannot list the VMs: {exc.strerror}") from exc
    now = host.clock()
    out = []
    for name in names:
        record = _read_record(host, f"{vms_dir}/{name}/record.json", name)
        if record is not None:
            out.append(lifecycle.classify(record, process.alive(record.pid, record.start_time), now))
    return out


def _observe_cached(host: Host, source: RecordSource) -> list[VmStatus]:
    by_name = {r.name: r for r in source.records()}
    for name in sorted(source.damaged):  # as observe does: the state module raises the damage
        record = host.state.load_record(name)
        if record is not None:  # mended meanwhile: it counts, or the plan would create a VM that exists
            by_name[name] = record
    now = host.clock()
    return [
        lifecycle.classify(r, process.alive(r.pid, r.start_time), now) for _, r in sorted(by_name.items())
    ]


_READ = 65536


def _read_file(path: str) -> bytes:
    """The whole of a small file; a short read of a regular file (or of a /proc file) is its end."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        chunks = [os.read(fd, _READ)]
        while len(chunks[-1]) == _READ:
            chunks.append(os.read(fd, _READ))
        return b"".join(chunks)
    finally:
        os.close(fd)


def _read_record(host: Host, path: str, name: str) -> VmRecord | None:
    try:
        return parse_record(path, jsonread.parse_text(path, _read_file(path)), name)
    except FileNotFoundError:
        return None
    except (OSError, ValidationError):  # the slow reader says what is wrong
        return host.state.load_record(name)


def check_bundles(deployment: Deployment, the_plan: Plan) -> dict[str, Bundle]:
    """Load every bundle the plan will start, before anything changes. Raises on the first bad one."""
    where = deployment.path / "deployment.json"
    out = {}
    for action in the_plan.actions:
        if action.kind not in (ActionKind.CREATE, ActionKind.REPLACE, ActionKind.START) or action.new is None:
            continue
        path = Path(action.new)
        if not path.exists():
            raise NotFoundError(
                f"VM {action.name!r}: bundle {path} (named in {where}) is not in this host's Nix store; "
                f"copy the deployment's closure here first: nix copy --to ssh://<this host> {deployment.path}"
            )
        bundle = Bundle.load(path)
        if bundle.name != action.name:
            problem = f"points at a bundle named {bundle.name!r}; rename one of them"
            raise ValidationError(str(where), f"vms.{action.name}", problem)
        out[action.name] = bundle
    return out


def with_strategies(the_plan: Plan, bundles: Mapping[str, Bundle]) -> Plan:
    """Each replace with the strategy its new bundle asks for (`replace.strategy`). Pure."""
    return Plan(
        tuple(
            replace(a, strategy=bundles[a.name].meta.replace.strategy.value)
            if a.kind is ActionKind.REPLACE and a.name in bundles
            else a
            for a in the_plan.actions
        )
    )


def make_plan(
    host: Host, deployment: Deployment, *, diffs: bool = True, records: RecordSource | None = None
) -> Plan:
    """Observe this host (through `records` if given) and plan `deployment` (no lock, no change).
    Bundles to start are checked."""
    the_plan = plan(deployment, observe(host, records), files=read_bundle_files if diffs else None)
    return with_strategies(the_plan, check_bundles(deployment, the_plan))


class Outcome(StrEnum):
    OK = "ok"
    FAILED = "failed"
    ROLLED_BACK = "rolled-back"


@dataclass(frozen=True)
class ActionResult:
    action: Action
    outcome: Outcome
    error: str = ""
    seconds: float = 0.0
    switch: Mapping[str, Any] | None = None  # a blue-green replace: both generations, the switch time

    @property
    def line(self) -> str:
        text = self.action.line()
        if not self.action.changes:
            return text
        tail = f": {self.outcome.value} in {self.seconds:.1f}s"
        return text + tail + (f": {self.error}" if self.error else "")

    def to_json(self) -> dict[str, Any]:
        return {
            **self.action.to_json(),
            "outcome": self.outcome.value,
            "error": self.error or None,
            "seconds": round(self.seconds, 3),
            "switch": None if self.switch is None else dict(self.switch),
        }

    @classmethod
    def from_json(cls, data: Any, source: str, where: str) -> ActionResult:
        r = Reader(source, data, where)
        return cls(
            action=Action.from_json(data, source, where),
            outcome=r.enum("outcome", Outcome),
            error=r.opt_text("error") or "",
            seconds=r.number("seconds"),
            switch=None if r.data.get("switch") is None else r.obj("switch").data,
        )


@dataclass(frozen=True)
class ApplyResult:
    """What an apply did. `history` is the deployment profile's generation of this deployment."""

    deployment: str
    actions: tuple[ActionResult, ...]
    duration: float
    history: int | None = None
    error: str = ""  # a failure after the actions ran (recording the history)

    @property
    def changed(self) -> bool:
        """Whether any VM was touched (created, replaced, started or removed, successfully or not)."""
        return any(r.action.changes for r in self.actions)

    @property
    def failed(self) -> bool:
        return bool(self.error) or any(r.outcome is not Outcome.OK for r in self.actions)

    def to_json(self) -> dict[str, Any]:
        return {
            "schema": WIRE_SCHEMA,
            "deployment": self.deployment,
            "generation": store_hash(Path(self.deployment)) or Path(self.deployment).name,
            "changed": self.changed,
            "failed": self.failed,
            "duration": round(self.duration, 3),
            "history": self.history,
            "error": self.error or None,
            "actions": [r.to_json() for r in self.actions],
        }

    @classmethod
    def from_json(cls, data: Any, source: str = "apply --json") -> ApplyResult:
        """The inverse of `to_json`, for a result another process (the worker, a remote host) sent."""
        r = _wire(source, data)
        actions = tuple(
            ActionResult.from_json(a, source, f"actions[{i}]")
            for i, a in enumerate(r.array("actions", required=True))
        )
        result = cls(
            deployment=r.text("deployment"),
            actions=actions,
            duration=r.number("duration"),
            history=r.opt_integer("history", minimum=0),
            error=r.opt_text("error") or "",
        )
        if r.boolean("failed") != result.failed or r.boolean("changed") != result.changed:
            raise r.fail("failed", "does not agree with the actions' outcomes")
        return result


class _RolledBackError(ProcuratorError):
    """The new generation failed; the old one runs again."""


class _Step(Protocol):
    """One action as an idempotent step: measure (`should_do`), act (`do`), check (`verify`)."""

    @property
    def action(self) -> Action: ...

    def should_do(self) -> bool: ...

    def do(self) -> None: ...

    def verify(self) -> None: ...


def _running_as(host: Host, name: str, path: str) -> VmRecord | None:
    """The record of `name` if it runs generation `path` (measured: record and process table)."""
    record = host.state.load_record(name)
    if record is None or record.bundle != path or not process.alive(record.pid, record.start_time):
        return None
    return record


def _expect_running(host: Host, name: str, path: str, after: str) -> None:
    if _running_as(host, name, path) is None:
        record = host.state.load_record(name)
        found = "no record" if record is None else f"generation {_short(record.bundle)}, pid {record.pid}"
        raise StateError(f"VM {name!r}: generation {_short(path)} is not running after {after} ({found})")


@dataclass(frozen=True)
class _Boot:
    """create and start: boot the deployment's generation (a record of it that is not running is replaced)."""

    host: Host
    action: Action
    bundle: Bundle
    wait: WaitFor

    def should_do(self) -> bool:
        return _running_as(self.host, self.action.name, str(self.bundle.path)) is None

    def do(self) -> None:
        if self.action.kind is ActionKind.START and self.host.state.load_record(self.action.name) is not None:
            lifecycle.start(self.host, self.action.name, wait=self.wait)
        else:
            lifecycle.up(self.host, self.bundle, wait=self.wait)

    def verify(self) -> None:
        _expect_running(self.host, self.action.name, str(self.bundle.path), self.action.kind.value)


@dataclass(frozen=True)
class _Replace:
    """Stop the old generation (keeping lease and volumes), start the new; on failure the old again.
    Blue-green (the new bundle's `replace.strategy`, with the old generation running): the new one boots
    beside it and takes over its address (`lifecycle.blue_green`); on failure it is removed."""

    host: Host
    action: Action
    bundle: Bundle
    wait: WaitFor
    report: dict[str, Any] = field(default_factory=dict)  # the switch, for the action's result

    def should_do(self) -> bool:
        return _running_as(self.host, self.action.name, str(self.bundle.path)) is None

    def do(self) -> None:
        name, new = self.action.name, str(self.bundle.path)
        old = self.host.state.load_record(name)
        if (
            self.bundle.meta.replace.strategy is ReplaceStrategy.BLUE_GREEN
            and old is not None
            and process.alive(old.pid, old.start_time)
            and self.bundle.meta.interfaces
        ):
            try:
                switch = lifecycle.blue_green(self.host, self.bundle)
            except ProcuratorError as exc:
                raise _RolledBackError(
                    f"new generation {_short(new)} failed: {exc}; it was removed, and the old generation "
                    f"{_short(old.bundle)} served throughout"
                ) from exc
            self.report.update(switch.to_json())
            return
        if old is not None:
            lifecycle.down(self.host, name)
        try:
            lifecycle.up(self.host, self.bundle, wait=self.wait)
        except ProcuratorError as exc:
            if old is None or old.bundle == new:
                raise
            self._restore(old, exc)

    def _restore(self, old: VmRecord, failure: ProcuratorError) -> None:
        name = self.action.name
        new = _short(str(self.bundle.path))
        log.info(
            "%s: new generation %s failed (%s); starting %s again", name, new, failure, _short(old.bundle)
        )
        try:
            # The old generation ran before: it is restored as it was, not gated on its health checks.
            bundle = Bundle.load(Path(old.bundle))
            lifecycle.up(self.host, bundle, backend=old.backend, wait=WaitFor.BOOTED, restarts=old.restarts)
            _expect_running(self.host, name, old.bundle, "the rollback")
        except ProcuratorError as again:
            raise ProcuratorError(
                f"new generation {_short(str(self.bundle.path))} failed: {failure}; starting the old "
                f"generation {_short(old.bundle)} again failed too: {again}"
            ) from again
        raise _RolledBackError(
            f"new generation {_short(str(self.bundle.path))} failed: {failure}; "
            f"old generation {_short(old.bundle)} runs again"
        ) from failure

    def verify(self) -> None:
        _expect_running(self.host, self.action.name, str(self.bundle.path), "the replacement")


@dataclass(frozen=True)
class _Remove:
    """Stop the VM and forget it; its volumes and lease stay."""

    host: Host
    action: Action

    def should_do(self) -> bool:
        return self.host.state.load_record(self.action.name) is not None

    def do(self) -> None:
        lifecycle.down(self.host, self.action.name)

    def verify(self) -> None:
        record = self.host.state.load_record(self.action.name)
        if record is not None:
            raise StateError(f"VM {self.action.name!r}: still recorded after its removal")


def _run_step(step: _Step) -> ActionResult:
    """Measure, act, verify one action; every failure becomes the action's outcome."""
    start = time.monotonic()
    name = step.action.name
    try:
        if step.should_do():
            log.info("%s: %s", name, step.action.line())
            step.do()
        else:
            log.info("%s: already as desired", name)
        step.verify()
    except _RolledBackError as exc:
        return ActionResult(step.action, Outcome.ROLLED_BACK, exc.message, time.monotonic() - start)
    except ProcuratorError as exc:
        return ActionResult(step.action, Outcome.FAILED, exc.message, time.monotonic() - start)
    except Exception as exc:  # a bug must not leave the other steps unreported
        log.exception("%s: %s failed unexpectedly", name, step.action.kind.value)
        return ActionResult(step.action, Outcome.FAILED, f"internal error: {exc!r}", time.monotonic() - start)
    report = getattr(step, "report", None)
    return ActionResult(
        step.action, Outcome.OK, "", time.monotonic() - start, dict(report) if report else None
    )


_ORDER = {ActionKind.REMOVE: 0, ActionKind.REPLACE: 1, ActionKind.START: 2, ActionKind.CREATE: 3}


def _steps(host: Host, the_plan: Plan, bundles: Mapping[str, Bundle], wait: WaitFor) -> list[_Step]:
    steps: list[_Step] = []
    for action in sorted((a for a in the_plan.actions if a.changes), key=lambda a: (_ORDER[a.kind], a.name)):
        if action.kind is ActionKind.REMOVE:
            steps.append(_Remove(host, action))
        elif action.kind is ActionKind.REPLACE:
            steps.append(_Replace(host, action, bundles[action.name], wait))
        else:
            steps.append(_Boot(host, action, bundles[action.name], wait))
    return steps


def _warm_backends(host: Host, the_plan: Plan, observed: Sequence[VmStatus]) -> None:
    """Make the backends the steps need, in this thread, before the parallel phase: a missing binary or an
    unknown backend fails before anything changes, and the threads share one instance per backend."""
    recorded = {s.record.name: s.record.backend for s in observed}
    needed: set[str] = set()
    for action in the_plan.actions:
        if action.kind in (ActionKind.CREATE, ActionKind.REPLACE):
            needed.add(host.config.hypervisor.backend)
        if action.kind in (ActionKind.REPLACE, ActionKind.REMOVE, ActionKind.START):
            needed.add(recorded[action.name])
    for backend in sorted(needed):
        host.hypervisors(backend)


def apply(
    host: Host,
    deployment: Deployment,
    *,
    parallel: int = 4,
    wait: WaitFor = WaitFor.HEALTHY,
    record: bool = True,
    lock_timeout: float = LOCK_TIMEOUT,
    records: RecordSource | None = None,
) -> ApplyResult:
    """Make this host run `deployment`: plan, then run the actions `parallel` at a time. The host is
    observed through `records` when given (the worker's cache of its records).

    Raises (having changed nothing) when the deployment cannot be applied at all: a bundle missing from
    the store or invalid, a damaged state file, the state lock busy for `lock_timeout` seconds. Otherwise
    returns what each action did; `failed` when any did not succeed. With `record`, a successful apply
    of a store deployment becomes the current generation of the deployment profile.
    """
    if parallel < 1:
        raise UsageError(f"parallel must be at least 1, got {parallel}")
    started = time.monotonic()
    with lifecycle.locked(host, lock_timeout):
        observed = observe(host, records)
        # with the replacements' diffs (read only for them), for `apply --json` and the status page
        the_plan = plan(deployment, observed, files=read_bundle_files)
        bundles = check_bundles(deployment, the_plan)
        the_plan = with_strategies(the_plan, bundles)
        steps = _steps(host, the_plan, bundles, wait)
        done: dict[str, ActionResult] = {}
        if steps:
            _warm_backends(host, the_plan, observed)
            networked = any(b.meta.interfaces for b in bundles.values())
            workers = min(parallel, len(steps))
            with (
                lifecycle.network_once(host) if networked else contextlib.nullcontext(),
                ThreadPoolExecutor(max_workers=workers, thread_name_prefix="apply") as pool,
            ):
                for step_result in pool.map(host.state.lend(_run_step), steps):
                    done[step_result.action.name] = step_result
        results = tuple(done.get(a.name) or ActionResult(a, Outcome.OK) for a in the_plan.actions)
        result = ApplyResult(str(deployment.path), results, 0.0)
        if record and not result.failed and history.is_recordable(deployment.path):
            try:
                result = replace(result, history=history.record(host.state, deployment.path))
            except ProcuratorError as exc:
                result = replace(
                    result,
                    error=f"applied, but not recorded in the deployment history: {exc}; run apply again",
                )
    return replace(result, duration=time.monotonic() - started)


def rollback(
    host: Host,
    *,
    to: int | None = None,
    parallel: int = 4,
    wait: WaitFor = WaitFor.HEALTHY,
    lock_timeout: float = LOCK_TIMEOUT,
) -> ApplyResult:
    """Apply an earlier generation of the deployment history (`to`, default the one before the current)
    and, if that succeeds, make it the current generation. Its number is the result's `history`."""
    with lifecycle.locked(host, lock_timeout):
        target = history.select(history.generations(host.state), to)
        deployment = Deployment.load(Path(target.deployment))
        result = apply(host, deployment, parallel=parallel, wait=wait, record=False)
        if result.failed:
            return result
        history.switch(host.state, target.number)
        return replace(result, history=target.number)
