"""Deploying to many hosts (docs/deploy.md): `procurator deploy` / `nix run .#deploy`.

A fleet is what `lib.mkHosts` (nix/hosts.nix) makes: per host an SSH target, tags, the command that runs
procurator there, and a deployment. `Fleet.load(REF)` reads the settings of every host with one
`nix eval --json <REF>.inventory`, evaluating no deployment; `deploy()` then works in two phases:

1. **Pre-flight**, every selected host at once (bounded), before anything is built: `ssh <target>
   true`, so a host that is unreachable or refuses the key is reported (`unreachable`) and left
   alone, and the others go on. (Nothing of procurator runs there yet: a host without procurator
   fails at its apply or plan, having changed nothing.)
2. **Per host**, `parallel` hosts at a time: build `<REF>.hosts.<name>.deployment` (one host's
   evaluation or build failing fails that host only), `nix copy --to ssh://<target>` its closure, then
   `<procurator> apply <deployment> --json` there. The remote apply is health-gated and puts back the old
   generation of any VM that fails; when the apply fails having changed something, the host is rolled
   back to the generation it ran before (`rollback --to N`, N being its current generation: an apply
   records its deployment only when it succeeds), or, on a host without history, the VMs the failed
   apply created are taken down again. With `dry_run`, `<procurator> plan <deployment> --json` runs instead
   of apply: the closure is copied (the host's store gains paths, nothing else changes) so that the plan
   sees the real bundles.

One host failing never stops the others. Interrupting (KeyboardInterrupt in the calling thread, or
`stop`) starts no new host; remote applies already running are left to finish (their ssh runs in its
own session, out of reach of the terminal's Ctrl-C) and reported as they end; builds and copies,
which change nothing on a host, end with the Ctrl-C. A second interrupt stops waiting: hosts still
applying are reported `interrupted`.

SSH is the system's `ssh` run through `procurator.process`, `nix copy` goes through `procurator.nix`;
the core never prints: `progress` receives every change of a host's phase and its result.
"""

from __future__ import annotations

import contextlib
import json
import logging
import queue
import re
import shlex
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any, Generic, TypeVar

from procurator import nix, process
from procurator.errors import ProcuratorError, UsageError, ValidationError, WaitTimeoutError
from procurator.history import History
from procurator.models import SCHEMA_VERSION, Deployment, is_dns_label
from procurator.reconcile import Action, ActionKind, ApplyResult, Outcome, PlanReport

log = logging.getLogger(__name__)

DEFAULT_ATTR = "procuratorHosts"  # the flake output `procurator deploy FLAKE` reads without `#attr`
CONNECT_TIMEOUT = 10  # seconds: ssh's ConnectTimeout
PREFLIGHT_TIMEOUT = 60.0  # seconds for one pre-flight command, connection included
APPLY_TIMEOUT = 3600.0  # seconds for one remote apply or rollback (the apply bounds its own waits)
REMOTE_TIMEOUT = 300.0  # seconds for a remote plan or down
SSH_FAILED = 255  # ssh's exit status when it, not the remote command, failed
NOT_FOUND = 127  # the remote shell's exit status for a command it cannot find
PREFLIGHT_PARALLEL = 16  # pre-flight checks at once (at least; --parallel if higher)
JOIN_POLL = 0.2  # seconds between checks of the worker threads (keeps the caller interruptible)
CONTROL_PERSIST = 60  # seconds a shared ssh connection outlives its last use (if not closed before)
CONTROL_EXIT_TIMEOUT = 10.0  # seconds for `ssh -O exit` (local: it talks to the master's socket)
CONTROL_PATH_MAX = 100  # a UNIX socket path has room for 107 bytes; %C adds 40 to the directory

_FLAKE_SCHEME = re.compile(r"^[a-z+]+:")
INTERRUPT_GRACE = 0.5  # seconds a failed build or copy waits to learn whether an interrupt caused it

T = TypeVar("T")
R = TypeVar("R")


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
_COUNTED = ("create", "replace", "start", "remove")


class Stage(StrEnum):
    PREFLIGHT = "preflight"
    BUILD = "build"
    COPY = "copy"
    PLAN = "plan"
    APPLY = "apply"
    ROLLBACK = "rollback"


# -- the fleet -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class HostSpec:
    """One host of the fleet, as lib.mkHosts' `inventory` describes it."""

    name: str
    target: str
    port: int | None = None
    identity_file: str | None = None
    ssh_options: tuple[str, ...] = ()
    tags: tuple[str, ...] = ()
    procurator: str = "procurator"

    @classmethod
    def parse(cls, source: str, name: str, data: Any) -> HostSpec:
        where = f"hosts.{name}"
        if not isinstance(data, dict):
            raise ValidationError(source, where, "expected an object of host settings")

        def text(key: str, *, optional: bool = False) -> str | None:
            value = data.get(key)
            if value is None and optional:
                return None
            if not isinstance(value, str) or not value.strip():
                raise ValidationError(source, f"{where}.{key}", f"expected a non-empty string, got {value!r}")
            return value

        def words(key: str) -> tuple[str, ...]:
            value = data.get(key, [])
            if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
                raise ValidationError(source, f"{where}.{key}", f"expected a list of strings, got {value!r}")
            return tuple(value)

        if not is_dns_label(name):
            raise ValidationError(source, where, f"host name {name!r} is not a DNS label")
        target = text("target") or ""
        if target.startswith("-") or target.split() != [target]:
            raise ValidationError(source, f"{where}.target", f"{target!r} is not [user@]host")
        port = data.get("port")
        if port is not None and (isinstance(port, bool) or not isinstance(port, int) or not 0 < port < 65536):
            raise ValidationError(source, f"{where}.port", f"{port!r} is not a TCP port")
        tags = words("tags")
        bad = [t for t in tags if not is_dns_label(t)]
        if bad:
            raise ValidationError(source, f"{where}.tags", f"{bad[0]!r} is not a DNS label")
        options = words("sshOptions")
        spaced = [o for o in options if o.split() != [o]]
        if spaced:
            raise ValidationError(source, f"{where}.sshOptions", f"{spaced[0]!r} has white space")
        return cls(
            name=name,
            target=target,
            port=port,
            identity_file=text("identityFile", optional=True),
            ssh_options=options,
            tags=tags,
            procurator=text("procurator", optional=True) or "procurator",
        )

    @property
    def store(self) -> str:
        """The `nix copy --to` store of this host."""
        return f"ssh://{self.target}"

    def ssh_options_for(
        self, connect_timeout: int = CONNECT_TIMEOUT, control_dir: Path | None = None
    ) -> list[str]:
        """ssh's options for this host, for our own ssh and for `nix copy`'s (NIX_SSHOPTS).

        The fleet's own options come first: ssh keeps the first value it is given for an option, so
        they win over these defaults. BatchMode: never ask for a password or a host key. With
        `control_dir`, every ssh to this host shares one connection (ControlMaster): the first one
        opens it and leaves it in the background for the others (`close_shared`).
        """
        out = list(self.ssh_options)
        if self.port is not None:
            out += ["-p", str(self.port)]
        if self.identity_file is not None:
            out += ["-i", self.identity_file, "-o", "IdentitiesOnly=yes"]
        out += [
            "-o",
            "BatchMode=yes",
            "-o",
            f"ConnectTimeout={connect_timeout}",
            "-o",
            "ServerAliveInterval=10",
            "-o",
            "ServerAliveCountMax=3",
        ]
        if control_dir is not None:
            out += ["-o", "ControlMaster=auto", "-o", f"ControlPath={control_dir}/%C"]
            out += ["-o", f"ControlPersist={CONTROL_PERSIST}"]
        return out

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "target": self.target,
            "port": self.port,
            "identityFile": self.identity_file,
            "sshOptions": list(self.ssh_options),
            "tags": list(self.tags),
            "procurator": self.procurator,
        }


@dataclass(frozen=True)
class FleetRef:
    """Where the fleet is: a flake with an attribute, or a Nix file with an optional attribute."""

    ref: str
    base: str
    attr: str  # the attribute path of the mkHosts value ("" for a file that is one)
    is_file: bool

    @classmethod
    def parse(cls, ref: str) -> FleetRef:
        if not ref:
            raise UsageError("empty REF; give a flake (`.`, `.#fleet`) or a Nix file (`hosts.nix[#attr]`)")
        base, sep, attr = ref.partition("#")
        if sep and not attr:
            raise UsageError(f"{ref}: empty attribute after '#'")
        local = Path(base)
        if base.endswith(".nix") or local.is_file():
            if not local.is_file():
                raise UsageError(f"{base}: no such Nix file")
            return cls(ref, base, attr, is_file=True)
        if not (_FLAKE_SCHEME.match(base) or local.is_dir()):
            raise UsageError(f"{ref}: {base!r} is neither a flake directory, a flake URL nor a Nix file")
        return cls(ref, base, attr or DEFAULT_ATTR, is_file=False)

    def _path(self, *rest: str) -> str:
        return ".".join(p for p in (self.attr, *rest) if p)

    def evaluate(self, *rest: str) -> Any:
        """`nix eval --json` of an attribute below the fleet."""
        if self.is_file:
            return nix.eval_file_json(Path(self.base), self._path(*rest))
        return nix.eval_flake_json(f"{self.base}#{self._path(*rest)}")

    def build(self, *rest: str) -> list[Path]:
        """`nix build` of an attribute below the fleet: its output paths."""
        if self.is_file:
            return nix.build_file(Path(self.base), self._path(*rest))
        return nix.build_flake(f"{self.base}#{self._path(*rest)}")

    def deployment_attr(self, name: str) -> str:
        """How people would name the deployment of host `name`."""
        where = self._path("hosts", name, "deployment")
        return f"{self.base} {where}" if self.is_file else f"{self.base}#{where}"


@dataclass(frozen=True)
class Fleet:
    ref: FleetRef
    hosts: dict[str, HostSpec]

    @classmethod
    def parse(cls, ref: FleetRef, data: Any) -> Fleet:
        source = f"{ref.ref} (inventory)"
        if not isinstance(data, dict):
            raise ValidationError(source, "", "expected the `inventory` of lib.mkHosts, an object")
        version = data.get("schema")
        if version != SCHEMA_VERSION:
            raise ValidationError(
                source, "schema", f"unknown version {version!r}; this procurator reads {SCHEMA_VERSION}"
            )
        hosts = data.get("hosts")
        if not isinstance(hosts, dict):
            raise ValidationError(source, "hosts", "expected an object of hosts by name")
        return cls(ref, {name: HostSpec.parse(source, name, spec) for name, spec in sorted(hosts.items())})

    @classmethod
    def load(cls, ref: str) -> Fleet:
        """Evaluate REF's inventory (no deployment is evaluated or built)."""
        fleet_ref = FleetRef.parse(ref)
        return cls.parse(fleet_ref, fleet_ref.evaluate("inventory"))

    def select(self, on: str | None) -> list[HostSpec]:
        """The hosts `--on` names: comma-separated host names and @tags (default: every host), by name."""
        if on is None:
            return list(self.hosts.values())
        names: set[str] = set()
        for raw in on.split(","):
            item = raw.strip()
            if not item:
                raise UsageError(f"--on {on!r}: empty item; give HOST,@TAG,...")
            if item.startswith("@"):
                tagged = {h.name for h in self.hosts.values() if item[1:] in h.tags}
                if not tagged:
                    known = sorted({t for h in self.hosts.values() for t in h.tags})
                    raise UsageError(
                        f"--on: no host has tag {item[1:]!r} (tags: {', '.join(known) or 'none'})"
                    )
                names |= tagged
            elif item in self.hosts:
                names.add(item)
            else:
                raise UsageError(f"--on: no host {item!r} in {self.ref.ref} (hosts: {', '.join(self.hosts)})")
        return [self.hosts[n] for n in sorted(names)]


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


def _ignore(_event: Event) -> None:
    return None


@dataclass(frozen=True)
class Options:
    dry_run: bool = False
    parallel: int = 4
    wait: str = "healthy"  # what the remote apply waits for: booted | healthy
    substitute_on_destination: bool = False
    connect_timeout: int = CONNECT_TIMEOUT
    share_connections: bool = True  # one ssh connection per host for all of its commands


# -- talking to a host -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Remote:
    """Runs procurator on one host over ssh (through `procurator.process`)."""

    host: HostSpec
    connect_timeout: int = CONNECT_TIMEOUT
    control_dir: Path | None = None

    def argv(self, args: Sequence[str], *, own_session: bool = False) -> list[str]:
        """ssh's argv for `<procurator> ARGS` on the host. `-n`: ssh never reads our stdin.

        With `own_session`, ssh runs in a session of its own (setsid): the terminal's Ctrl-C does not
        reach it, so what it runs on the host is not cut off halfway.
        """
        return self.shell(f"{self.host.procurator} {shlex.join(args)}", own_session=own_session)

    def shell(self, command: str, *, own_session: bool = False) -> list[str]:
        """ssh's argv for a command line the host's shell runs."""
        argv = [
            "ssh",
            "-n",
            *self.host.ssh_options_for(self.connect_timeout, self.control_dir),
            "--",
            self.host.target,
            command,
        ]
        return ["setsid", "--wait", *argv] if own_session else argv

    def run(self, args: Sequence[str], *, timeout: float, own_session: bool = False) -> process.Completed:
        return process.run(self.argv(args, own_session=own_session), check=False, timeout=timeout)


class _HostFailedError(ProcuratorError):
    def __init__(self, result: Result, stage: Stage, message: str) -> None:
        super().__init__(message)
        self.result = result
        self.stage = stage


def _last(text: str) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else ""


def _error_line(done: process.Completed) -> str:
    """What a failed remote command said: its `error: ...` line, else its last line of stderr."""
    lines = [line.strip() for line in done.stderr.splitlines() if line.strip()]
    for line in reversed(lines):
        if line.startswith("error:"):
            return line.removeprefix("error:").strip()
    return lines[-1] if lines else f"exit status {done.returncode}"


def _json_out(done: process.Completed) -> Any:
    """The JSON a remote `--json` command printed (None if it printed none)."""
    if not done.stdout.strip():
        return None
    try:
        return json.loads(done.stdout)
    except json.JSONDecodeError:
        return None


def _remote_failure(host: HostSpec, done: process.Completed, what: str) -> str:
    if done.returncode == SSH_FAILED:
        said = _last(done.stderr) or "failed"
        return said if said.startswith("ssh:") else f"ssh {host.target}: {said}"
    if done.returncode == NOT_FOUND:
        return (
            f"`{host.procurator}` not found on {host.target} ({_last(done.stderr)}); install procurator "
            "there or set the host's `procurator` command"
        )
    return f"{what} on {host.target} failed: {_error_line(done)}"


def _counts(actions: Iterable[Action]) -> dict[str, int]:
    counts = dict.fromkeys(_COUNTED, 0)
    for action in actions:
        if action.kind.value in counts:
            counts[action.kind.value] += 1
    return counts


def _typed(host: HostSpec, done: process.Completed, what: str, read: Callable[[Any, str], T]) -> T | None:
    """What a remote `procurator WHAT --json` printed, read by its typed reader; None when it printed
    no JSON. JSON of the wrong shape (another procurator release there) is an error naming the host."""
    data = _json_out(done)
    if data is None:
        return None
    return read(data, f"{what} --json on {host.target}")


def preflight(
    host: HostSpec, connect_timeout: int = CONNECT_TIMEOUT, control_dir: Path | None = None
) -> None:
    """`ssh <target> true`: the host is reachable and accepts the key (nothing of procurator runs).
    Raises `_HostFailedError`."""
    argv = Remote(host, connect_timeout, control_dir).shell("true")
    try:
        done = process.run(argv, check=False, timeout=PREFLIGHT_TIMEOUT)
    except ProcuratorError as exc:
        raise _HostFailedError(Result.UNREACHABLE, Stage.PREFLIGHT, f"ssh {host.target}: {exc}") from exc
    if done.returncode == SSH_FAILED:
        raise _HostFailedError(Result.UNREACHABLE, Stage.PREFLIGHT, _remote_failure(host, done, "ssh"))
    if done.returncode != 0:
        raise _HostFailedError(
            Result.FAILED, Stage.PREFLIGHT, f"`true` over ssh failed on {host.target}: {_error_line(done)}"
        )


# -- one host --------------------------------------------------------------------------------------------


@dataclass
class _HostRun:
    """The deploy of one host: build, copy, apply (or plan), roll back on failure."""

    fleet: FleetRef
    host: HostSpec
    options: Options
    stop: threading.Event
    progress: Progress
    control_dir: Path | None = None
    started: float = field(default_factory=time.monotonic)
    deployment: str | None = None

    @property
    def remote(self) -> Remote:
        return Remote(self.host, self.options.connect_timeout, self.control_dir)

    def phase(self, phase: Phase, detail: str = "") -> None:
        self.progress(Event(self.host.name, phase, detail))

    def result(self, result: Result, **fields: Any) -> HostResult:
        return HostResult(
            name=self.host.name,
            target=self.host.target,
            result=result,
            deployment=self.deployment,
            duration=time.monotonic() - self.started,
            **fields,
        )

    def interrupted_before(self, stage: Stage) -> None:
        if self.stop.is_set():
            raise _HostFailedError(
                Result.INTERRUPTED, stage, f"interrupted before {stage.value}; host unchanged"
            )

    def failed_by_interrupt(self) -> bool:
        """Whether a failed build or copy was the interrupt's doing: the terminal's Ctrl-C reaches nix at
        the same time as us, and we may learn of it a moment later."""
        return self.stop.wait(INTERRUPT_GRACE)

    def run(self) -> HostResult:
        try:
            return self._run()
        except _HostFailedError as exc:
            return self.result(exc.result, stage=exc.stage, error=exc.message)
        except Exception as exc:  # a bug must not leave the other hosts unreported
            log.exception("%s: deploy failed unexpectedly", self.host.name)
            return self.result(Result.FAILED, error=f"internal error: {exc!r}")

    def _run(self) -> HostResult:
        self.interrupted_before(Stage.BUILD)
        path = self._build()
        self.interrupted_before(Stage.COPY)
        self._copy(path)
        self.interrupted_before(Stage.PLAN if self.options.dry_run else Stage.APPLY)
        if self.options.dry_run:
            return self._plan(path)
        return self._apply(path)

    def _build(self) -> Path:
        self.phase(Phase.BUILDING, self.fleet.deployment_attr(self.host.name))
        try:
            paths = self.fleet.build("hosts", self.host.name, "deployment")
            if len(paths) != 1:
                raise ValidationError(self.fleet.deployment_attr(self.host.name), "", "not one output")
            deployment = Deployment.load(paths[0])
        except ProcuratorError as exc:
            if self.failed_by_interrupt():
                raise _HostFailedError(Result.INTERRUPTED, Stage.BUILD, "interrupted while building") from exc
            raise _HostFailedError(Result.FAILED, Stage.BUILD, exc.message) from exc
        self.deployment = str(deployment.path)
        if deployment.host != self.host.name:
            raise _HostFailedError(
                Result.FAILED,
                Stage.BUILD,
                f"{deployment.path} is the deployment of host {deployment.host!r}, not {self.host.name!r}",
            )
        return deployment.path

    def _copy(self, path: Path) -> None:
        self.phase(Phase.COPYING, self.host.store)
        try:
            nix.copy_to(
                [path],
                self.host.store,
                ssh_options=self.host.ssh_options_for(self.options.connect_timeout, self.control_dir),
                substitute_on_destination=self.options.substitute_on_destination,
            )
        except ProcuratorError as exc:
            result = Result.INTERRUPTED if self.failed_by_interrupt() else Result.FAILED
            hint = ""
            if "lacks a signature by a trusted key" in exc.message:
                hint = (
                    f"; the target's nix-daemon does not trust what {self.host.target} sends: make that user "
                    "a trusted-user there (nix.settings.trusted-users) or sign the paths (docs/deploy.md)"
                )
            raise _HostFailedError(result, Stage.COPY, f"{exc.message}{hint}; host unchanged") from exc

    def _plan(self, path: Path) -> HostResult:
        self.phase(Phase.PLANNING)
        done = self._remote(["plan", str(path), "--json"], Stage.PLAN, REMOTE_TIMEOUT)
        if done.returncode != 0:
            raise _HostFailedError(Result.FAILED, Stage.PLAN, _remote_failure(self.host, done, "plan"))
        try:
            plan = _typed(self.host, done, "plan", PlanReport.from_json)
        except ValidationError as exc:
            raise _HostFailedError(Result.FAILED, Stage.PLAN, exc.message) from exc
        if plan is None:
            raise _HostFailedError(Result.FAILED, Stage.PLAN, _remote_failure(self.host, done, "plan"))
        return self.result(Result.PLANNED, counts=_counts(plan.plan.actions), plan=plan)

    def _remote(
        self, args: list[str], stage: Stage, timeout: float, *, own_session: bool = False
    ) -> process.Completed:
        try:
            return self.remote.run(args, timeout=timeout, own_session=own_session)
        except ProcuratorError as exc:
            raise _HostFailedError(Result.FAILED, stage, f"ssh {self.host.target}: {exc.message}") from exc

    def _apply(self, path: Path) -> HostResult:
        self.phase(Phase.APPLYING)
        args = ["apply", str(path), "--json", "--wait", self.options.wait]
        try:
            done = self.remote.run(args, timeout=APPLY_TIMEOUT, own_session=True)
        except WaitTimeoutError as exc:  # it may still run there (and roll back its VMs itself)
            raise _HostFailedError(
                Result.FAILED, Stage.APPLY, f"{exc.message}; its outcome is unknown: look at the host"
            ) from exc
        except ProcuratorError as exc:  # ssh could not even start: nothing ran
            raise _HostFailedError(Result.FAILED, Stage.APPLY, f"{exc.message}; nothing changed") from exc
        try:
            applied = _typed(self.host, done, "apply", ApplyResult.from_json)
        except ValidationError as exc:  # it ran, with an outcome we cannot read: do not guess
            raise _HostFailedError(
                Result.FAILED, Stage.APPLY, f"{exc.message}; its outcome is unknown: look at the host"
            ) from exc
        if done.returncode == 0 and applied is not None and not applied.failed:
            counts = _counts(r.action for r in applied.actions if r.outcome is Outcome.OK)
            return self.result(
                Result.DEPLOYED if any(counts.values()) else Result.UNCHANGED,
                counts=counts,
                apply=applied,
                generation=applied.history,
            )
        why = _remote_failure(self.host, done, "apply")
        if applied is not None:
            failures = [
                f"{r.action.name} {r.outcome.value}: {r.error}"
                for r in applied.actions
                if r.outcome is not Outcome.OK
            ]
            why = "; ".join(failures) or applied.error or why
            if not applied.changed:
                raise _HostFailedError(Result.FAILED, Stage.APPLY, f"apply failed, nothing changed: {why}")
        elif done.returncode != SSH_FAILED:
            # The apply refused before acting (procurator missing, a bundle missing, the lock busy, ...).
            raise _HostFailedError(Result.FAILED, Stage.APPLY, f"{why}; nothing changed")
        return self._roll_back(applied, f"apply failed: {why}")

    def _current_generation(self) -> tuple[int, str] | None:
        """The host's current deployment generation and its deployment. After a failed apply that is
        the one it ran before: an apply records its deployment only when it succeeds."""
        done = self._remote(["history", "--json"], Stage.ROLLBACK, REMOTE_TIMEOUT)
        try:
            read = _typed(self.host, done, "history", History.from_json) if done.returncode == 0 else None
        except ValidationError as exc:
            raise _HostFailedError(
                Result.ROLLBACK_FAILED, Stage.ROLLBACK, f"cannot read the deployment history: {exc.message}"
            ) from exc
        if read is None:
            raise _HostFailedError(
                Result.ROLLBACK_FAILED,
                Stage.ROLLBACK,
                "cannot read the deployment history to roll back: "
                + _remote_failure(self.host, done, "history"),
            )
        current = read.current
        return None if current is None else (current.number, current.deployment)

    def _roll_back(self, applied: ApplyResult | None, why: str) -> HostResult:
        """Put the host back as it was before this deploy (the apply failed having changed something)."""
        now = self._current_generation()
        if applied is None and now is not None and now[1] == self.deployment:
            # The connection was lost, but the apply went through: it recorded this deployment.
            return self.result(Result.DEPLOYED, generation=now[0], error=f"{why}; but it was applied")
        previous = None if now is None else now[0]
        if previous is not None:
            self.phase(Phase.ROLLING_BACK, f"to generation {previous}")
            args = ["rollback", "--to", str(previous), "--json", "--wait", "booted"]
            done = self._remote(args, Stage.ROLLBACK, APPLY_TIMEOUT, own_session=True)
            try:
                rolled_doc = _typed(self.host, done, "rollback", ApplyResult.from_json)
            except ValidationError as exc:
                log.warning("%s", exc.message)
                rolled_doc = None
            if done.returncode == 0:
                return self.result(
                    Result.ROLLED_BACK,
                    stage=Stage.APPLY,
                    error=f"{why}; rolled back to generation {previous}",
                    apply=applied,
                    rollback=rolled_doc,
                    generation=previous,
                )
            return self.result(
                Result.ROLLBACK_FAILED,
                stage=Stage.ROLLBACK,
                error=f"{why}; rolling back to generation {previous} failed too: "
                f"{_remote_failure(self.host, done, 'rollback')}",
                apply=applied,
                rollback=rolled_doc,
            )
        # No history: what ran before was no deployment. Take down what the failed apply created.
        created = sorted(
            r.action.name
            for r in (applied.actions if applied is not None else ())
            if r.action.kind is ActionKind.CREATE and r.outcome is Outcome.OK
        )
        if applied is None:
            return self.result(
                Result.ROLLBACK_FAILED,
                stage=Stage.APPLY,
                error=f"{why}; the host has no earlier generation and its state is unknown",
            )
        if not created:
            return self.result(
                Result.FAILED,
                stage=Stage.APPLY,
                error=f"{why}; no earlier generation to roll back to, and no VM was created",
                apply=applied,
            )
        self.phase(Phase.ROLLING_BACK, f"down {', '.join(created)}")
        done = self._remote(["down", *created], Stage.ROLLBACK, REMOTE_TIMEOUT, own_session=True)
        if done.returncode == 0:
            return self.result(
                Result.ROLLED_BACK,
                stage=Stage.APPLY,
                error=f"{why}; no earlier generation: took down the VMs it created ({', '.join(created)})",
                apply=applied,
            )
        return self.result(
            Result.ROLLBACK_FAILED,
            stage=Stage.ROLLBACK,
            error=f"{why}; taking down the VMs it created failed: {_remote_failure(self.host, done, 'down')}",
            apply=applied,
        )


# -- the fleet at once -----------------------------------------------------------------------------------


class _Bounded(Generic[T, R]):
    """Run `fn` on items, `parallel` at a time, on daemon threads (an abandoned host never blocks exit).

    `wait()` returns when every item is done. A KeyboardInterrupt while waiting: the first sets `stop`
    (no new item starts; `fn` sees it and winds down), the second gives up waiting. Then the keys of
    items still running are in `running`; items never started have no result in `done`.
    """

    def __init__(
        self,
        items: Sequence[T],
        fn: Callable[[T], R],
        key: Callable[[T], str],
        parallel: int,
        stop: threading.Event,
    ) -> None:
        self.items = list(items)
        self.fn = fn
        self.key = key
        self.parallel = parallel
        self.stop = stop
        self.done: dict[str, R] = {}
        self.running: set[str] = set()
        self.interrupted = False
        self._queue: queue.SimpleQueue[T] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._alive = 0
        self._finished = threading.Event()
        for item in self.items:
            self._queue.put(item)

    def _worker(self) -> None:
        try:
            while not self.stop.is_set():
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    return
                key = self.key(item)
                with self._lock:
                    self.running.add(key)
                result = self.fn(item)
                with self._lock:
                    self.done[key] = result
                    self.running.discard(key)
        finally:
            with self._lock:
                self._alive -= 1
                if self._alive == 0:
                    self._finished.set()

    def wait(self) -> None:
        # Waiting on an Event, not Thread.join: in Python 3.11 an interrupted join marks the thread
        # stopped while it still runs (bpo-45274's fix), and the second wait would return at once.
        workers = min(self.parallel, len(self.items))
        self._alive = workers
        if workers == 0:
            self._finished.set()
        for i in range(workers):
            threading.Thread(target=self._worker, name=f"deploy-{i}", daemon=True).start()
        try:
            self._wait_finished()
        except KeyboardInterrupt:
            self.stop.set()
            log.info("interrupted: no new host starts; waiting for the hosts in flight")
            try:
                self._wait_finished()
            except KeyboardInterrupt:
                log.info("interrupted again: no longer waiting")
        self.interrupted = self.stop.is_set()

    def _wait_finished(self) -> None:
        while not self._finished.wait(JOIN_POLL):
            pass


def deploy(
    fleet: Fleet,
    hosts: Sequence[HostSpec],
    options: Options,
    *,
    progress: Progress = _ignore,
    stop: threading.Event | None = None,
) -> DeployResult:
    """Deploy (or with `options.dry_run`, plan) `hosts` of `fleet`. Never raises for a host's failure:
    each host's outcome is in the result, in the order of `hosts`."""
    if options.parallel < 1:
        raise UsageError(f"parallel must be at least 1, got {options.parallel}")
    if options.wait not in ("booted", "healthy"):
        raise UsageError(f"wait must be booted or healthy, got {options.wait!r}")
    in_flight: set[str] = set()
    with _shared_connections(hosts, options, in_flight) as control_dir:
        return _deploy(fleet, hosts, options, progress, stop or threading.Event(), control_dir, in_flight)


@contextlib.contextmanager
def _shared_connections(
    hosts: Sequence[HostSpec], options: Options, in_flight: set[str]
) -> Iterator[Path | None]:
    """A private directory for the ssh connections shared per host (ControlPath), closed at the end
    (`ssh -O exit`) except those of hosts still applying when the deploy stopped waiting (`in_flight`):
    closing those would cut their apply off. None when sharing is off or the path would be too long."""
    if not options.share_connections:
        yield None
        return
    control_dir = Path(tempfile.mkdtemp(prefix="procurator-ssh-"))
    if len(str(control_dir)) + 41 > CONTROL_PATH_MAX:
        control_dir.rmdir()
        yield None
        return
    try:
        yield control_dir
    finally:
        if any(control_dir.iterdir()):
            for host in hosts:
                if host.name in in_flight:
                    continue
                argv = ["ssh", *host.ssh_options_for(options.connect_timeout, control_dir)]
                argv += ["-O", "exit", "--", host.target]
                try:
                    process.run(argv, check=False, timeout=CONTROL_EXIT_TIMEOUT)
                except ProcuratorError as exc:
                    log.warning("%s: closing the shared ssh connection: %s", host.name, exc)
        shutil.rmtree(control_dir, ignore_errors=True)


def _deploy(  # noqa: PLR0917 - the private body of deploy()
    fleet: Fleet,
    hosts: Sequence[HostSpec],
    options: Options,
    progress: Progress,
    stop: threading.Event,
    control_dir: Path | None,
    in_flight: set[str],
) -> DeployResult:
    started = time.monotonic()
    results: dict[str, HostResult] = {}

    def finish(result: HostResult) -> HostResult:
        progress(Event(result.name, Phase.DONE, result.result.value, result))
        return result

    for host in hosts:
        progress(Event(host.name, Phase.QUEUED))

    # 1. Pre-flight, every host at once (bounded), before any build.
    def check(host: HostSpec) -> bool:
        progress(Event(host.name, Phase.CHECKING, host.target))
        t0 = time.monotonic()
        try:
            preflight(host, options.connect_timeout, control_dir)
        except _HostFailedError as exc:
            took = time.monotonic() - t0
            results[host.name] = finish(
                HostResult(host.name, host.target, exc.result, exc.stage, exc.message, duration=took)
            )
            return False
        progress(Event(host.name, Phase.WAITING, "reachable"))
        return True

    first = _Bounded(hosts, check, lambda h: h.name, max(options.parallel, PREFLIGHT_PARALLEL), stop)
    first.wait()
    interrupted = first.interrupted

    # 2. Per host: build, copy, apply (or plan), `parallel` at a time, in the order given.
    if not interrupted:
        reachable = [h for h in hosts if first.done.get(h.name)]

        def run(host: HostSpec) -> HostResult:
            return finish(_HostRun(fleet.ref, host, options, stop, progress, control_dir).run())

        second = _Bounded(reachable, run, lambda h: h.name, options.parallel, stop)
        second.wait()
        results.update(second.done)
        interrupted = second.interrupted
        in_flight.update(second.running)
        for name in sorted(second.running):
            results[name] = finish(
                HostResult(
                    name,
                    fleet.hosts[name].target,
                    Result.INTERRUPTED,
                    error="still in flight when the deploy stopped waiting; a remote apply may still run "
                    "there: check `procurator history` and `procurator ps` on the host",
                    duration=time.monotonic() - started,
                )
            )
    for host in hosts:
        if host.name not in results:
            results[host.name] = finish(
                HostResult(host.name, host.target, Result.SKIPPED, error="interrupted before its turn")
            )
    return DeployResult(
        ref=fleet.ref.ref,
        dry_run=options.dry_run,
        hosts=tuple(results[h.name] for h in hosts),
        duration=time.monotonic() - started,
        interrupted=interrupted,
    )


__all__ = [
    "DEFAULT_ATTR",
    "DeployResult",
    "Event",
    "Fleet",
    "FleetRef",
    "HostResult",
    "HostSpec",
    "Options",
    "Phase",
    "Progress",
    "Remote",
    "Result",
    "Stage",
    "deploy",
    "preflight",
]
