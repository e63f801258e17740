"""The one place Procurator speaks HTTP: cloud-hypervisor's REST API (/api/v1) over its UNIX socket.

`ApiClient` wraps an httpx transport bound to one socket. It sends bodyless PUTs without a body and
without a content type, JSON bodies as `application/json`, and translates every answer:

- 2xx: the decoded JSON body, or None when the body is empty (204, and vmm.shutdown's empty 200);
- an error answer (cloud-hypervisor sends a JSON array of error strings, outermost first):
  `InvalidStateError` when the strings say the VM is in the wrong state for the request (the real
  server answers those with 500, or 404 for "not created", never with the 405 its spec documents),
  `HypervisorApiError` otherwise;
- a transport failure (no socket, refused, reset, timeout): `HypervisorError`, chained `from` httpx's.
"""

from __future__ import annotations

import functools
import json
import logging
import socket
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any

from procurator import http1
from procurator.errors import HypervisorApiError, HypervisorError, InvalidStateError

if TYPE_CHECKING:
    import ssl

    import httpx

log = logging.getLogger(__name__)

BASE_URL = "http://localhost/api/v1/"

# httpx (and ssl) are imported by the first ApiClient: a worker that only pings and scrapes its VMs
# (`get_once`, through http1.py) never pays for them, some 5 MB of its memory and 20 ms of its start.


@functools.cache
def _unused_tls() -> ssl.SSLContext:
    """httpx builds an SSL context for every transport, and the default one loads the CA bundle (tens of
    milliseconds). This API is plain HTTP over a UNIX socket, so hand it one empty context, made once."""
    import ssl  # noqa: PLC0415 - see above

    return ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)


# Substrings of cloud-hypervisor's error strings that mean "the VM is not in a state where this request
# makes sense", as opposed to a failure of the request itself. Each is the `#[error]` text of a variant, the
# same from v40 to v53 unless noted: vm.rs `Error::{VmConfigMissing, VmNotCreated, VmAlreadyCreated,
# VmNotRunning, InvalidStateTransition}` ("invalid VM state transition: {from:?} to {to:?}"),
# `Error::VmMigrating` (v53: "VM is currently migrating and can't be modified"), api/mod.rs
# `ApiError::{VmNotBooted, VmNotCreated}` ("The VM is not booted", "The VM is not created").
# micro_http (the API server's HTTP crate) refuses a body longer than this with a 400 and drops the
# connection (`MAX_PAYLOAD_SIZE`); a request that big is refused here, before it is sent, with its size.
MAX_BODY_BYTES = 51200

_STATE_MARKERS = (
    "VM is not running",
    "VM is not created",
    "VM is already created",
    "VM config is missing",
    "The VM is not booted",
    "VM is currently migrating",
    "invalid VM state transition",
)


def is_state_error(status: int, details: tuple[str, ...]) -> bool:
    """Whether an error answer means "wrong state" rather than "this request failed"."""
    return status in (404, 500) and any(marker in d for d in details for marker in _STATE_MARKERS)


def error_details(content: bytes) -> tuple[str, ...]:
    """The error strings of an error answer: a JSON array of strings, else the raw text."""
    text = content.decode("utf-8", errors="replace").strip()
    if not text:
        return ()
    try:
        parsed = json.loads(text, strict=False)  # micro_http puts raw newlines in its strings
    except json.JSONDecodeError:
        return (text,)
    if isinstance(parsed, list):
        return tuple(str(item) for item in parsed)
    if isinstance(parsed, dict) and "error" in parsed:  # micro_http's own parse errors
        return (str(parsed["error"]),)
    return (text,)


def _url(endpoint: str) -> httpx.URL:
    import httpx  # noqa: PLC0415 - see _unused_tls

    url = _URLS.get(endpoint)
    if url is None:
        url = _URLS[endpoint] = httpx.URL(BASE_URL + endpoint)
    return url


_URLS: dict[str, httpx.URL] = {}


class ApiClient:
    """A small httpx client for one cloud-hypervisor API socket. Use as a context manager.

    Requests go straight to an `httpx.HTTPTransport` over the UNIX socket (a pool of at most two
    connections, one kept alive): `httpx.Client`'s layers (base URL merging, cookies, redirects, auth,
    proxies from the environment) have no use on a local socket and cost more than the request itself.
    """

    def __init__(
        self,
        socket_path: Path,
        *,
        timeout: float = 10.0,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        import httpx  # noqa: PLC0415 - see _unused_tls

        self.socket_path = socket_path
        self.timeout = timeout
        self._transport = transport or httpx.HTTPTransport(
            uds=str(socket_path),
            verify=_unused_tls(),
            limits=httpx.Limits(max_connections=2, max_keepalive_connections=1),
            retries=0,
        )

    def __enter__(self) -> ApiClient:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        self._transport.close()

    def get(self, endpoint: str, *, timeout: float | None = None) -> Any:
        """GET /api/v1/<endpoint>; the decoded JSON answer."""
        return self._request("GET", endpoint, None, timeout)

    def put(
        self, endpoint: str, body: Mapping[str, Any] | None = None, *, timeout: float | None = None
    ) -> Any:
        """PUT /api/v1/<endpoint>, with `body` as JSON or with no body at all (no content type either)."""
        return self._request("PUT", endpoint, body, timeout)

    def put_with_fds(
        self, endpoint: str, body: Mapping[str, Any], fds: Sequence[int], *, timeout: float | None = None
    ) -> Any:
        """PUT /api/v1/<endpoint> with `body`, the descriptors `fds` sent beside the request (SCM_RIGHTS).

        micro_http collects the descriptors that arrive with a connection's bytes and hands them to the
        request they complete (its connection.rs `recv_with_fds`); cloud-hypervisor's vm.add-net and
        vm.restore take them (vmm/src/api/http/http_endpoint.rs). The request goes in one sendmsg with
        the descriptors, on a connection of its own, closed after the answer."""
        limit = self.timeout if timeout is None else timeout
        content = _body(endpoint, body)
        head = (
            f"PUT /api/v1/{endpoint} HTTP/1.1\r\nHost: localhost\r\nAccept: application/json\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(content)}\r\n\r\n"
        )
        log.debug("cloud-hypervisor api: PUT %s with %d fds (%s)", endpoint, len(fds), self.socket_path)
        return _exchange(self.socket_path, endpoint, head.encode() + content, fds, limit)

    def _request(
        self, method: str, endpoint: str, body: Mapping[str, Any] | None, timeout: float | None
    ) -> Any:
        import httpx  # noqa: PLC0415 - imported by __init__ already

        limit = self.timeout if timeout is None else timeout
        content: bytes | None = None
        headers: dict[str, str] | None = None
        if body is not None:
            content = _body(endpoint, body)
            headers = {"Content-Type": "application/json"}
        request = httpx.Request(
            method,
            _url(endpoint),
            content=content,
            headers=headers,
            extensions={
                "timeout": {"connect": min(limit, 2.0), "read": limit, "write": limit, "pool": limit}
            },
        )
        log.debug("cloud-hypervisor api: %s %s (%s)", method, endpoint, self.socket_path)
        try:
            response = self._transport.handle_request(request)
            try:
                response.read()
            finally:
                response.close()
        except httpx.TimeoutException as exc:
            raise HypervisorError(
                f"{endpoint}: cloud-hypervisor did not answer within {limit:.1f}s on {self.socket_path}"
            ) from exc
        except httpx.TransportError as exc:
            reason = str(exc) or type(exc).__name__
            raise HypervisorError(
                f"{endpoint}: cannot talk to cloud-hypervisor on {self.socket_path}: {reason}"
            ) from exc
        return _answer(endpoint, response.status_code, response.content)


def get_once(socket_path: Path, endpoint: str, *, timeout: float) -> Any:
    """GET /api/v1/<endpoint> on a connection of its own, closed after the answer; the decoded JSON answer,
    translated as `ApiClient` does. For the calls a worker makes to every VM in turn (adoption's and the
    watchdog's vmm.ping, vm.info, the scrape's vm.counters): one request per socket, where an httpx
    transport made for each costs twice the CPU of the request (bench_worker.py, 1 000 VMs)."""
    request = f"GET /api/v1/{endpoint} HTTP/1.1\r\nHost: localhost\r\nAccept: application/json\r\n\r\n"
    log.debug("cloud-hypervisor api: GET %s once (%s)", endpoint, socket_path)
    return _exchange(socket_path, endpoint, request.encode(), (), timeout)


def _exchange(socket_path: Path, endpoint: str, request: bytes, fds: Sequence[int], limit: float) -> Any:
    """Send `request` (with `fds` beside its first bytes, SCM_RIGHTS) on a new connection to
    `socket_path`, read the answer (procurator/http1.py), and translate it."""
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(limit)
            sock.connect(str(socket_path))
            sent = socket.send_fds(sock, [request], list(fds)) if fds else 0
            sock.sendall(request[sent:])
            status, answer = http1.read_answer(sock)
    except TimeoutError as exc:
        raise HypervisorError(
            f"{endpoint}: cloud-hypervisor did not answer within {limit:.1f}s on {socket_path}"
        ) from exc
    except (OSError, http1.ProtocolError) as exc:
        raise HypervisorError(f"{endpoint}: cannot talk to cloud-hypervisor on {socket_path}: {exc}") from exc
    return _answer(endpoint, status, answer)


def _body(endpoint: str, body: Mapping[str, Any]) -> bytes:
    content = json.dumps(body, separators=(",", ":")).encode()
    if len(content) > MAX_BODY_BYTES:
        raise HypervisorError(
            f"{endpoint}: the request body is {len(content)} bytes, more than the {MAX_BODY_BYTES} "
            "cloud-hypervisor's API accepts; shorten the VM's configuration (kernel command line, "
            "number of disks or interfaces)"
        )
    return content


def _answer(endpoint: str, status: int, content: bytes) -> Any:
    if status >= 400:
        details = error_details(content)
        if is_state_error(status, details):
            raise InvalidStateError(endpoint, status, details)
        raise HypervisorApiError(endpoint, status, details)
    if status < 200 or status >= 300:
        raise HypervisorApiError(endpoint, status, (f"unexpected status {status}",))
    if not content.strip():
        return None
    try:
        return json.loads(content)
    except ValueError as exc:
        raise HypervisorError(f"{endpoint}: cloud-hypervisor answered invalid JSON: {exc}") from exc
