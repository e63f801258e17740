"""The worker daemon's HTTP API on a UNIX socket (its client is worker/client.py).

The server is the standard library's `ThreadingHTTPServer` bound to an AF_UNIX socket (mode 0600; a
stale socket file is replaced, a live one means another worker runs and is refused); an optional TCP
listener serves `/metrics` only. Requests are parsed by `http.server`; this module only routes them.

    GET  /status                    {"worker": {...}, "vms": [VmStatus.to_json()...], "supervision": {...}}
    GET  /plan[?deployment=PATH]    the plan to PATH (default: the desired deployment)
    POST /apply                     {"deployment": PATH, "wait"?: "none"|"booted"|"healthy"} -> the report
    GET  /history                   the deployment profile's generations
    POST /pause, /resume            {"vm": NAME} -> the VM as `ps --json` shows it (paused or running)
    GET  /metrics                   Prometheus text exposition

Errors answer `{"error": message, "type": error class}` with 400 (bad request, invalid input), 404
(unknown path or object), 405 (wrong method), 409 (conflict, state lock busy), 503 (busy or stopping) or
500 (anything else).

The server knows the daemon only as the `Service` protocol below, so the API does not depend on the
daemon's module (no import cycle).
"""

from __future__ import annotations

import ipaddress
import json
import logging
import os
import socket
import socketserver
import threading
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, ClassVar, Protocol
from urllib.parse import parse_qs, urlsplit

from procurator import metrics, sockets
from procurator.errors import (
    ConfigError,
    ConflictError,
    LockBusyError,
    NotFoundError,
    ProcuratorError,
    UsageError,
    ValidationError,
    WaitTimeoutError,
)
from procurator.lifecycle import WaitFor

log = logging.getLogger(__name__)

MAX_BODY = 1 << 20
SERVE_POLL = 0.2  # how often serve_forever looks for a shutdown request

_STATUS = {
    UsageError: 400,
    ValidationError: 400,
    NotFoundError: 404,
    ConflictError: 409,
    LockBusyError: 409,
    WaitTimeoutError: 503,
}


def _status_of(exc: ProcuratorError) -> int:
    for kind in type(exc).__mro__:
        if kind in _STATUS:
            return _STATUS[kind]
    return 500


MAX_PATH = 4096  # PATH_MAX


def _path_arg(value: str) -> Path:
    """A deployment path from a request: absolute, without NUL, at most PATH_MAX bytes (else 400)."""
    if not value.startswith("/") or "\0" in value or len(value.encode()) > MAX_PATH:
        shown = value if len(value) <= 80 else f"{value[:77]}..."
        raise UsageError(f"deployment: {shown!r} is not an absolute path of at most {MAX_PATH} bytes")
    return Path(value)


class Service(Protocol):
    """What the API serves, as the daemon (worker/daemon.py `Worker`) provides it."""

    @property
    def stopping(self) -> bool: ...

    def status_json(self) -> dict[str, Any]: ...

    def plan(self, deployment_path: Path | None) -> Any: ...

    def apply(self, deployment_path: Path, *, wait: WaitFor | None = None) -> Any: ...

    def pause(self, name: str, *, pause: bool) -> dict[str, Any]: ...

    def history(self) -> Any: ...

    def metrics_text(self) -> str: ...


# --- the server --------------------------------------------------------------------------------------


class _Handler(BaseHTTPRequestHandler):
    server: _UnixServer | _TcpServer
    protocol_version = "HTTP/1.1"
    server_version = "procurator-worker"
    timeout = 60.0  # a client that stops sending (or reading) mid-request is dropped after this
    query: dict[str, list[str]]
    sys_version = ""

    # Routes: path -> {method: handler name}
    ROUTES: ClassVar[dict[str, dict[str, str]]] = {
        "/status": {"GET": "get_status"},
        "/plan": {"GET": "get_plan"},
        "/apply": {"POST": "post_apply"},
        "/history": {"GET": "get_history"},
        "/pause": {"POST": "post_pause"},
        "/resume": {"POST": "post_resume"},
        "/metrics": {"GET": "get_metrics"},
    }
    METRICS_ONLY = frozenset({"/metrics"})

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("api: " + format, *args)

    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_POST(self) -> None:
        self._dispatch("POST")

    def do_PUT(self) -> None:
        self._dispatch("PUT")

    def do_DELETE(self) -> None:
        self._dispatch("DELETE")

    def _dispatch(self, method: str) -> None:
        url = urlsplit(self.path)
        routes = self.ROUTES.get(url.path)
        if routes is None or (self.server.metrics_only and url.path not in self.METRICS_ONLY):
            self._error(404, "NotFound", f"no such endpoint {url.path!r}; see GET /status")
            return
        name = routes.get(method)
        if name is None:
            self._error(405, "MethodNotAllowed", f"{method} {url.path}: use {', '.join(routes)}",
                        allow=", ".join(routes))  # fmt: skip
            return
        worker = self.server.worker
        if worker.stopping:
            self._error(503, "Stopping", "the worker is stopping")
            return
        self.query = parse_qs(url.query)
        try:
            getattr(self, name)(worker)
        except ProcuratorError as exc:
            self._error(_status_of(exc), type(exc).__name__, str(exc))
        except Exception as exc:  # an answer, not a dropped connection, and the daemon carries on
            log.exception("api: %s %s failed", method, url.path)
            self._error(500, "InternalError", f"internal error ({type(exc).__name__}); see the worker's log")

    # --- endpoints ---

    def get_status(self, worker: Service) -> None:
        self._json(200, worker.status_json())

    def get_plan(self, worker: Service) -> None:
        values = self.query.get("deployment", [])
        self._json(200, worker.plan(_path_arg(values[-1]) if values else None))

    def post_apply(self, worker: Service) -> None:
        body = self._body()
        if not isinstance(body, dict) or not isinstance(body.get("deployment"), str):
            raise UsageError('POST /apply expects {"deployment": "<store path>"}')
        wait = body.get("wait")
        if wait is not None and wait not in {w.value for w in WaitFor}:
            raise UsageError(f"wait: {wait!r} is not one of {', '.join(w.value for w in WaitFor)}")
        report = worker.apply(_path_arg(body["deployment"]), wait=WaitFor(wait) if wait else None)
        self._json(200, report.to_json())

    def post_pause(self, worker: Service) -> None:
        self._json(200, worker.pause(self._vm_name(), pause=True))

    def post_resume(self, worker: Service) -> None:
        self._json(200, worker.pause(self._vm_name(), pause=False))

    def _vm_name(self) -> str:
        body = self._body()
        if not isinstance(body, dict) or not isinstance(body.get("vm"), str) or not body["vm"]:
            raise UsageError('POST /pause and /resume expect {"vm": "<name>"}')
        name: str = body["vm"]
        return name

    def get_history(self, worker: Service) -> None:
        self._json(200, worker.history())

    def get_metrics(self, worker: Service) -> None:
        self._send(200, worker.metrics_text().encode(), metrics.CONTENT_TYPE)

    # --- plumbing ---

    def _body(self) -> Any:
        length = self.headers.get("Content-Length")
        if length is None or not length.isdigit():
            raise UsageError("a JSON body with Content-Length is required")
        size = int(length)
        if size > MAX_BODY:
            raise UsageError(f"the body is larger than {MAX_BODY} bytes")
        raw = self.rfile.read(size)
        try:
            return json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise UsageError(f"the body is not JSON: {exc}") from exc

    def _json(self, status: int, body: Any) -> None:
        self._send(status, (json.dumps(body, sort_keys=True) + "\n").encode(), "application/json")

    def _error(self, status: int, kind: str, message: str, *, allow: str | None = None) -> None:
        self._send(status, (json.dumps({"error": message, "type": kind}) + "\n").encode(), "application/json",
                   allow=allow)  # fmt: skip

    def _send(self, status: int, data: bytes, content_type: str, *, allow: str | None = None) -> None:
        self.send_response(status, HTTPStatus(status).phrase)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        if allow is not None:
            self.send_header("Allow", allow)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)


class _UnixServer(ThreadingHTTPServer):
    address_family = socket.AF_UNIX
    daemon_threads = True
    block_on_close = False

    def __init__(self, path: Path, worker: Service, *, metrics_only: bool = False) -> None:
        self.worker = worker
        self.metrics_only = metrics_only
        super().__init__(str(path), _Handler)  # type: ignore[arg-type]  # AF_UNIX takes a path

    def server_bind(self) -> None:
        # HTTPServer.server_bind would look the "host" up in DNS: a UNIX socket has no host or port.
        socketserver.TCPServer.server_bind(self)
        os.chmod(str(self.server_address), 0o600)  # before listen(): nobody connects before this
        self.server_name, self.server_port = "localhost", 0

    def get_request(self) -> tuple[socket.socket, Any]:
        conn, _ = self.socket.accept()
        return conn, ("uds", 0)  # http.server logs client_address[0]


class _TcpServer(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False

    def __init__(self, address: tuple[str, int], family: socket.AddressFamily, worker: Service) -> None:
        self.address_family = family
        self.worker = worker
        self.metrics_only = True
        super().__init__(address, _Handler)


class Server:
    """One listening server on its own thread; `close()` stops it and removes its socket file."""

    def __init__(self, server: ThreadingHTTPServer, where: str, path: Path | None = None) -> None:
        self.server = server
        self.where = where
        self.path = path
        self.thread = threading.Thread(
            target=server.serve_forever,
            kwargs={"poll_interval": SERVE_POLL},
            name=f"api {where}",
            daemon=True,
        )
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()  # returns once serve_forever has (within SERVE_POLL)
        self.server.server_close()
        self.thread.join(timeout=5.0)
        if self.path is not None:
            sockets.remove(self.path)


def parse_listen(text: str) -> tuple[str, int, socket.AddressFamily]:
    """'127.0.0.1:9477', '[::1]:9477' or 'localhost:9477' -> (host, port, family)."""
    host, sep, port_text = text.rpartition(":")
    if not sep or not host or not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise ConfigError(f"metrics listen address {text!r}: expected host:port, e.g. 127.0.0.1:9477")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    try:
        family = socket.AF_INET6 if ipaddress.ip_address(host).version == 6 else socket.AF_INET
    except ValueError:
        family = socket.AF_INET
    return host, int(port_text), family


def serve(worker: Service, api_socket: Path, metrics_listen: str | None) -> list[Server]:
    """Start the API on `api_socket` (and /metrics on `metrics_listen`); refuses if a worker runs there."""
    listen = parse_listen(metrics_listen) if metrics_listen else None  # a typo fails before anything
    api_socket.parent.mkdir(parents=True, exist_ok=True)
    claimed = sockets.claim(api_socket)
    if claimed is sockets.Claim.IN_USE:
        raise ConflictError(f"{api_socket}: another worker already serves this API socket; stop it first")
    if claimed is sockets.Claim.NOT_A_SOCKET:
        raise ConfigError(f"{api_socket}: exists and is not a socket; remove it or change apiSocket")
    try:
        unix = _UnixServer(api_socket, worker)
    except OSError as exc:
        raise ConfigError(f"{api_socket}: cannot serve the API: {exc.strerror or exc}") from exc
    servers = [Server(unix, str(api_socket), api_socket)]
    if listen is not None:
        host, port, family = listen
        try:
            tcp = _TcpServer((host, port), family, worker)
        except OSError as exc:
            servers[0].close()
            raise ConfigError(
                f"metrics listen {metrics_listen}: cannot listen: {exc.strerror or exc}"
            ) from exc
        servers.append(Server(tcp, f"{host}:{port}"))
    return servers
