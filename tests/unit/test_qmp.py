"""The QMP client against a fake QEMU on the other end of a socketpair (and of a UNIX socket for connect)."""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

from procurator.errors import HypervisorApiError, HypervisorError, WaitTimeoutError
from procurator.hypervisor import qmp

GREETING = {"QMP": {"version": {"qemu": {"micro": 0, "minor": 2, "major": 7}}, "capabilities": ["oob"]}}

HANG_UP = "hang up"
# What the fake sends for a request, in order: messages (dicts), raw bytes, pauses (seconds), HANG_UP.
Item = dict[str, Any] | bytes | float | str
Reply = Callable[[dict[str, Any]], Sequence[Item]]


def answer(request: dict[str, Any], value: Any = None) -> dict[str, Any]:
    return {"return": {} if value is None else value, "id": request.get("id")}


def event(name: str, **data: Any) -> dict[str, Any]:
    return {"event": name, "data": data, "timestamp": {"seconds": 1, "microseconds": 0}}


def silent(request: dict[str, Any]) -> list[Item]:
    return []


class FakeQemu:
    """Serves one QMP session on `sock` in a thread: sends the greeting, then answers each request with
    what `reply` returns (nothing: stay silent). Records every request it received."""

    def __init__(self, sock: socket.socket, reply: Reply, *, greeting: bytes | None = None) -> None:
        self.sock = sock
        self.reply = reply
        self.greeting = greeting if greeting is not None else json.dumps(GREETING).encode() + b"\r\n"
        self.requests: list[dict[str, Any]] = []
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        with self.sock, self.sock.makefile("rb") as lines:
            try:
                self.sock.sendall(self.greeting)
                for line in lines:
                    request = json.loads(line)
                    self.requests.append(request)
                    if request.get("execute") == "qmp_capabilities":
                        self.sock.sendall(json.dumps(answer(request)).encode() + b"\r\n")
                        continue
                    for item in self.reply(request):
                        if item == HANG_UP:
                            self.sock.shutdown(socket.SHUT_RDWR)
                            return
                        if isinstance(item, float):
                            time.sleep(item)
                        elif isinstance(item, bytes):
                            self.sock.sendall(item)
                        elif isinstance(item, dict):
                            self.sock.sendall(json.dumps(item).encode() + b"\r\n")
            except OSError:
                return  # the client went away: the session is over


@pytest.fixture
def pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    ours, theirs = socket.socketpair()
    yield ours, theirs
    ours.close()
    theirs.close()


def session(
    pair: tuple[socket.socket, socket.socket], reply: Reply, **kwargs: Any
) -> tuple[qmp.QmpClient, FakeQemu]:
    ours, theirs = pair
    fake = FakeQemu(theirs, reply)
    return qmp.QmpClient(ours, **kwargs), fake


def test_handshake_reads_the_greeting_and_negotiates_first(pair: tuple[socket.socket, socket.socket]) -> None:
    client, fake = session(pair, lambda request: [answer(request, {"status": "running", "running": True})])
    assert client.greeting["version"]["qemu"]["major"] == 7
    assert client.execute("query-status") == {"status": "running", "running": True}
    assert [r["execute"] for r in fake.requests] == ["qmp_capabilities", "query-status"]


def test_execute_sends_arguments_and_an_id(pair: tuple[socket.socket, socket.socket]) -> None:
    client, fake = session(pair, lambda request: [answer(request, [{"device": "disk0"}])])
    assert client.execute("query-blockstats", {"query-nodes": False}) == [{"device": "disk0"}]
    sent = fake.requests[-1]
    assert sent["execute"] == "query-blockstats"
    assert sent["arguments"] == {"query-nodes": False}
    assert isinstance(sent["id"], int)
    assert "arguments" not in fake.requests[0]  # qmp_capabilities goes without


def test_error_answer_raises_hypervisor_api_error(pair: tuple[socket.socket, socket.socket]) -> None:
    def reply(request: dict[str, Any]) -> list[dict[str, Any]]:
        desc = f"The command {request['execute']} has not been found"
        return [{"error": {"class": "CommandNotFound", "desc": desc}, "id": request["id"]}]

    client, _ = session(pair, reply)
    with pytest.raises(HypervisorApiError) as caught:
        client.execute("bogus")
    assert isinstance(caught.value, qmp.QmpError)
    assert caught.value.error_class == "CommandNotFound"
    assert str(caught.value) == "QMP bogus: CommandNotFound: The command bogus has not been found"


def test_async_events_are_recorded_not_taken_for_answers(pair: tuple[socket.socket, socket.socket]) -> None:
    def reply(request: dict[str, Any]) -> list[dict[str, Any]]:
        return [event("POWERDOWN"), event("SHUTDOWN", guest=True, reason="guest-shutdown"), answer(request)]

    client, _ = session(pair, reply)
    assert client.execute("system_powerdown") == {}
    assert client.event_names() == ["POWERDOWN", "SHUTDOWN"]
    assert client.events[1]["data"] == {"guest": True, "reason": "guest-shutdown"}


def test_a_late_answer_to_an_earlier_command_is_skipped(pair: tuple[socket.socket, socket.socket]) -> None:
    def reply(request: dict[str, Any]) -> list[dict[str, Any]]:
        return [{"return": {"status": "stale"}, "id": -1}, answer(request, {"status": "running"})]

    client, _ = session(pair, reply)
    assert client.execute("query-status") == {"status": "running"}


def test_a_silent_server_times_out_within_the_bound(pair: tuple[socket.socket, socket.socket]) -> None:
    client, _ = session(pair, silent, timeout=0.3)
    began = time.monotonic()
    with pytest.raises(WaitTimeoutError) as caught:
        client.execute("query-status")
    elapsed = time.monotonic() - began
    assert 0.25 <= elapsed < 1.5
    assert str(caught.value) == "timed out after 0.3s waiting for the QMP answer to `query-status`"


def test_an_event_stream_does_not_extend_the_bound(pair: tuple[socket.socket, socket.socket]) -> None:
    def chatter(request: dict[str, Any]) -> list[Item]:
        return [item for _ in range(40) for item in (event("RTC_CHANGE", offset=0), 0.05)]

    client, _ = session(pair, chatter, timeout=0.4)
    began = time.monotonic()
    with pytest.raises(WaitTimeoutError):
        client.execute("query-status")
    assert time.monotonic() - began < 1.5
    assert "RTC_CHANGE" in client.event_names()


def test_a_missing_greeting_times_out_and_closes_the_socket(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    ours, _ = pair
    with pytest.raises(WaitTimeoutError) as caught:
        qmp.QmpClient(ours, timeout=0.2)
    assert "the QMP greeting" in str(caught.value)
    assert ours.fileno() == -1


def test_a_wrong_greeting_is_a_protocol_error(pair: tuple[socket.socket, socket.socket]) -> None:
    ours, theirs = pair
    FakeQemu(theirs, silent, greeting=b'{"hello": 1}\n')
    with pytest.raises(qmp.QmpError, match="expected a QMP greeting"):
        qmp.QmpClient(ours, timeout=1.0)


def test_an_event_before_the_greeting_is_kept_and_the_greeting_read(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    # Seen with QEMU 7.2 under TCG: a client connecting as the guest starts got RESUME before the greeting.
    ours, theirs = pair
    resume = b'{"timestamp": {"seconds": 1, "microseconds": 2}, "event": "RESUME"}\r\n'
    FakeQemu(theirs, silent, greeting=resume + json.dumps(GREETING).encode() + b"\r\n")
    client = qmp.QmpClient(ours, timeout=2.0)
    assert client.greeting["version"]["qemu"]["major"] == 7
    assert client.event_names() == ["RESUME"]


def test_a_closed_connection_is_an_api_error(pair: tuple[socket.socket, socket.socket]) -> None:
    client, _ = session(pair, lambda _: [HANG_UP])
    with pytest.raises(
        HypervisorApiError, match="connection closed while waiting for the QMP answer to `quit`"
    ):
        client.execute("quit")


def test_garbage_is_an_api_error(pair: tuple[socket.socket, socket.socket]) -> None:
    client, _ = session(pair, lambda _: [b"this is not json\n"])
    with pytest.raises(HypervisorApiError, match="not JSON"):
        client.execute("query-status")


def serve_later(path: Path, delay: float) -> threading.Thread:
    """Bind `path` after `delay` seconds (as a starting QEMU does) and serve one QMP session."""

    def run() -> None:
        time.sleep(delay)
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(str(path))
        listener.listen(1)
        conn, _ = listener.accept()
        listener.close()
        FakeQemu(conn, lambda request: [answer(request, {"status": "running"})]).thread.join(5)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def test_connect_retries_until_the_socket_appears(tmp_path: Path) -> None:
    path = tmp_path / "api.sock"
    server = serve_later(path, 0.3)
    with qmp.connect(path, timeout=5.0) as client:
        assert client.execute("query-status") == {"status": "running"}
    server.join(5)


def test_connect_gives_up_after_its_bound(tmp_path: Path) -> None:
    began = time.monotonic()
    with pytest.raises(WaitTimeoutError) as caught:
        qmp.connect(tmp_path / "api.sock", timeout=0.3)
    assert time.monotonic() - began < 1.0
    assert f"QMP socket {tmp_path / 'api.sock'} to accept a connection" in str(caught.value)
    assert "No such file or directory" in str(caught.value)


def test_connect_stops_waiting_when_the_process_is_gone(tmp_path: Path) -> None:
    began = time.monotonic()
    with pytest.raises(HypervisorError, match="exited before it answered"):
        qmp.connect(tmp_path / "api.sock", timeout=10.0, alive=lambda: False)
    assert time.monotonic() - began < 1.0
