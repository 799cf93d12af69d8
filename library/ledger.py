"""The ledger: runs, source objects (lineage), checkpoints and object locks.

State lives in the database, never only in the process: a run that dies
leaves its objects `processing` with the checkpoint of its last flush, and the
next run resumes them from there. Two runs never work on the same object at
once: each object is guarded by a PostgreSQL session advisory lock held by the
run's ledger connection, released when the object is done or when the
connection dies with its process.
"""

from __future__ import annotations

import logging
import socket
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal

import orjson
import psycopg

from library.models import Counts, SourceObject

log = logging.getLogger(__name__)

RunStatus = Literal["processing", "completed", "completed_with_errors", "failed", "interrupted"]
ClaimStatus = Literal["new", "resume", "completed", "locked"]


def run_id_base(now: datetime) -> str:
    return now.strftime("batch_%Y%m%d_%H%M%S")


def object_lock_key(obj: SourceObject) -> str:
    return f"batch-pipeline:object:{obj.uri}"


def run_lock_key(run_id: str) -> str:
    return f"batch-pipeline:run:{run_id}"


ABANDONED = (
    "abandoned: its process stopped without finishing (killed or crashed); "
    "run {by} found it and resumes its objects from their checkpoints"
)


@dataclass
class Claim:
    status: ClaimStatus
    checkpoint_line: int = 1
    prior: Counts | None = None  # counts already stored for this object version
    held_by: str | None = None  # the run holding the lock, when locked


class Ledger:
    """Run and object bookkeeping on the run's own connection (autocommit)."""

    def __init__(self, conn: psycopg.Connection[Any]) -> None:
        self.conn = conn  # autocommit: each statement stands alone

    def start_run(self, now: datetime, source_uri: str | None, settings: dict[str, Any]) -> str:
        """Insert the run row; the id is unique even for two runs started in one second.

        The run holds an advisory lock on its own id for as long as its connection
        lives, taken in the same transaction as the insert: a run seen as
        `processing` whose lock is free belongs to a process that is gone.
        """
        base = run_id_base(now)
        for n in range(1, 1000):
            run_id = base if n == 1 else f"{base}_{n}"
            with self.conn.transaction():
                row = self.conn.execute(
                    """INSERT INTO pipeline_runs (run_id, status, source_uri, settings)
                       VALUES (%s, 'processing', %s, %s)
                       ON CONFLICT (run_id) DO NOTHING RETURNING run_id""",
                    (run_id, source_uri, orjson.dumps(settings).decode()),
                ).fetchone()
                if row:
                    self.conn.execute(
                        "SELECT pg_advisory_lock(hashtextextended(%s, 0))", (run_lock_key(run_id),)
                    )
            if row:
                self.conn.execute(
                    "SELECT set_config('application_name', %s, false)",
                    (f"batch-pipeline {run_id} {socket.gethostname()}"[:63],),
                )
                self._close_abandoned(run_id)
                return run_id
        raise RuntimeError("could not allocate a run id")

    def _close_abandoned(self, run_id: str) -> None:
        """Mark `processing` runs whose process is gone as failed, saying so."""
        others = self.conn.execute(
            "SELECT run_id FROM pipeline_runs WHERE status = 'processing' AND run_id <> %s",
            (run_id,),
        ).fetchall()
        for (other,) in others:
            key = run_lock_key(other)
            free = self.conn.execute(
                "SELECT pg_try_advisory_lock(hashtextextended(%s, 0))", (key,)
            ).fetchone()
            if not free or not free[0]:
                continue  # alive: another run working right now
            try:
                self.conn.execute(
                    """UPDATE pipeline_runs SET status = 'failed', error = %s,
                           finished_at = heartbeat_at
                       WHERE run_id = %s AND status = 'processing'""",
                    (ABANDONED.format(by=run_id), other),
                )
                log.warning(
                    "Run %s was abandoned (its process is gone): marked failed; "
                    "its objects resume from their checkpoints",
                    other,
                )
            finally:
                self.conn.execute("SELECT pg_advisory_unlock(hashtextextended(%s, 0))", (key,))

    def set_objects_total(self, run_id: str, total: int) -> None:
        self.conn.execute(
            "UPDATE pipeline_runs SET objects_total = %s WHERE run_id = %s", (total, run_id)
        )

    def claim(self, run_id: str, obj: SourceObject, reprocess: bool = False) -> Claim:
        """Lock an object for this run and say where to start reading it."""
        locked = self.conn.execute(
            "SELECT pg_try_advisory_lock(hashtextextended(%s, 0))", (object_lock_key(obj),)
        ).fetchone()
        if not locked or not locked[0]:
            holder = self.conn.execute(
                """SELECT run_id FROM source_objects WHERE source_uri = %s
                   AND status = 'processing' ORDER BY started_at DESC LIMIT 1""",
                (obj.uri,),
            ).fetchone()
            return Claim("locked", held_by=holder[0] if holder else None)
        row = self.conn.execute(
            """SELECT status, checkpoint_line, rows_read, rows_valid, rows_invalid,
                      rows_scored, rows_failed
               FROM source_objects WHERE source_uri = %s AND source_version = %s""",
            (obj.uri, obj.version),
        ).fetchone()
        if row is not None and row[0] == "completed" and not reprocess:
            self.release(obj)
            return Claim("completed", checkpoint_line=row[1])
        if row is None or row[0] == "completed":  # new, or reprocessing from the top
            self.conn.execute(
                """INSERT INTO source_objects (source_uri, source_version, size_bytes, run_id)
                   VALUES (%s, %s, %s, %s)
                   ON CONFLICT (source_uri, source_version) DO UPDATE SET
                     status = 'processing', run_id = EXCLUDED.run_id, checkpoint_line = 1,
                     rows_read = 0, rows_valid = 0, rows_invalid = 0, rows_scored = 0,
                     rows_failed = 0, error = NULL, started_at = now(), finished_at = NULL""",
                (obj.uri, obj.version, obj.size, run_id),
            )
            return Claim("new")
        self.conn.execute(
            """UPDATE source_objects SET status = 'processing', run_id = %s, error = NULL,
                   finished_at = NULL
               WHERE source_uri = %s AND source_version = %s""",
            (run_id, obj.uri, obj.version),
        )
        prior = Counts(read=row[2], valid=row[3], invalid=row[4], scored=row[5], failed=row[6])
        return Claim("resume", checkpoint_line=row[1], prior=prior)

    def release(self, obj: SourceObject) -> None:
        self.conn.execute(
            "SELECT pg_advisory_unlock(hashtextextended(%s, 0))", (object_lock_key(obj),)
        )

    def finish_run(
        self,
        run_id: str,
        status: RunStatus,
        error: str | None,
        summary: dict[str, Any] | None,
        model_version: str | None,
    ) -> None:
        self.conn.execute(
            """UPDATE pipeline_runs SET status = %s, finished_at = now(), heartbeat_at = now(),
                   error = %s, summary = %s, model_version = COALESCE(%s, model_version)
               WHERE run_id = %s""",
            (
                status,
                error,
                orjson.dumps(summary).decode() if summary is not None else None,
                model_version,
                run_id,
            ),
        )


# -- written by the sink, as parts of its flush statement ------------------------
#
# Each flush sets (never increments) the counts, in the same statement as the rows
# they count: a flush retried after a lost connection writes the same values again.

# A CTE: each touched object's checkpoint, counts (earlier runs' included) and status.
OBJECT_PROGRESS = """
object_progress AS (
    UPDATE source_objects s SET checkpoint_line = o.checkpoint_line,
        rows_read = o.rows_read, rows_valid = o.rows_valid, rows_invalid = o.rows_invalid,
        rows_scored = o.rows_scored, rows_failed = o.rows_failed,
        status = o.status, error = o.error,
        finished_at = CASE WHEN o.status = 'processing' THEN NULL ELSE now() END
    FROM jsonb_to_recordset(%(objects)s::jsonb) AS o(
        source_uri text, source_version text, checkpoint_line bigint, rows_read bigint,
        rows_valid bigint, rows_invalid bigint, rows_scored bigint, rows_failed bigint,
        status text, error text)
    WHERE s.source_uri = o.source_uri AND s.source_version = o.source_version
    RETURNING 1
)"""

# A CTE: this run's own share of each touched object (a resumed object is shared).
RUN_OBJECTS = """
run_object_progress AS (
    INSERT INTO run_objects (run_id, source_uri, source_version, status, rows_read,
        rows_valid, rows_invalid, rows_scored, rows_failed)
    SELECT %(run_id)s, o.source_uri, o.source_version, o.status, o.rows_read, o.rows_valid,
        o.rows_invalid, o.rows_scored, o.rows_failed
    FROM jsonb_to_recordset(%(run_objects)s::jsonb) AS o(
        source_uri text, source_version text, status text, rows_read bigint,
        rows_valid bigint, rows_invalid bigint, rows_scored bigint, rows_failed bigint)
    ON CONFLICT (run_id, source_uri, source_version) DO UPDATE SET
        status = EXCLUDED.status, rows_read = EXCLUDED.rows_read,
        rows_valid = EXCLUDED.rows_valid, rows_invalid = EXCLUDED.rows_invalid,
        rows_scored = EXCLUDED.rows_scored, rows_failed = EXCLUDED.rows_failed,
        updated_at = now()
    RETURNING 1
)"""

# The statement's main part: the run's counts.
RUN_PROGRESS = """
UPDATE pipeline_runs SET rows_read = %(read)s, rows_valid = %(valid)s,
    rows_invalid = %(invalid_count)s, rows_scored = %(scored)s, rows_failed = %(failed)s,
    objects_done = %(objects_done)s, objects_failed = %(objects_failed)s,
    objects_skipped = %(objects_skipped)s, model_version = COALESCE(%(model_version)s, model_version),
    heartbeat_at = now()
WHERE run_id = %(run_id)s"""


def object_progress_json(
    obj: SourceObject, checkpoint_line: int, counts: Counts, status: str, error: str | None
) -> dict[str, Any]:
    return {
        "source_uri": obj.uri,
        "source_version": obj.version,
        "checkpoint_line": checkpoint_line,
        "rows_read": counts.read,
        "rows_valid": counts.valid,
        "rows_invalid": counts.invalid,
        "rows_scored": counts.scored,
        "rows_failed": counts.failed,
        "status": status,
        "error": error,
    }


def run_object_json(obj: SourceObject, counts: Counts, status: str) -> dict[str, Any]:
    return {
        "source_uri": obj.uri,
        "source_version": obj.version,
        "status": status,
        "rows_read": counts.read,
        "rows_valid": counts.valid,
        "rows_invalid": counts.invalid,
        "rows_scored": counts.scored,
        "rows_failed": counts.failed,
    }
