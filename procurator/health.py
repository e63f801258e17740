"""Health checks a bundle declares (TCP connect, HTTP status), run from the host against the guest."""

from __future__ import annotations

import errno
import os
import select
import socket
import time
from collections.abc import Callable

from procurator import waits
from procurator.errors import WaitTimeoutError
from procurator.models import HealthCheck
from procurator.netns import connect_tcp, make_socket

# While a start waits for its checks, a new connection attempt starts every WAIT_POLL seconds (a failed
# connect to a booting guest is immediate once its network is up: a reset), and each attempt is kept up to
# WAIT_CONNECT seconds beside the newer ones. A SYN sent before the guest's network was up is lost, and
# the kernel would send it again only after a second (TCP's initial retransmission timeout): a connect
# that waited for it would notice a service starting meanwhile that much later, and one given up sooner
# could never reach a guest answering slower than that. The budget stays the checks' own, intervalSeconds
# times retries; the HTTP answer still gets timeoutSeconds.
WAIT_POLL = 0.05
WAIT_CONNECT = 0.25


def probe(
    check: HealthCheck, ip: str, netns: str | None, *, connect_timeout: float | None = None
) -> str | None:
    """Run one check once. None when it passes, else what went wrong. `connect_timeout` bounds the TCP
    connect apart from the check's timeout (see WAIT_CONNECT)."""
    limit = check.timeout_seconds if connect_timeout is None else min(connect_timeout, check.timeout_seconds)
    try:
        sock = connect_tcp(netns, ip, check.port, limit)
    except OSError as exc:
        return f"{check.type} {ip}:{check.port}: {exc.strerror or exc}"
    with sock:
        return _on_connected(check, ip, sock)


def _on_connected(check: HealthCheck, ip: str, sock: socket.socket) -> str | None:
    """The rest of a check once its TCP connection is up: nothing for tcp, the HTTP request for http."""
    sock.settimeout(check.timeout_seconds)
    if check.type == "tcp":
        return None
    import http.client  # noqa: PLC0415 - only for HTTP checks (`ps` need not import it)

    conn = http.client.HTTPConnection(ip, check.port, timeout=check.timeout_seconds)
    conn.sock = sock  # connected already, in the VMs' network namespace
    try:
        conn.request("GET", check.path, headers={"Connection": "close"})
        status = conn.getresponse().status
    except http.client.HTTPException:
        return f"http {ip}:{check.port}{check.path}: not an HTTP answer"
    except OSError as exc:
        return f"http {ip}:{check.port}{check.path}: {exc.strerror or exc}"
    if status != check.expect_status:
        return f"http {ip}:{check.port}{check.path}: status {status}, expected {check.expect_status}"
    return None


class _Attempts:
    """The connection attempts of one check while a start waits for it (see WAIT_CONNECT)."""

    def __init__(self, check: HealthCheck, ip: str, netns: str | None, clock: Callable[[], float]) -> None:
        self.check, self.ip, self.netns, self.clock = check, ip, netns, clock
        self.flying: list[tuple[float, socket.socket]] = []
        self.last_start: float | None = None
        self.problem = ""

    def _fail(self, text: str) -> None:
        self.problem = f"{self.check.type} {self.ip}:{self.check.port}: {text}"

    def due(self) -> float:
        """When the next attempt may start."""
        return float("-inf") if self.last_start is None else self.last_start + WAIT_POLL

    def step(self) -> bool:
        """Start a new attempt when one is due, then collect what those in flight came to; True once
        the check passed."""
        now = self.clock()
        if now >= self.due():
            self.last_start = now
            try:
                sock = make_socket(self.netns)
                sock.setblocking(False)
                err = sock.connect_ex((self.ip, self.check.port))
            except OSError as exc:
                self._fail(exc.strerror or str(exc))
                return False
            if err in (0, errno.EINPROGRESS, errno.EAGAIN):
                self.flying.append((now, sock))
            else:
                sock.close()
                self._fail(os.strerror(err))
        if not self.flying:
            return False
        _, ready, _ = select.select([], [s for _, s in self.flying], [], 0)
        still = []
        for started, sock in self.flying:
            if sock in ready:
                if self._answered(sock):
                    self.flying.remove((started, sock))
                    return True
            elif now - started >= min(WAIT_CONNECT, self.check.timeout_seconds):
                sock.close()
                self._fail("timed out")
            else:
                still.append((started, sock))
        self.flying = still
        return False

    def _answered(self, sock: socket.socket) -> bool:
        """An attempt whose connect finished: refused, or connected and the rest of the check run."""
        with sock:
            err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if err != 0:
                self._fail(os.strerror(err))
                return False
            sock.setblocking(True)
            problem = _on_connected(self.check, self.ip, sock)
        if problem is not None:
            self.problem = problem
            return False
        return True

    def close(self) -> None:
        for _, sock in self.flying:
            sock.close()
        self.flying = []


def wait_healthy(
    checks: tuple[HealthCheck, ...],
    ip: str,
    netns: str | None,
    *,
    timeout: float | None = None,
    cap: float | None = None,
    still_running: Callable[[], bool] = lambda: True,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] | None = None,
) -> None:
    """Wait until every check passes once, starting a connection attempt every WAIT_POLL seconds. Bounded
    by `timeout` (default: the checks' own budget, their intervals times their retries), and never longer
    than `cap` (the worker configuration's healthTimeout); a wait cut short by the cap says so. Between
    tries it waits on the attempts in flight (`sleep`, when given, instead: tests with a fake clock)."""
    if not checks:
        return
    if any(c.type == "http" for c in checks):
        import http.client  # noqa: F401, PLC0415 - now, not inside the probe that first connects (~10 ms)
    budget = timeout if timeout is not None else max(c.interval_seconds * c.retries for c in checks)
    capped = cap is not None and budget > cap
    if cap is not None:
        budget = min(budget, cap)
    started = clock()
    pending = [_Attempts(c, ip, netns, clock) for c in checks]
    everyone = list(pending)
    last = [""]

    def passed() -> bool:
        still = []
        for attempts in pending:
            if not attempts.step():
                still.append(attempts)
                last[0] = attempts.problem or last[0]
            else:
                attempts.close()
        pending[:] = still
        if not pending:
            return True
        if not still_running():
            raise WaitTimeoutError(f"health checks of {ip} (the VM stopped)", clock() - started, last[0])
        return False

    def pause(seconds: float) -> None:
        """Until an attempt in flight finishes or the next one is due, at most `seconds`."""
        until = min([clock() + seconds, *(a.due() for a in pending)])
        flying = [s for a in pending for _, s in a.flying]
        wait = max(0.0, until - clock())
        if flying:
            select.select([], flying, [], wait)
        else:
            time.sleep(wait)

    what = f"health checks of {ip}" + (
        " (capped by the worker configuration's healthTimeout)" if capped else ""
    )
    try:
        waits.wait_until(
            passed,
            budget,
            what,
            poll=min(WAIT_POLL, *(c.interval_seconds for c in checks)),
            last=lambda: last[0],
            clock=clock,
            sleep=sleep or pause,
        )
    finally:
        for attempts in everyone:
            attempts.close()
