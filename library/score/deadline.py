"""A deadline for the whole of an HTTP request: connect, send, and the whole answer.

urllib3's `Timeout(total=...)` bounds the connection and each socket read, not
the response as a whole (FACTS.md): a server that sends its headers and then one
byte a second never trips it, and the job would hang all night. Here each
request registers a deadline with one watchdog thread; the connection the
request uses registers itself when it starts sending; when the deadline passes
first, the watchdog shuts the socket down, the blocked read returns at once,
and the caller reports a timeout. urllib3 notices the dead socket and opens a
new connection for the next request.

The connection classes are urllib3's own, subclassed through the documented
`ConnectionCls` of its pools, so every other behaviour of the pool stays.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import urllib3
from urllib3.connection import HTTPConnection, HTTPSConnection
from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool


@dataclass
class _Request:
    deadline: float
    conn: HTTPConnection | None = None
    expired: bool = False


class Watchdog:
    """Shuts down the socket of any request still running past its deadline."""

    def __init__(self) -> None:
        self._requests: dict[int, _Request] = {}  # by thread id: one request per thread
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None
        self._closed = False

    @contextlib.contextmanager
    def bound(self, seconds: float) -> Iterator[_Request]:
        """Run one request within `seconds`; `.expired` says whether the watchdog cut it."""
        request = _Request(time.monotonic() + seconds)
        key = threading.get_ident()
        with self._cond:
            self._requests[key] = request
            self._ensure_thread()
            self._cond.notify()
        try:
            yield request
        finally:
            with self._cond:
                self._requests.pop(key, None)

    def attach(self, conn: HTTPConnection) -> None:
        """Called by the connection as it starts sending: this is the socket to cut."""
        with self._cond:
            request = self._requests.get(threading.get_ident())
            if request is not None:
                request.conn = conn
                if request.expired:
                    _cut(conn)

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify()

    def _ensure_thread(self) -> None:
        if self._thread is None or not self._thread.is_alive():
            self._thread = threading.Thread(target=self._watch, name="http-deadline", daemon=True)
            self._thread.start()

    def _watch(self) -> None:
        with self._cond:
            while not self._closed:
                now = time.monotonic()
                pending = [r for r in self._requests.values() if not r.expired]
                for request in pending:
                    if request.deadline <= now:
                        request.expired = True
                        if request.conn is not None:
                            _cut(request.conn)
                waits = [r.deadline - now for r in pending if r.deadline > now]
                self._cond.wait(timeout=min(waits) if waits else None)


def _cut(conn: HTTPConnection) -> None:
    sock = getattr(conn, "sock", None)
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)


class _Watched:
    watchdog: Watchdog

    def request(self, *args: Any, **kwargs: Any) -> None:
        self.watchdog.attach(self)  # type: ignore[arg-type]
        super().request(*args, **kwargs)  # type: ignore[misc]


def pool_manager(watchdog: Watchdog, **kwargs: Any) -> urllib3.PoolManager:
    """A urllib3 PoolManager whose connections obey `watchdog`'s deadlines."""

    class Connection(_Watched, HTTPConnection):
        pass

    class SecureConnection(_Watched, HTTPSConnection):
        pass

    Connection.watchdog = watchdog
    SecureConnection.watchdog = watchdog

    class Pool(HTTPConnectionPool):
        ConnectionCls = Connection

    class SecurePool(HTTPSConnectionPool):
        ConnectionCls = SecureConnection

    manager = urllib3.PoolManager(**kwargs)
    manager.pool_classes_by_scheme = {"http": Pool, "https": SecurePool}
    return manager
