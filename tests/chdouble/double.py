"""A test double of the `cloud-hypervisor` binary: its command line, its HTTP API on a UNIX socket, its VM
state machine, its log and its event monitor. It runs no guest.

What it copies from cloud-hypervisor (v53/v54 sources: `cloud-hypervisor/src/main.rs`, `vmm/src/lib.rs`,
`vmm/src/vm.rs`, `vmm/src/api/http/`, `event_monitor/src/lib.rs`, and the micro_http server):

- flags: `--api-socket path=<p>|fd=<n>`, `--event-monitor path=<p>|fd=<n>`, `--log-file`, `-v` (repeatable),
  `--seccomp true|false|log|errno`, `--no-shutdown`, `-V`; every other real flag is accepted and ignored
  (create the VM over the API); an unknown flag is a usage error (exit 2), as with clap.
- the API: the real routes; a wrong method answers 400 (`["Bad Request"]`, or an empty 400 for PATCH and
  DELETE on action endpoints), never 405; an unknown path 404 `["Not Found"]`; a body on a bodyless PUT
  400 `["Bad Request"]`; `Content-Length: 0` counts as no body; errors are a JSON array of the error chain
  (`["Error from API", "The VM could not boot", "VM is already created"]`); wrong-state answers are 500
  (404 for "not created" / "config is missing"); vmm.shutdown answers 200 with an empty body, then the
  process exits. Status lines carry no reason phrase; `Server: Cloud Hypervisor API`.
- vm.create validates its body against the official spec's VmConfig (tests/support/chspec.py) and answers
  400 `["Failed to deserialize JSON", <problems>]`; it creates the serial/console files in File mode.
- states: after vm.create the VM is `Created`; vm.boot makes it `Running`; vm.shutdown (or the guest
  powering off under `--no-shutdown`) drops the VM, so vm.info says `Created` again and vm.boot boots it
  anew. The power button makes the guest power off after a delay: with `--no-shutdown` the VM shuts down
  and the process stays; without it the VMM shuts down and the process exits 0. SIGTERM/SIGINT shut the
  VMM down and exit 0.
- vm.boot first runs `VmConfig::validate` as `Vm::new` does (tests/chdouble/validate.py): a refused config
  answers 500 `["Error from API", "The VM could not boot", "Failed to validate config", <reason>...]`.
- TAPs: vm.boot opens each net entry's TAP queues for real, as net_util's open_tap does, and keeps them
  open while the VM exists (tests/chdouble/tap.py; the rules and their sources in README.md).
- disks: vm.boot opens and types each disk image for real, as make_virtio_block_device does, and from v46
  locks it (an OFD lock) while the VM exists (tests/chdouble/disk.py).
- before v47 an error answer is one text, not the JSON array (README.md, "error answers before v47").
- Landlock (v41+): vm.create with `landlock_enable` makes the one VMM thread (`VmmThread`, which serves
  every request) restrict itself for real to the config's paths and `landlock_rules`, as
  `VmConfig::apply_landlock` does (tests/chdouble/landlock.py), so what no rule allows fails to open.
- events: pretty-printed JSON objects `{"timestamp": {"secs", "nanos"}, "source", "event", "properties"}`
  separated by a blank line, as the real event monitor writes them.

Differences: vm.create is stricter than the real server (`payload` is required by the spec, the real one
only fails at vm.boot); vm.info echoes the config as given (the real one fills in defaults); hot-plug,
migration and resize endpoints answer 500 (not simulated). vm.snapshot writes the real layout (config.json,
state.json with the double's own small state, a sparse memory-ranges of the memory size); vm.restore, on a
process without a VM, reads it back and opens the TAPs and disks (README.md, "snapshot" and "restore").

Knobs (environment):
  CHDOUBLE_BOOT_DELAY      seconds vm.boot takes (default 0)
  CHDOUBLE_RESTORE_DELAY   seconds vm.restore takes, after the devices exist (default 0)
  CHDOUBLE_POWEROFF_DELAY  seconds the guest takes to power off after the power button (default 0.05)
  CHDOUBLE_START_DELAY     seconds before the API is served (default 0)
  CHDOUBLE_FAULT           comma-separated faults:
                             die-at-start         log a fatal error and exit 1 before serving anything
                             no-answer            never accept a connection on the API socket
                             die-on-boot          exit 1 in the middle of vm.boot, answering nothing
                             ignore-power-button  the guest ignores the power button
                             hang-on-shutdown     vm.shutdown, vmm.shutdown and SIGTERM never complete
  CHDOUBLE_RECORD          append one JSON line per process start/ready/exit, request and guest power-off
  CHDOUBLE_VALIDATE        "0" skips the schema validation of vm.create (default on)
  CHDOUBLE_GUEST_RESET     seconds after each boot at which the guest panics and resets (a crash loop)
  CHDOUBLE_HANG_AFTER      seconds after the API is first served at which the VMM thread hangs for good:
                           connections are still accepted, no request is answered, SIGTERM is not acted
                           on (only SIGKILL ends it); a test knob, no cloud-hypervisor rule
  CHDOUBLE_LANDLOCK_PROBE  a path the VMM thread tries to open once it is landlocked, logging the outcome;
                           a test knob, no cloud-hypervisor rule
  CHDOUBLE_VERSION         the release to act as, a major number from 40 to 53 (default 53): gates flags
                           and rules as that release's code does (see tests/chdouble/README.md)
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import io
import json
import os
import queue
import signal
import socket
import socketserver
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler
from typing import IO, Any, ClassVar

from tests.chdouble import landlock
from tests.chdouble.disk import DiskOpener, OpenDisk, close_disks, device_manager, lock_disks
from tests.chdouble.tap import ChainError, RustError, TapOpener, boot_chain, from_tap_fds, io_error, rust_str
from tests.chdouble.validate import validate

MAX_PAYLOAD_SIZE = 51200  # micro_http (the micro-http crate cloud-hypervisor pins): larger bodies get 400
MAX_LINE = 1024  # micro_http connection.rs BUFFER_SIZE: a request or header line, CR LF included
DEFAULT_RELEASE = 53  # CHDOUBLE_VERSION: the release the double acts as (40 to 53)
OLDEST_RELEASE = 40
NO_SHUTDOWN_SINCE = 52  # cloud-hypervisor/src/main.rs: the `no-shutdown` Arg first appears in v52.0
SERIAL_BUFFER_SINCE = (
    53  # vmm/src/serial_manager.rs: v53's SocketConsole keeps output until a client connects
)
ERROR_RESPONSE_LOG_SINCE = (
    52  # vmm/src/api/http/mod.rs error_response logs "HTTP API error response" from v52
)
CONSOLE_CHECK_AT_CREATE_SINCE = 42  # vmm/src/lib.rs: pre_create_console_devices at vm.create from v42
JSON_ERRORS_SINCE = 47  # vmm/src/api/http/mod.rs error_response: the JSON array of the chain from v47
THISERROR_API_SINCE = 46  # api/mod.rs, api/http/mod.rs: thiserror texts embedding their source in v46
NET_DEFAULT_WARNING = 48  # vmm/src/vm_config.rs: only v48's default_netconfig_ip/mask warn
FEATURES = ("kvm",)
RESTORE_FIELDS_SINCE = 52  # vmm/src/config.rs RestoreConfig: `memory_restore_mode` and `resume` from v52
RESTORE_DELETES_SINCE = 44  # vmm/src/lib.rs vm_restore: a failed restore deletes the VM (map_err) from v44
SNAPSHOT_ROUTES = {"vm.snapshot": "VmSnapshotConfig", "vm.restore": "RestoreConfig"}  # endpoint -> schema
SNAPSHOT_CONFIG_FILE = "config.json"  # vmm/src/migration/mod.rs
SNAPSHOT_STATE_FILE = "state.json"  # vmm/src/migration/mod.rs
MEMORY_SNAPSHOT_FILE = "memory-ranges"  # vmm/src/memory_manager.rs SNAPSHOT_FILENAME
FAULTS = frozenset({"die-at-start", "no-answer", "die-on-boot", "ignore-power-button", "hang-on-shutdown"})
DEFAULT_MEMORY = 512 << 20

API_ERROR = "Error from API"
FDS_HELPER_SINCE = 49  # http_endpoint.rs: attach_fds_to_cfg's warning from v49, "Ignoring FDs .." before
PREFIX = "/api/v1/"

# Route kinds, after vmm/src/api/http/mod.rs: which handler serves the endpoint decides what a wrong
# method or an unexpected body gets.
GET_ACTION = "get-action"  # VmActionHandler with a GET handler (vm.counters)
PUT_ACTION = "put-action"  # VmActionHandler, bodyless PUT
PUT_BODY = "put-body"  # VmActionHandler, PUT with a JSON body
CREATE = "create"  # VmCreate
GET_ONLY = "get-only"  # VmInfo, VmmPing
VMM_SHUTDOWN = "vmm-shutdown"  # VmmShutdown
ROUTES = {
    "vm.add-device": PUT_BODY,
    "vm.add-user-device": PUT_BODY,
    "vm.add-disk": PUT_BODY,
    "vm.add-fs": PUT_BODY,
    "vm.add-generic-vhost-user": PUT_BODY,
    "vm.add-net": PUT_BODY,
    "vm.add-pmem": PUT_BODY,
    "vm.add-vdpa": PUT_BODY,
    "vm.add-vsock": PUT_BODY,
    "vm.boot": PUT_ACTION,
    "vm.counters": GET_ACTION,
    "vm.create": CREATE,
    "vm.delete": PUT_ACTION,
    "vm.info": GET_ONLY,
    "vm.pause": PUT_ACTION,
    "vm.power-button": PUT_ACTION,
    "vm.reboot": PUT_ACTION,
    "vm.receive-migration": PUT_BODY,
    "vm.remove-device": PUT_BODY,
    "vm.resize": PUT_BODY,
    "vm.resize-disk": PUT_BODY,
    "vm.resize-zone": PUT_BODY,
    "vm.restore": PUT_BODY,
    "vm.resume": PUT_ACTION,
    "vm.send-migration": PUT_BODY,
    "vm.shutdown": PUT_ACTION,
    "vm.snapshot": PUT_BODY,
    "vmm.ping": GET_ONLY,
    "vmm.shutdown": VMM_SHUTDOWN,
    "vm.nmi": PUT_ACTION,
}


class UsageError(Exception):
    """A bad knob or flag value: the double exits 2 with this message."""


def release() -> int:
    raw = os.environ.get("CHDOUBLE_VERSION", "").strip().lstrip("v").split(".")[0]
    if not raw:
        return DEFAULT_RELEASE
    if not raw.isdigit() or not OLDEST_RELEASE <= int(raw) <= DEFAULT_RELEASE:
        raise UsageError(
            f"CHDOUBLE_VERSION={raw!r}: expected a release from {OLDEST_RELEASE} to {DEFAULT_RELEASE}"
        )
    return int(raw)


def _seconds(name: str, default: float) -> float:
    raw = os.environ.get(name, "")
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError as exc:
        raise UsageError(f"{name}={raw!r}: expected seconds") from exc
    if value < 0:
        raise UsageError(f"{name}={raw!r}: must not be negative")
    return value


@dataclass(frozen=True)
class Settings:
    boot_delay: float = 0.0
    restore_delay: float = 0.0
    poweroff_delay: float = 0.05
    start_delay: float = 0.0
    faults: frozenset[str] = frozenset()
    validate: bool = True
    no_shutdown: bool = False
    release: int = DEFAULT_RELEASE
    guest_reset: float | None = None
    hang_after: float | None = None
    landlock_probe: str = ""

    @classmethod
    def from_env(cls, *, no_shutdown: bool) -> Settings:
        faults = frozenset(f.strip() for f in os.environ.get("CHDOUBLE_FAULT", "").split(",") if f.strip())
        unknown = faults - FAULTS
        if unknown:
            raise UsageError(
                f"CHDOUBLE_FAULT: unknown {', '.join(sorted(unknown))}; known: {', '.join(sorted(FAULTS))}"
            )
        return cls(
            boot_delay=_seconds("CHDOUBLE_BOOT_DELAY", 0.0),
            restore_delay=_seconds("CHDOUBLE_RESTORE_DELAY", 0.0),
            poweroff_delay=_seconds("CHDOUBLE_POWEROFF_DELAY", 0.05),
            start_delay=_seconds("CHDOUBLE_START_DELAY", 0.0),
            faults=faults,
            validate=os.environ.get("CHDOUBLE_VALIDATE", "1") != "0",
            no_shutdown=no_shutdown,
            release=release(),
            guest_reset=_seconds("CHDOUBLE_GUEST_RESET", -1.0)
            if os.environ.get("CHDOUBLE_GUEST_RESET")
            else None,
            hang_after=_seconds("CHDOUBLE_HANG_AFTER", -1.0)
            if os.environ.get("CHDOUBLE_HANG_AFTER")
            else None,
            landlock_probe=os.environ.get("CHDOUBLE_LANDLOCK_PROBE", ""),
        )


class Log:
    """cloud-hypervisor's logger: `cloud-hypervisor: <secs>s: <thread> LEVEL:location -- msg`."""

    _RANK: ClassVar[dict[str, int]] = {"ERROR": 0, "WARN": 1, "INFO": 2, "DEBUG": 3, "TRACE": 4}

    def __init__(self, stream: IO[str], verbosity: int, start: float) -> None:
        self.stream = stream
        self.limit = 1 + verbosity  # no -v: warnings and errors; -v: info; -vv: debug; -vvv: trace
        self.start = start
        self._lock = threading.Lock()

    def write(self, level: str, location: str, message: str) -> None:
        if self._RANK[level] > self.limit:
            return
        elapsed = time.monotonic() - self.start
        thread = threading.current_thread().name
        line = f"cloud-hypervisor: {elapsed:>10.6f}s: <{thread}> {level}:{location} -- {message}\n"
        with self._lock, contextlib.suppress(OSError, ValueError):
            self.stream.write(line)
            self.stream.flush()

    def error_at(self, location: str, message: str) -> None:
        self.write("ERROR", location, message)

    def warn_at(self, location: str, message: str) -> None:
        self.write("WARN", location, message)

    def info_at(self, location: str, message: str) -> None:
        self.write("INFO", location, message)


class Events:
    """The event monitor: pretty JSON objects, each followed by a blank line (vmm/src/lib.rs)."""

    def __init__(self, stream: IO[str] | None, start: float, log: Log) -> None:
        self.stream = stream
        self.start = start
        self.log = log
        self._lock = threading.Lock()

    def emit(self, source: str, event: str, properties: dict[str, str] | None = None) -> None:
        props = ", ".join(f"{k} = {v}" for k, v in (properties or {}).items())
        self.log.info_at("event_monitor/src/lib.rs:113", f"Event: source = {source} event = {event} {props}")
        if self.stream is None:
            return
        elapsed = time.monotonic() - self.start
        secs = int(elapsed)
        record = {
            "timestamp": {"secs": secs, "nanos": int((elapsed - secs) * 1e9)},
            "source": source,
            "event": event,
            "properties": properties,
        }
        with self._lock, contextlib.suppress(OSError, ValueError):
            self.stream.write(json.dumps(record, indent=2) + "\n\n")
            self.stream.flush()


class Recorder:
    """CHDOUBLE_RECORD: one JSON object per line, appended atomically (several doubles may share it)."""

    def __init__(self, path: str | None) -> None:
        self.fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644) if path else None

    def write(self, entry: dict[str, Any]) -> None:
        if self.fd is not None:
            os.write(self.fd, (json.dumps(entry) + "\n").encode())


class SpecUnavailableError(Exception):
    """The schema could not be loaded, so bodies cannot be validated."""


class SpecCheck:
    """Validation against our schema of the API, loaded in the background (jsonschema is slow to import)."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self._errors: Callable[[str, Any], list[str]] | None = None
        self._failure = ""
        self._thread = threading.Thread(target=self._load, name="spec-loader", daemon=True)
        if enabled:
            self._thread.start()

    def _load(self) -> None:
        try:
            from tests.support import chspec  # noqa: PLC0415 - heavy import, off the start-up path

            for name in ("VmConfig", *SNAPSHOT_ROUTES.values()):  # built before any Landlock restriction
                chspec.validator(name)
            self._errors = chspec.errors
        except Exception as exc:  # reported on every vm.create instead
            self._failure = f"{type(exc).__name__}: {exc}"

    def errors(self, schema: str, instance: Any) -> list[str]:
        if not self.enabled:
            return []
        self._thread.join()
        if self._errors is None:
            raise SpecUnavailableError(self._failure)
        return self._errors(schema, instance)


@dataclass
class Answer:
    """An HTTP answer. `body=None`: no Content-Type/Content-Length (204); `then` runs once it is sent."""

    status: int
    body: bytes | None = None
    then: Callable[[], None] | None = None


def _url_to_path(url: str, text: str, variant: str) -> str | RustError:
    """vmm/src/migration/mod.rs `url_to_path`: the path after `file://`, which must be a directory."""
    if not url.startswith("file://"):
        return RustError(variant, text, RustError("", f"Could not extract path from URL: {url}"))
    path = url[len("file://") :]
    if not os.path.isdir(path):
        return RustError(variant, text, RustError("", f"Destination is not a directory: {rust_str(path)}"))
    return path


def _console_error(exc: OSError) -> RustError:
    """vmm/src/lib.rs `VmError::CreateConsoleDevices` over vmm/src/console_devices.rs
    `ConsoleDeviceError::CreateConsoleDevice` (v53.0) over the io error."""
    inner = RustError("CreateConsoleDevice", "Error creating console device", io_error(exc))
    return RustError("CreateConsoleDevices", "Error creating console devices", inner)


def _json(status: int, value: Any) -> Answer:
    return Answer(status, json.dumps(value).encode())


def _errors(status: int, *chain: str) -> Answer:
    return _json(status, list(chain))


# How a vm.rs error (and what it wraps) displays before v47, where the answer is one text: "embed" for a
# `#[error("...: {0}")]`, "debug" for `{0:?}`; any other level shows its own text only. vm.rs
# (`ConfigValidation`, `DeviceManager`, `KernelFile`, `InitramfsFile`, `Pause`, `Resume`) and
# vm-migration/src/lib.rs (`MigratableError::{Pause, Resume}`), the same at v40.0 and v46.0.
BEFORE_V47 = {
    "ConfigValidation": "embed",
    "DeviceManager": "debug",
    "KernelFile": "embed",
    "InitramfsFile": "embed",
    "Pause": "embed",
    "Resume": "embed",
    "MigratablePause": "embed",
    "MigratableResume": "embed",
    "ApplyLandlock": "embed",  # vm.rs v41.0-v46.0: "Failed to apply landlock config during vm_create: {0}"
}


def _display_before_v47(error: RustError) -> str:
    mode = BEFORE_V47.get(error.variant)
    if mode is None or error.source is None:
        return error.text
    if mode == "debug":
        return f"{error.text}: {error.source.debug()}"
    return f"{error.text}: {_display_before_v47(error.source)}"


def _abbreviated(disk: dict[str, Any]) -> str:
    """The start of `DiskConfig`'s Debug, as the "Creating virtio-block device" line shows it."""
    path = f"Some({json.dumps(disk['path'])})" if disk.get("path") else "None"
    readonly = "true" if disk.get("readonly") else "false"
    return f"DiskConfig {{ path: {path}, readonly: {readonly}, .. }}"


NO_CONTENT = Answer(204)
BAD_REQUEST = _errors(400, "Bad Request")


def _micro_http_error(message: str) -> Answer:
    # micro_http's own answer to a request it cannot parse (a JSON-looking text with a raw newline).
    return Answer(
        400, f'{{ "error": "{message}\nAll previous unanswered requests will be dropped." }}'.encode()
    )


class Vmm:
    """The VMM and its one VM, after vmm/src/lib.rs (`vm_config` + `VmOwnership`) and vmm/src/vm.rs.

    Every operation runs under one lock, as the real VMM thread serves one API request at a time.
    """

    def __init__(
        self,
        *,
        settings: Settings,
        events: Events,
        log: Log,
        exit_process: Callable[[int], None],
        spec: SpecCheck,
        recorder: Recorder | None = None,
    ) -> None:
        self.settings = settings
        self.events = events
        self.log = log
        self.exit_process = exit_process
        self.spec = spec
        self.recorder = recorder or Recorder(None)
        self.pid = os.getpid()
        self.config: dict[str, Any] | None = None
        # None: no VM object (not booted yet, or shut down); else Running or Paused
        self.state: str | None = None
        self.booted_at = 0.0
        self.poweroff_pending = False
        self.exiting = False
        self.serial_path = ""
        self.serial_listener: socket.socket | None = None
        self.serial_client: socket.socket | None = None
        self.serial_pending = b""
        self.ptys: list[int] = []  # the main ends of Pty consoles, held as the VMM holds them
        self.tap_fds: list[int] = []  # the TAP queues of the VM's virtio-net devices, while the VM exists
        self.passed_fds: list[int] = []  # descriptors vm.add-net was sent, kept while the VM's config is
        self.disks: list[OpenDisk] = []  # the images of the VM's virtio-block devices, while the VM exists
        self.landlocked = False  # the VMM thread restricted itself at vm.create (tests/chdouble/landlock.py)
        self.lock = threading.RLock()
        self._timer: threading.Timer | None = None

    # --- routing (vmm/src/api/http) -------------------------------------------------------------

    @staticmethod
    def _route(path: str) -> str:
        if path.startswith("http://"):  # absolute form: micro_http keeps only the path
            rest = path[len("http://") :]
            path = rest[rest.find("/") :] if "/" in rest else ""
        return path[len(PREFIX) :] if path.startswith(PREFIX) else ""

    def dispatch(self, method: str, path: str, body: bytes | None) -> Answer:
        name = self._route(path)
        kind = ROUTES.get(name)
        if kind is None:
            return _errors(404, "Not Found")
        if kind in (GET_ACTION, PUT_ACTION, PUT_BODY):
            if method not in ("GET", "PUT"):
                return Answer(400, b"")
            wanted = "GET" if kind == GET_ACTION else "PUT"
            if method != wanted:
                return BAD_REQUEST
            if kind == PUT_ACTION and body is not None:
                return BAD_REQUEST
            if kind == PUT_BODY and name in SNAPSHOT_ROUTES:
                return self._with_body(name, SNAPSHOT_ROUTES[name], body)
            if kind == PUT_BODY:
                return self._unsimulated(name, body)
        elif kind == CREATE:
            if method != "PUT":
                return BAD_REQUEST
            return self.create(body)
        elif kind == GET_ONLY:
            if method != "GET":
                return BAD_REQUEST
        elif method != "PUT":  # VMM_SHUTDOWN
            return BAD_REQUEST
        action: Callable[[], Answer] = getattr(self, "op_" + name.replace(".", "_").replace("-", "_"))
        return action()

    def answer(self, method: str, path: str, body: bytes | None, files: Sequence[int] = ()) -> Answer:
        """`dispatch`, and from v52 error_response's log line (vmm/src/api/http/mod.rs). `files` are the
        descriptors the request came with (micro_http's `Request::files`): vm.add-net takes them, every
        other handler drops them (closed)."""
        left = list(files)
        try:
            route = self._route(path)
            if route == "vm.add-net" and method == "PUT":
                answer = self.op_vm_add_net(body, left)
            elif route == "vm.restore" and method == "PUT":
                answer = self._with_body(route, SNAPSHOT_ROUTES[route], body, left)
            else:
                answer = self.dispatch(method, path, body)
        finally:
            for fd in left:
                with contextlib.suppress(OSError):
                    os.close(fd)
        if self.settings.release >= ERROR_RESPONSE_LOG_SINCE and answer.status >= 400 and answer.body:
            with contextlib.suppress(ValueError):
                chain = json.loads(answer.body)
                if isinstance(chain, list) and all(isinstance(c, str) for c in chain):
                    self.log.info_at(
                        "vmm/src/api/http/mod.rs:106", f"HTTP API error response: {': '.join(chain)}"
                    )
        return answer

    def _unsimulated(self, name: str, body: bytes | None) -> Answer:
        if body is None:
            return BAD_REQUEST
        try:
            json.loads(body)
        except ValueError as exc:
            return _errors(400, "Failed to deserialize JSON", str(exc))
        return _errors(500, API_ERROR, f"chdouble: {name} is not simulated")

    def _with_body(
        self, name: str, schema: str, body: bytes | None, files: list[int] | None = None
    ) -> Answer:
        """`vm_action_put_handler_body!` (vmm/src/api/http/http_endpoint.rs): no body is 400, a body serde
        cannot read is 400 ["Failed to deserialize JSON", ..]; checked against our schema (stricter).
        vm.restore's `net_fds` is taken out first: `RestoreConfig` (vmm/src/config.rs) has it, the official
        OpenAPI spec our schema follows does not."""
        if body is None:
            return BAD_REQUEST
        try:
            request = json.loads(body)
        except ValueError as exc:
            return _errors(400, "Failed to deserialize JSON", str(exc))
        net_fds = request.pop("net_fds", None) if isinstance(request, dict) and name == "vm.restore" else None
        try:
            problems = self.spec.errors(schema, request)
        except SpecUnavailableError as exc:
            return _errors(500, "chdouble: cannot validate against the cloud-hypervisor spec", str(exc))
        if problems:
            return _errors(400, "Failed to deserialize JSON", *problems)
        if name == "vm.snapshot":
            return self.op_vm_snapshot(request)
        restored = _restored_nets(net_fds, files if files is not None else [])
        if isinstance(restored, Answer):
            return restored
        return self.op_vm_restore(request, restored, files if files is not None else [])

    # --- endpoints ------------------------------------------------------------------------------

    def op_vmm_ping(self) -> Answer:
        with self.lock:
            self.log.info_at("vmm/src/api/mod.rs:1990", "API request event: VmmPing")
            return _json(
                200,
                {
                    "build_version": f"v{self.settings.release}.0",
                    "version": f"{self.settings.release}.0.0",
                    "pid": self.pid,
                    "features": list(FEATURES),
                },
            )

    def op_vm_add_net(self, body: bytes | None, files: list[int]) -> Answer:
        """vm.add-net: vmm/src/api/http/http_endpoint.rs `VmAddNet` (v40.0: a body's `fds` are dropped
        with "Ignoring FDs sent via the HTTP request body", the request's descriptors become `fds`; v53.0:
        the same through `attach_fds_to_cfg`), then vmm/src/lib.rs `vm_add_net`: no VM is VmNotCreated,
        the config with the net added is validated (`VmConfig::validate`, tests/chdouble/validate.py),
        and on a VM created but not booted the net is added to its config (`add_to_config`), answered 204.
        Hot-adding to a booted VM is not simulated."""
        if body is None:
            return BAD_REQUEST
        try:
            net = json.loads(body)
        except ValueError as exc:
            return _errors(400, "Failed to deserialize JSON", str(exc))
        if not isinstance(net, dict):
            return _errors(400, "Failed to deserialize JSON", "invalid type: expected struct NetConfig")
        try:
            problems = self.spec.errors("NetConfig", net)
        except SpecUnavailableError as exc:
            return _errors(500, "chdouble: cannot validate against the cloud-hypervisor spec", str(exc))
        if problems:
            return _errors(400, "Failed to deserialize JSON", *problems)
        if net.pop("fds", None) is not None:
            if self.settings.release >= FDS_HELPER_SINCE:  # fds_helper: the device id's Debug form
                ident = net.get("id")
                shown = f"Some({rust_str(ident)})" if isinstance(ident, str) else "None"
                text = f"FD numbers were present in HTTP request body for device {shown} but will be ignored"
            else:
                text = "Ignoring FDs sent via the HTTP request body"
            self.log.warn_at("vmm/src/api/http/http_endpoint.rs", text)
        api = "The network device could not be added to the VM"
        with self.lock:
            self.log.info_at("vmm/src/api/mod.rs:1445", "API request event: VmAddNet")
            if self.config is None:
                return self._fail(500, api, "VM is not created")
            if files:
                net["fds"], files[:] = list(files), []
            candidate = copy.deepcopy(self.config)
            candidate.setdefault("net", []).append(net)
            invalid = validate(candidate, self.settings.release, self.log.warn_at)
            if invalid is not None:
                for fd in net.get("fds") or []:
                    files.append(fd)  # dropped with the request
                return self._fail(500, api, invalid)
            if self.state is not None:
                files.extend(net.get("fds") or [])
                return _errors(500, API_ERROR, "chdouble: vm.add-net on a booted VM is not simulated")
            self.config.setdefault("net", []).append(net)
            self.passed_fds.extend(net.get("fds") or [])
            return NO_CONTENT

    def create(self, body: bytes | None) -> Answer:
        if body is None:
            return Answer(400, b"")
        try:
            config = json.loads(body)
        except ValueError as exc:
            return _errors(400, "Failed to deserialize JSON", str(exc))
        if not isinstance(config, dict):
            return _errors(400, "Failed to deserialize JSON", "invalid type: expected struct VmConfig")
        try:
            problems = self.spec.errors("VmConfig", config)
        except SpecUnavailableError as exc:
            return _errors(500, "chdouble: cannot validate against the cloud-hypervisor spec", str(exc))
        if problems:
            return _errors(400, "Failed to deserialize JSON", *problems)
        with self.lock:
            self.log.info_at("vmm/src/api/mod.rs:1445", "API request event: VmCreate")
            if self.config is not None:
                return self._fail(500, "The VM could not be created", "VM is already created")
            if self.settings.release == NET_DEFAULT_WARNING:
                self._warn_net_defaults(config)
            refused = self._pre_create_consoles(config)
            if refused is not None:
                return refused
            self.config = config
            if config.get("landlock_enable") and self.settings.release >= landlock.LANDLOCK_SINCE:
                return self._apply_landlock(config)
            return NO_CONTENT

    def _apply_landlock(self, config: dict[str, Any]) -> Answer:
        """vmm/src/lib.rs `vm_create` (v41.0-v53.0): once the config is stored and the consoles exist, the
        VMM thread restricts itself to the config's paths (`VmConfig::apply_landlock`); a failure answers
        `VmError::ApplyLandlock` and leaves the config stored, as the real one does."""
        failed = landlock.restrict(landlock.config_rules(config, self.settings.release))
        if failed is not None:
            error = RustError("ApplyLandlock", "Failed to apply landlock config during vm_create", failed)
            return self._fail(500, "The VM could not be created", error)
        self.landlocked = True
        probe = self.settings.landlock_probe
        if probe:  # CHDOUBLE_LANDLOCK_PROBE: a test knob, no cloud-hypervisor rule
            try:
                with open(probe, "rb"):
                    outcome = "opened"
            except OSError as exc:
                outcome = f"refused: {exc.strerror} (os error {exc.errno})"
            self.log.info_at("chdouble", f"CHDOUBLE_LANDLOCK_PROBE {probe}: {outcome}")
        return NO_CONTENT

    def _warn_net_defaults(self, config: dict[str, Any]) -> None:
        """v48 vmm/src/vm_config.rs: serde calls default_netconfig_ip/mask for a net entry without them,
        and each warns (v40-v47 assign the same defaults silently; from v49 the fields are optional)."""
        for net in config.get("net") or []:
            if "ip" not in net:
                self.log.warn_at(
                    "vmm/src/vm_config.rs:356",
                    "Deprecation warning: No IP address provided. A default IP address is assigned. This "
                    "behavior will be deprecated soon.",
                )
            if "mask" not in net:
                self.log.warn_at(
                    "vmm/src/vm_config.rs:363",
                    "Deprecation warning: No network mask provided. A default network mask is assigned. This "
                    "behavior will be deprecated soon.",
                )

    def _pre_create_consoles(
        self, config: dict[str, Any], *, api: str = "The VM could not be created"
    ) -> Answer | None:
        """vmm/src/console_devices.rs `pre_create_console_devices`, run by vm.create (vmm/src/lib.rs).

        The console device refuses `Socket` (NoSocketOptionSupportForConsoleDevice); `File` is created with
        truncation; `Pty` opens a pty and writes its path back into the config's `file`, as vm.info shows.
        `vm_restore` runs it too, for the restored config.
        """
        console = config.get("console") or {}
        if console.get("mode") == "Socket" and self.settings.release >= CONSOLE_CHECK_AT_CREATE_SINCE:
            refused = RustError(
                "NoSocketOptionSupportForConsoleDevice", "No socket option support for console device"
            )
            return self._fail(
                500, api, RustError("CreateConsoleDevices", "Error creating console devices", refused)
            )
        for key in ("serial", "console"):
            device = config.get(key) or {}
            if device.get("mode") == "File" and device.get("file"):
                try:
                    with open(device["file"], "w"):
                        pass
                except OSError as exc:
                    return self._fail(
                        500,
                        api,
                        RustError("CreateConsoleDevices", "Error creating console devices", io_error(exc)),
                    )
            elif key == "serial" and device.get("mode") == "Socket":
                try:
                    self._bind_serial(device.get("socket") or "")
                except OSError as exc:
                    return self._fail(500, api, _console_error(exc))
            elif device.get("mode") == "Pty":
                main_fd, sub_fd = os.openpty()
                device["file"] = os.ttyname(sub_fd)
                os.close(sub_fd)
                self.ptys.append(main_fd)
        return None

    # --- the serial port in Socket mode (vmm/src/serial_manager.rs) ------------------------------

    def _bind_serial(self, path: str) -> None:
        """Listen on the serial socket; one client at a time, a new connection replaces the old one.
        Before the first client, output is dropped, and from v53 kept and replayed on connect."""
        self._close_serial()
        with contextlib.suppress(OSError):  # under Landlock the removal fails, and bind then finds it
            os.unlink(path)
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(path)
        listener.listen(1)
        self.serial_path, self.serial_listener = path, listener
        threading.Thread(target=self._accept_serial, args=(listener,), name="serial", daemon=True).start()

    def _accept_serial(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return  # closed: the serial device was re-created or the VMM shut down
            with self.lock:
                if self.serial_listener is not listener:
                    client.close()
                    return
                if self.serial_client is not None:
                    self.serial_client.close()
                self.serial_client = client
                if self.serial_pending:
                    with contextlib.suppress(OSError):
                        client.sendall(self.serial_pending)
                    self.serial_pending = b""

    def _close_serial(self) -> None:
        for sock in (self.serial_client, self.serial_listener):
            if sock is not None:
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
                sock.close()
        self.serial_client = self.serial_listener = None

    def _remove_serial(self) -> None:
        """The serial manager's Drop: the socket file is removed (RemoveUnixSocket)."""
        self._close_serial()
        if self.serial_path:
            with contextlib.suppress(OSError):
                os.unlink(self.serial_path)

    def _guest_output(self, data: bytes) -> None:
        """What the simulated guest writes on its serial port (ttyS0)."""
        serial = (self.config or {}).get("serial") or {}
        if serial.get("mode") == "File" and serial.get("file"):
            with contextlib.suppress(OSError), open(serial["file"], "ab") as out:
                out.write(data)
        elif serial.get("mode") == "Socket":
            if self.serial_client is not None:
                try:
                    self.serial_client.sendall(data)
                except OSError:
                    self.serial_client = None
            elif self.settings.release >= SERIAL_BUFFER_SINCE:
                self.serial_pending = (self.serial_pending + data)[-65536:]

    def op_vm_boot(self) -> Answer:
        with self.lock:
            self.log.info_at("vmm/src/api/mod.rs:1060", "API request event: VmBoot")
            if self.state is not None:
                return self._fail(500, "The VM could not boot", "VM is already created")
            self.log.info_at("vmm/src/lib.rs:2369", "Booting VM")
            self.events.emit("vm", "booting")
            if self.config is None:
                return self._fail(404, "The VM could not boot", "VM config is missing")
            # Vm::new: the config is validated first (vm.rs new_from_memory_manager), then the devices
            # (consoles, then block, then net devices: vmm/src/device_manager.rs create_devices and
            # make_virtio_devices); then Vm::boot locks the disks (from v46) and joins the thread that
            # read the payload, started before the devices
            invalid = validate(self.config, self.settings.release, self.log.warn_at)
            if invalid is not None:
                return self._fail(500, "The VM could not boot", invalid)
            failed = self._create_devices() or self._lock_disks()
            if failed is not None:
                return self._fail(500, "The VM could not boot", failed)
            payload = self.config.get("payload") or {}
            for key, what in (("kernel", "kernel"), ("initramfs", "initramfs"), ("firmware", "firmware")):
                try:  # opened for real, so that Landlock applies (Vm::new's payload thread)
                    if key in payload:
                        os.close(os.open(payload[key], os.O_RDONLY | os.O_CLOEXEC))
                except OSError as exc:
                    self._close_devices()
                    cause = io_error(exc)
                    return self._fail(
                        500,
                        "The VM could not boot",
                        RustError(f"{what.capitalize()}File", f"Cannot open {what} file", cause),
                    )
            if not any(k in payload for k in ("kernel", "firmware", "igvm")):
                self._close_devices()
                return self._fail(500, "The VM could not boot", "No payload to boot")
            if "die-on-boot" in self.settings.faults:
                self.log.error_at("vmm/src/vm.rs:2010", "chdouble fault die-on-boot: vCPU thread panicked")
                self.exit_process(1)
            if self.settings.boot_delay:
                time.sleep(self.settings.boot_delay)
            self.state = "Running"
            self.booted_at = time.monotonic()
            self.events.emit("vm", "booted")
            self._guest_output(b"Linux version chdouble: booting\n")
            self._schedule_reset()
            return NO_CONTENT

    # --- devices (tests/chdouble/disk.py, tests/chdouble/tap.py) --------------------------------

    def _create_devices(self) -> RustError | None:
        """The devices `Vm::new` creates at vm.boot, as a `vm.rs` error if one fails; the VM (with what was
        opened so far) is then dropped. v40 and v41 refuse a `Socket` console here (`add_console_devices`
        runs before the virtio devices); from v42 vm.create refuses it."""
        assert self.config is not None
        if (
            self.settings.release < CONSOLE_CHECK_AT_CREATE_SINCE
            and (self.config.get("console") or {}).get("mode") == "Socket"
        ):
            return device_manager(
                RustError(
                    "NoSocketOptionSupportForConsoleDevice", "No socket option support for console device"
                )
            )
        failed = self._open_disks()
        if failed is None:
            failed = self._open_taps()
        if failed is not None:
            self._close_devices()
        return failed

    def _open_disks(self) -> RustError | None:
        """vmm/src/device_manager.rs `make_virtio_block_devices`: each disk entry's image is opened and typed
        by `make_virtio_block_device`, in order. `vhost_user` entries open nothing (not simulated)."""
        assert self.config is not None
        opener = DiskOpener(self.settings.release, self.log.warn_at)
        for disk in self.config.get("disks") or []:
            if disk.get("vhost_user"):
                continue
            self.log.info_at(
                "vmm/src/device_manager.rs:2700", f"Creating virtio-block device: {_abbreviated(disk)}"
            )
            try:
                self.disks.append(opener.open_disk(disk))
            except ChainError as exc:
                return device_manager(exc.error)
        return None

    def _lock_disks(self) -> RustError | None:
        """vmm/src/vm.rs `Vm::boot`: `try_lock_disks` (from v46) before anything else of the boot."""
        try:
            lock_disks(self.settings.release, self.disks, self.log.error_at)
        except ChainError as exc:
            self._close_devices()
            return exc.error
        return None

    def _open_taps(self) -> RustError | None:
        """vmm/src/device_manager.rs `make_virtio_net_devices`: each net entry with a `tap` gets its queues
        opened by `net_util::open_tap`, in order. Entries without `tap` (cloud-hypervisor would create its
        own vmtapN), with `fds` or with `vhost_user` are not simulated and open nothing."""
        assert self.config is not None
        opener = TapOpener(self.settings.release, self.log.warn_at)
        for net in self.config.get("net") or []:
            if not net.get("tap") and net.get("fds") and not net.get("vhost_user"):
                self.log.info_at(
                    "vmm/src/device_manager.rs:2929",
                    f"Creating virtio-net device: NetConfig {{ tap: None, fds: Some({net['fds']}), .. }}",
                )
                try:
                    self.tap_fds.extend(from_tap_fds(self.settings.release, net["fds"]))
                except ChainError as exc:
                    return exc.error  # the whole chain: from_tap_fds is not open_tap
                continue
            if not net.get("tap") or net.get("vhost_user") or net.get("fds"):
                continue
            self.log.info_at(
                "vmm/src/device_manager.rs:2929",
                f"Creating virtio-net device: NetConfig {{ tap: Some({json.dumps(net['tap'])}), "
                f"num_queues: {net.get('num_queues', 2)}, .. }}",
            )
            try:
                self.tap_fds.extend(opener.open_tap(net))
            except ChainError as exc:
                return boot_chain(exc.error)
        return None

    def _close_devices(self) -> None:
        """The VM's devices are dropped: the `Tap` files close (detaching every queue), the disk images close
        (releasing their locks)."""
        fds, self.tap_fds = self.tap_fds, []
        for fd in fds:
            with contextlib.suppress(OSError):
                os.close(fd)
        disks, self.disks = self.disks, []
        close_disks(disks)

    # --- error answers (vmm/src/api/http/mod.rs error_response) ----------------------------------

    def _fail(self, status: int, api: str, error: RustError | str) -> Answer:
        """An `ApiError` answer: `api` is its text (e.g. "The VM could not boot"), `error` the `vm.rs` error
        under it. From v47 the body is the JSON array of the chain's Display texts; before, it is the text of
        the error's Display alone: v46's thiserror texts embed their source (`"Error from API: {0}"`,
        `"The VM could not boot: {0}"`), v40-v45 display the VM error only (manual `Display` impls in
        api/mod.rs and api/http/mod.rs)."""
        vm = error if isinstance(error, RustError) else RustError("", error)
        if self.settings.release >= JSON_ERRORS_SINCE:
            return _errors(status, API_ERROR, api, *vm.chain())
        text = _display_before_v47(vm)
        if self.settings.release >= THISERROR_API_SINCE:
            text = f"{API_ERROR}: {api}: {text}"
        return Answer(status, text.encode())

    def op_vm_info(self) -> Answer:
        with self.lock:
            self.log.info_at("vmm/src/api/mod.rs:1620", "API request event: VmInfo")
            if self.config is None:
                return self._fail(404, "The VM info is not available", "VM is not created")
            memory = self.config.get("memory") or {}
            info: dict[str, Any] = {
                "config": self.config,
                "state": self.state or "Created",
                "memory_actual_size": int(memory.get("size", DEFAULT_MEMORY)),
            }
            if self.state is not None:
                info["device_tree"] = self._device_tree()
            return _json(200, info)

    def op_vm_counters(self) -> Answer:
        with self.lock:
            self.log.info_at("vmm/src/api/mod.rs:1408", "API request event: VmCounters")
            if self.state is None:
                return self._fail(500, "The VM info is not available", "VM is not running")
            ticks = int((time.monotonic() - self.booted_at) * 1000)
            counters: dict[str, dict[str, int]] = {}
            for device in self._devices("disks", "_disk"):
                counters[device] = {
                    "read_bytes": ticks * 512,
                    "write_bytes": ticks * 64,
                    "read_ops": ticks,
                    "write_ops": ticks // 8,
                    "read_latency_min": 10,
                    "read_latency_max": 90,
                    "read_latency_avg": 30,
                    "write_latency_min": 20,
                    "write_latency_max": 120,
                    "write_latency_avg": 45,
                }
            for device in self._devices("net", "_net"):
                counters[device] = {
                    "rx_bytes": ticks * 100,
                    "rx_frames": ticks,
                    "tx_bytes": ticks * 80,
                    "tx_frames": ticks,
                }
            return _json(200, counters)

    def op_vm_pause(self) -> Answer:
        with self.lock:
            self.log.info_at("vmm/src/api/mod.rs:1700", "API request event: VmPause")
            if self.state is None:
                return self._fail(500, "The VM could not be paused", "VM is not running")
            self.events.emit("vm", "pausing")
            if self.state != "Running":
                transition = RustError(
                    "InvalidStateTransition", f"invalid VM state transition: {self.state} to Paused"
                )
                component = RustError("MigratablePause", "Failed to pause migratable component", transition)
                return self._fail(
                    500, "The VM could not be paused", RustError("Pause", "Cannot pause VM", component)
                )
            self.state = "Paused"
            self.events.emit("vm", "paused")
            return NO_CONTENT

    def op_vm_resume(self) -> Answer:
        with self.lock:
            self.log.info_at("vmm/src/api/mod.rs:1760", "API request event: VmResume")
            if self.state is None:
                return self._fail(500, "The VM could not resume", "VM is not running")
            self.events.emit("vm", "resuming")
            if self.state == "Running":
                transition = RustError(
                    "InvalidStateTransition", "invalid VM state transition: Running to Running"
                )
                component = RustError("MigratableResume", "Failed to resume migratable component", transition)
                return self._fail(
                    500, "The VM could not resume", RustError("Resume", "Cannot resume VM", component)
                )
            self.state = "Running"
            self.events.emit("vm", "resumed")
            if self.poweroff_pending:
                self.poweroff_pending = False
                self._schedule_poweroff()
            return NO_CONTENT

    # --- snapshot and restore (vmm/src/lib.rs vm_snapshot/vm_restore, vmm/src/vm.rs, migration/mod.rs) --

    def op_vm_snapshot(self, request: dict[str, Any]) -> Answer:
        """`Vmm::vm_snapshot`: only a VM that exists ("VM is not running" otherwise), only paused
        (`Vm::snapshot`: "Trying to snapshot while VM is running", after the `snapshotting` event); then
        `Vm::send` writes config.json and state.json and the memory manager memory-ranges, each
        `create_new` in the existing directory of the `file://` URL. The VM stays paused."""
        api = "The VM could not be snapshotted"
        with self.lock:
            self.log.info_at("vmm/src/api/mod.rs:1810", f"API request event: VmSnapshot {request}")
            if self.state is None or self.config is None:
                return self._fail(500, api, "VM is not running")
            self.events.emit("vm", "snapshotting")
            if self.state != "Paused":
                refused = RustError(
                    "Snapshot",
                    "Failed to snapshot migratable component",
                    RustError("", "Trying to snapshot while VM is running"),
                )
                return self._fail(500, api, RustError("Snapshot", "Cannot snapshot VM", refused))
            self.events.emit("vm", "snapshotted")
            failed = self._send_snapshot(str(request.get("destination_url", "")))
            if failed is not None:
                return self._fail(500, api, RustError("SnapshotSend", "Cannot send VM snapshot", failed))
            return NO_CONTENT

    def _send_snapshot(self, url: str) -> RustError | None:
        """`Transportable::send` of `Vm` and of `MemoryManager`: the files, or the MigrateSend error."""
        assert self.config is not None
        directory = _url_to_path(url, "Failed to send migratable component snapshot", "MigrateSend")
        if isinstance(directory, RustError):
            return directory
        memory = int((self.config.get("memory") or {}).get("size", DEFAULT_MEMORY))
        state = {  # the double's own stand-in for the Snapshot tree (cpu, memory and device managers)
            "snapshots": {
                "cpu-manager": {"snapshots": {}, "snapshot_data": None},
                "memory-manager": {"snapshots": {}, "snapshot_data": {"chdouble_memory_size": memory}},
                "device-manager": {"snapshots": {}, "snapshot_data": None},
            },
            "snapshot_data": {"chdouble": {"release": self.settings.release, "state": self.state}},
        }
        files = (
            (
                SNAPSHOT_CONFIG_FILE,
                "Error creating VM config snapshot file",
                json.dumps(self.config).encode(),
            ),
            (SNAPSHOT_STATE_FILE, "Error creating VM state snapshot file", json.dumps(state).encode()),
            (MEMORY_SNAPSHOT_FILE, "", b""),
        )
        for name, context, data in files:
            path = os.path.join(directory, name)
            try:
                fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
            except OSError as exc:
                text = context or f"Error creating memory snapshot file {rust_str(path)}"
                return RustError(
                    "MigrateSend",
                    "Failed to send migratable component snapshot",
                    RustError("", text, io_error(exc)),
                )
            with os.fdopen(fd, "wb") as out:
                if name == MEMORY_SNAPSHOT_FILE:
                    out.truncate(memory)  # the guest's RAM, sparse: the double has no guest memory
                else:
                    out.write(data)
        return None

    def op_vm_restore(
        self,
        request: dict[str, Any],
        net_fds: list[dict[str, Any]] | None = None,
        files: list[int] | None = None,
    ) -> Answer:
        """`Vmm::vm_restore` on a VMM without a VM (else "VM is already created"): config.json and
        state.json read from the `file://` directory (`recv_vm_config`, `recv_vm_state`), the config
        validated and the devices made as `Vm::new` does at boot (consoles pre-created, TAPs opened by the
        names in the config, disks opened), then `Vm::restore` locks the disks (from v46); the VM is
        Paused, and from v52 `resume: true` runs it (`vm_resume`). A failure from v44 deletes the VM
        again; v40 to v43 keep its config once it was read."""
        api = "The VM could not be restored"
        with self.lock:
            self.log.info_at("vmm/src/api/mod.rs:1670", f"API request event: VmRestore {request}")
            if self.config is not None or self.state is not None:
                return self._fail(500, api, "VM is already created")
            url = str(request.get("source_url", ""))
            config = self._recv(url, SNAPSHOT_CONFIG_FILE, "VM config")
            if isinstance(config, RustError):
                return self._fail(500, api, RustError("Restore", "Cannot restore VM", config))
            snapshot = self._recv(url, SNAPSHOT_STATE_FILE, "VM state")
            if isinstance(snapshot, RustError):
                return self._fail(500, api, RustError("Restore", "Cannot restore VM", snapshot))
            invalid = _restore_validate(net_fds, config)
            if invalid is not None:  # lib.rs vm_restore: VmError::ConfigValidation
                refused = RustError("ConfigValidation", "Failed to validate config", invalid)
                return self._fail(500, api, refused)
            for restored in net_fds or []:  # lib.rs vm_restore: only nets backed by descriptors
                for net in config.get("net") or []:
                    if net.get("id") == restored["id"] and net.get("fds") is not None:
                        net["fds"] = list(restored["fds"])
            taken = [fd for restored in net_fds or [] for fd in restored["fds"]]
            if files is not None:
                files[:] = [fd for fd in files if fd not in taken]
            self.passed_fds.extend(taken)
            self.config = config
            failed = self._restore_vm(config)
            if failed is not None:
                if self.settings.release >= RESTORE_DELETES_SINCE:
                    self._vm_delete()
                return failed
            if request.get("resume") and self.settings.release >= RESTORE_FIELDS_SINCE:
                self.events.emit("vm", "resuming")
                self.state = "Running"
                self.events.emit("vm", "resumed")
            return NO_CONTENT

    def _restore_vm(self, config: dict[str, Any]) -> Answer | None:
        api = "The VM could not be restored"
        refused = self._pre_create_consoles(config, api=api)
        if refused is not None:
            return refused
        invalid = validate(config, self.settings.release, self.log.warn_at)
        if invalid is not None:
            return self._fail(500, api, invalid)
        failed = self._create_devices()  # Vm::new with the snapshot
        if (
            failed is None
            and config.get("landlock_enable")
            and self.settings.release >= landlock.LANDLOCK_SINCE
        ):
            # vmm/src/lib.rs vm_restore (v41.0-v53.0): the restored config's rules, after Vm::new
            failed = landlock.restrict(landlock.config_rules(config, self.settings.release))
            if failed is not None:
                self._close_devices()
                failed = RustError(
                    "ApplyLandlock", "Failed to apply landlock config during vm_create", failed
                )
            else:
                self.landlocked = True
        if failed is None:
            self.events.emit("vm", "restoring")  # Vm::restore: the disk locks again, then the vCPUs
            failed = self._lock_disks()
        if failed is not None:
            return self._fail(500, api, failed)
        if self.settings.restore_delay:
            time.sleep(self.settings.restore_delay)
        self.state = "Paused"
        self.booted_at = time.monotonic()
        self.events.emit("vm", "restored")
        return None

    def _recv(self, url: str, name: str, what: str) -> dict[str, Any] | RustError:
        """`recv_vm_config`/`recv_vm_state` (vmm/src/migration/mod.rs): `url_to_path` (its error is a
        MigrateSend, whatever the direction), then the file opened, read and deserialised."""
        directory = _url_to_path(url, "Failed to send migratable component snapshot", "MigrateSend")
        if isinstance(directory, RustError):
            return directory
        path = os.path.join(directory, name)
        receive = "Failed to receive migratable component snapshot"
        try:
            with open(path, "rb") as source:
                data = source.read()
        except OSError as exc:
            context = RustError("", f"Error opening {what} snapshot file {rust_str(path)}", io_error(exc))
            return RustError("MigrateReceive", receive, context)
        try:
            value = json.loads(data)
        except ValueError as exc:
            context = RustError("", f"Error deserialising {what} snapshot", RustError("", str(exc)))
            return RustError("MigrateReceive", receive, context)
        if not isinstance(value, dict):
            context = RustError(
                "", f"Error deserialising {what} snapshot", RustError("", "expected a struct")
            )
            return RustError("MigrateReceive", receive, context)
        return value

    def op_vm_power_button(self) -> Answer:
        with self.lock:
            self.log.info_at("vmm/src/api/mod.rs:2100", "API request event: VmPowerButton")
            if self.state is None:
                return self._fail(500, "Error triggering power button", "VM is not running")
            if "ignore-power-button" in self.settings.faults:
                self.log.info_at("chdouble", "fault ignore-power-button: the guest ignores the power button")
            elif self.state == "Paused":
                self.poweroff_pending = True  # a paused guest reacts once resumed
            elif self._timer is None:
                self._schedule_poweroff()
            return NO_CONTENT

    def op_vm_nmi(self) -> Answer:
        with self.lock:
            if self.state is None:
                return self._fail(500, "Error triggering NMI", "VM is not running")
            return NO_CONTENT

    def op_vm_shutdown(self) -> Answer:
        with self.lock:
            self.log.info_at("vmm/src/api/mod.rs:1830", "API request event: VmShutdown")
            self._maybe_hang("vm.shutdown")
            if self.state is None:
                return self._fail(500, "The VM could not shutdown", "VM is not running")
            self._vm_shutdown()
            return NO_CONTENT

    def op_vm_reboot(self) -> Answer:
        with self.lock:
            self.log.info_at("vmm/src/api/mod.rs:1880", "API request event: VmReboot")
            self.events.emit("vm", "rebooting")
            if self.state is None:
                return self._fail(404, "The VM could not reboot", "VM is not created")
            self._cancel_poweroff()
            failed = self._reboot()
            if failed is not None:
                return self._fail(500, "The VM could not reboot", failed)
            return NO_CONTENT

    def _reboot(self) -> RustError | None:
        """vmm/src/lib.rs `vm_reboot` (v40 to v53): the VM is rebuilt inside the same process, and
        `pre_create_console_devices` runs again, so `File` consoles are created anew (emptied). The old VM
        is dropped first (its TAP queues closed), then the new one opens them again; if that fails, there
        is no VM any more (vm.info: Created) and the error is returned."""
        assert self.config is not None
        self._close_devices()
        for key in ("serial", "console"):
            device = self.config.get(key) or {}
            if device.get("mode") == "File" and device.get("file"):
                with contextlib.suppress(OSError), open(device["file"], "w"):
                    pass
            elif key == "serial" and device.get("mode") == "Socket":
                try:
                    self._bind_serial(device.get("socket") or "")
                except OSError as exc:  # e.g. under Landlock, which grants no MakeSock in its directory
                    self._cancel_poweroff()
                    self.state = None
                    return _console_error(exc)
        failed = self._create_devices() or self._lock_disks()
        if failed is not None:
            self._cancel_poweroff()
            self.state = None
            return failed
        self.state = "Running"
        self.booted_at = time.monotonic()
        self.events.emit("vm", "rebooted")
        self._guest_output(b"Linux version chdouble: booting again\n")
        self._schedule_reset()
        return None

    def _schedule_reset(self) -> None:
        """CHDOUBLE_GUEST_RESET: the guest panics that long after each boot; under `panic=-1` the kernel
        resets the machine, which cloud-hypervisor serves as a reboot (no `vm shutdown` event)."""
        if self.settings.guest_reset is None:
            return
        timer = threading.Timer(self.settings.guest_reset, self._guest_reset, args=(self.booted_at,))
        timer.name = "guest-reset"
        timer.daemon = True
        timer.start()

    def _guest_reset(self, booted_at: float) -> None:
        with self.lock:
            if self.state != "Running" or self.booted_at != booted_at or self.exiting or self.config is None:
                return
            self._guest_output(b"Kernel panic - not syncing: chdouble guest reset\n")
            self.log.info_at("vmm/src/lib.rs:2151", "VM reset event")
            self.events.emit("vm", "rebooting")
            failed = self._reboot()
            if failed is None:
                return
            # the control loop's `self.vm_reboot().map_err(Error::VmReboot)?` ends the VMM thread, and main
            # reports it (cloud-hypervisor/src/main.rs Error::VmmThread) and exits 1
            top = RustError(
                "VmmThread",
                "VMM thread exited with error",
                RustError("VmReboot", "Error rebooting VM", failed),
            )
            _fatal(self.log, top.debug(), top.chain())
            self.exiting = True
        self.exit_process(1)

    def op_vm_delete(self) -> Answer:
        with self.lock:
            self.log.info_at("vmm/src/api/mod.rs:1500", "API request event: VmDelete")
            self._vm_delete()
            return NO_CONTENT

    def op_vmm_shutdown(self) -> Answer:
        with self.lock:
            self.log.info_at("vmm/src/api/mod.rs:2045", "API request event: VmmShutdown")
            self._maybe_hang("vmm.shutdown")
            self._vmm_shutdown()
            return Answer(200, b"", then=lambda: self.exit_process(0))

    # --- the VMM's inner steps ------------------------------------------------------------------

    def _vm_shutdown(self) -> None:
        self._cancel_poweroff()
        self._close_devices()
        self.state = None
        self.events.emit("vm", "shutdown")

    def _vm_delete(self) -> None:
        if self.config is None:
            return
        if self.state is not None:
            self._vm_shutdown()
        self.config = None
        fds, self.passed_fds = self.passed_fds, []
        for fd in fds:
            with contextlib.suppress(OSError):
                os.close(fd)
        self.events.emit("vm", "deleted")

    def _vmm_shutdown(self) -> None:
        self._vm_delete()
        self._remove_serial()
        self.events.emit("vmm", "shutdown")
        self.exiting = True

    def on_signal(self, signum: int) -> None:
        """SIGTERM/SIGINT: the VMM shuts down and the process exits 0 (once the VMM thread is free)."""
        self.log.info_at("vmm/src/lib.rs:800", f"Received signal {signum}, shutting down")
        with self.lock:
            self._vmm_shutdown()
        self.exit_process(0)

    def hang(self) -> None:
        """CHDOUBLE_HANG_AFTER: the VMM thread takes its lock and never lets go, as a VMM stuck in an
        ioctl would; every request waits for it, so none is answered."""
        self.log.warn_at("chdouble", "CHDOUBLE_HANG_AFTER: the VMM thread hangs; no request is answered")
        self.recorder.write({"kind": "process", "what": "hang", "pid": os.getpid(), "t": time.monotonic()})
        with self.lock:
            while True:
                time.sleep(3600)

    def _maybe_hang(self, what: str) -> None:
        if "hang-on-shutdown" not in self.settings.faults:
            return
        self.log.warn_at("chdouble", f"fault hang-on-shutdown: {what} never completes")
        while True:  # holding the VMM lock, as a stuck VMM thread would
            time.sleep(3600)

    # --- the simulated guest --------------------------------------------------------------------

    def _schedule_poweroff(self) -> None:
        pressed = time.monotonic()
        timer = threading.Timer(self.settings.poweroff_delay, self._guest_poweroff, args=(pressed,))
        timer.name = "guest"
        timer.daemon = True
        self._timer = timer
        timer.start()

    def _cancel_poweroff(self) -> None:
        self.poweroff_pending = False
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _guest_poweroff(self, pressed: float) -> None:
        exit_now = False
        with self.lock:
            if self._timer is None or threading.current_thread() is not self._timer or self.exiting:
                return
            self._timer = None
            if self.state is None:
                return
            if self.state == "Paused":
                self.poweroff_pending = True
                return
            self.log.info_at("vmm/src/lib.rs:2151", "VM guest exit event")
            if self.settings.no_shutdown:
                self._vm_shutdown()
            else:
                self._vmm_shutdown()
                exit_now = True
            done = time.monotonic()
            self.recorder.write(
                {"kind": "guest", "what": "poweroff", "pid": self.pid, "t_start": pressed, "t_done": done}
            )
        if exit_now:
            self.exit_process(0)

    # --- views ----------------------------------------------------------------------------------

    def _devices(self, key: str, prefix: str) -> list[str]:
        assert self.config is not None
        items = self.config.get(key) or []
        return [str(item.get("id") or f"{prefix}{i}") for i, item in enumerate(items)]

    def _device_tree(self) -> dict[str, Any]:
        tree: dict[str, Any] = {}
        devices = self._devices("disks", "_disk") + self._devices("net", "_net")
        for slot, device in enumerate(devices, start=1):
            tree[device] = {"id": device, "resources": [], "children": [], "pci_bdf": f"0000:00:{slot:02x}.0"}
        return tree


class VmmThread:
    """The VMM thread (vmm/src/lib.rs `start_vmm_thread`): the HTTP threads hand it each request and wait
    for its answer (vmm/src/api/mod.rs `ApiRequest`), so what it restricts itself to at vm.create
    (Landlock) holds for every later request and for the threads it starts."""

    def __init__(self) -> None:
        self._requests: queue.SimpleQueue[
            tuple[Callable[[], Answer], list[Answer | BaseException], threading.Event]
        ]
        self._requests = queue.SimpleQueue()
        threading.Thread(target=self._run, name="vmm", daemon=True).start()

    def _run(self) -> None:
        while True:
            work, result, done = self._requests.get()
            try:
                result.append(work())
            except BaseException as exc:  # handed back to the HTTP thread that asked
                result.append(exc)
            done.set()

    def call(self, work: Callable[[], Answer]) -> Answer:
        result: list[Answer | BaseException] = []
        done = threading.Event()
        self._requests.put((work, result, done))
        done.wait()
        if isinstance(result[0], BaseException):
            raise result[0]
        return result[0]


def _restored_nets(net_fds: Any, files: list[int]) -> list[dict[str, Any]] | Answer | None:
    """vm.restore's `net_fds` with the request's descriptors given out in order, `num_fds` each
    (vmm/src/api/http/http_endpoint.rs `VmRestore`: v40.0 by hand, v53.0 `attach_fds_to_cfgs`); another
    count of descriptors than their sum is 400 Bad Request."""
    if net_fds is None:
        return None
    if not isinstance(net_fds, list) or not all(
        isinstance(n, dict) and isinstance(n.get("id"), str) and isinstance(n.get("num_fds"), int)
        for n in net_fds
    ):
        return _errors(400, "Failed to deserialize JSON", "net_fds: expected [{id, num_fds}]")
    if sum(n["num_fds"] for n in net_fds) != len(files):
        return BAD_REQUEST
    out, start = [], 0
    for n in net_fds:
        out.append({"id": n["id"], "num_fds": n["num_fds"], "fds": files[start : start + n["num_fds"]]})
        start += n["num_fds"]
    return out


def _restore_validate(net_fds: list[dict[str, Any]] | None, config: dict[str, Any]) -> RustError | None:
    """vmm/src/config.rs `RestoreConfig::validate` (v40.0, v53.0; the texts the same from v40): every net of
    the snapshot's config backed by descriptors needs a `net_fds` entry of its id with as many."""
    given: dict[str, dict[str, Any]] = {}
    for n in net_fds or []:
        if n["id"] in given:
            return RustError("IdentifierNotUnique", f"Identifier {n['id']} is not unique")
        given[n["id"]] = n
    for net in config.get("net") or []:
        fds = net.get("fds")
        if fds is None:
            continue
        ident = str(net.get("id"))
        found = given.pop(ident, None)
        if found is None:
            text = f"Net id {ident} is associated with FDs and is required"
            return RustError("RestoreMissingRequiredNetId", text)
        if found["num_fds"] != len(fds):
            passed = found["num_fds"]
            text = f"Number of Net FDs passed for '{ident}' during Restore: {passed}. Expected: {len(fds)}"
            return RustError("RestoreNetFdCountMismatch", text)
    return None


class ApiServer(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    """micro_http stand-in: HTTP/1.1 with keep-alive on an already listening UNIX socket."""

    daemon_threads = True
    block_on_close = False

    def __init__(self, listener: socket.socket, vmm: Vmm, recorder: Recorder) -> None:
        super().__init__("", _Handler, bind_and_activate=False)
        self.socket.close()
        self.socket = listener
        self.vmm = vmm
        self.vmm_thread = VmmThread()
        self.recorder = recorder
        self.accepted_at: dict[int, float] = {}  # connection fd -> when it was accepted

    def get_request(self) -> tuple[socket.socket, Any]:
        connection, address = self.socket.accept()
        self.accepted_at[connection.fileno()] = time.monotonic()
        return connection, address

    def handle_error(self, request: Any, client_address: Any) -> None:  # noqa: ARG002 - the stdlib signature
        # A client that went away (e.g. gave up waiting): one log line, as micro_http logs, no traceback.
        self.vmm.log.error_at(
            "vmm/src/api/http/mod.rs:409", f"HTTP server error on response: {sys.exc_info()[1]!r}"
        )


SCM_MAX_FD = 253  # the most descriptors one recvmsg takes (micro_http's connection.rs, the kernel's)


class _FdReader(io.RawIOBase):
    """A connection's bytes as micro_http reads them (src/connection.rs `recv_with_fds`, at the commits
    cloud-hypervisor v40.0 and v53.0 pin): each read also takes the descriptors sent with the bytes, and
    they wait on the connection (`files`) for the request they complete."""

    def __init__(self, connection: socket.socket) -> None:
        super().__init__()
        self.connection = connection
        self.files: list[int] = []

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        data, fds, _flags, _address = socket.recv_fds(self.connection, len(buffer), SCM_MAX_FD)
        self.files.extend(fds)
        buffer[: len(data)] = data
        return len(data)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    _arrived = 0.0
    _accepted: float | None = None

    def setup(self) -> None:
        super().setup()
        server = self.server
        assert isinstance(server, ApiServer)
        self._accepted = server.accepted_at.pop(self.connection.fileno(), None)
        self._files = _FdReader(self.connection)
        self.rfile = io.BufferedReader(self._files)

    def parse_request(self) -> bool:
        # When the request reached the double: for the first request on a connection, when the connection
        # was accepted (thread start-up and parsing are the double's own time), else when its line arrived.
        self._arrived = self._accepted if self._accepted is not None else time.monotonic()
        self._accepted = None
        # micro_http reads into a 1024-byte buffer (connection.rs BUFFER_SIZE) and needs a whole line,
        # CR LF included, in it: a longer request line is "Invalid request.", a longer header line is
        # reported with the buffer's 1024 bytes (parse_request_line, parse_headers)
        if len(getattr(self, "raw_requestline", b"")) > MAX_LINE:  # set by handle_one_request
            return self._refuse("Invalid request.")
        if not super().parse_request():
            return False
        for name, value in self.headers.raw_items():
            line = f"{name}: {value}".encode()
            if len(line) + 2 > MAX_LINE:
                shown = line[:MAX_LINE].decode("utf-8", errors="replace")
                return self._refuse(f"Invalid header. Reason: Invalid content length. Header: {shown}")
        return True

    def _refuse(self, message: str) -> bool:
        self.close_connection = True
        self.request_version = "HTTP/1.1"  # micro_http answers HTTP/1.1 whatever it could not parse
        self._send(_micro_http_error(message))
        return False

    def do_GET(self) -> None:
        self._serve()

    def do_PUT(self) -> None:
        self._serve()

    def do_PATCH(self) -> None:
        self._serve()

    def do_DELETE(self) -> None:
        self._serve()

    def do_POST(self) -> None:
        self._unsupported()

    def do_HEAD(self) -> None:
        self._unsupported()

    def do_OPTIONS(self) -> None:
        self._unsupported()

    def _unsupported(self) -> None:
        self.close_connection = True
        self._send(_micro_http_error("Invalid HTTP Method: Unsupported HTTP method."))

    def _serve(self) -> None:
        received = self._arrived or time.monotonic()
        threading.current_thread().name = "http-server"  # the VMM thread (VmmThread) answers
        server = self.server
        assert isinstance(server, ApiServer)
        body: bytes | None = None
        answer: Answer | None = None
        try:
            length = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            answer = _micro_http_error("Invalid request.")
            length = 0
        if self.headers.get("Transfer-Encoding"):
            answer = _micro_http_error("Invalid request.")
        if answer is None and length > MAX_PAYLOAD_SIZE:  # refused before the body is read
            answer = _micro_http_error(
                f"Request payload with size {length} is larger than the limit of {MAX_PAYLOAD_SIZE} "
                "allowed by server."
            )
            length = 0
        if answer is None and length > 0:
            body = self.rfile.read(length)
            if self.command in ("GET", "DELETE"):
                answer = _micro_http_error("Invalid request.")
        if answer is None:
            try:
                command, path = self.command, self.path
                files, self._files.files = self._files.files, []
                answer = server.vmm_thread.call(lambda: server.vmm.answer(command, path, body, files))
            except Exception as exc:  # a bug in the double: say so rather than drop the connection
                server.vmm.log.error_at("chdouble", f"internal error: {exc!r}")
                answer = _errors(500, "chdouble: internal error", repr(exc))
        else:
            self.close_connection = True
        self._send(answer)
        done = time.monotonic()
        server.recorder.write(
            {
                "kind": "request",
                "pid": server.vmm.pid,
                "method": self.command,
                "path": self.path,
                "headers": {k.lower(): v for k, v in self.headers.items()},
                "body": None if body is None else body.decode("utf-8", errors="replace"),
                "status": answer.status,
                "t_recv": received,
                "t_done": done,
            }
        )
        if answer.then is not None:
            answer.then()

    def _send(self, answer: Answer) -> None:
        closing = self.close_connection  # send_header("Connection", "keep-alive") would reset it
        self.send_response_only(answer.status, "")  # micro_http sends no reason phrase
        self.send_header("Server", "Cloud Hypervisor API")
        self.send_header("Connection", "keep-alive")
        self.close_connection = closing
        if answer.body is not None:
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(answer.body)))
        self.end_headers()
        if answer.body:
            self.wfile.write(answer.body)
        self.wfile.flush()

    def log_message(self, format: str, *args: Any) -> None:  # the stdlib's signature
        pass


# --- the command line ---------------------------------------------------------------------------

_VALUE_FLAGS = (
    "api-socket",
    "balloon",
    "cmdline",
    "console",
    "cpus",
    "dbus-object-path",
    "dbus-service-name",
    "debug-console",
    "event-monitor",
    "firmware",
    "fw-cfg-config",
    "gdb",
    "igvm",
    "host-data",
    "initramfs",
    "ivshmem",
    "kernel",
    "log-file",
    "log-format",
    "memory",
    "platform",
    "restore",
    "rng",
    "serial",
    "tpm",
    "vsock",
)
_MULTI_FLAGS = (
    "device",
    "disk",
    "fs",
    "generic-vhost-user",
    "landlock-rules",
    "memory-zone",
    "net",
    "numa",
    "pci-segment",
    "pmem",
    "rate-limit-group",
    "user-device",
    "vdpa",
)
_SWITCHES = ("dbus-system-bus", "landlock", "no-shutdown", "pvmemcontrol", "pvpanic", "watchdog")
_VM_FLAGS = ("kernel", "firmware", "igvm", "restore")


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="cloud-hypervisor",
        allow_abbrev=False,
        usage="%(prog)s [OPTIONS]",
        description="Test double of cloud-hypervisor (runs no guest).",
    )
    for name in _VALUE_FLAGS:
        parser.add_argument(f"--{name}")
    for name in _MULTI_FLAGS:
        parser.add_argument(f"--{name}", nargs="+", action="append")
    for name in _SWITCHES:
        parser.add_argument(f"--{name}", action="store_true")
    parser.add_argument("--rtc", nargs="?", const="")
    parser.add_argument("--seccomp", choices=("true", "false", "log", "errno"), default="true")
    parser.add_argument("-v", action="count", default=0, dest="verbosity")
    parser.add_argument("-V", "--version", action="store_true")
    return parser.parse_args(argv)


def _landlock_flags(argv: Sequence[str], acting_as: int) -> str:
    """clap's refusals of `--landlock`/`--landlock-rules` (cloud-hypervisor/src/main.rs; src/main.rs to
    v49): unknown before v41; from v44 in the `vm-config` group, which `.requires("vm-payload")`, so only
    with `--kernel`, `--firmware` or `--igvm`. The usage lines after the first are not copied."""
    given = [a.split("=", 1)[0] for a in argv if a.startswith("--")]
    flags = [f for f in ("--landlock", "--landlock-rules") if f in given]
    if not flags:
        return ""
    if acting_as < landlock.LANDLOCK_SINCE:
        return (
            f"error: unexpected argument '{flags[0]}' found\n\nUsage: cloud-hypervisor [OPTIONS]\n\n"
            "For more information, try '--help'."
        )
    if acting_as >= landlock.PAYLOAD_REQUIRED_SINCE and not {"--kernel", "--firmware", "--igvm"} & set(given):
        return (
            "error: the following required arguments were not provided:\n  <--firmware <firmware>|--kernel "
            "<kernel>>\n\nUsage: cloud-hypervisor [OPTIONS]\n\nFor more information, try '--help'."
        )
    return ""


def _option(value: str, keys: tuple[str, ...]) -> dict[str, str]:
    """cloud-hypervisor's OptionParser for `k=v,k=v` values (only `keys` are known)."""
    found: dict[str, str] = {}
    for part in value.split(","):
        key, sep, val = part.partition("=")
        if sep and key in keys:
            found[key] = val
    return found


def _fatal(log: Log, debug: str, chain: Sequence[str]) -> int:
    log.error_at("cloud-hypervisor/src/lib.rs:24", f"Fatal error: {debug}")
    if len(chain) == 1:
        print(f"Error: Cloud Hypervisor exited with the following error:\n  {chain[0]}", file=sys.stderr)
    else:
        print("Error: Cloud Hypervisor exited with the following chain of errors:", file=sys.stderr)
        for level, message in enumerate(chain):
            print(f"  {level}: {message}", file=sys.stderr)
    return 1


def main(argv: Sequence[str] | None = None) -> int:
    started = time.monotonic()
    args_list = list(sys.argv[1:] if argv is None else argv)
    try:
        acting_as = release()
    except UsageError as exc:
        print(f"chdouble: {exc}", file=sys.stderr)
        return 2
    if acting_as < NO_SHUTDOWN_SINCE and "--no-shutdown" in args_list:
        # clap's answer to an argument the release does not define (cloud-hypervisor/src/main.rs)
        print(
            "error: unexpected argument '--no-shutdown' found\n\nUsage: cloud-hypervisor [OPTIONS]\n\n"
            "For more information, try '--help'.",
            file=sys.stderr,
        )
        return 2
    refused = _landlock_flags(args_list, acting_as)
    if refused:
        print(refused, file=sys.stderr)
        return 2
    args = parse_args(args_list)
    if args.version:
        # src/main.rs: "{CARGO_BIN_NAME} {BUILD_VERSION}"; build.rs makes BUILD_VERSION "v" + the crate
        # version unless `git describe --dirty` answers (a Nix build from a tarball has no .git)
        print(f"cloud-hypervisor v{acting_as}.0.0")
        return 0
    try:
        settings = Settings.from_env(no_shutdown=args.no_shutdown)
    except UsageError as exc:
        print(f"chdouble: {exc}", file=sys.stderr)
        return 2
    recorder = Recorder(os.environ.get("CHDOUBLE_RECORD"))
    recorder.write({"kind": "process", "what": "start", "pid": os.getpid(), "argv": args_list, "t": started})
    try:
        log_stream: IO[str] = open(args.log_file, "w") if args.log_file else sys.stderr  # noqa: SIM115
    except OSError as exc:
        print(
            "Error: Cloud Hypervisor exited with the following chain of errors:\n"
            "  0: Error creating log file"
            f"\n  1: {exc.strerror} (os error {exc.errno})",
            file=sys.stderr,
        )
        return 1
    log = Log(log_stream, args.verbosity, started)
    log.info_at("cloud-hypervisor/src/main.rs:680", f"v{acting_as}.0 starting")
    if "die-at-start" in settings.faults:
        return _fatal(
            log,
            "CreateHypervisor(HypervisorCreate(no supported hypervisor))",
            (
                "Failed to open hypervisor interface (is hypervisor interface available?)",
                "Failed to create the hypervisor",
                "no supported hypervisor",
            ),
        )
    if any(getattr(args, flag.replace("-", "_")) for flag in _VM_FLAGS):
        log.warn_at("chdouble", "VM configuration flags are accepted but ignored: create the VM over the API")

    events_stream: IO[str] | None = None
    if args.event_monitor is not None:
        monitor = _option(args.event_monitor, ("path", "fd"))
        try:
            if "fd" in monitor:
                events_stream = os.fdopen(int(monitor["fd"]), "w")
            elif "path" in monitor:
                events_stream = open(monitor["path"], "w")  # noqa: SIM115
            else:
                return _fatal(
                    log, "BareEventMonitor", ("Error parsing --event-monitor: path or fd required",)
                )
        except (OSError, ValueError) as exc:
            return _fatal(log, f"EventMonitorIo({exc})", ("Error opening event monitor file", str(exc)))
    events = Events(events_stream, started, log)
    events.emit("vmm", "starting")

    listener: socket.socket | None = None
    socket_path: str | None = None
    if args.api_socket is not None:
        api = _option(args.api_socket, ("path", "fd"))
        try:
            if "fd" in api:
                listener = socket.socket(fileno=int(api["fd"]))
            else:
                socket_path = api.get("path", args.api_socket)
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(socket_path)
                listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                listener.bind(socket_path)
                listener.listen(16)
        except (OSError, ValueError) as exc:
            return _fatal(
                log,
                f"CreateApiServerSocket({exc})",
                ("Failed to start the VMM thread", "Error creating API server's socket", str(exc)),
            )

    exiting = threading.Lock()

    def exit_process(code: int) -> None:
        # One exit per process, as the real VMM's: the guest's poweroff (before v52, no --no-shutdown) and a
        # vmm.shutdown request may both get here; the second waits for the first's os._exit.
        exiting.acquire()
        recorder.write(
            {"kind": "process", "what": "exit", "pid": os.getpid(), "code": code, "t": time.monotonic()}
        )
        if code == 0:
            log.info_at("cloud-hypervisor/src/main.rs:1011", "Cloud Hypervisor exited successfully")
            if socket_path is not None:
                with contextlib.suppress(OSError):
                    os.unlink(socket_path)
        for stream in (events_stream, log_stream, sys.stdout, sys.stderr):
            with contextlib.suppress(OSError, ValueError, AttributeError):
                stream.flush()  # type: ignore[union-attr]
        os._exit(code)

    vmm = Vmm(
        settings=settings,
        events=events,
        log=log,
        exit_process=exit_process,
        spec=SpecCheck(settings.validate),
        recorder=recorder,
    )
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda sig, _frame: vmm.on_signal(sig))

    if listener is None or "no-answer" in settings.faults:
        if listener is not None:
            log.warn_at("chdouble", "fault no-answer: the API socket is never served")
        while True:
            signal.pause()
    if settings.start_delay:
        time.sleep(settings.start_delay)
    server = ApiServer(listener, vmm, recorder)
    if settings.hang_after is not None:
        hang = threading.Timer(settings.hang_after, vmm.hang)
        hang.name, hang.daemon = "hang", True
        hang.start()
    recorder.write({"kind": "process", "what": "ready", "pid": os.getpid(), "t": time.monotonic()})
    server.serve_forever(poll_interval=0.5)
    return 0
