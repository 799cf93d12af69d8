"""The scoring client's thin HTTP transport (library/score/deadline.py) against raw
socket servers on 127.0.0.1 that answer the way real servers sometimes do: closing
an idle keep-alive connection, chunked bodies, no length, a trickle."""

from __future__ import annotations

import http.client
import socket
import threading
import time
from collections.abc import Callable, Iterator

import pytest

from library.score.deadline import DeadlineExceeded, Transport

# request -> (pieces to send, or seconds to wait between them; close after)
Answer = Callable[[bytes], tuple[list[bytes | float], bool]]


class RawServer:
    """Reads each request whole (head and Content-Length body), sends `answer`'s pieces."""

    def __init__(self, answer: Answer) -> None:
        self.answer = answer
        self.connections = 0
        self.requests: list[bytes] = []
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(8)
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.connections += 1
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        data = b""
        with conn:
            try:
                while True:
                    while b"\r\n\r\n" not in data:
                        more = conn.recv(65536)
                        if not more:
                            return
                        data += more
                    head, _, data = data.partition(b"\r\n\r\n")
                    length = 0
                    for line in head.split(b"\r\n")[1:]:
                        name, _, value = line.partition(b":")
                        if name.strip().lower() == b"content-length":
                            length = int(value)
                    while len(data) < length:
                        data += conn.recv(65536)
                    self.requests.append(head + b"\r\n\r\n" + data[:length])
                    data = data[length:]
                    pieces, close = self.answer(self.requests[-1])
                    for piece in pieces:
                        if isinstance(piece, float):
                            time.sleep(piece)
                        else:
                            conn.sendall(piece)
                    if close:
                        return
            except OSError:
                return

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def serve() -> Iterator[Callable[[Answer], RawServer]]:
    servers: list[RawServer] = []

    def start(answer: Answer) -> RawServer:
        servers.append(RawServer(answer))
        return servers[-1]

    yield start
    for server in servers:
        server.close()


def ok(body: bytes = b'{"ok":true}', extra: bytes = b"") -> bytes:
    return b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n%s\r\n%s" % (len(body), extra, body)


def test_requests_share_one_keep_alive_connection_per_thread(
    serve: Callable[[Answer], RawServer],
) -> None:
    server = serve(lambda _req: ([ok()], False))
    transport = Transport(server.url, {"Content-Type": "application/json"})
    for _ in range(3):
        response = transport.request("POST", "/predict", b"[1,2]", 5.0)
        assert (response.status, response.data) == (200, b'{"ok":true}')
    assert server.connections == 1
    head = server.requests[0].split(b"\r\n\r\n")[0].split(b"\r\n")
    assert head[0] == b"POST /predict HTTP/1.1"
    assert f"Host: {server.url.removeprefix('http://')}".encode() in head
    assert b"Content-Length: 5" in head and server.requests[0].endswith(b"\r\n\r\n[1,2]")
    transport.close()


def test_an_idle_connection_closed_by_the_server_is_reopened_without_an_error(
    serve: Callable[[Answer], RawServer],
) -> None:
    # The server drops every connection after one answer, without saying so (its
    # keep-alive timeout): the next request must go out again on a new connection.
    server = serve(lambda _req: ([ok()], True))
    transport = Transport(server.url, {})
    for _ in range(3):
        time.sleep(0.05)  # the close reaches the client first
        assert transport.request("POST", "/predict", b"{}", 5.0).status == 200
    assert server.connections == 3 and len(server.requests) == 3


def test_connection_close_chunked_and_unbounded_bodies(
    serve: Callable[[Answer], RawServer],
) -> None:
    answers = iter(
        [
            (
                [
                    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n",
                    b"6;ext=1\r\n world\r\n0\r\nX-Trailer: t\r\n\r\n",
                ],
                False,
            ),
            ([ok(b"bye", b"Connection: close\r\n")], True),
            (
                [b"HTTP/1.0 503 Service Unavailable\r\nRetry-After: 7\r\n\r\ndown", b" for now"],
                True,
            ),
        ]
    )
    server = serve(lambda _req: next(answers))
    transport = Transport(server.url, {})
    first = transport.request("POST", "/p", b"x", 5.0)
    assert first.data == b"hello world"
    assert transport.request("POST", "/p", b"x", 5.0).data == b"bye"
    last = transport.request("POST", "/p", b"x", 5.0)
    assert (last.status, last.header("Retry-After"), last.data) == (503, "7", b"down for now")
    assert server.connections == 2


def test_a_trickling_answer_is_cut_at_the_deadline(serve: Callable[[Answer], RawServer]) -> None:
    # A byte every 0.3 s: every read gets something well within the timeout, so only
    # the deadline of the whole request can end it (urllib3's Timeout(total) would not).
    head = b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n"
    server = serve(lambda _req: ([head, *([0.3, b" "] * 30)], False))
    transport = Transport(server.url, {})
    began = time.monotonic()
    with pytest.raises(DeadlineExceeded):
        transport.request("POST", "/p", b"x", 1.0)
    assert 0.9 < time.monotonic() - began < 2.0
    transport.close()


def test_a_server_that_closes_without_an_answer_is_an_http_error(
    serve: Callable[[Answer], RawServer],
) -> None:
    server = serve(lambda _req: ([], True))
    with pytest.raises(http.client.RemoteDisconnected):
        Transport(server.url, {}).request("POST", "/p", b"x", 5.0)
    with pytest.raises(ConnectionRefusedError):
        port = socket.socket()
        port.bind(("127.0.0.1", 0))
        address = port.getsockname()[1]
        port.close()
        Transport(f"http://127.0.0.1:{address}", {}).request("GET", "/", None, 5.0)
