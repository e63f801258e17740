"""One HTTP/1.1 answer read from a connected stream socket: the status and the body.

For the one-request connections of the hot paths, where http.client's parser (email.parser for the
headers: about 60 us an answer, and 17 ms of imports for a command that makes one request) costs more
than the request: `hypervisor.api.get_once` and `put_with_fds` (cloud-hypervisor's micro_http, whose
src/response.rs writes `Content-Length` in every answer but a 1xx or 204, and a status line of the code
alone, `HTTP/1.1 200 `) and
`worker.client.listing` (our own worker/api.py, http.server's `send_header("Content-Length")`). An
answer without `Content-Length` is read to the end of the connection; a chunked one is refused (neither
server sends one), as is a head over `MAX_HEAD` bytes or a body over `max_body`.
"""

from __future__ import annotations

import socket

MAX_HEAD = 64 << 10  # bytes of status line and headers
MAX_BODY = 64 << 20  # bytes of body, by default


class ProtocolError(Exception):
    """The peer's answer is not an HTTP/1.x answer this reader takes."""


def read_answer(sock: socket.socket, *, max_body: int = MAX_BODY) -> tuple[int, bytes]:
    """(status, body) of the answer on `sock`; the socket's timeout bounds each read (TimeoutError).
    Raises ProtocolError for what is not an answer, OSError for what the socket raises."""
    data = b""
    while (end := data.find(b"\r\n\r\n")) < 0:
        if len(data) > MAX_HEAD:
            raise ProtocolError(f"an answer's head of more than {MAX_HEAD} bytes")
        chunk = sock.recv(65536)
        if not chunk:
            raise ProtocolError("the connection closed before the answer's head ended")
        data += chunk
    head, rest = data[:end], data[end + 4 :]
    lines = head.split(b"\r\n")
    status = _status(lines[0])
    length: int | None = None
    for line in lines[1:]:
        name, colon, value = line.partition(b":")
        if not colon:
            raise ProtocolError(f"a header line without ':': {line[:80]!r}")
        name = name.strip().lower()
        if name == b"content-length":
            length = _length(value)
        elif name == b"transfer-encoding" and value.strip().lower() != b"identity":
            raise ProtocolError(f"transfer-encoding {value.strip()[:40]!r}, which this reader does not take")
    if length is None and (status in {204, 304} or 100 <= status < 200):
        length = 0  # RFC 9112 6.3: no body
    limit = max_body if length is None else length
    if limit > max_body:
        raise ProtocolError(f"an answer's body of {limit} bytes, more than {max_body}")
    parts = [rest]
    received = len(rest)
    while length is None or received < length:
        if length is None and received > limit:
            raise ProtocolError(f"an answer's body of more than {limit} bytes")
        chunk = sock.recv(1 << 20 if length is None else min(1 << 20, length - received))
        if not chunk:
            if length is None:
                break
            raise ProtocolError(f"the connection closed after {received} of {length} bytes of the body")
        parts.append(chunk)
        received += len(chunk)
    if length is None and received > limit:
        raise ProtocolError(f"an answer's body of more than {limit} bytes")
    body = b"".join(parts)
    return status, body if length is None else body[:length]


def _status(line: bytes) -> int:
    version, _, rest = line.partition(b" ")
    code = rest[:3]
    if not version.startswith(b"HTTP/1.") or len(code) != 3 or not code.isdigit():
        raise ProtocolError(f"not an HTTP/1.x status line: {line[:80]!r}")
    return int(code)


def _length(value: bytes) -> int:
    text = value.strip()
    if not text.isdigit():
        raise ProtocolError(f"a Content-Length that is not a number: {text[:40]!r}")
    return int(text)
