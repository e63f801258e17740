"""Every polled wait in Procurator goes through here, on the monotonic clock.

`wait_until(probe, timeout, what)` asks `probe` until it returns something (not None, not False), sleeping
`poll` between tries; the last sleep ends at the deadline and the probe is tried once more there, so a
condition met just in time counts. Past the deadline it raises `WaitTimeoutError` saying what it waited for
(and, with `last`, what the last try said). `poll_until` is the same wait answering True or False.

Waits that block on a descriptor instead (pidfds, sockets, flock) keep their own calls and bound them
with `Deadline`.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TypeVar

from procurator.errors import WaitTimeoutError

T = TypeVar("T")

DEFAULT_POLL = 0.05


@dataclass
class Deadline:
    """A point on the monotonic clock `seconds` from now."""

    seconds: float
    clock: Callable[[], float] = time.monotonic
    at: float = field(init=False)

    def __post_init__(self) -> None:
        self.at = self.clock() + self.seconds

    def remaining(self) -> float:
        return max(0.0, self.at - self.clock())

    def passed(self) -> bool:
        return self.clock() >= self.at


def wait_until(
    probe: Callable[[], T | None],
    timeout: float,
    what: str,
    *,
    poll: float = DEFAULT_POLL,
    last: Callable[[], str] | None = None,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
) -> T:
    """What `probe` returned once it returned something; WaitTimeoutError after `timeout` seconds."""
    deadline = Deadline(timeout, clock)
    while True:
        result = probe()
        if result is not None and result is not False:
            return result
        remaining = deadline.at - clock()
        if remaining <= 0:
            raise WaitTimeoutError(what, timeout, last() if last is not None else "")
        sleep(min(poll, remaining))


def poll_until(
    probe: Callable[[], bool],
    timeout: float,
    *,
    poll: float = DEFAULT_POLL,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
) -> bool:
    """Whether `probe` said True within `timeout` seconds (tried once more at the deadline)."""
    try:
        return wait_until(probe, timeout, "a condition", poll=poll, clock=clock, sleep=sleep)
    except WaitTimeoutError:
        return False
