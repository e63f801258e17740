"""A small QMP (QEMU Machine Protocol) client.

`QmpClient` takes an already connected stream socket, reads QEMU's greeting and negotiates capabilities;
`execute` sends one command and returns its `return` value. Asynchronous events that arrive in between
(SHUTDOWN, POWERDOWN, RESET, ...) are recorded in `events`, never mistaken for answers. Every read is
bounded on the monotonic clock. `connect` opens the UNIX socket a QEMU process listens on, retrying
(bounded) while the socket does not exist or refuses, which is how a just-started QEMU looks.

Errors: an error answer, a closed connection or garbage on the wire raise `QmpError` (a
`HypervisorApiError`); a read that runs out of time raises `WaitTimeoutError`.
"""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import Any

from procurator import waits
from procurator.errors import HypervisorApiError, HypervisorError, WaitTimeoutError

DEFAULT_TIMEOUT = 5.0
MAX_EVENTS = 1000  # a long-lived client keeps at most this many recorded events
_MAX_LINE = 16 * 1024 * 1024  # no QMP answer is this large; more means the peer is not QEMU


class QmpError(HypervisorApiError):
    """QEMU answered a QMP command with an error, or the QMP conversation itself broke.

    `error_class` is QMP's error class (e.g. `GenericError`, `CommandNotFound`), empty for protocol faults.
    """

    def __init__(self, command: str, problem: str, *, error_class: str = "") -> None:
        detail = f"{error_class}: {problem}" if error_class else problem
        super().__init__(f"QMP {command}", 0, (detail,))
        # HypervisorApiError words its message for HTTP; QMP has no status code, so say it plainly.
        self.message = f"QMP {command}: {detail}"
        self.args = (self.message,)
        self.command = command
        self.error_class = error_class


class QmpClient:
    """One QMP session over a connected socket, which the client owns from then on (`close` closes it).

    The constructor performs the handshake (greeting, `qmp_capabilities`) within `timeout` seconds; on
    failure it closes the socket and raises. `timeout` is also the default bound of each `execute`.
    """

    def __init__(self, sock: socket.socket, *, timeout: float = DEFAULT_TIMEOUT) -> None:
        self._sock = sock
        self._buffer = b""
        self._next_id = 0
        self.timeout = timeout
        self.events: list[dict[str, Any]] = []
        self.greeting: dict[str, Any] = {}
        try:
            self._handshake()
        except BaseException:
            sock.close()
            raise

    def __enter__(self) -> QmpClient:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def close(self) -> None:
        self._sock.close()

    def execute(
        self, command: str, arguments: dict[str, Any] | None = None, *, timeout: float | None = None
    ) -> Any:
        """Run `command` and return its `return` value (a dict for most commands, a list for some).

        Raises QmpError on an error answer or a broken connection, WaitTimeoutError after `timeout`.
        """
        bound = self.timeout if timeout is None else timeout
        deadline = time.monotonic() + bound
        self._next_id += 1
        request_id = self._next_id
        request: dict[str, Any] = {"execute": command, "id": request_id}
        if arguments:
            request["arguments"] = arguments
        try:
            self._sock.settimeout(max(bound, 0.001))
            self._sock.sendall(json.dumps(request).encode() + b"\n")
        except TimeoutError as exc:
            raise WaitTimeoutError(f"QMP to accept the command `{command}`", bound) from exc
        except OSError as exc:
            raise QmpError(command, f"cannot send: {exc.strerror or exc}") from exc
        while True:
            message = self._read_message(command, deadline, bound)
            if "event" in message:
                self._record(message)
                continue
            if message.get("id") != request_id:
                continue  # the late answer to an earlier command that timed out
            if "error" in message:
                error = message["error"] if isinstance(message["error"], dict) else {}
                raise QmpError(
                    command, str(error.get("desc", "no description")), error_class=str(error.get("class", ""))
                )
            if "return" not in message:
                raise QmpError(command, f"answer has neither return nor error: {_short(message)}")
            return message["return"]

    def _handshake(self) -> None:
        deadline = time.monotonic() + self.timeout
        greeting = self._read_message("greeting", deadline, self.timeout)
        # A client that connects while the guest starts can see an event (RESUME) broadcast before its
        # greeting: keep the event and read on, within the same deadline.
        while "event" in greeting and "QMP" not in greeting:
            self._record(greeting)
            greeting = self._read_message("greeting", deadline, self.timeout)
        if not isinstance(greeting.get("QMP"), dict):
            raise QmpError("greeting", f"expected a QMP greeting, got {_short(greeting)}")
        self.greeting = greeting["QMP"]
        self.execute("qmp_capabilities")

    def event_names(self) -> list[str]:
        return [str(event.get("event")) for event in self.events]

    def _record(self, event: dict[str, Any]) -> None:
        self.events.append(event)
        del self.events[:-MAX_EVENTS]

    def _read_message(self, command: str, deadline: float, bound: float) -> dict[str, Any]:
        """The next JSON object on the wire, read at most until `deadline` (`bound` seconds after the
        start of the call); `command` is what it answers ("greeting" for the greeting)."""
        what = "the QMP greeting" if command == "greeting" else f"the QMP answer to `{command}`"
        while b"\n" not in self._buffer:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise WaitTimeoutError(what, bound)
            try:
                self._sock.settimeout(remaining)
                chunk = self._sock.recv(65536)
            except TimeoutError as exc:
                raise WaitTimeoutError(what, bound) from exc
            except OSError as exc:
                raise QmpError(command, f"cannot read: {exc.strerror or exc}") from exc
            if not chunk:
                raise QmpError(command, f"connection closed while waiting for {what}")
            self._buffer += chunk
            if len(self._buffer) > _MAX_LINE:
                raise QmpError(command, f"a message longer than {_MAX_LINE} bytes")
        line, _, self._buffer = self._buffer.partition(b"\n")
        try:
            message = json.loads(line)
        except ValueError as exc:
            raise QmpError(command, f"not JSON: {_short(line)}") from exc
        if not isinstance(message, dict):
            raise QmpError(command, f"not a JSON object: {_short(message)}")
        return message


def connect(
    path: Path, timeout: float, *, alive: Callable[[], bool] | None = None, poll: float = 0.05
) -> QmpClient:
    """Connect to the QMP socket at `path` and negotiate, retrying while it is absent or refuses.

    Connecting is bounded by `timeout`, and so is the handshake after it. `alive`, when given, is asked
    between attempts; once it says False (the QEMU process exited) the wait ends with a HypervisorError.
    """
    deadline = waits.Deadline(timeout)
    last = [""]

    def attempt() -> QmpClient | None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.settimeout(max(deadline.remaining(), poll))
            sock.connect(str(path))
        except (FileNotFoundError, ConnectionRefusedError) as exc:
            sock.close()
            last[0] = exc.strerror or str(exc)
        except TimeoutError as exc:
            sock.close()
            raise WaitTimeoutError(f"QMP socket {path} to accept a connection", timeout) from exc
        except OSError as exc:
            sock.close()
            raise HypervisorError(f"QMP socket {path}: cannot connect: {exc.strerror or exc}") from exc
        else:
            return QmpClient(sock, timeout=timeout)
        if alive is not None and not alive():
            raise HypervisorError(f"QMP socket {path}: the QEMU process exited before it answered")
        return None

    return waits.wait_until(
        attempt, timeout, f"QMP socket {path} to accept a connection", poll=poll, last=lambda: last[0]
    )


def _short(value: object) -> str:
    text = value.decode(errors="replace") if isinstance(value, bytes) else json.dumps(value)
    return text if len(text) <= 200 else text[:200] + "..."
