"""The worker's API client: every command that talks to a running worker does it through this module.

`WorkerClient` talks to the daemon (worker/api.py) with httpx over its UNIX socket
(`httpx.HTTPTransport(uds=...)`); connection failures become `WorkerUnavailableError`, error answers
`WorkerApiError` with the daemon's message. The VM commands (`vm_up`, `vm_stop`, ...: the `Commands`
of worker/commands.py) answer typed results, and their errors come back as the command's own: the
daemon's one line and the exit code the command has when it does the work itself. `listing` is the one
read that `procurator ps` makes of a running worker: one request on the socket, its answer read by
procurator/http1.py, so that a `ps` answered by the worker pays neither httpx's import nor
http.client's.
"""

from __future__ import annotations

import json
import os
import socket

from procurator import errors, http1
from procurator.errors import WaitTimeoutError, WorkerApiError, WorkerUnavailableError

# What `ps` imports of this module is the standard library's json, os and socket (see `listing`); the
# rest is imported where it is used. typing.TYPE_CHECKING without typing (mypy reads the name as True):
TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Sequence
    from pathlib import Path
    from typing import Any

    import httpx

    from procurator.lifecycle import WaitFor
    from procurator.models import Bundle
    from procurator.worker.commands import Restored, Snapshotted, Started, Stopped

CLIENT_TIMEOUT = 10.0
APPLY_TIMEOUT = 1800.0  # a reconcile boots VMs and waits for their health checks


class WorkerClient:
    """The worker's API over its UNIX socket. Use as a context manager."""

    def __init__(
        self,
        api_socket: Path,
        *,
        timeout: float = CLIENT_TIMEOUT,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        import ssl  # noqa: PLC0415 - as httpx, not for `ps`

        import httpx  # noqa: PLC0415 - only for the commands that talk to the worker, not `ps`

        self.api_socket = api_socket
        # Plain HTTP on a UNIX socket: an empty TLS context, not the default one that loads the CA
        # bundle (~20 ms of every command that asks a worker), as hypervisor/api.py does.
        unused_tls = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        self._client = httpx.Client(
            transport=transport or httpx.HTTPTransport(uds=str(api_socket), verify=unused_tls),
            base_url="http://procurator-worker",
            timeout=timeout,
        )

    def __enter__(self) -> WorkerClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._client.close()

    def status(self) -> dict[str, Any]:
        body: dict[str, Any] = self._request("GET", "/status").json()
        return body

    def plan(self, deployment: Path | None = None) -> Any:
        params = {"deployment": str(deployment)} if deployment is not None else None
        return self._request("GET", "/plan", params=params).json()

    def apply(self, deployment: Path, *, wait: WaitFor | None = None, timeout: float = APPLY_TIMEOUT) -> Any:
        body: dict[str, Any] = {"deployment": str(deployment)}
        if wait is not None:
            body["wait"] = wait.value
        return self._request("POST", "/apply", json=body, timeout=timeout).json()

    def rollback(
        self, to: int | None = None, *, wait: WaitFor | None = None, timeout: float = APPLY_TIMEOUT
    ) -> Any:
        body: dict[str, Any] = {"to": to}
        if wait is not None:
            body["wait"] = wait.value
        return self._request("POST", "/rollback", json=body, timeout=timeout).json()

    def pause(self, name: str) -> Any:
        return self._request("POST", "/pause", json={"vm": name}).json()

    def resume(self, name: str) -> Any:
        return self._request("POST", "/resume", json={"vm": name}).json()

    def history(self) -> Any:
        return self._request("GET", "/history").json()

    # --- the VM commands (worker/commands.py `Commands`) ---

    def vm_up(self, bundle: Bundle, *, backend: str | None, wait: WaitFor) -> Started:
        from procurator.worker import commands  # noqa: PLC0415 - lifecycle and most of Procurator: not for `ps`

        body: dict[str, Any] = {"bundle": str(bundle.path), "wait": wait.value}
        if backend is not None:
            body["backend"] = backend
        return commands.Started.from_json(*self._command("/up", body))

    def vm_stop(self, name: str) -> Stopped:
        from procurator.worker import commands  # noqa: PLC0415 - lifecycle and most of Procurator: not for `ps`

        return commands.Stopped.from_json(*self._command(_vm(name, "stop"), {}))

    def vm_start(self, name: str, *, wait: WaitFor) -> Started:
        from procurator.worker import commands  # noqa: PLC0415 - lifecycle and most of Procurator: not for `ps`

        return commands.Started.from_json(*self._command(_vm(name, "start"), {"wait": wait.value}))

    def vm_down(self, name: str, *, purge: bool) -> Stopped:
        from procurator.worker import commands  # noqa: PLC0415 - lifecycle and most of Procurator: not for `ps`

        return commands.Stopped.from_json(*self._command(_vm(name, "down"), {"purge": purge}))

    def vm_pause(self, name: str, *, pause: bool) -> Started:
        from procurator.worker import commands  # noqa: PLC0415 - lifecycle and most of Procurator: not for `ps`

        return commands.Started.from_json(*self._command(_vm(name, "pause" if pause else "resume"), {}))

    def vm_snapshot(self, name: str, *, keep: int | None, stay_paused: bool) -> Snapshotted:
        from procurator.worker import commands  # noqa: PLC0415 - lifecycle and most of Procurator: not for `ps`

        body: dict[str, Any] = {"stay_paused": stay_paused}
        if keep is not None:
            body["keep"] = keep
        return commands.Snapshotted.from_json(*self._command(_vm(name, "snapshot"), body))

    def vm_restore(self, name: str, *, ident: str | None, paused: bool, wait: WaitFor) -> Restored:
        from procurator.worker import commands  # noqa: PLC0415 - lifecycle and most of Procurator: not for `ps`

        body: dict[str, Any] = {"paused": paused, "wait": wait.value}
        if ident is not None:
            body["id"] = commands.check_snapshot_id(ident)
        return commands.Restored.from_json(*self._command(_vm(name, "restore"), body))

    def vm_rows(self, names: Sequence[str]) -> list[dict[str, Any]]:
        from procurator.worker import commands  # noqa: PLC0415 - lifecycle and most of Procurator: not for `ps`

        listed = self._request("GET", "/vms").json()
        rows = listed.get("vms") if isinstance(listed, dict) else None
        if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
            raise errors.ValidationError(
                f"GET /vms on {self.api_socket}", "vms", "expected a list of objects"
            )
        return commands.rows_of(rows, names)

    def _command(self, path: str, body: dict[str, Any]) -> tuple[Any, str]:
        """POST one VM command; (the answer's JSON, where it came from). An error answer is raised as
        the command's own error (`CommandError`)."""
        try:
            response = self._request("POST", path, json=body, timeout=COMMAND_TIMEOUT)
        except WorkerApiError as exc:
            raise CommandError(exc) from exc
        try:
            return response.json(), f"POST {path} on {self.api_socket}"
        except ValueError as exc:
            raise WorkerApiError(f"POST {path}", response.status_code, "the answer is not JSON") from exc

    def metrics(self) -> str:
        return self._request("GET", "/metrics").text

    def _request(
        self, method: str, path: str, *, timeout: float | None = None, **kwargs: Any
    ) -> httpx.Response:
        import httpx  # noqa: PLC0415 - imported once already by __init__

        extra: dict[str, Any] = {} if timeout is None else {"timeout": timeout}
        try:
            response = self._client.request(method, path, **kwargs, **extra)
        except httpx.TimeoutException as exc:
            raise WaitTimeoutError(
                f"the worker to answer {method} {path}", _seconds(self._client, timeout)
            ) from exc
        except httpx.RemoteProtocolError as exc:  # it took the request, then went away (stopped, killed)
            raise WorkerUnavailableError(
                f"the worker on {self.api_socket} went away during {method} {path} ({exc}); "
                "run the command again (without a worker it does the work itself)"
            ) from exc
        except httpx.TransportError as exc:
            raise WorkerUnavailableError(
                f"no worker answers on {self.api_socket} ({exc}); start it with `procurator worker`"
            ) from exc
        if response.is_success:
            return response
        try:
            body = response.json()
        except ValueError:
            body = {}
        message = body.get("error") if isinstance(body, dict) else None
        raise WorkerApiError(
            f"{method} {path}",
            response.status_code,
            str(message or response.text.strip() or response.reason_phrase),
            kind=str(body.get("type", "")) if isinstance(body, dict) else "",
        )


COMMAND_TIMEOUT = APPLY_TIMEOUT  # a stop waits for the guest's shutdown, a start maybe for its health checks


def _vm(name: str, verb: str) -> str:
    from urllib.parse import quote  # noqa: PLC0415 - see the imports

    from procurator.worker import commands  # noqa: PLC0415 - lifecycle and most of Procurator: not for `ps`

    return f"/vm/{quote(commands.check_name(name), safe='')}/{verb}"


class CommandError(WorkerApiError):
    """A VM command the worker refused or that failed in it, reported as the command reports it when it
    does the work itself: the daemon's message alone, and that error class's exit code (the API's `type`)."""

    def __init__(self, exc: WorkerApiError) -> None:
        message = exc.message.removeprefix(f"worker: {exc.request}: ")
        super().__init__(exc.request, exc.status, message, kind=exc.kind)
        self.message = message
        kind = getattr(errors, exc.kind, None)
        if isinstance(kind, type) and issubclass(kind, errors.ProcuratorError):
            self.exit_code = kind.exit_code


def _seconds(client: httpx.Client, timeout: float | None) -> float:
    if timeout is not None:
        return timeout
    return float(client.timeout.read or 0.0)


def connect(api_socket: Path, *, timeout: float = CLIENT_TIMEOUT) -> WorkerClient | None:
    """A client if a worker answers on `api_socket`, else None (no daemon: callers work without it)."""
    from procurator import sockets  # noqa: PLC0415 - see the imports

    if not sockets.answers(api_socket):
        return None
    return WorkerClient(api_socket, timeout=timeout)


LISTING_TIMEOUT = 2.0  # a worker that does not answer this fast: `ps` reads the state itself


def listing(
    api_socket: str | os.PathLike[str],
    state_dir: str | os.PathLike[str],
    *,
    config_digest: str | None = None,
    timeout: float = LISTING_TIMEOUT,
) -> list[dict[str, Any]] | None:
    """The VMs as a running worker of `state_dir` lists them (`GET /vms`: the rows `ps --json` prints), or
    None when no worker answers there, or one of another state directory, or (`config_digest` given) one
    that did not load a configuration of exactly those bytes (`WorkerConfig.digest`): then the caller
    reads the state itself."""
    if not os.path.exists(api_socket):
        return None
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(timeout)
            sock.connect(os.fspath(api_socket))
            sock.sendall(b"GET /vms HTTP/1.1\r\nHost: procurator-worker\r\nConnection: close\r\n\r\n")
            status, body = http1.read_answer(sock)
    except (OSError, http1.ProtocolError):
        return None
    if status != 200:
        return None
    try:
        listed = json.loads(body)
        same = listed["schema"] == 1 and os.path.realpath(listed["state_dir"]) == os.path.realpath(state_dir)
        if config_digest is not None:
            same = same and listed.get("config") == config_digest
        rows = listed["vms"]
    except (ValueError, KeyError, TypeError, AttributeError, OSError):
        return None
    if not same or not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
        return None
    return rows
