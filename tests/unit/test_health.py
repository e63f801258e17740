"""Health waits are bounded: by the checks' own budget and by the worker configuration's cap."""

from __future__ import annotations

import socket

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


@pytest.mark.parametrize("value", [0, -1, 10**9, "600", True, None])
def test_the_cap_in_the_worker_configuration_is_checked(value: object) -> None:
    with pytest.raises(ValidationError, match="healthTimeout: expected seconds from 1 to 86400"):
        WorkerConfig.parse("worker.json", {"healthTimeout": value})


def test_the_cap_defaults_to_ten_minutes() -> None:
    assert WorkerConfig.parse("worker.json", {}).health_timeout == 600.0
    assert WorkerConfig.parse("worker.json", {"healthTimeout": 30}).health_timeout == 30.0
