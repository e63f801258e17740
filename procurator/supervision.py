"""Supervision's pure part: what the worker does when a VM's hypervisor exits.

`decide(policy, exit kind, history, limits, now)` is a pure function of the restart policy, how the VM
exited and when it was last restarted; the worker daemon (procurator/worker/) observes exits and acts.
Kept apart so the CLI can show the defaults without importing the daemon.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum

from procurator.models import Restart

DEFAULT_INTERVAL = 300.0
DEFAULT_POLL = 1.0


# --- supervision: the pure part ------------------------------------------------------------------------


class ExitKind(StrEnum):
    CRASHED = "crashed"  # killed by a signal, non-zero exit, vanished, guest panic
    POWERED_OFF = "powered-off"  # the guest shut itself down (or the hypervisor exited 0)


class Verdict(StrEnum):
    RESTART = "restart"  # restart now
    WAIT = "wait"  # restart at `due`
    GIVE_UP = "give-up"  # crash loop: mark the VM failed
    LEAVE = "leave"  # the policy keeps it down


@dataclass(frozen=True)
class Limits:
    """Daemon-wide supervision limits (the policy's own numbers come from each bundle)."""

    window: float = 600.0  # maxRestarts within this many seconds make a crash loop
    max_backoff: float = 300.0  # the cap of the exponential backoff


@dataclass(frozen=True)
class Decision:
    verdict: Verdict
    reason: str
    due: float | None = None  # for RESTART and WAIT: when (same clock as `now`)


def backoff_delay(base: float, attempt: int, cap: float) -> float:
    """`base * 2^attempt`, at most `cap` (and never negative)."""
    if base <= 0 or attempt < 0:
        return 0.0
    if attempt >= 64:
        return cap
    return float(min(base * (2**attempt), cap))


def recent(restarts: Sequence[float], now: float, window: float) -> list[float]:
    """The restart times that lie within `window` before `now`."""
    return [t for t in restarts if now - t < window]


def decide(
    restart: Restart,
    kind: ExitKind,
    *,
    exited_at: float,
    restarts: Sequence[float],
    now: float,
    limits: Limits = Limits(),
) -> Decision:
    """What to do about a VM that should run and exited (`kind`, first seen at `exited_at`).

    `restarts` are the times the daemon restarted this VM before (any age; only those within the
    window count). Pure: same inputs, same decision.
    """
    if restart.policy.value == "never":
        return Decision(Verdict.LEAVE, "restart policy never")
    if restart.policy.value == "on-failure" and kind is not ExitKind.CRASHED:
        return Decision(Verdict.LEAVE, "restart policy on-failure restarts only crashes")
    count = len(recent(restarts, now, limits.window))
    if count >= restart.max_restarts:
        return Decision(
            Verdict.GIVE_UP,
            f"crash loop: {count} restarts within {limits.window:g}s (maxRestarts {restart.max_restarts})",
        )
    due = exited_at + backoff_delay(restart.backoff_seconds, count, limits.max_backoff)
    if now >= due:
        return Decision(Verdict.RESTART, f"{kind.value}; restart {count + 1} of {restart.max_restarts}", due)
    return Decision(Verdict.WAIT, f"{kind.value}; backoff until restart {count + 1}", due)
