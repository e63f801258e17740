"""The deploy of one host, a fixed sequence of named steps: build, copy, apply (or plan), and on a
failed apply that changed something, roll back."""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from procurator import nix, process
from procurator.deploy.fleet import FleetRef, HostSpec
from procurator.deploy.model import Event, HostResult, Options, Phase, Progress, Result, Stage
from procurator.deploy.remote import (
    APPLY_TIMEOUT,
    REMOTE_TIMEOUT,
    SSH_FAILED,
    HostFailedError,
    Remote,
    count_changes,
    remote_failure,
    typed_output,
)
from procurator.errors import ProcuratorError, ValidationError, WaitTimeoutError
from procurator.history import History
from procurator.models import Deployment
from procurator.reconcile import ActionKind, ApplyResult, Outcome, PlanReport

INTERRUPT_GRACE = 0.5  # seconds a failed build or copy waits to learn whether an interrupt caused it

log = logging.getLogger("procurator.deploy")


# -- one host --------------------------------------------------------------------------------------------


@dataclass
class HostRun:
    """The deploy of one host: build, copy, apply (or plan), roll back on failure."""

    fleet: FleetRef
    host: HostSpec
    options: Options
    stop: threading.Event
    progress: Progress
    control_dir: Path | None = None
    built: Path | None = None  # the deployment, when the deploy built every host's at once
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
            raise HostFailedError(
                Result.INTERRUPTED, stage, f"interrupted before {stage.value}; host unchanged"
            )

    def failed_by_interrupt(self) -> bool:
        """Whether a failed build or copy was the interrupt's doing: the terminal's Ctrl-C reaches nix at
        the same time as us, and we may learn of it a moment later."""
        return self.stop.wait(INTERRUPT_GRACE)

    def run(self) -> HostResult:
        try:
            return self._run()
        except HostFailedError as exc:
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
        if self.built is None:  # else the deploy said so when it built every host's at once
            self.phase(Phase.BUILDING, self.fleet.deployment_attr(self.host.name))
        try:
            if self.built is not None:
                paths = [self.built]
            else:
                paths = self.fleet.build("hosts", self.host.name, "deployment")
            if len(paths) != 1:
                raise ValidationError(self.fleet.deployment_attr(self.host.name), "", "not one output")
            deployment = Deployment.load(paths[0])
        except ProcuratorError as exc:
            if self.failed_by_interrupt():
                raise HostFailedError(Result.INTERRUPTED, Stage.BUILD, "interrupted while building") from exc
            raise HostFailedError(Result.FAILED, Stage.BUILD, exc.message) from exc
        self.deployment = str(deployment.path)
        if deployment.host != self.host.name:
            raise HostFailedError(
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
            raise HostFailedError(result, Stage.COPY, f"{exc.message}{hint}; host unchanged") from exc

    def _plan(self, path: Path) -> HostResult:
        self.phase(Phase.PLANNING)
        done = self._remote(["plan", str(path), "--json"], Stage.PLAN, REMOTE_TIMEOUT)
        if done.returncode != 0:
            raise HostFailedError(Result.FAILED, Stage.PLAN, remote_failure(self.host, done, "plan"))
        try:
            plan = typed_output(self.host, done, "plan", PlanReport.from_json)
        except ValidationError as exc:
            raise HostFailedError(Result.FAILED, Stage.PLAN, exc.message) from exc
        if plan is None:
            raise HostFailedError(Result.FAILED, Stage.PLAN, remote_failure(self.host, done, "plan"))
        return self.result(Result.PLANNED, counts=count_changes(plan.plan.actions), plan=plan)

    def _remote(
        self, args: list[str], stage: Stage, timeout: float, *, own_session: bool = False
    ) -> process.Completed:
        try:
            return self.remote.run(args, timeout=timeout, own_session=own_session)
        except ProcuratorError as exc:
            raise HostFailedError(Result.FAILED, stage, f"ssh {self.host.target}: {exc.message}") from exc

    def _apply(self, path: Path) -> HostResult:
        self.phase(Phase.APPLYING)
        args = ["apply", str(path), "--json", "--wait", self.options.wait]
        try:
            done = self.remote.run(args, timeout=APPLY_TIMEOUT, own_session=True)
        except WaitTimeoutError as exc:  # it may still run there (and roll back its VMs itself)
            raise HostFailedError(
                Result.FAILED, Stage.APPLY, f"{exc.message}; its outcome is unknown: look at the host"
            ) from exc
        except ProcuratorError as exc:  # ssh could not even start: nothing ran
            raise HostFailedError(Result.FAILED, Stage.APPLY, f"{exc.message}; nothing changed") from exc
        try:
            applied = typed_output(self.host, done, "apply", ApplyResult.from_json)
        except ValidationError as exc:  # it ran, with an outcome we cannot read: do not guess
            raise HostFailedError(
                Result.FAILED, Stage.APPLY, f"{exc.message}; its outcome is unknown: look at the host"
            ) from exc
        if done.returncode == 0 and applied is not None and not applied.failed:
            counts = count_changes(r.action for r in applied.actions if r.outcome is Outcome.OK)
            return self.result(
                Result.DEPLOYED if any(counts.values()) else Result.UNCHANGED,
                counts=counts,
                apply=applied,
                generation=applied.history,
            )
        why = remote_failure(self.host, done, "apply")
        if applied is not None:
            failures = [
                f"{r.action.name} {r.outcome.value}: {r.error}"
                for r in applied.actions
                if r.outcome is not Outcome.OK
            ]
            why = "; ".join(failures) or applied.error or why
            if not applied.changed:
                raise HostFailedError(Result.FAILED, Stage.APPLY, f"apply failed, nothing changed: {why}")
        elif done.returncode != SSH_FAILED:
            # The apply refused before acting (procurator missing, a bundle missing, the lock busy, ...).
            raise HostFailedError(Result.FAILED, Stage.APPLY, f"{why}; nothing changed")
        return self._roll_back(applied, f"apply failed: {why}")

    def _current_generation(self) -> tuple[int, str] | None:
        """The host's current deployment generation and its deployment. After a failed apply that is
        the one it ran before: an apply records its deployment only when it succeeds."""
        done = self._remote(["history", "--json"], Stage.ROLLBACK, REMOTE_TIMEOUT)
        try:
            read = (
                typed_output(self.host, done, "history", History.from_json) if done.returncode == 0 else None
            )
        except ValidationError as exc:
            raise HostFailedError(
                Result.ROLLBACK_FAILED, Stage.ROLLBACK, f"cannot read the deployment history: {exc.message}"
            ) from exc
        if read is None:
            raise HostFailedError(
                Result.ROLLBACK_FAILED,
                Stage.ROLLBACK,
                "cannot read the deployment history to roll back: "
                + remote_failure(self.host, done, "history"),
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
                rolled_doc = typed_output(self.host, done, "rollback", ApplyResult.from_json)
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
                f"{remote_failure(self.host, done, 'rollback')}",
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
            error=f"{why}; taking down the VMs it created failed: {remote_failure(self.host, done, 'down')}",
            apply=applied,
        )


# -- the fleet at once -----------------------------------------------------------------------------------
