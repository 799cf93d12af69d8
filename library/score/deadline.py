"""A thin HTTP/1.1 keep-alive client whose every request ends by a deadline.

Two reasons for a client of our own rather than urllib3's pool:

* **A deadline for the whole request.** urllib3's `Timeout(total=...)` bounds
  the connection and each socket read, not the response as a whole (FACTS.md):
  a server that sends its headers and then one byte a second never trips it,
  and the job would hang all night. Here every blocking step (connect, send,
  each read) gets as its socket timeout what is left of the request's
  deadline, so the request as a whole ends by it, with no watchdog thread.
* **CPU per row.** A scoring request is one POST of a ready body and one
  answer with a Content-Length. urllib3 spends more CPU on each exchange than
  the codec does on the rows (its pool and response objects, a poll of the
  socket before reuse, headers parsed by the `email` package); FACTS.md
  measured `http.client` keep-alive per thread at 247k rows/s against 200k
  for one urllib3 pool. Here each thread keeps one connection, the request
  goes out in one `sendall`, and the answer's head is split by hand.

It speaks just enough HTTP/1.1 for a model API: any status, Content-Length,
chunked or until-close bodies, `Connection: close`, TLS for https. A request
on a reused connection that the server had closed meanwhile (its keep-alive
timeout) is sent once more on a new connection, within the same deadline, when
nothing of an answer had arrived (scoring is idempotent). Errors are the
standard library's: `DeadlineExceeded` (a `TimeoutError`), other `OSError`s
(refused, reset) and `http.client.HTTPException`s (a malformed answer); the
scoring client classifies them.
"""

from __future__ import annotations

import contextlib
import http.client
import socket
import ssl
import threading
import time
from dataclasses import dataclass
from urllib.parse import urlsplit

MAX_HEAD_BYTES = 65536  # status line and headers of one answer
READ_SIZE = 65536


class DeadlineExceeded(TimeoutError):
    """The request's deadline passed before its whole answer arrived."""


@dataclass
class Response:
    status: int
    headers: dict[str, str]  # names in lower case
    data: bytes

    def header(self, name: str) -> str | None:
        return self.headers.get(name.lower())


class _Stale(Exception):
    """A reused connection was closed by the server before any byte of an answer."""


class Connection:
    """One keep-alive connection, used by one thread at a time."""

    def __init__(self, host: str, port: int, tls: ssl.SSLContext | None) -> None:
        self.host, self.port, self.tls = host, port, tls
        self.sock: socket.socket | None = None
        self._buffer = b""  # bytes read past the previous answer (none, in practice)
        self.used = False  # whether a request has completed on this socket

    def close(self) -> None:
        sock, self.sock = self.sock, None
        self._buffer = b""
        self.used = False
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.close()

    def exchange(self, request: bytes, deadline: float, head_only: bool) -> Response:
        """Send `request`, read the whole answer by `deadline`."""
        if self.sock is not None and self.used:
            try:
                return self._exchange(request, deadline, head_only, reused=True)
            except _Stale:
                self.close()
        try:
            return self._exchange(request, deadline, head_only, reused=False)
        except _Stale:  # not reused: a fresh connection closed without an answer
            raise http.client.RemoteDisconnected(
                "the server closed the connection without an answer"
            ) from None

    def _exchange(self, request: bytes, deadline: float, head_only: bool, reused: bool) -> Response:
        try:
            if self.sock is None:
                self.sock = self._connect(deadline)
            sock = self.sock
            sock.settimeout(_left(deadline))
            try:
                sock.sendall(request)
            except (BrokenPipeError, ConnectionResetError):
                if reused:
                    raise _Stale from None
                raise
            response, keep = self._read(sock, deadline, head_only, reused)
        except BaseException:
            self.close()
            raise
        if keep:
            self.used = True
        else:
            self.close()
        return response

    def _connect(self, deadline: float) -> socket.socket:
        sock = socket.create_connection((self.host, self.port), timeout=_left(deadline))
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if self.tls is not None:
                sock.settimeout(_left(deadline))
                sock = self.tls.wrap_socket(sock, server_hostname=self.host)
        except BaseException:
            sock.close()
            raise
        return sock

    def _recv(self, sock: socket.socket, deadline: float) -> bytes:
        sock.settimeout(_left(deadline))
        try:
            return sock.recv(READ_SIZE)
        except TimeoutError:
            raise DeadlineExceeded("no whole answer before the deadline") from None

    def _read(
        self, sock: socket.socket, deadline: float, head_only: bool, reused: bool
    ) -> tuple[Response, bool]:
        data = self._buffer
        self._buffer = b""
        while True:
            end = data.find(b"\r\n\r\n")
            if end >= 0:
                status, version, headers = _parse_head(data[:end])
                data = data[end + 4 :]
                if 100 <= status < 200:
                    continue  # an interim answer (100 Continue): the real one follows
                break
            if len(data) > MAX_HEAD_BYTES:
                raise http.client.LineTooLong("the answer's head")
            try:
                more = self._recv(sock, deadline)
            except ConnectionResetError:
                if reused and not data:
                    raise _Stale from None
                raise
            if not more:
                if reused and not data:
                    raise _Stale
                raise http.client.RemoteDisconnected(
                    "the server closed the connection before a whole answer's head"
                )
            data += more
        keep = version != "HTTP/1.0" and headers.get("connection", "").lower() != "close"
        if head_only or status in (204, 304):
            return Response(status, headers, b""), keep and not data
        if "chunked" in headers.get("transfer-encoding", "").lower():
            body, rest = self._read_chunked(sock, deadline, data)
        elif "content-length" in headers:
            try:
                length = int(headers["content-length"])
            except ValueError:
                raise http.client.HTTPException(
                    f"bad Content-Length: {headers['content-length']!r}"
                ) from None
            parts = [data]
            have = len(data)
            while have < length:
                more = self._recv(sock, deadline)
                if not more:
                    raise http.client.IncompleteRead(b"".join(parts), length - have)
                parts.append(more)
                have += len(more)
            whole = b"".join(parts)
            body, rest = whole[:length], whole[length:]
        else:  # no length: the body ends when the server closes the connection
            parts = [data]
            while more := self._recv(sock, deadline):
                parts.append(more)
            return Response(status, headers, b"".join(parts)), False
        self._buffer = rest
        return Response(status, headers, body), keep

    def _read_chunked(
        self, sock: socket.socket, deadline: float, data: bytes
    ) -> tuple[bytes, bytes]:
        parts: list[bytes] = []
        while True:
            while (eol := data.find(b"\r\n")) < 0:
                data = self._more(sock, deadline, data)
            size_text = data[:eol].split(b";", 1)[0].strip()
            try:
                size = int(size_text, 16)
            except ValueError:
                raise http.client.HTTPException(f"bad chunk size: {size_text[:40]!r}") from None
            data = data[eol + 2 :]
            if size == 0:
                while (end := data.find(b"\r\n")) != 0:  # trailers, then an empty line
                    data = data[end + 2 :] if end > 0 else self._more(sock, deadline, data)
                return b"".join(parts), data[2:]
            while len(data) < size + 2:
                data = self._more(sock, deadline, data)
            parts.append(data[:size])
            data = data[size + 2 :]

    def _more(self, sock: socket.socket, deadline: float, data: bytes) -> bytes:
        more = self._recv(sock, deadline)
        if not more:
            raise http.client.IncompleteRead(data)
        return data + more


def _left(deadline: float) -> float:
    left = deadline - time.monotonic()
    if left <= 0:
        raise DeadlineExceeded("no whole answer before the deadline")
    return left


def _parse_head(head: bytes) -> tuple[int, str, dict[str, str]]:
    lines = head.decode("latin-1").split("\r\n")
    version, _, rest = lines[0].partition(" ")
    code = rest[:3]
    if not version.startswith("HTTP/") or not code.isdigit():
        raise http.client.BadStatusLine(lines[0][:100])
    headers: dict[str, str] = {}
    for line in lines[1:]:
        name, colon, value = line.partition(":")
        if not colon:
            raise http.client.HTTPException(f"malformed header line: {line[:100]!r}")
        key = name.strip().lower()
        value = value.strip()
        headers[key] = f"{headers[key]}, {value}" if key in headers else value
    return int(code), version, headers


class Transport:
    """Per-thread keep-alive connections to one origin; each request ends by its deadline."""

    def __init__(self, base_url: str, headers: dict[str, str]) -> None:
        parts = urlsplit(base_url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"not an http(s) URL: {base_url}")
        self.host = parts.hostname
        self.port = parts.port or (443 if parts.scheme == "https" else 80)
        default = 443 if parts.scheme == "https" else 80
        host = f"[{self.host}]" if ":" in self.host else self.host
        self.authority = host if self.port == default else f"{host}:{self.port}"
        self.tls = ssl.create_default_context() if parts.scheme == "https" else None
        fixed = {"Host": self.authority, "Accept-Encoding": "identity", **headers}
        self._head_lines = "".join(f"{k}: {v}\r\n" for k, v in fixed.items())
        self._local = threading.local()
        self._all: list[Connection] = []
        self._lock = threading.Lock()

    def request(self, method: str, target: str, body: bytes | None, timeout: float) -> Response:
        """`method` `target` (the path and query) with `body`: the whole answer within
        `timeout` seconds, or DeadlineExceeded."""
        deadline = time.monotonic() + timeout
        length = f"Content-Length: {len(body)}\r\n" if body is not None else ""
        head = f"{method} {target} HTTP/1.1\r\n{self._head_lines}{length}\r\n".encode("latin-1")
        return self._connection().exchange(
            head + body if body else head, deadline, head_only=method == "HEAD"
        )

    def _connection(self) -> Connection:
        conn: Connection | None = getattr(self._local, "conn", None)
        if conn is None:
            conn = self._local.conn = Connection(self.host, self.port, self.tls)
            with self._lock:
                self._all.append(conn)
        return conn

    def close(self) -> None:
        """Close every thread's connection (a thread's next request opens a new one)."""
        with self._lock:
            conns = list(self._all)
        for conn in conns:
            conn.close()
