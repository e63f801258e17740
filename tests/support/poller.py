"""A client polling one HTTP address at a fixed interval, for zero-downtime tests and the benchmark.

Run inside the test's network namespace (`ip netns exec NS python3 -m tests.support.poller ADDR`): each
poll is a fresh TCP connection and `GET /` with a short timeout, printed as one JSON line
`{"t": <monotonic>, "ok": bool, "release": "2" | null, "error": "..."}`; it stops when stdin closes.
Standard library only.
"""

from __future__ import annotations

import itertools
import json
import re
import socket
import sys
import threading
import time
from dataclasses import dataclass

INTERVAL = 0.05
TIMEOUT = 1.0
_RELEASE = re.compile(rb"release=(\S+)")


def get(address: str, timeout: float = TIMEOUT) -> tuple[bool, str | None, str]:
    """(ok, release on the page, error) of one `GET /` of `address` on port 80."""
    try:
        with socket.create_connection((address, 80), timeout=timeout) as conn:
            conn.sendall(b"GET / HTTP/1.0\r\nHost: x\r\n\r\n")
            data = b""
            while chunk := conn.recv(4096):
                data += chunk
    except OSError as exc:
        return False, None, f"{type(exc).__name__}: {exc}"
    if not data.startswith(b"HTTP/1.") or b" 200 " not in data.split(b"\r\n", 1)[0]:
        return False, None, f"bad response {data[:40]!r}"
    found = _RELEASE.search(data)
    return True, found.group(1).decode() if found else None, ""


def main(address: str) -> None:
    done = threading.Event()

    def watch_stdin() -> None:
        sys.stdin.read()
        done.set()

    threading.Thread(target=watch_stdin, daemon=True).start()
    while not done.is_set():
        start = time.monotonic()
        ok, release, error = get(address)
        print(json.dumps({"t": start, "ok": ok, "release": release, "error": error}), flush=True)
        done.wait(max(0.0, INTERVAL - (time.monotonic() - start)))


@dataclass(frozen=True)
class Poll:
    t: float
    ok: bool
    release: str | None
    error: str


def parse(text: str) -> list[Poll]:
    return [Poll(**json.loads(line)) for line in text.splitlines() if line.strip()]


def max_gap(polls: list[Poll]) -> float:
    """The longest time between two successful polls (seconds)."""
    times = [p.t for p in polls if p.ok]
    return max((b - a for a, b in itertools.pairwise(times)), default=0.0)


if __name__ == "__main__":
    main(sys.argv[1])
