"""The worker's API client: every command that talks to a running worker does it through this module.

`WorkerClient` talks to the daemon (worker/api.py) with httpx over its UNIX socket
(`httpx.HTTPTransport(uds=...)`); connection failures become `WorkerUnavailableError`, error answers
`WorkerApiError` with the daemon's message. `listing` is the one read that `procurator ps` makes of a
running worker: the standard library's http.client on the socket, so that a `ps` answered by the worker
does not pay httpx's import.
"""

from __future__ import annotations

import http.client
import json
import socket
from pathlib import Path
from typing import TYPE_CHECKING, Any

from procurator import sockets
from procurator.errors import WaitTimeoutError, WorkerApiError, WorkerUnavailableError

if TYPE_CHECKING:
    import httpx

    from procurator.lifecycle import WaitFor

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
        import httpx  # noqa: PLC0415 - only for the commands that talk to the worker, not `ps`

        self.api_socket = api_socket
        self._client = httpx.Client(
            transport=transport or httpx.HTTPTransport(uds=str(api_socket)),
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


def _seconds(client: httpx.Client, timeout: float | None) -> float:
    if timeout is not None:
        return timeout
    return float(client.timeout.read or 0.0)


def connect(api_socket: Path, *, timeout: float = CLIENT_TIMEOUT) -> WorkerClient | None:
    """A client if a worker answers on `api_socket`, else None (no daemon: callers work without it)."""
    if not sockets.answers(api_socket):
        return None
    return WorkerClient(api_socket, timeout=timeout)


LISTING_TIMEOUT = 2.0  # a worker that does not answer this fast: `ps` reads the state itself


class _Unix(http.client.HTTPConnection):
    def __init__(self, path: Path, timeout: float) -> None:
        super().__init__("procurator-worker", timeout=timeout)
        self._path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(str(self._path))
        except OSError:
            sock.close()
            raise
        self.sock = sock


def listing(
    api_socket: Path, state_dir: Path, *, timeout: float = LISTING_TIMEOUT
) -> list[dict[str, Any]] | None:
    """The VMs as a running worker of `state_dir` lists them (`GET /vms`: the rows `ps --json` prints), or
    None when no worker answers there, or one of another state directory: then the caller reads the
    state itself."""
    if not api_socket.exists():
        return None
    conn = _Unix(api_socket, timeout)
    try:
        conn.request("GET", "/vms")
        answer = conn.getresponse()
        body = answer.read()
    except (OSError, http.client.HTTPException):
        return None
    finally:
        conn.close()
    if answer.status != 200:
        return None
    try:
        listed = json.loads(body)
        same = listed["schema"] == 1 and Path(listed["state_dir"]).resolve() == state_dir.resolve()
        rows = listed["vms"]
    except (ValueError, KeyError, TypeError, OSError):
        return None
    if not same or not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
        return None
    return rows
