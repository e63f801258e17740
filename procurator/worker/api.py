"""The worker daemon's HTTP API on a UNIX socket (its client is worker/client.py).

The server is the standard library's `ThreadingHTTPServer` bound to an AF_UNIX socket (mode 0600; a
stale socket file is replaced, a live one means another worker runs and is refused); an optional TCP
listener (metricsListen) serves `/metrics` only, another (statusListen) the status page, the read-only
JSON it polls and, from loopback peers, its actions. Requests are parsed by `http.server`; this module
only routes them.

    GET  /status                    {"worker": {...}, "vms": [VmStatus.to_json()...], "supervision": {...},
                                     "details": {NAME: {last_exit, health, cpu_seconds, memory_bytes}}}
    GET  /vms                       {"schema": 1, "state_dir", "config", "vms": [...]}: the rows `ps --json`
                                     prints; `config` the digest of its configuration file (or null)
    GET  /plan[?deployment=PATH]    the plan to PATH (default: the desired deployment)
    POST /apply                     {"deployment": PATH, "wait"?: "none"|"booted"|"healthy"} -> the report
    GET  /history                   the deployment profile's generations
    POST /rollback                  {"to"?: N, "wait"?: ...} -> the ApplyResult (as `rollback --json`)
    POST /pause, /resume            {"vm": NAME} -> the VM as `ps --json` shows it (paused or running)
    POST /up                        {"bundle": PATH, "backend"?: NAME, "wait"?: ...} -> Started (below)
    POST /vm/NAME/stop              {} -> Stopped: {"schema", "name", "was_running", "graceful", "steps"}
    POST /vm/NAME/start             {"wait"?: ...} -> Started: {"schema", "changed", "vm": the `ps` row}
    POST /vm/NAME/down              {"purge"?: bool} -> Stopped, with "purged"
    POST /vm/NAME/pause, /resume    {} -> Started ("changed": false when it already was)
    POST /vm/NAME/snapshot          {"keep"?: N, "stay_paused"?: bool} -> {"schema", "snapshot": as --json}
    POST /vm/NAME/restore           {"id"?: ID, "paused"?: bool, "wait"?: ...} -> {"schema", "snapshot": ID,
                                    "vm": the `ps` row}
                                    (worker/commands.py: the same results the commands make without a
                                    worker; the daemon runs each under its work lock and the state lock)
    GET  /metrics                   Prometheus text exposition
    GET  /                          the status page (HTML, worker/status.py)
    GET  /vm/NAME                   one VM's page, with the tail of its serial log
    GET  /vm/NAME/log?offset=N      what the serial log gained since byte N, as JSON text
    POST /actions/restart|apply|rollback   the page's forms: only with statusActions, a CSRF token, and
                                    over the UNIX socket or from a loopback address

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
from urllib.parse import parse_qs, quote, unquote, urlsplit

from procurator import metrics, sockets
from procurator.config import BACKENDS
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
from procurator.worker import commands, status

log = logging.getLogger(__name__)

MAX_BODY = 1 << 20
SERVE_POLL = 0.2  # how often serve_forever looks for a shutdown request

HTML = "text/html; charset=utf-8"


class ForbiddenError(UsageError):
    """A status page action that is not allowed here (answered 403)."""


_VM_VERBS = frozenset({"log", "stop", "start", "down", "pause", "resume", "snapshot", "restore"})


def _route(path: str) -> tuple[str, str]:
    """The route a path takes, and the VM name in /vm/NAME paths ("" otherwise)."""
    parts = path.split("/")
    if len(parts) in (3, 4) and parts[1] == "vm" and parts[2]:
        name = unquote(parts[2])
        if len(parts) == 3:
            return "/vm/*", name
        if parts[3] in _VM_VERBS:
            return f"/vm/*/{parts[3]}", name
    return path, ""


_STATUS = {
    ForbiddenError: 403,
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


def _path_arg(value: str, what: str = "deployment") -> Path:
    """A deployment (bundle) path from a request: absolute, without NUL, at most PATH_MAX bytes (else 400)."""
    if not value.startswith("/") or "\0" in value or len(value.encode()) > MAX_PATH:
        shown = value if len(value) <= 80 else f"{value[:77]}..."
        raise UsageError(f"{what}: {shown!r} is not an absolute path of at most {MAX_PATH} bytes")
    return Path(value)


def _flag(body: dict[str, Any], key: str) -> bool:
    value = body.get(key, False)
    if not isinstance(value, bool):
        raise UsageError(f"{key}: {json.dumps(value)[:40]} is not true or false")
    return value


def _wait_arg(body: dict[str, Any]) -> WaitFor | None:
    wait = body.get("wait")
    if wait is not None and wait not in {w.value for w in WaitFor}:
        raise UsageError(f"wait: {wait!r} is not one of {', '.join(w.value for w in WaitFor)}")
    return WaitFor(wait) if wait else None


class Service(Protocol):
    """What the API serves, as the daemon (worker/daemon.py `Worker`) provides it."""

    @property
    def stopping(self) -> bool: ...

    def status_json(self) -> dict[str, Any]: ...

    def vms_json(self) -> dict[str, Any]: ...

    def plan(self, deployment_path: Path | None) -> Any: ...

    def apply(self, deployment_path: Path, *, wait: WaitFor | None = None) -> Any: ...

    def pause(self, name: str, *, pause: bool) -> dict[str, Any]: ...

    def history(self) -> Any: ...

    def metrics_text(self) -> str: ...

    @property
    def status_actions(self) -> bool: ...

    @property
    def csrf(self) -> status.Csrf: ...

    def page(self) -> str: ...

    def vm_page(self, name: str) -> str: ...

    def vm_log(self, name: str, offset: int) -> dict[str, Any]: ...

    def restart_vm(self, name: str) -> None: ...

    def apply_desired(self) -> Any: ...

    def rollback(self, to: int | None = None, wait: WaitFor | None = None) -> Any: ...

    # the VM commands (worker/commands.py): each answers its result's to_json()

    def up_vm(self, bundle_path: Path, *, backend: str | None, wait: WaitFor | None) -> dict[str, Any]: ...

    def stop_vm(self, name: str) -> dict[str, Any]: ...

    def start_vm(self, name: str, *, wait: WaitFor | None) -> dict[str, Any]: ...

    def down_vm(self, name: str, *, purge: bool) -> dict[str, Any]: ...

    def pause_vm(self, name: str, *, pause: bool) -> dict[str, Any]: ...

    def snapshot_vm(self, name: str, *, keep: int | None, stay_paused: bool) -> dict[str, Any]: ...

    def restore_vm(
        self, name: str, *, ident: str | None, paused: bool, wait: WaitFor | None
    ) -> dict[str, Any]: ...


# --- the server --------------------------------------------------------------------------------------


class _Handler(BaseHTTPRequestHandler):
    server: _UnixServer | _TcpServer
    protocol_version = "HTTP/1.1"
    server_version = "procurator-worker"
    timeout = 60.0  # a client that stops sending (or reading) mid-request is dropped after this
    query: dict[str, list[str]]
    name: str  # the NAME of /vm/NAME routes
    body_read: bool  # whether this request's body was read (else an error answer reads it first)
    sys_version = ""

    # Routes: path -> {method: handler name}
    ROUTES: ClassVar[dict[str, dict[str, str]]] = {
        "/status": {"GET": "get_status"},
        "/vms": {"GET": "get_vms"},
        "/plan": {"GET": "get_plan"},
        "/apply": {"POST": "post_apply"},
        "/rollback": {"POST": "post_rollback_to"},
        "/history": {"GET": "get_history"},
        "/pause": {"POST": "post_pause"},
        "/resume": {"POST": "post_resume"},
        "/metrics": {"GET": "get_metrics"},
        "/": {"GET": "get_page"},
        "/vm/*": {"GET": "get_vm_page"},
        "/vm/*/log": {"GET": "get_vm_log"},
        "/up": {"POST": "post_up"},
        "/vm/*/stop": {"POST": "post_vm_stop"},
        "/vm/*/start": {"POST": "post_vm_start"},
        "/vm/*/down": {"POST": "post_vm_down"},
        "/vm/*/pause": {"POST": "post_vm_pause"},
        "/vm/*/resume": {"POST": "post_vm_resume"},
        "/vm/*/snapshot": {"POST": "post_vm_snapshot"},
        "/vm/*/restore": {"POST": "post_vm_restore"},
        "/actions/restart": {"POST": "post_restart"},
        "/actions/apply": {"POST": "post_apply_desired"},
        "/actions/rollback": {"POST": "post_rollback"},
    }
    # What each kind of listener serves: the UNIX socket everything; a TCP listener only these.
    SERVED: ClassVar[dict[str, frozenset[str] | None]] = {
        "api": None,
        "metrics": frozenset({"/metrics"}),
        "status": frozenset({"/", "/vm/*", "/vm/*/log", "/status", "/vms", "/history", "/metrics",
                             "/actions/restart", "/actions/apply", "/actions/rollback"}),
    }  # fmt: skip

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
        self.body_read = False
        url = urlsplit(self.path)
        route, self.name = _route(url.path)
        routes = self.ROUTES.get(route)
        served = self.SERVED[self.server.kind]
        if routes is None or (served is not None and route not in served):
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

    def get_vms(self, worker: Service) -> None:
        self._json(200, worker.vms_json())

    def get_plan(self, worker: Service) -> None:
        values = self.query.get("deployment", [])
        self._json(200, worker.plan(_path_arg(values[-1]) if values else None))

    def post_apply(self, worker: Service) -> None:
        body = self._body()
        if not isinstance(body, dict) or not isinstance(body.get("deployment"), str):
            raise UsageError('POST /apply expects {"deployment": "<store path>"}')
        report = worker.apply(_path_arg(body["deployment"]), wait=_wait_arg(body))
        self._json(200, report.to_json())

    def post_rollback_to(self, worker: Service) -> None:
        body = self._body()
        if not isinstance(body, dict):
            raise UsageError('POST /rollback expects {"to"?: N, "wait"?: "none"|"booted"|"healthy"}')
        to, wait = body.get("to"), body.get("wait")
        if to is not None and (isinstance(to, bool) or not isinstance(to, int) or to < 1):
            raise UsageError(f"to: {to!r} is not a generation number (see GET /history)")
        if wait is not None and wait not in {w.value for w in WaitFor}:
            raise UsageError(f"wait: {wait!r} is not one of {', '.join(w.value for w in WaitFor)}")
        self._json(200, worker.rollback(to, WaitFor(wait) if wait else None))

    def post_pause(self, worker: Service) -> None:
        self._json(200, worker.pause(self._vm_name(), pause=True))

    def post_resume(self, worker: Service) -> None:
        self._json(200, worker.pause(self._vm_name(), pause=False))

    # --- the VM commands ---

    def post_up(self, worker: Service) -> None:
        body = self._body()
        if not isinstance(body, dict) or not isinstance(body.get("bundle"), str):
            raise UsageError('POST /up expects {"bundle": "<store path>", "backend"?: ..., "wait"?: ...}')
        backend = body.get("backend")
        if backend is not None and backend not in BACKENDS:
            raise UsageError(f"backend: {backend!r} is not one of {', '.join(BACKENDS)}")
        bundle = _path_arg(body["bundle"], "bundle")
        self._json(200, worker.up_vm(bundle, backend=backend, wait=_wait_arg(body)))

    def post_vm_stop(self, worker: Service) -> None:
        self._command_body("stop")
        self._json(200, worker.stop_vm(self._named()))

    def post_vm_start(self, worker: Service) -> None:
        body = self._command_body("start", '{"wait"?: "none"|"booted"|"healthy"}')
        self._json(200, worker.start_vm(self._named(), wait=_wait_arg(body)))

    def post_vm_down(self, worker: Service) -> None:
        body = self._command_body("down", '{"purge"?: true|false}')
        self._json(200, worker.down_vm(self._named(), purge=_flag(body, "purge")))

    def post_vm_pause(self, worker: Service) -> None:
        self._command_body("pause")
        self._json(200, worker.pause_vm(self._named(), pause=True))

    def post_vm_resume(self, worker: Service) -> None:
        self._command_body("resume")
        self._json(200, worker.pause_vm(self._named(), pause=False))

    def post_vm_snapshot(self, worker: Service) -> None:
        body = self._command_body("snapshot", '{"keep"?: N, "stay_paused"?: true|false}')
        keep = body.get("keep")
        if keep is not None and (isinstance(keep, bool) or not isinstance(keep, int) or keep < 1):
            raise UsageError(f"keep: {json.dumps(keep)[:40]} is not a number of snapshots (1 or more)")
        stay = _flag(body, "stay_paused")
        self._json(200, worker.snapshot_vm(self._named(), keep=keep, stay_paused=stay))

    def post_vm_restore(self, worker: Service) -> None:
        body = self._command_body("restore", '{"id"?: "<snapshot id>", "paused"?: true|false, "wait"?: ...}')
        ident = body.get("id")
        if ident is not None and not isinstance(ident, str):
            raise UsageError(f"id: {json.dumps(ident)[:40]} is not a snapshot id")
        ident = None if ident is None else commands.check_snapshot_id(ident)
        paused, wait = _flag(body, "paused"), _wait_arg(body)
        self._json(200, worker.restore_vm(self._named(), ident=ident, paused=paused, wait=wait))

    def _command_body(self, verb: str, shape: str = "{}") -> dict[str, Any]:
        """The JSON object a /vm/NAME/VERB request carries (an empty body is {})."""
        body = {} if self.headers.get("Content-Length") in (None, "0") else self._body()
        if not isinstance(body, dict):
            raise UsageError(f"POST /vm/NAME/{verb} expects {shape}")
        return body

    def _named(self) -> str:
        return commands.check_name(self.name)

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

    # --- the status page ---

    def get_page(self, worker: Service) -> None:
        self._send(200, worker.page().encode(), HTML)

    def get_vm_page(self, worker: Service) -> None:
        self._send(200, worker.vm_page(self.name).encode(), HTML)

    def get_vm_log(self, worker: Service) -> None:
        values = self.query.get("offset", ["0"])
        if not values[-1].isdigit():
            raise UsageError(f"offset: {values[-1]!r} is not a byte offset")
        self._json(200, worker.vm_log(self.name, int(values[-1])))

    def post_restart(self, worker: Service) -> None:
        form = self._form(worker)
        name = (form.get("vm") or [""])[-1]
        if not name:
            raise UsageError("the restart form names no VM")
        worker.restart_vm(name)
        self._see_other(f"/vm/{quote(name)}")

    def post_apply_desired(self, worker: Service) -> None:
        self._form(worker)
        worker.apply_desired()
        self._see_other("/")

    def post_rollback(self, worker: Service) -> None:
        self._form(worker)
        worker.rollback()
        self._see_other("/")

    def _form(self, worker: Service) -> dict[str, list[str]]:
        """A page form's fields, once the action is allowed: statusActions on, the socket or a loopback
        peer, a url-encoded body with the page's CSRF token."""
        if not worker.status_actions:
            raise ForbiddenError(
                "the status page's actions are off; set statusActions in the worker configuration"
            )
        if not self.server.trusted(self.client_address):
            raise ForbiddenError("actions are taken only over the worker's socket or from a loopback address")
        length = self.headers.get("Content-Length")
        if length is None or not length.isdigit() or int(length) > MAX_BODY:
            raise UsageError("a form body with Content-Length is required")
        self.body_read = True
        form = status.parse_form(self.rfile.read(int(length)))
        worker.csrf.check(form)
        return form

    def _see_other(self, where: str) -> None:
        self.send_response(303, HTTPStatus(303).phrase)
        self.send_header("Location", where)
        self.send_header("Content-Length", "0")
        self.end_headers()

    # --- plumbing ---

    def _body(self) -> Any:
        length = self.headers.get("Content-Length")
        if length is None or not length.isdigit():
            raise UsageError("a JSON body with Content-Length is required")
        size = int(length)
        if size > MAX_BODY:
            raise UsageError(f"the body is larger than {MAX_BODY} bytes")
        self.body_read = True
        raw = self.rfile.read(size)
        try:
            return json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise UsageError(f"the body is not JSON: {exc}") from exc

    def _skip_body(self) -> None:
        """Read and drop the body of a request refused before its body was read, so that the connection
        can carry the next request (and the client can finish sending); one too large to read: closed."""
        if self.body_read:
            return
        self.body_read = True
        length = self.headers.get("Content-Length", "0")
        if length.isdigit() and int(length) <= MAX_BODY and not self.headers.get("Transfer-Encoding"):
            self.rfile.read(int(length))
        else:
            self.close_connection = True

    def _json(self, status: int, body: Any) -> None:
        self._send(status, (json.dumps(body, sort_keys=True) + "\n").encode(), "application/json")

    def _error(self, status: int, kind: str, message: str, *, allow: str | None = None) -> None:
        self._skip_body()
        self._send(status, (json.dumps({"error": message, "type": kind}) + "\n").encode(), "application/json",
                   allow=allow)  # fmt: skip

    def _send(self, status: int, data: bytes, content_type: str, *, allow: str | None = None) -> None:
        self.send_response(status, HTTPStatus(status).phrase)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        if allow is not None:
            self.send_header("Allow", allow)
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)


class _UnixServer(ThreadingHTTPServer):
    address_family = socket.AF_UNIX
    daemon_threads = True
    block_on_close = False

    kind = "api"

    def __init__(self, path: Path, worker: Service) -> None:
        self.worker = worker
        super().__init__(str(path), _Handler)  # type: ignore[arg-type]  # AF_UNIX takes a path

    def trusted(self, _client: Any) -> bool:
        return True  # the socket is 0600: only its owner connects

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

    def __init__(
        self, address: tuple[str, int], family: socket.AddressFamily, worker: Service, kind: str
    ) -> None:
        self.address_family = family
        self.worker = worker
        self.kind = kind  # "metrics" or "status": what it serves (_Handler.SERVED)
        super().__init__(address, _Handler)

    def trusted(self, client: Any) -> bool:
        """Whether a page action may come from `client`: a loopback peer only."""
        try:
            return ipaddress.ip_address(str(client[0]).split("%")[0]).is_loopback
        except (ValueError, IndexError, TypeError):
            return False


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


def serve(
    worker: Service, api_socket: Path, metrics_listen: str | None, status_listen: str | None = None
) -> list[Server]:
    """Start the API on `api_socket`, /metrics on `metrics_listen` and the status page on `status_listen`
    (TCP, each optional); refuses if a worker runs there."""
    tcp: list[tuple[str, str, tuple[str, int, socket.AddressFamily]]] = []
    for kind, listen in (("metrics", metrics_listen), ("status", status_listen)):
        if listen:
            tcp.append((kind, listen, parse_listen(listen)))  # a typo fails before anything
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
    for kind, listen, (host, port, family) in tcp:
        try:
            server = _TcpServer((host, port), family, worker, kind)
        except OSError as exc:
            for started in servers:
                started.close()
            raise ConfigError(f"{kind} listen {listen}: cannot listen: {exc.strerror or exc}") from exc
        servers.append(Server(server, f"{host}:{port}"))
    return servers
