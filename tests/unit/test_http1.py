"""procurator/http1.py: one HTTP/1.x answer read from a socket, as the hypervisor's and the worker's
servers write them, and what it refuses."""

from __future__ import annotations

import socket
import threading

import pytest

from procurator import http1


def read(*chunks: bytes, close: bool = True, max_body: int = http1.MAX_BODY) -> tuple[int, bytes]:
    """What `read_answer` makes of a peer that sends `chunks` (one send each), then closes if `close`."""
    ours, theirs = socket.socketpair()
    ours.settimeout(5)

    def write() -> None:
        for chunk in chunks:
            theirs.sendall(chunk)
        if close:
            theirs.shutdown(socket.SHUT_WR)

    writer = threading.Thread(target=write)
    writer.start()
    try:
        return http1.read_answer(ours, max_body=max_body)
    finally:
        writer.join(5)
        ours.close()
        theirs.close()


MICRO_HTTP = (
    b"HTTP/1.1 200 \r\nServer: Cloud Hypervisor API\r\nConnection: keep-alive\r\n"
    b"Content-Type: application/json\r\nContent-Length: 11\r\n\r\n"
)


def test_an_answer_with_content_length_is_read_to_its_length_without_waiting_for_the_close() -> None:
    assert read(MICRO_HTTP + b'{"a": true}', close=False) == (200, b'{"a": true}')


def test_head_and_body_may_arrive_in_any_pieces() -> None:
    whole = MICRO_HTTP + b'{"a": true}'
    assert read(*(whole[i : i + 7] for i in range(0, len(whole), 7)), close=False) == (200, b'{"a": true}')


def test_bytes_past_the_length_are_not_the_body() -> None:
    assert read(MICRO_HTTP + b'{"a": true}GARBAGE') == (200, b'{"a": true}')


def test_without_content_length_the_body_runs_to_the_close() -> None:
    assert read(b"HTTP/1.0 500 Internal Server Error\r\n\r\n", b'["boom"]') == (500, b'["boom"]')


def test_no_content_has_no_body() -> None:
    assert read(b"HTTP/1.1 204 No Content\r\nServer: Cloud Hypervisor API\r\n\r\n", close=False) == (204, b"")


def test_header_names_are_case_insensitive() -> None:
    assert read(b"HTTP/1.1 404 Not Found\r\ncontent-LENGTH:  2 \r\n\r\n[]", close=False) == (404, b"[]")


@pytest.mark.parametrize(
    ("chunks", "said"),
    [
        ((b"SSH-2.0-OpenSSH_9.2\r\n\r\n",), "not an HTTP/1.x status line"),
        ((b"HTTP/1.1 2x0 OK\r\n\r\n",), "not an HTTP/1.x status line"),
        ((b"HTTP/1.1 200 OK\r\nContent-Length: ten\r\n\r\n",), "a Content-Length that is not a number"),
        ((b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",), "chunked"),
        ((b"HTTP/1.1 200 OK\r\nno colon here\r\n\r\n",), "a header line without ':'"),
        ((b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nshort",), "closed after 5 of 10 bytes"),
        ((b"HTTP/1.1 200 OK\r\nContent-",), "closed before the answer's head ended"),
        ((b"",), "closed before the answer's head ended"),
        ((b"HTTP/1.1 200 OK\r\n" + b"X-Pad: " + b"a" * (http1.MAX_HEAD + 10),), "head of more than"),
    ],
)
def test_what_is_not_an_answer_is_refused(chunks: tuple[bytes, ...], said: str) -> None:
    with pytest.raises(http1.ProtocolError, match=said):
        read(*chunks)


def test_a_body_over_the_limit_is_refused_announced_or_not() -> None:
    with pytest.raises(http1.ProtocolError, match="body of 100 bytes, more than 10"):
        read(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n" + b"x" * 100, max_body=10)
    with pytest.raises(http1.ProtocolError, match="body of more than 10 bytes"):
        read(b"HTTP/1.1 200 OK\r\n\r\n", b"x" * 100, max_body=10)


def test_a_silent_peer_ends_in_the_sockets_timeout() -> None:
    ours, theirs = socket.socketpair()
    with ours, theirs:
        ours.settimeout(0.05)
        theirs.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc")
        with pytest.raises(TimeoutError):
            http1.read_answer(ours)
