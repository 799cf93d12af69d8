"""The database boundary: connections, error classification, migrations, embedded server.

psycopg errors are classified here, once (`classify`): a lost connection, a
deadlock or a serialization failure is transient, and `with_retries` retries the
whole unit of work (one transaction) with tenacity for up to DB_RETRY_TIMEOUT;
anything else stops the run. `Supervised` is a connection that comes back after
a restart, restoring its session state (advisory locks, temporary tables).

Migrations are the Flyway-style files in `sql/` (`V1__create_tables.sql`, ...),
recorded in Flyway's own `flyway_schema_history` table with Flyway's checksum,
so `batch-pipeline migrate` and a Flyway container agree on what is applied.
"""

from __future__ import annotations

import contextlib
import logging
import re
import threading
import time
import warnings
import zlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import psycopg
import tenacity
from psycopg import errors as pg_errors

from library.config import (
    DEFAULT_DB_RETRY_FIRST_DELAY,
    DEFAULT_DB_RETRY_MAX_DELAY,
    redact_url,
    scrub,
    url_secrets,
)
from library.errors import DatabaseError, SchemaNotReadyError, TransientDatabaseError

if TYPE_CHECKING:
    from library.config import SinkSettings

log = logging.getLogger(__name__)

T = TypeVar("T")

CONNECT_TIMEOUT_SECONDS = 10
HISTORY_TABLE = "flyway_schema_history"
_MIGRATION_NAME = re.compile(r"V(\d+(?:[._]\d+)*)__(.+)\.sql")

TRANSIENT_ERRORS: tuple[type[Exception], ...] = (
    psycopg.OperationalError,  # connection refused or lost, server shutting down, ...
    pg_errors.SerializationFailure,
    pg_errors.DeadlockDetected,
    pg_errors.LockNotAvailable,
    pg_errors.AdminShutdown,
    pg_errors.CannotConnectNow,
)
# OperationalErrors that no wait will cure: the credentials or the database name are wrong.
PERMANENT_CONNECT_ERRORS = ("authentication failed", "does not exist", "no password supplied")

# A fenced flush found that another worker claimed one of its objects (sql/V4).
CLAIM_LOST_SQLSTATE = "BPF01"

# libpq's TCP keepalives: a peer that vanished (a host powered off, a network cut)
# is noticed in about a minute instead of the operating system's two hours, so
# that the advisory locks its backend held are released (FACTS.md).
KEEPALIVES: dict[str, Any] = {
    "keepalives": 1,
    "keepalives_idle": 30,
    "keepalives_interval": 10,
    "keepalives_count": 3,
    "tcp_user_timeout": 60_000,  # ms: unacknowledged data for this long breaks the connection
}


class ClaimLostError(DatabaseError):
    """A flush was refused: another worker claimed one of its objects since this one did."""


def classify(exc: BaseException, doing: str) -> DatabaseError:
    """A psycopg error as the error tree says the caller reacts to it.

    Transient (retry the whole unit of work on a new connection): a lost or refused
    connection, a server shutting down or starting up, a deadlock, a serialization
    failure. A lost claim has its own class. Anything else stops the run."""
    detail = first_line(exc)
    if getattr(exc, "sqlstate", None) == CLAIM_LOST_SQLSTATE:
        return ClaimLostError(f"{doing}: {detail}")
    if isinstance(exc, TRANSIENT_ERRORS) and not any(
        marker in detail for marker in PERMANENT_CONNECT_ERRORS
    ):
        return TransientDatabaseError(f"database error while {doing}: {detail}")
    return DatabaseError(f"database error while {doing}: {type(exc).__name__}: {detail}")


def connect(url: str, application_name: str = "batch-pipeline") -> psycopg.Connection[Any]:
    """A new autocommit connection with keepalives; raises a classified DatabaseError."""
    try:
        # Autocommit: every unit of work opens its own explicit transaction.
        return psycopg.connect(
            url,
            connect_timeout=CONNECT_TIMEOUT_SECONDS,
            application_name=application_name,
            autocommit=True,
            **KEEPALIVES,
        )
    except psycopg.Error as exc:
        # libpq's message can quote pieces of the URL (a host, a port, a bad token), and
        # this message is also printed in the summary and stored, outside the log filter.
        detail = scrub(first_line(exc), url_secrets(url))
        error = classify(exc, "connecting")  # refused or lost: transient; a wrong password: not
        raise type(error)(
            f"cannot connect to the database at {redact_url(url)}: {detail}; "
            "check DATABASE_URL and that PostgreSQL is running"
        ) from None


def first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


@contextmanager
def classified(doing: str) -> Iterator[None]:
    """Turn any psycopg error raised inside into the error tree's DatabaseError."""
    try:
        yield
    except psycopg.Error as exc:
        raise classify(exc, doing) from None


def with_retries(
    action: Callable[[], T],
    doing: str,
    window: float,
    on_retry: Callable[[], None] | None = None,
) -> T:
    """Run `action` (one whole database transaction), retrying transient failures
    with exponential backoff and full jitter for up to `window` seconds
    (DB_RETRY_TIMEOUT): a restart or a failover shorter than that is ridden out.
    `on_retry` runs after each transient failure (drop the broken connection)."""

    def attempt() -> T:
        with classified(doing):
            return action()

    def before_sleep(state: tenacity.RetryCallState) -> None:
        if on_retry:
            on_retry()
        error = state.outcome.exception() if state.outcome else None
        delay = state.next_action.sleep if state.next_action else 0.0
        log.warning(
            "%s (attempt %d); retrying in %.1fs, for up to DB_RETRY_TIMEOUT=%gs in all",
            error,
            state.attempt_number,
            delay,
            window,
        )

    retrying = tenacity.Retrying(
        retry=tenacity.retry_if_exception_type(TransientDatabaseError),
        stop=tenacity.stop_after_delay(window),
        wait=tenacity.wait_random_exponential(
            multiplier=DEFAULT_DB_RETRY_FIRST_DELAY, max=DEFAULT_DB_RETRY_MAX_DELAY
        ),
        before_sleep=before_sleep,
        reraise=True,
    )
    return retrying(attempt)


class Supervised:
    """One database connection that comes back after a restart or a dropped connection.

    Every use is one unit of work run through `with_retries`: on a transient error
    the connection is dropped and the unit retried on a new one, after
    `on_reconnect` has restored the session's state (a temporary table, the
    advisory locks the session held). Thread-safe: one unit at a time."""

    def __init__(
        self,
        url: str,
        application_name: str,
        window: float,
        on_reconnect: Callable[[psycopg.Connection[Any]], object] | None = None,
        conn: psycopg.Connection[Any] | None = None,
    ) -> None:
        self.url = url
        self.application_name = application_name
        self.window = window
        self.on_reconnect = on_reconnect
        self.lock = threading.RLock()
        self._conn = conn
        self._connected_once = conn is not None

    def run(self, doing: str, action: Callable[[psycopg.Connection[Any]], T]) -> T:
        with self.lock:
            return with_retries(
                lambda: action(self.connection()), doing, self.window, on_retry=self.drop
            )

    def run_in_session(
        self, doing: str, action: Callable[[psycopg.Connection[Any]], object]
    ) -> bool:
        """Run `action` on the current connection only: for what lives in its session
        (an advisory lock), which a new connection would not have. No reconnect, no
        retry; False when the session is gone (the server ended it with its state)."""
        with self.lock:
            if self._conn is None or self._conn.closed:
                return False
            try:
                with classified(doing):
                    action(self._conn)
            except TransientDatabaseError:
                self.drop()
                return False
            return True

    def connection(self) -> psycopg.Connection[Any]:
        with self.lock:
            if self._conn is None or self._conn.closed:
                conn = connect(self.url, self.application_name)
                if self.on_reconnect:
                    try:
                        with classified("restoring the session"):
                            self.on_reconnect(conn)
                    except BaseException:
                        conn.close()
                        raise
                self._conn = conn
                self._connected_once = True
            return self._conn

    def drop(self) -> None:
        with self.lock:
            if self._conn is not None:
                with contextlib.suppress(psycopg.Error):
                    self._conn.close()
            self._conn = None

    def close(self) -> None:
        self.drop()


# -- migrations ----------------------------------------------------------------


@dataclass(frozen=True)
class Migration:
    version: str
    description: str
    path: Path

    @property
    def script(self) -> str:
        return self.path.name

    def sql(self) -> str:
        return self.path.read_text(encoding="utf-8")

    def checksum(self) -> int:
        """Flyway's checksum: CRC32 over the UTF-8 bytes of each line, line ends excluded.

        Flyway splits lines at \\n, \\r and \\r\\n only (read_text has already turned the
        last two into \\n); str.splitlines would also split at form feeds, \\x85, \\u2028...
        Checked against Flyway 11.20.3: identical history rows both ways."""
        crc = 0
        text = self.sql().removeprefix("\ufeff")
        for line in text.split("\n"):
            crc = zlib.crc32(line.encode("utf-8"), crc)
        return crc - (1 << 32) if crc >= 1 << 31 else crc


def migrations_dir() -> Path:
    package = Path(__file__).resolve().parents[1]  # library/
    # library/sql in an installed wheel (pyproject's force-include), sql/ in a checkout
    for candidate in (package / "sql", package.parent / "sql"):
        if candidate.is_dir():
            return candidate
    raise FileNotFoundError("the sql/ migrations folder is missing from this installation")


def version_key(version: str) -> tuple[int, ...]:
    return tuple(int(p) for p in re.split(r"[._]", version))


def available_migrations(folder: Path | None = None) -> list[Migration]:
    found = []
    for path in (folder or migrations_dir()).glob("V*__*.sql"):
        match = _MIGRATION_NAME.fullmatch(path.name)
        if match:
            found.append(
                Migration(match.group(1).replace("_", "."), match.group(2).replace("_", " "), path)
            )
    return sorted(found, key=lambda m: version_key(m.version))


def applied_versions(conn: psycopg.Connection[Any]) -> set[str]:
    exists = conn.execute("SELECT to_regclass(%s) IS NOT NULL", (HISTORY_TABLE,)).fetchone()
    if not exists or not exists[0]:
        return set()
    rows = conn.execute(
        f"SELECT version FROM {HISTORY_TABLE} WHERE success AND version IS NOT NULL"
    ).fetchall()
    return {r[0] for r in rows}


def pending_migrations(conn: psycopg.Connection[Any]) -> list[Migration]:
    applied = applied_versions(conn)
    return [m for m in available_migrations() if m.version not in applied]


def migrate(conn: psycopg.Connection[Any]) -> list[Migration]:
    """Apply every pending migration, each in its own transaction; return those applied."""
    applied: list[Migration] = []
    with conn.transaction():
        # One migrator at a time: two jobs started together must not both apply V1.
        conn.execute("SELECT pg_advisory_xact_lock(hashtext('batch-pipeline:migrate'))")
        conn.execute(
            f"""CREATE TABLE IF NOT EXISTS {HISTORY_TABLE} (
                installed_rank integer PRIMARY KEY,
                version varchar(50),
                description varchar(200) NOT NULL,
                type varchar(20) NOT NULL,
                script varchar(1000) NOT NULL,
                checksum integer,
                installed_by varchar(100) NOT NULL,
                installed_on timestamp NOT NULL DEFAULT now(),
                execution_time integer NOT NULL,
                success boolean NOT NULL)"""
        )
    for migration in available_migrations():
        with conn.transaction():
            conn.execute("SELECT pg_advisory_xact_lock(hashtext('batch-pipeline:migrate'))")
            if migration.version in applied_versions(conn):
                continue
            began = time.perf_counter()
            try:
                conn.execute(migration.sql().encode())
            except psycopg.Error as exc:
                raise DatabaseError(
                    f"migration {migration.script} failed: {first_line(exc)}"
                ) from None
            elapsed_ms = int((time.perf_counter() - began) * 1000)
            conn.execute(
                f"""INSERT INTO {HISTORY_TABLE}
                    (installed_rank, version, description, type, script, checksum,
                     installed_by, execution_time, success)
                    SELECT COALESCE(MAX(installed_rank), 0) + 1, %s, %s, 'SQL', %s, %s,
                           current_user, %s, true FROM {HISTORY_TABLE}""",
                (
                    migration.version,
                    migration.description,
                    migration.script,
                    migration.checksum(),
                    elapsed_ms,
                ),
            )
        applied.append(migration)
        log.info("applied migration %s", migration.script)
    return applied


def require_schema(conn: psycopg.Connection[Any]) -> None:
    pending = pending_migrations(conn)
    if pending:
        names = ", ".join(m.script for m in pending)
        raise SchemaNotReadyError(
            f"the database is not migrated (pending: {names}); "
            "run `batch-pipeline migrate` first, or pass --migrate"
        )


# -- embedded PostgreSQL -------------------------------------------------------


@contextmanager
def embedded_postgres(folder: Path) -> Iterator[str]:
    """Start (or reuse) the embedded PostgreSQL in `folder`; yield its URL.

    pgserver ships real PostgreSQL binaries; the server is stopped when the last
    process using it exits.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # platformdirs warns when XDG_RUNTIME_DIR is unset
        import pgserver

    folder = folder.expanduser().resolve()
    folder.parent.mkdir(parents=True, exist_ok=True)
    try:
        server = pgserver.get_server(folder, cleanup_mode="stop")  # type: ignore[attr-defined]
    except Exception as exc:
        raise DatabaseError(
            f"cannot start the embedded PostgreSQL in {folder}: {first_line(exc)}; "
            "set DATABASE_URL to use your own PostgreSQL"
        ) from None
    yield server.get_uri()


@contextmanager
def database(settings: SinkSettings) -> Iterator[tuple[str, str]]:
    """The database URL to use (given, or the embedded server) and how to show it."""
    url = settings.database_url
    if url:
        yield url, redact_url(url)
        return
    with embedded_postgres(settings.embedded_dir) as embedded:
        folder = settings.embedded_dir.expanduser().resolve()
        log.info(
            "DATABASE_URL is unset: using the embedded PostgreSQL in %s (%s)", folder, embedded
        )
        # Its folder, not only its URL: the socket may live elsewhere when the path is long.
        yield embedded, f"{embedded} (embedded, in {folder})"
