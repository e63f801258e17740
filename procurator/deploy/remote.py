"""Talking to one host: procurator there over ssh (through `procurator.process`), its exit status and
its `--json` output read by the typed readers (`ApplyResult`, `PlanReport`, `History`), and the
pre-flight check."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from procurator import process
from procurator.deploy.fleet import CONNECT_TIMEOUT, HostSpec
from procurator.deploy.model import COUNTED, Result, Stage
from procurator.errors import ProcuratorError
from procurator.reconcile import Action

PREFLIGHT_TIMEOUT = 60.0  # seconds for one pre-flight command, connection included
APPLY_TIMEOUT = 3600.0  # seconds for one remote apply or rollback (the apply bounds its own waits)
REMOTE_TIMEOUT = 300.0  # seconds for a remote plan or down
SSH_FAILED = 255  # ssh's exit status when it, not the remote command, failed
NOT_FOUND = 127  # the remote shell's exit status for a command it cannot find

T = TypeVar("T")


# -- talking to a host -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Remote:
    """Runs commands on one host over ssh: `procurator.process.run(..., remote=...)` makes the ssh
    command line and quotes every argument."""

    host: HostSpec
    connect_timeout: int = CONNECT_TIMEOUT
    control_dir: Path | None = None

    def ssh(self, *, own_session: bool = False) -> process.SshRemote:
        """The host as `process.run` reaches it (see `process.SshRemote` for `own_session`)."""
        options = self.host.ssh_options_for(self.connect_timeout, self.control_dir)
        return process.SshRemote(self.host.target, tuple(options), own_session=own_session)

    def command(self, argv: Sequence[str], *, timeout: float, own_session: bool = False) -> process.Completed:
        """`argv` on the host, its exit status and output (never raises for a non-zero exit)."""
        return process.run(argv, check=False, timeout=timeout, remote=self.ssh(own_session=own_session))

    def run(self, args: Sequence[str], *, timeout: float, own_session: bool = False) -> process.Completed:
        """`<procurator> ARGS` on the host (the host's `procurator` command, then ARGS)."""
        return self.command([*self.host.command, *args], timeout=timeout, own_session=own_session)

    def close_shared(self, timeout: float) -> None:
        """`ssh -O exit`: close the connection shared with this host (ControlMaster), if open."""
        process.run(self.ssh().control_argv("exit"), check=False, timeout=timeout)


class HostFailedError(ProcuratorError):
    def __init__(self, result: Result, stage: Stage, message: str) -> None:
        super().__init__(message)
        self.result = result
        self.stage = stage


def _last(text: str) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else ""


def error_line(done: process.Completed) -> str:
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


def remote_failure(host: HostSpec, done: process.Completed, what: str) -> str:
    if done.returncode == SSH_FAILED:
        said = _last(done.stderr) or "failed"
        return said if said.startswith("ssh:") else f"ssh {host.target}: {said}"
    if done.returncode == NOT_FOUND:
        return (
            f"`{host.procurator}` not found on {host.target} ({_last(done.stderr)}); install procurator "
            "there or set the host's `procurator` command"
        )
    return f"{what} on {host.target} failed: {error_line(done)}"


def count_changes(actions: Iterable[Action]) -> dict[str, int]:
    counts = dict.fromkeys(COUNTED, 0)
    for action in actions:
        if action.kind.value in counts:
            counts[action.kind.value] += 1
    return counts


def typed_output(
    host: HostSpec, done: process.Completed, what: str, read: Callable[[Any, str], T]
) -> T | None:
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
    Raises `HostFailedError`."""
    try:
        done = Remote(host, connect_timeout, control_dir).command(["true"], timeout=PREFLIGHT_TIMEOUT)
    except ProcuratorError as exc:
        raise HostFailedError(Result.UNREACHABLE, Stage.PREFLIGHT, f"ssh {host.target}: {exc}") from exc
    if done.returncode == SSH_FAILED:
        raise HostFailedError(Result.UNREACHABLE, Stage.PREFLIGHT, remote_failure(host, done, "ssh"))
    if done.returncode != 0:
        raise HostFailedError(
            Result.FAILED, Stage.PREFLIGHT, f"`true` over ssh failed on {host.target}: {error_line(done)}"
        )
