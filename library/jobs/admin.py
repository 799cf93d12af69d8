"""The database work of the commands that are not a run: `status`, `runs`, `report`,
`query` and `migrate` (pipeline/batch/main.py only parses, calls these and renders).

Each opens the database the run would use (DATABASE_URL, or the embedded server,
which is migrated first so that a command run before any `run` finds an empty
history instead of a schema error), does one thing, and closes it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import psycopg

from library.config import SinkSettings
from library.errors import PipelineError, SchemaNotReadyError
from library.jobs import history, reports
from library.state import db
from library.state.db import database

T = TypeVar("T")


def read_only(sink: SinkSettings, action: Callable[[psycopg.Connection[Any]], T]) -> T:
    """`action(conn)` on the database in a read-only transaction, on a migrated schema."""

    with database(sink) as (url, shown):
        conn = db.connect(url, "batch-pipeline read")
        try:
            with db.classified("reading the ledger"):
                if sink.database_url is None:
                    db.migrate(conn)
                pending = db.pending_migrations(conn)
            if pending:
                raise SchemaNotReadyError(
                    f"the database at {shown} is not migrated (pending: "
                    f"{', '.join(m.script for m in pending)}); run `batch-pipeline migrate` first"
                )
            with db.classified("reading the ledger"), conn.transaction():
                conn.execute("SET TRANSACTION READ ONLY")
                return action(conn)
        finally:
            conn.close()


def run_status(sink: SinkSettings, run_id: str | None) -> dict[str, Any]:
    """One run's status (default: the latest), as `reports.run_status` builds it."""
    return read_only(sink, lambda conn: reports.run_status(conn, run_id))


def group_status(sink: SinkSettings, group: str) -> dict[str, Any]:
    """A run group's workers and their sum (scale-out)."""
    return read_only(sink, lambda conn: reports.group_status(conn, group))


def run_report(sink: SinkSettings, run_id: str | None) -> dict[str, Any]:
    """Everything a run's report shows (default: the latest run)."""
    return read_only(sink, lambda conn: reports.run_report(conn, run_id))


def recent_runs(sink: SinkSettings, limit: int) -> list[dict[str, Any]]:
    """The `limit` most recent runs, newest first."""
    return read_only(sink, lambda conn: history.recent_runs(conn, limit))


@dataclass(frozen=True)
class QueryResult:
    columns: list[str]
    rows: list[tuple[Any, ...]]


def query(sink: SinkSettings, sql: str) -> QueryResult:
    """One user query in a read-only transaction; its error is one line, without context
    that could carry the connection's details."""

    with database(sink) as (url, _shown):
        conn = db.connect(url, "batch-pipeline query")
        try:
            with conn.transaction():
                conn.execute("SET TRANSACTION READ ONLY")
                cur = conn.execute(sql)
                columns = [d.name for d in cur.description or []]
                rows = cur.fetchall() if cur.description else []
        except psycopg.Error as exc:
            raise PipelineError(f"query failed: {db.first_line(exc)}") from None
        finally:
            conn.close()
    return QueryResult(columns, rows)


@dataclass(frozen=True)
class Migrated:
    applied: list[db.Migration]
    database: str  # where, as shown to a user (no password)


def migrate(sink: SinkSettings) -> Migrated:
    """Apply the pending migrations of sql/."""

    with database(sink) as (url, shown):
        conn = db.connect(url, "batch-pipeline migrate")
        try:
            with db.classified("migrating"):
                applied = db.migrate(conn)
        finally:
            conn.close()
    return Migrated(applied, shown)
