"""The one wait helper: bounded, tried once more at the deadline, saying what it waited for."""

from __future__ import annotations

import pytest

from procurator.errors import WaitTimeoutError
from procurator.waits import Deadline, poll_until, wait_until


class Clock:
    """A fake monotonic clock that sleeping advances."""

    def __init__(self) -> None:
        self.now = 100.0
        self.sleeps: list[float] = []

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


def test_returns_what_the_probe_found() -> None:
    clock = Clock()
    answers = iter([None, False, "ready"])
    assert wait_until(lambda: next(answers), 1.0, "x", clock=clock, sleep=clock.sleep) == "ready"
    assert clock.sleeps == [0.05, 0.05]


def test_tries_once_more_at_the_deadline() -> None:
    clock = Clock()
    tries: list[float] = []

    def probe() -> bool:
        tries.append(clock.now)
        return clock.now >= 100.12  # met only at the deadline itself

    assert wait_until(probe, 0.12, "x", poll=0.05, clock=clock, sleep=clock.sleep)
    assert tries[-1] == pytest.approx(100.12)
    assert clock.sleeps == pytest.approx([0.05, 0.05, 0.02])  # the last sleep ends at the deadline


def test_says_what_it_waited_for_and_the_last_answer() -> None:
    clock = Clock()
    with pytest.raises(WaitTimeoutError) as caught:
        wait_until(
            lambda: None, 0.3, "the VM to boot", last=lambda: "HTTP 503", clock=clock, sleep=clock.sleep
        )
    assert str(caught.value) == "timed out after 0.3s waiting for the VM to boot (last: HTTP 503)"
    assert clock.now == pytest.approx(100.3)


def test_poll_until_answers_false_when_time_runs_out() -> None:
    clock = Clock()
    assert not poll_until(lambda: False, 0.2, clock=clock, sleep=clock.sleep)
    assert poll_until(lambda: True, 0.0, clock=clock, sleep=clock.sleep)


def test_deadline_remaining_never_goes_below_zero() -> None:
    clock = Clock()
    deadline = Deadline(1.0, clock)
    clock.now += 0.4
    assert deadline.remaining() == pytest.approx(0.6)
    assert not deadline.passed()
    clock.now += 1.0
    assert deadline.remaining() == 0.0
    assert deadline.passed()
