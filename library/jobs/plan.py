"""`run --dry-run` as a plan: what a real run would read, skip or resume, and why rows
would be refused.

The ledger is only read (one read-only transaction), and only when a database is
there to read: DATABASE_URL, or an embedded database that already exists (a dry
run never creates one). Without one the plan says it could not check the ledger,
and counts every object as to be read.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from library.config import SinkSettings
from library.errors import PipelineError
from library.models import InvalidRow, SourceObject
from library.state import db
from library.state.db import database

log = logging.getLogger(__name__)

EXAMPLES_PER_REASON = 3

LEDGER_STATE = """
SELECT source_uri, source_version, status, checkpoint_line FROM source_objects
WHERE source_uri = ANY(%s)
"""


@dataclass(frozen=True)
class PlannedObject:
    uri: str
    size: int | None
    action: str  # read, skip, resume
    resume_after_line: int = 1

    def describe(self) -> str:
        size = f"{(self.size or 0) / 1024:.1f} KB"
        if self.action == "skip":
            return (
                f"skip   {self.uri} ({size}): already completed at this version "
                "(use --reprocess to read it again)"
            )
        if self.action == "resume":
            return f"resume {self.uri} ({size}) after line {self.resume_after_line}"
        return f"read   {self.uri} ({size})"

    def as_dict(self) -> dict[str, Any]:
        return {
            "uri": self.uri,
            "size": self.size,
            "action": self.action,
            "resume_after_line": self.resume_after_line,
        }


def embedded_exists(settings: SinkSettings) -> bool:
    return (settings.embedded_dir.expanduser() / "PG_VERSION").is_file()


def ledger_state(
    settings: SinkSettings, objects: list[SourceObject]
) -> tuple[dict[tuple[str, str], tuple[str, int]], str | None]:
    """{(uri, version): (status, checkpoint_line)} from source_objects, and a note when the
    ledger could not be read."""
    if settings.database_url is None and not embedded_exists(settings):
        return {}, "no database (DATABASE_URL unset, no embedded database yet): ledger not checked"
    try:
        with database(settings) as (url, shown):
            conn = db.connect(url, "batch-pipeline dry run")
            try:
                if db.pending_migrations(conn):
                    return {}, f"the database at {shown} is not migrated: ledger not checked"
                with conn.transaction():
                    conn.execute("SET TRANSACTION READ ONLY")
                    rows = conn.execute(LEDGER_STATE, ([o.uri for o in objects],)).fetchall()
            finally:
                conn.close()
    except PipelineError as exc:
        return {}, f"could not check the ledger: {exc}"
    return {(r[0], r[1]): (r[2], int(r[3])) for r in rows}, None


def plan_objects(
    objects: list[SourceObject],
    state: dict[tuple[str, str], tuple[str, int]],
    reprocess: bool,
) -> list[PlannedObject]:
    """What `run` would do with each object: the same decisions as Ledger.claim."""
    planned = []
    for obj in objects:
        status, checkpoint = state.get((obj.uri, obj.version), (None, 1))
        if status == "completed" and not reprocess:
            planned.append(PlannedObject(obj.uri, obj.size, "skip"))
        elif status is not None and status != "completed" and checkpoint > 1:
            planned.append(PlannedObject(obj.uri, obj.size, "resume", checkpoint))
        else:
            planned.append(PlannedObject(obj.uri, obj.size, "read"))
    return planned


@dataclass
class InvalidReasons:
    """Invalid rows grouped by (column, message), with a few examples each."""

    counts: Counter[tuple[str, str]] = field(default_factory=Counter)
    examples: dict[tuple[str, str], list[str]] = field(default_factory=dict)

    def add(self, uri: str, rows: list[InvalidRow]) -> None:
        name = uri.rsplit("/", 1)[-1]
        for row in rows:
            for reason in row.reasons:
                key = (reason.column, reason.message)
                self.counts[key] += 1
                examples = self.examples.setdefault(key, [])
                if len(examples) < EXAMPLES_PER_REASON:
                    examples.append(f"{name}:{row.line_number}")

    def lines(self) -> list[str]:
        return [
            f"{column}: {message} ({n} row{'s' if n != 1 else ''}, e.g. "
            f"{', '.join(self.examples[(column, message)])})"
            for (column, message), n in self.counts.most_common()
        ]

    def as_list(self) -> list[dict[str, Any]]:
        return [
            {"column": c, "reason": m, "rows": n, "examples": self.examples[(c, m)]}
            for (c, m), n in self.counts.most_common()
        ]
