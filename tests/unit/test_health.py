"""Health waits are bounded: by the checks' own budget and by the worker configuration's cap."""

from __future__ import annotations

import http.server
import socket
import threading
from typing import ClassVar

import pytest

from procurator.config import WorkerConfig
from procurator.errors import ValidationError, WaitTimeoutError
from procurator.health import WAIT_POLL, wait_healthy
from procurator.models import HealthCheck


class FakeTime:
    def __init__(self) -> None:
        self.now = 0.0
        self.sleeps = 0

    def clock(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps += 1
        self.now += seconds


def closed_port() -> int:
    """A loopback port nothing listens on (bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
    return port


def test_a_billion_retries_on_a_dead_port_stop_at_the_cap() -> None:
    check = HealthCheck(
        type="tcp", port=closed_port(), interval_seconds=1.0, timeout_seconds=1.0, retries=10**9
    )
    fake = FakeTime()
    with pytest.raises(WaitTimeoutError) as caught:
        wait_healthy((check,), "127.0.0.1", None, cap=5.0, clock=fake.clock, sleep=fake.sleep)
    assert caught.value.seconds == 5.0
    assert str(caught.value).startswith(
        "timed out after 5.0s waiting for health checks of 127.0.0.1 "
        "(capped by the worker configuration's healthTimeout) (last: tcp 127.0.0.1:"
    )
    assert "Connection refused" in str(caught.value)
    # tried every WAIT_POLL seconds while waiting (not every intervalSeconds), within the same bound
    assert 5.0 / WAIT_POLL <= fake.sleeps <= 5.0 / WAIT_POLL + 1


def test_the_checks_own_budget_when_below_the_cap() -> None:
    check = HealthCheck(type="tcp", port=closed_port(), interval_seconds=2.0, timeout_seconds=1.0, retries=3)
    fake = FakeTime()
    with pytest.raises(WaitTimeoutError) as caught:
        wait_healthy((check,), "127.0.0.1", None, cap=600.0, clock=fake.clock, sleep=fake.sleep)
    assert caught.value.seconds == 6.0
    assert "capped" not in str(caught.value)


def test_a_passing_check_returns_at_once() -> None:
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        check = HealthCheck(type="tcp", port=server.getsockname()[1], retries=10**9)
        fake = FakeTime()
        wait_healthy((check,), "127.0.0.1", None, cap=5.0, clock=fake.clock, sleep=fake.sleep)
        assert fake.sleeps == 0


class _Status(http.server.BaseHTTPRequestHandler):
    codes: ClassVar[list[int]] = [503, 503, 200]  # not ready twice, then ready
    asked: ClassVar[list[str]] = []

    def do_GET(self) -> None:
        self.asked.append(self.path)
        self.send_response(self.codes[min(len(self.asked), len(self.codes)) - 1])
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


def test_an_http_check_waits_through_refusals_and_wrong_statuses_until_it_passes() -> None:
    """Nothing listens at first (refused), then the service answers 503 twice, then 200: the wait, on the
    real clock and its own waiting between attempts, ends once the 200 came and not before."""
    port = closed_port()
    listening = threading.Event()

    def serve_later() -> None:
        listening.wait(timeout=10)
        with http.server.HTTPServer(("127.0.0.1", port), _Status) as server:
            while len(_Status.asked) < 3:
                server.handle_request()

    check = HealthCheck(type="http", port=port, path="/health", retries=10**9)
    server = threading.Thread(target=serve_later, daemon=True)
    server.start()
    timer = threading.Timer(0.3, listening.set)
    timer.start()
    try:
        wait_healthy((check,), "127.0.0.1", None, cap=20.0)
    finally:
        timer.cancel()
        listening.set()
    server.join(timeout=10)
    assert _Status.asked == ["/health", "/health", "/health"]


@pytest.mark.parametrize("value", [0, -1, 10**9, "600", True, None])
def test_the_cap_in_the_worker_configuration_is_checked(value: object) -> None:
    with pytest.raises(ValidationError, match="healthTimeout: expected seconds from 1 to 86400"):
        WorkerConfig.parse("worker.json", {"healthTimeout": value})


def test_the_cap_defaults_to_ten_minutes() -> None:
    assert WorkerConfig.parse("worker.json", {}).health_timeout == 600.0
    assert WorkerConfig.parse("worker.json", {"healthTimeout": 30}).health_timeout == 30.0
