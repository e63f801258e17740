"""Health checks a bundle declares (TCP connect, HTTP status), run from the host against the guest."""

from __future__ import annotations

import time
from collections.abc import Callable

from procurator import waits
from procurator.errors import WaitTimeoutError
from procurator.models import HealthCheck
from procurator.netns import connect_tcp

# While a start waits for its checks, they are tried every WAIT_POLL seconds (a failed connect to a
# booting guest is immediate once its network is up: a reset), and a connect is given at most
# WAIT_CONNECT seconds (a guest that does not answer ARP yet would otherwise hold a probe for the whole
# timeoutSeconds, and its service's start be noticed that much later). The budget stays the checks'
# own, intervalSeconds times retries; the HTTP answer still gets timeoutSeconds.
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
    sock.settimeout(check.timeout_seconds)
    with sock:
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


def wait_healthy(
    checks: tuple[HealthCheck, ...],
    ip: str,
    netns: str | None,
    *,
    timeout: float | None = None,
    cap: float | None = None,
    still_running: Callable[[], bool] = lambda: True,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
) -> None:
    """Wait until every check passes once, trying them every WAIT_POLL seconds. Bounded by `timeout`
    (default: the checks' own budget, their intervals times their retries), and never longer than `cap`
    (the worker configuration's healthTimeout); a wait cut short by the cap says so."""
    if not checks:
        return
    if any(c.type == "http" for c in checks):
        import http.client  # noqa: F401, PLC0415 - now, not inside the probe that first connects (~10 ms)
    budget = timeout if timeout is not None else max(c.interval_seconds * c.retries for c in checks)
    capped = cap is not None and budget > cap
    if cap is not None:
        budget = min(budget, cap)
    started = clock()
    pending = list(checks)
    last = [""]

    def passed() -> bool:
        still = []
        for check in pending:
            problem = probe(check, ip, netns, connect_timeout=WAIT_CONNECT)
            if problem is not None:
                still.append(check)
                last[0] = problem
        pending[:] = still
        if not pending:
            return True
        if not still_running():
            raise WaitTimeoutError(f"health checks of {ip} (the VM stopped)", clock() - started, last[0])
        return False

    what = f"health checks of {ip}" + (
        " (capped by the worker configuration's healthTimeout)" if capped else ""
    )
    waits.wait_until(
        passed,
        budget,
        what,
        poll=min(WAIT_POLL, *(c.interval_seconds for c in checks)),
        last=lambda: last[0],
        clock=clock,
        sleep=sleep,
    )
