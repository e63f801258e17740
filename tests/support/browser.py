"""Headless Chromium driven over the DevTools protocol on a pipe (`--remote-debugging-pipe`: commands on
fd 3, answers and events on fd 4, each a JSON message ended by NUL), for the status page's browser tests.

Chromium runs with a fresh user data directory and without background networking (this machine's closed
network refuses it), optionally inside a network namespace (`ip netns exec`), so that it reaches what
listens on that namespace's loopback. Every wait is bounded.
"""

from __future__ import annotations

import base64
import contextlib
import fcntl
import json
import os
import select
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--remote-debugging-pipe",
)
ARTEFACTS = Path(os.environ.get("PROCURATOR_ARTEFACTS") or Path(__file__).resolve().parents[2] / ".artefacts")


class Page:
    """One tab: navigate, evaluate JavaScript, take screenshots."""

    def __init__(self, browser: Browser, session: str) -> None:
        self.browser = browser
        self.session = session

    def send(self, method: str, **params: Any) -> dict[str, Any]:
        return self.browser.send(method, params, session=self.session)

    def goto(self, url: str, timeout: float = 20.0) -> None:
        self.send("Page.navigate", url=url)
        self.wait_for("the page to load", lambda: self.eval("document.readyState") == "complete", timeout)

    def eval(self, expression: str) -> Any:
        got = self.send("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in got:
            raise AssertionError(f"{expression!r} raised: {got['exceptionDetails']}")
        return got["result"].get("value")

    def wait_for(self, what: str, check: Callable[[], Any], timeout: float = 30.0) -> Any:
        deadline = time.monotonic() + timeout
        last: Any = None
        while True:
            with contextlib.suppress(AssertionError):
                last = check()
                if last:
                    return last
            if time.monotonic() >= deadline:
                raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what} (last: {last!r})")
            time.sleep(0.2)

    def screenshot(self, name: str) -> Path:
        """A PNG of the page, saved as a test artefact (ARTEFACTS, or $PROCURATOR_ARTEFACTS)."""
        data = self.send("Page.captureScreenshot", format="png", captureBeyondViewport=True)["data"]
        ARTEFACTS.mkdir(parents=True, exist_ok=True)
        path = ARTEFACTS / f"{name}.png"
        path.write_bytes(base64.b64decode(data))
        return path


class Browser:
    def __init__(self, proc: subprocess.Popen[bytes], to_browser: int, from_browser: int) -> None:
        self.proc = proc
        self._out = to_browser
        self._in = from_browser
        self._buffer = b""
        self._next = 0

    def send(self, method: str, params: dict[str, Any], *, session: str | None = None,
             timeout: float = 30.0) -> dict[str, Any]:  # fmt: skip
        self._next += 1
        ident = self._next
        message: dict[str, Any] = {"id": ident, "method": method, "params": params}
        if session is not None:
            message["sessionId"] = session
        os.write(self._out, json.dumps(message).encode() + b"\0")
        deadline = time.monotonic() + timeout
        while True:
            got = self._read(deadline, method)
            if got.get("id") == ident:
                if "error" in got:
                    raise AssertionError(f"{method}: {got['error']}")
                result: dict[str, Any] = got.get("result", {})
                return result

    def _read(self, deadline: float, waiting_for: str) -> dict[str, Any]:
        while b"\0" not in self._buffer:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"chromium did not answer {waiting_for} in time")
            ready, _, _ = select.select([self._in], [], [], remaining)
            if ready:
                chunk = os.read(self._in, 1 << 20)
                if not chunk:
                    raise AssertionError(f"chromium closed its pipe (exit {self.proc.poll()})")
                self._buffer += chunk
        raw, _, self._buffer = self._buffer.partition(b"\0")
        message: dict[str, Any] = json.loads(raw)
        return message

    def open(self, url: str = "about:blank", width: int = 1200, height: int = 900) -> Page:
        target = self.send("Target.createTarget", {"url": "about:blank"})["targetId"]
        session = self.send("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        page = Page(self, session)
        page.send("Page.enable")
        page.send("Runtime.enable")
        page.send("Emulation.setDeviceMetricsOverride", width=width, height=height, deviceScaleFactor=1,
                  mobile=False)  # fmt: skip
        if url != "about:blank":
            page.goto(url)
        return page


def _above_nine(fd: int) -> int:
    moved = fcntl.fcntl(fd, fcntl.F_DUPFD, 10)
    os.close(fd)
    return moved


@contextlib.contextmanager
def chromium(netns: str | None = None) -> Iterator[Browser]:
    """A headless Chromium (in `netns` if given), closed at the end."""
    with tempfile.TemporaryDirectory(prefix="procurator-chromium-") as profile:
        to_read, to_browser = os.pipe()  # Chromium reads commands on fd 3
        from_browser, to_write = os.pipe()  # and writes on fd 4
        # Its ends move above 9, so that putting them on 3 and 4 in the child clobbers neither.
        to_read, to_write = (_above_nine(fd) for fd in (to_read, to_write))
        # a shell puts the pipes on fds 3 and 4, where --remote-debugging-pipe looks, then runs Chromium
        argv = ["bash", "-c", f'exec 3<&{to_read} 4>&{to_write} {to_read}<&- {to_write}>&- "$@"', "bash",
                CHROMIUM, *FLAGS, f"--user-data-dir={profile}", "about:blank"]  # fmt: skip
        if netns is not None:
            argv = ["ip", "netns", "exec", netns, *argv]
        proc = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            pass_fds=(to_read, to_write), start_new_session=True,
        )  # fmt: skip
        os.close(to_read)
        os.close(to_write)
        browser = Browser(proc, to_browser, from_browser)
        try:
            browser.send("Target.setDiscoverTargets", {"discover": True}, timeout=60.0)
            yield browser
        finally:
            with contextlib.suppress(AssertionError, OSError):
                browser.send("Browser.close", {}, timeout=5.0)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, 9)
                proc.wait(timeout=10)
            os.close(to_browser)
            os.close(from_browser)
