"""The one exception tree of Procurator.

Every failure the core reports is a `ProcuratorError`. The CLI's `main()` is the only place that turns one
into `error: <message>` on stderr and an exit code. Foreign exceptions (OSError, httpx, pyroute2, JSON)
are translated at the boundary where they happen, with `raise ... from exc`, so the chain is kept.

A message is one line: what is wrong, naming the thing (file, field, VM, interface), and what to do.
"""

from __future__ import annotations

EXIT_FAILURE = 1
EXIT_USAGE = 2


class ProcuratorError(Exception):
    """Base of every error Procurator reports. `exit_code` is what the CLI exits with."""

    exit_code: int = EXIT_FAILURE

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return self.message


class UsageError(ProcuratorError):
    """The command line or a reference given on it is wrong (exit 2)."""

    exit_code = EXIT_USAGE


class ConfigError(ProcuratorError):
    """The worker configuration file is missing, malformed or invalid."""


class ValidationError(ProcuratorError):
    """A bundle, deployment or state file does not match its contract.

    `source` names the file, `field` the dotted path of the offending field (empty for the whole file).
    """

    def __init__(self, source: str, field: str, problem: str) -> None:
        where = f"{source}: {field}" if field else source
        super().__init__(f"{where}: {problem}")
        self.source = source
        self.field = field
        self.problem = problem


class NixError(ProcuratorError):
    """A nix command failed; the message quotes nix's own last error line."""


class ProcessError(ProcuratorError):
    """A subprocess could not be started or exited non-zero."""

    def __init__(
        self, message: str, *, argv: tuple[str, ...] = (), returncode: int | None = None, stderr: str = ""
    ) -> None:
        super().__init__(message)
        self.argv = argv
        self.returncode = returncode
        self.stderr = stderr


class StateError(ProcuratorError):
    """The state directory cannot be read or written."""


class DamagedStateError(StateError):
    """A state file is there but cannot be parsed: the message names it, what is wrong and the fix."""

    def __init__(self, path: object, problem: str, fix: str) -> None:
        super().__init__(f"{path}: damaged state file: {problem}; {fix}")
        self.path = path
        self.problem = problem
        self.fix = fix


class LockBusyError(StateError):
    """Another mutating command holds the state lock."""


class NotFoundError(ProcuratorError):
    """A VM (or other named object) the command refers to does not exist."""


class ConflictError(ProcuratorError):
    """The request conflicts with what exists: a name already running, an occupied interface name."""


class NetworkError(ProcuratorError):
    """Host networking (bridge, TAP, addresses, NAT) could not be set up or torn down."""


class LeaseExhaustedError(NetworkError):
    """No free address is left in the subnet."""


class HypervisorError(ProcuratorError):
    """A hypervisor process or its API failed."""


class HypervisorStartError(HypervisorError):
    """The hypervisor process could not be started or died while starting."""


class HypervisorApiError(HypervisorError):
    """The hypervisor's API answered an error. `status` is the HTTP status, `details` its error strings."""

    def __init__(self, endpoint: str, status: int, details: tuple[str, ...]) -> None:
        text = "; ".join(details) if details else "no details"
        super().__init__(f"{endpoint}: HTTP {status}: {text}")
        self.endpoint = endpoint
        self.status = status
        self.details = details


class InvalidStateError(HypervisorApiError):
    """The hypervisor refused an action because the VM is in the wrong state (cloud-hypervisor's 500)."""


class CgroupError(ProcuratorError):
    """A VM's cgroup could not be made, joined, limited, read or removed (the message names the file)."""


class WaitTimeoutError(ProcuratorError):
    """A bounded wait ran out. The message says what was waited for and for how long."""

    def __init__(self, what: str, seconds: float, last: str = "") -> None:
        tail = f" (last: {last})" if last else ""
        super().__init__(f"timed out after {seconds:.1f}s waiting for {what}{tail}")
        self.what = what
        self.seconds = seconds


class WorkerError(ProcuratorError):
    """The worker daemon could not be reached, or it refused a request."""


class WorkerUnavailableError(WorkerError):
    """No worker daemon answers on its API socket."""


class WorkerApiError(WorkerError):
    """The worker answered a request with an error. `status` is the HTTP status, `kind` its error class."""

    def __init__(self, request: str, status: int, message: str, *, kind: str = "") -> None:
        super().__init__(f"worker: {request}: {message}")
        self.request = request
        self.status = status
        self.kind = kind


class ApplyError(ProcuratorError):
    """An apply (or rollback) ran and at least one of its actions failed or was rolled back."""


class DeployError(ProcuratorError):
    """`procurator deploy` ran and at least one host did not end up running its deployment."""


class DeployInterruptedError(DeployError):
    """`procurator deploy` was interrupted (Ctrl-C): hosts not started were skipped (exit 130)."""

    exit_code = 130
