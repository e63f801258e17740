"""The cloud-hypervisor test double itself, over a real UNIX socket: state machine, status codes, error
bodies, spec validation, events; and its executable: flags, fd passing, faults, exit."""

from __future__ import annotations

import contextlib
import io
import json
import os
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from procurator import process
from tests.chdouble import BINARY, sample_config
from tests.chdouble.double import ApiServer, Events, Log, Settings, SpecCheck, Vmm
from tests.support import chspec

E = "Error from API"


@dataclass
class Served:
    """An in-process double serving on `socket_path`; `exits` collects the exit codes it asked for."""

    socket_path: Path
    events_path: Path
    vm_dir: Path
    vmm: Vmm
    client: httpx.Client
    exits: list[int] = field(default_factory=list)

    def events(self) -> list[tuple[str, str]]:
        return [(e["source"], e["event"]) for e in read_events(self.events_path)]

    def create(self) -> None:
        kernel = self.vm_dir / "kernel"
        kernel.write_bytes(b"not really a kernel")
        assert self.client.put("vm.create", json=sample_config(self.vm_dir, kernel)).status_code == 204

    def wait(self, predicate: Callable[[], bool], what: str, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while not predicate():
            assert time.monotonic() < deadline, f"timed out after {timeout}s waiting for {what}"
            time.sleep(0.01)


def read_events(path: Path) -> list[dict[str, Any]]:
    chunks = [c for c in path.read_text().split("\n\n") if c.strip()]
    return [json.loads(c) for c in chunks]


@contextlib.contextmanager
def serve(tmp_path: Path, settings: Settings) -> Iterator[Served]:
    vm_dir = tmp_path / "vm"
    vm_dir.mkdir()
    socket_path = vm_dir / "api.sock"
    events_path = vm_dir / "events"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(socket_path))
    listener.listen(8)
    start = time.monotonic()
    log = Log(io.StringIO(), 1, start)
    with events_path.open("w") as events_file:
        exits: list[int] = []
        vmm = Vmm(
            settings=settings,
            events=Events(events_file, start, log),
            log=log,
            exit_process=exits.append,
            spec=SpecCheck(settings.validate),
        )
        server = ApiServer(listener, vmm, vmm.recorder)
        thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        thread.start()
        transport = httpx.HTTPTransport(uds=str(socket_path))
        with httpx.Client(transport=transport, base_url="http://localhost/api/v1/", timeout=5.0) as client:
            try:
                yield Served(socket_path, events_path, vm_dir, vmm, client, exits)
            finally:
                server.shutdown()
                server.server_close()


@pytest.fixture
def served(tmp_path: Path) -> Iterator[Served]:
    with serve(tmp_path, Settings(poweroff_delay=0.05, no_shutdown=True)) as double:
        yield double


def raw_request(path: Path, data: bytes) -> tuple[int, dict[str, str], bytes]:
    """Send `data` as is; the status, headers (lower-case names) and body of the answer."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(5)
        sock.connect(str(path))
        sock.sendall(data)
        buffer = b""
        while b"\r\n\r\n" not in buffer:
            chunk = sock.recv(65536)
            assert chunk, f"connection closed before the headers: {buffer!r}"
            buffer += chunk
        head, _, body = buffer.partition(b"\r\n\r\n")
        status_line, *header_lines = head.decode().split("\r\n")
        headers = {k.lower(): v.strip() for k, _, v in (h.partition(":") for h in header_lines)}
        length = int(headers.get("content-length", "0"))
        while len(body) < length:
            chunk = sock.recv(65536)
            assert chunk
            body += chunk
    assert status_line.startswith("HTTP/1.1 ")
    return int(status_line.split()[1]), headers, body


# --- the API, in process -------------------------------------------------------------------------


def test_ping_answers_a_valid_vmm_ping_response(served: Served) -> None:
    answer = served.client.get("vmm.ping")
    assert answer.status_code == 200
    assert answer.headers["server"] == "Cloud Hypervisor API"
    assert answer.headers["content-type"] == "application/json"
    assert chspec.errors("VmmPingResponse", answer.json()) == []
    assert answer.json()["pid"] == os.getpid()


def test_lifecycle_follows_the_real_state_machine(served: Served) -> None:
    c = served.client
    assert c.get("vm.info").status_code == 404
    served.create()
    info = c.get("vm.info").json()
    assert info["state"] == "Created"
    assert "device_tree" not in info
    assert chspec.errors("VmInfo", info) == []

    boot = c.put("vm.boot")
    assert (boot.status_code, boot.content) == (204, b"")
    assert "content-type" not in boot.headers
    info = c.get("vm.info").json()
    assert info["state"] == "Running"
    assert info["memory_actual_size"] == 256 << 20
    assert set(info["device_tree"]) == {"store", "eth0"}
    assert chspec.errors("VmInfo", info) == []

    counters = c.get("vm.counters").json()
    assert set(counters) == {"store", "eth0"}
    assert chspec.errors("VmCounters", counters) == []

    assert c.put("vm.pause").status_code == 204
    assert c.get("vm.info").json()["state"] == "Paused"
    assert c.put("vm.resume").status_code == 204
    assert c.get("vm.info").json()["state"] == "Running"
    assert c.put("vm.reboot").status_code == 204
    # vm.shutdown drops the VM: the real VMM then reports the config as Created, and boots it anew.
    assert c.put("vm.shutdown").status_code == 204
    assert c.get("vm.info").json()["state"] == "Created"
    assert c.put("vm.boot").status_code == 204
    assert c.put("vm.delete").status_code == 204
    assert c.get("vm.info").status_code == 404
    assert c.put("vm.delete").status_code == 204  # deleting nothing is fine
    served.create()
    assert served.exits == []


def test_events_are_written_in_the_event_monitor_format(served: Served) -> None:
    served.create()
    for endpoint in ("vm.boot", "vm.pause", "vm.resume", "vm.shutdown", "vm.delete"):
        assert served.client.put(endpoint).status_code == 204
    text = served.events_path.read_text()
    assert text.endswith("}\n\n")
    events = read_events(served.events_path)
    assert [(e["source"], e["event"]) for e in events] == [
        ("vm", "booting"), ("vm", "booted"), ("vm", "pausing"), ("vm", "paused"), ("vm", "resuming"),
        ("vm", "resumed"), ("vm", "shutdown"), ("vm", "deleted"),
    ]  # fmt: skip
    for event in events:
        assert list(event) == ["timestamp", "source", "event", "properties"]
        assert set(event["timestamp"]) == {"secs", "nanos"}
        assert event["properties"] is None
    assert '\n  "source": "vm",\n' in text  # pretty-printed, two spaces, like serde_json


WRONG_STATE = [
    # (steps before, request, status, error chain)
    ((), "PUT vm.boot", 404, [E, "The VM could not boot", "VM config is missing"]),
    ((), "GET vm.info", 404, [E, "The VM info is not available", "VM is not created"]),
    ((), "PUT vm.reboot", 404, [E, "The VM could not reboot", "VM is not created"]),
    (("create",), "PUT vm.create", 500, [E, "The VM could not be created", "VM is already created"]),
    (("create",), "GET vm.counters", 500, [E, "The VM info is not available", "VM is not running"]),
    (("create",), "PUT vm.pause", 500, [E, "The VM could not be paused", "VM is not running"]),
    (("create",), "PUT vm.resume", 500, [E, "The VM could not resume", "VM is not running"]),
    (("create",), "PUT vm.power-button", 500, [E, "Error triggering power button", "VM is not running"]),
    (("create",), "PUT vm.shutdown", 500, [E, "The VM could not shutdown", "VM is not running"]),
    (("create", "vm.boot"), "PUT vm.boot", 500, [E, "The VM could not boot", "VM is already created"]),
    (
        ("create", "vm.boot"), "PUT vm.resume", 500,
        [E, "The VM could not resume", "Cannot resume VM", "Failed to resume migratable component",
         "invalid VM state transition: Running to Running"],
    ),
    (
        ("create", "vm.boot", "vm.pause"), "PUT vm.pause", 500,
        [E, "The VM could not be paused", "Cannot pause VM", "Failed to pause migratable component",
         "invalid VM state transition: Paused to Paused"],
    ),
]  # fmt: skip


@pytest.mark.parametrize(("steps", "request_line", "status", "chain"), WRONG_STATE)
def test_wrong_state_answers_like_the_real_vmm(
    served: Served, steps: tuple[str, ...], request_line: str, status: int, chain: list[str]
) -> None:
    method, endpoint = request_line.split()
    for step in steps:
        if step == "create":
            served.create()
        else:
            assert served.client.put(step).status_code == 204
    body = sample_config(served.vm_dir, served.vm_dir / "kernel") if endpoint == "vm.create" else None
    answer = served.client.request(method, endpoint, json=body)
    assert answer.status_code == status
    assert answer.headers["content-type"] == "application/json"
    assert answer.json() == chain


HTTP_ERRORS = [
    # (request bytes, status, body)
    (b"GET /api/v1/vm.nope HTTP/1.1\r\nHost: x\r\n\r\n", 404, b'["Not Found"]'),
    (b"GET /nope HTTP/1.1\r\nHost: x\r\n\r\n", 404, b'["Not Found"]'),
    (b"GET /api/v1/vm.boot HTTP/1.1\r\nHost: x\r\n\r\n", 400, b'["Bad Request"]'),
    (b"PUT /api/v1/vm.info HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n", 400, b'["Bad Request"]'),
    (b"PUT /api/v1/vm.counters HTTP/1.1\r\nHost: x\r\n\r\n", 400, b'["Bad Request"]'),
    (b"PUT /api/v1/vmm.ping HTTP/1.1\r\nHost: x\r\n\r\n", 400, b'["Bad Request"]'),
    (b"DELETE /api/v1/vm.boot HTTP/1.1\r\nHost: x\r\n\r\n", 400, b""),
    (b"PATCH /api/v1/vm.create HTTP/1.1\r\nHost: x\r\n\r\n", 400, b'["Bad Request"]'),
    (b"PUT /api/v1/vm.create HTTP/1.1\r\nHost: x\r\n\r\n", 400, b""),
    (b"PUT /api/v1/vm.create HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n", 400, b""),
    (b"PUT /api/v1/vm.boot HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n{}", 400, b'["Bad Request"]'),
    (b"PUT /api/v1/vm.pause HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\n\r\nnull", 400, b'["Bad Request"]'),
]  # fmt: skip


@pytest.mark.parametrize(("request_bytes", "status", "body"), HTTP_ERRORS)
def test_http_errors_match_the_real_server(
    served: Served, request_bytes: bytes, status: int, body: bytes
) -> None:
    got_status, headers, got_body = raw_request(served.socket_path, request_bytes)
    assert (got_status, got_body) == (status, body)
    assert headers["server"] == "Cloud Hypervisor API"
    assert headers["content-length"] == str(len(body))  # error answers always carry a length, even 0
    assert served.vmm.config is None  # nothing happened


def test_unsupported_methods_and_get_bodies_get_micro_http_errors(served: Served) -> None:
    status, _, body = raw_request(served.socket_path, b"POST /api/v1/vm.boot HTTP/1.1\r\nHost: x\r\n\r\n")
    assert status == 400
    assert body.startswith(b'{ "error": "Invalid HTTP Method: Unsupported HTTP method.\n')
    status, _, body = raw_request(
        served.socket_path, b"GET /api/v1/vmm.ping HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n{}"
    )
    assert status == 400
    assert body.startswith(b'{ "error": "Invalid request.')


def test_bodies_over_micro_http_limit_are_refused_unread(served: Served) -> None:
    # micro_http refuses a Content-Length over 51200 bytes before reading the body, and the VM is untouched.
    status, _, body = raw_request(
        served.socket_path,
        b"PUT /api/v1/vm.create HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Content-Length: 51201\r\n\r\n{",
    )
    assert status == 400
    assert body == (
        b'{ "error": "Request payload with size 51201 is larger than the limit of 51200 allowed by server.\n'
        b'All previous unanswered requests will be dropped." }'
    )
    status, _, _ = raw_request(served.socket_path, b"GET /api/v1/vm.info HTTP/1.1\r\nHost: x\r\n\r\n")
    assert status == 404  # still not created


DROPPED = b'\nAll previous unanswered requests will be dropped." }'


@pytest.mark.parametrize(
    "extra", [1022 - len("GET /api/v1/vmm.ping HTTP/1.1"), 1023 - len("GET /api/v1/vmm.ping HTTP/1.1")]
)
def test_a_request_line_must_fit_micro_http_buffer(served: Served, extra: int) -> None:
    """micro_http (connection.rs, BUFFER_SIZE 1024) needs the request line and its CR LF in 1024 bytes."""
    line = b"GET /api/v1/vmm.ping" + b"x" * extra + b" HTTP/1.1"  # an unknown path, of the length asked
    status, _, body = raw_request(served.socket_path, line + b"\r\nHost: x\r\n\r\n")
    if len(line) + 2 <= 1024:
        assert (status, body) == (404, b'["Not Found"]')  # parsed, and routed: no such endpoint
    else:
        assert (status, body) == (400, b'{ "error": "Invalid request.' + DROPPED)


def test_a_header_line_must_fit_micro_http_buffer(served: Served) -> None:
    fits = b"X-Filler: " + b"a" * (1022 - 10)
    status, _, _ = raw_request(served.socket_path, b"GET /api/v1/vmm.ping HTTP/1.1\r\n" + fits + b"\r\n\r\n")
    assert status == 200
    long = fits + b"b"
    status, _, body = raw_request(
        served.socket_path, b"GET /api/v1/vmm.ping HTTP/1.1\r\n" + long + b"\r\n\r\n"
    )
    assert status == 400
    assert (
        body
        == b'{ "error": "Invalid header. Reason: Invalid content length. Header: ' + long[:1024] + DROPPED
    )


def test_bodyless_put_without_content_length_is_accepted(served: Served) -> None:
    served.create()
    status, headers, body = raw_request(
        served.socket_path, b"PUT /api/v1/vm.boot HTTP/1.1\r\nHost: x\r\n\r\n"
    )
    assert (status, body) == (204, b"")
    assert "content-length" not in headers
    assert "content-type" not in headers


def test_status_lines_carry_no_reason_phrase(served: Served) -> None:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(5)
        sock.connect(str(served.socket_path))
        sock.sendall(b"GET /api/v1/vm.info HTTP/1.1\r\nHost: x\r\n\r\n")
        assert sock.recv(65536).startswith(b"HTTP/1.1 404 \r\n")


def test_keep_alive_serves_several_requests_on_one_connection(served: Served) -> None:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(5)
        sock.connect(str(served.socket_path))
        sock.sendall(b"GET /api/v1/vmm.ping HTTP/1.1\r\nHost: x\r\n\r\n" * 2)
        received = b""
        while received.count(b"HTTP/1.1 200") < 2:
            chunk = sock.recv(65536)
            assert chunk
            received += chunk


@pytest.mark.parametrize(
    ("body", "expect"),
    [
        (b'{"cpus": {"boot_vcpus": 1, "max_vcpus": 1}}', "'payload' is a required property"),
        (b'{"payload": {}, "cpus": {"boot_vcpus": "one", "max_vcpus": 1}}', "cpus.boot_vcpus"),
        (b'{"payload": {}, "serial": {"file": "/tmp/x"}}', "'mode' is a required property"),
        (b'{"payload": {}, "memory": {"size": 1, "shared": "yes"}}', "'shared' was unexpected"),
        (b"{not json", "Expecting property name"),
    ],
)
def test_create_validates_the_body_against_the_schema(served: Served, body: bytes, expect: str) -> None:
    answer = served.client.put("vm.create", content=body, headers={"Content-Type": "application/json"})
    assert answer.status_code == 400
    chain = answer.json()
    assert chain[0] == "Failed to deserialize JSON"
    assert any(expect in line for line in chain[1:]), chain
    assert served.client.get("vm.info").status_code == 404  # nothing was created


def test_create_creates_the_serial_file(served: Served) -> None:
    served.create()
    assert (served.vm_dir / "serial.log").is_file()


def test_boot_fails_when_the_kernel_is_missing(served: Served) -> None:
    config = sample_config(served.vm_dir, served.vm_dir / "missing-kernel")
    config["disks"] = []
    assert served.client.put("vm.create", json=config).status_code == 204
    answer = served.client.put("vm.boot")
    assert answer.status_code == 500
    assert answer.json() == [E, "The VM could not boot", "Cannot open kernel file",
                             "No such file or directory (os error 2)"]  # fmt: skip
    assert served.client.get("vm.info").json()["state"] == "Created"


def test_power_button_shuts_the_guest_down_and_keeps_the_process_with_no_shutdown(served: Served) -> None:
    served.create()
    served.client.put("vm.boot")
    assert served.client.put("vm.power-button").status_code == 204
    served.wait(lambda: ("vm", "shutdown") in served.events(), "the guest to power off")
    assert served.client.get("vm.info").json()["state"] == "Created"
    assert served.exits == []
    assert served.client.put("vm.boot").status_code == 204  # it can boot again


def test_power_button_reaches_a_paused_guest_once_resumed(served: Served) -> None:
    served.create()
    served.client.put("vm.boot")
    served.client.put("vm.pause")
    assert served.client.put("vm.power-button").status_code == 204
    time.sleep(0.2)
    assert served.client.get("vm.info").json()["state"] == "Paused"
    served.client.put("vm.resume")
    served.wait(lambda: ("vm", "shutdown") in served.events(), "the resumed guest to power off")


def test_guest_power_off_without_no_shutdown_ends_the_vmm(tmp_path: Path) -> None:
    with serve(tmp_path, Settings(poweroff_delay=0.0, no_shutdown=False)) as served:
        served.create()
        served.client.put("vm.boot")
        served.client.put("vm.power-button")
        served.wait(lambda: served.exits == [0], "the VMM to exit")
        assert served.events()[-3:] == [("vm", "shutdown"), ("vm", "deleted"), ("vmm", "shutdown")]


def test_ignored_power_button_leaves_the_guest_running(tmp_path: Path) -> None:
    settings = Settings(poweroff_delay=0.0, no_shutdown=True, faults=frozenset({"ignore-power-button"}))
    with serve(tmp_path, settings) as served:
        served.create()
        served.client.put("vm.boot")
        assert served.client.put("vm.power-button").status_code == 204
        time.sleep(0.2)
        assert served.client.get("vm.info").json()["state"] == "Running"


def test_vmm_shutdown_answers_200_with_an_empty_body_then_exits(served: Served) -> None:
    served.create()
    served.client.put("vm.boot")
    status, headers, body = raw_request(
        served.socket_path, b"PUT /api/v1/vmm.shutdown HTTP/1.1\r\nHost: x\r\n\r\n"
    )
    assert (status, headers["content-length"], body) == (200, "0", b"")
    served.wait(lambda: served.exits == [0], "the VMM to exit")
    assert served.events()[-3:] == [("vm", "shutdown"), ("vm", "deleted"), ("vmm", "shutdown")]


def test_boot_takes_the_configured_delay(tmp_path: Path) -> None:
    with serve(tmp_path, Settings(boot_delay=0.3, no_shutdown=True)) as served:
        served.create()
        started = time.monotonic()
        assert served.client.put("vm.boot").status_code == 204
        assert time.monotonic() - started >= 0.3


# --- the executable ------------------------------------------------------------------------------


def spawn_double(tmp_path: Path, *args: str, env: dict[str, str] | None = None) -> Any:
    log = (tmp_path / "stderr").open("wb")
    with log:
        return process.spawn([str(BINARY), *args], stdout=log, stderr=log, env=env)


def ping(socket_path: Path) -> dict[str, Any]:
    with httpx.Client(transport=httpx.HTTPTransport(uds=str(socket_path)), timeout=10.0) as client:
        answer = client.get("http://localhost/api/v1/vmm.ping")
    assert answer.status_code == 200
    result: dict[str, Any] = answer.json()
    return result


def test_executable_serves_the_socket_passed_as_fd_and_exits_on_vmm_shutdown(tmp_path: Path) -> None:
    socket_path = tmp_path / "api.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(socket_path))
    listener.listen(4)
    record = tmp_path / "record.jsonl"
    with listener:
        proc = process.spawn(
            [str(BINARY), "--api-socket", f"fd={listener.fileno()}",
             "--event-monitor", f"path={tmp_path / 'ev'}", "--log-file", str(tmp_path / "ch.log"),
             "--seccomp", "true", "--no-shutdown", "-v", "--serial", "off", "--console", "off"],
            pass_fds=(listener.fileno(),),
            env={"CHDOUBLE_RECORD": str(record)},
        )  # fmt: skip
    try:
        assert ping(socket_path)["pid"] == proc.pid
        with httpx.Client(transport=httpx.HTTPTransport(uds=str(socket_path)), timeout=10.0) as client:
            assert client.put("http://localhost/api/v1/vmm.shutdown").status_code == 200
        assert proc.wait(timeout=10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert socket_path.exists()  # with fd=, the socket belongs to whoever bound it
    events = read_events(tmp_path / "ev")
    assert (events[0]["source"], events[0]["event"]) == ("vmm", "starting")
    assert (events[-1]["source"], events[-1]["event"]) == ("vmm", "shutdown")
    assert "v53.0 starting" in (tmp_path / "ch.log").read_text()
    kinds = [
        (r["kind"], r.get("what") or r.get("path")) for r in map(json.loads, record.read_text().splitlines())
    ]
    assert kinds == [("process", "start"), ("process", "ready"), ("request", "/api/v1/vmm.ping"),
                     ("request", "/api/v1/vmm.shutdown"), ("process", "exit")]  # fmt: skip


def test_executable_binds_a_path_and_removes_it_on_exit(tmp_path: Path) -> None:
    socket_path = tmp_path / "api.sock"
    proc = spawn_double(tmp_path, "--api-socket", f"path={socket_path}")
    try:
        deadline = time.monotonic() + 10
        while not socket_path.exists():
            assert time.monotonic() < deadline, "the double never bound its socket"
            time.sleep(0.01)
        assert ping(socket_path)["version"]
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert not socket_path.exists()


def test_executable_dies_at_start_with_a_fatal_error_in_its_log(tmp_path: Path) -> None:
    log = tmp_path / "ch.log"
    proc = spawn_double(tmp_path, "--api-socket", f"path={tmp_path / 'api.sock'}", "--log-file", str(log),
                        env={"CHDOUBLE_FAULT": "die-at-start"})  # fmt: skip
    assert proc.wait(timeout=10) == 1
    assert "Fatal error: CreateHypervisor(HypervisorCreate(no supported hypervisor))" in log.read_text()
    stderr = (tmp_path / "stderr").read_text()
    assert "Error: Cloud Hypervisor exited with the following chain of errors:" in stderr
    assert not (tmp_path / "api.sock").exists()


@pytest.mark.parametrize(
    "args",
    [("--no-such-flag",), ("--seccomp", "maybe"), ("--api-sock", "path=/tmp/x")],
)
def test_executable_rejects_what_the_real_cli_rejects(tmp_path: Path, args: tuple[str, ...]) -> None:
    assert spawn_double(tmp_path, *args).wait(timeout=10) == 2


def test_executable_rejects_unknown_faults(tmp_path: Path) -> None:
    proc = spawn_double(tmp_path, "-v", env={"CHDOUBLE_FAULT": "explode"})
    assert proc.wait(timeout=10) == 2
    assert "unknown explode" in (tmp_path / "stderr").read_text()
