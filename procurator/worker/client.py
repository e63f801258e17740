"""The worker's API client: every command that talks to a running worker does it through this module.

`WorkerClient` talks to the daemon (worker/api.py) with httpx over its UNIX socket
(`httpx.HTTPTransport(uds=...)`); connection failures become `WorkerUnavailableError`, error answers
`WorkerApiError` with the daemon's message.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx

from procurator import sockets
from procurator.errors import WaitTimeoutError, WorkerApiError, WorkerUnavailableError
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
