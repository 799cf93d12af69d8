"""The ledger: runs, source objects (lineage), checkpoints and object locks.

State lives in the database, never only in the process: a run that dies
leaves its objects `processing` with the checkpoint of its last flush, and the
next run resumes them from there. Two runs never work on the same object at
once: each object is guarded by a PostgreSQL session advisory lock held by the
run's ledger connection, released when the object is done or when the
connection dies with its process.

A lock lost with its connection does not stop the old holder from writing when
it comes back, so every claim also bumps the object's fence (`claim_fence`,
sql/V4) and every flush names the fence it claimed with: a flush for an object
claimed since by another run is refused whole, in its own transaction. The
ledger's connection is supervised (`db.Supervised`): after a restart or a
dropped connection it reconnects, takes its locks back, and beats every second
so that a live run is never taken for a dead one.
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal

import orjson
import psycopg

from library.errors import DatabaseError
from library.models import Counts, SourceObject
from library.state import db

log = logging.getLogger(__name__)

RunStatus = Literal["processing", "completed", "completed_with_errors", "failed", "interrupted"]
# finished: completed or failed by another worker of this run group (scale-out)
ClaimStatus = Literal["new", "resume", "completed", "locked", "finished"]

HEARTBEAT_SECONDS = 1.0  # how often a live run says so (and notices a dropped connection)
# A run whose lock is free is only called abandoned once it has not beaten for this
# long: a live run whose connection was dropped re-takes its lock within a beat or two.
ABANDON_GRACE_SECONDS = 5.0


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

_TRY_LOCK = "SELECT pg_try_advisory_lock(hashtextextended(%s, 0))"
_LOCK = "SELECT pg_advisory_lock(hashtextextended(%s, 0))"
_UNLOCK = "SELECT pg_advisory_unlock(hashtextextended(%s, 0))"


@dataclass
class Claim:
    status: ClaimStatus
    checkpoint_line: int = 1
    prior: Counts | None = None  # counts already stored for this object version
    held_by: str | None = None  # the run holding the lock, when locked
    fence: int = 0  # the object's claim counter: every flush for it must name it


class Ledger:
    """Run and object bookkeeping on the run's own supervised connection (autocommit).

    The connection holds the run's lock and the locks of the objects it works on.
    When it is lost (a database restart, a terminated backend) the next use, or the
    heartbeat within a second, reconnects, takes the run's lock again and tries to
    take each held object's lock again; an object whose lock another run took
    meanwhile is marked lost (`is_lost`): the reader stops it, and the fence refuses
    any flush for it anyway.
    """

    def __init__(
        self,
        url: str,
        retry_window: float,
        conn: psycopg.Connection[Any] | None = None,
        application_name: str = "batch-pipeline ledger",
    ) -> None:
        self.db = db.Supervised(
            url, application_name, retry_window, on_reconnect=self._restore, conn=conn
        )
        self.run_id: str | None = None
        self._held: dict[str, SourceObject] = {}  # lock key -> object
        self._lost: set[tuple[str, str]] = set()
        self._suspects: dict[str, float] = {}  # run id -> when it was first seen lockless
        self._stopping = threading.Event()  # set to stop the heartbeat at once
        self._heart: threading.Thread | None = None

    # -- the connection's session state ----------------------------------------

    def _restore(self, conn: psycopg.Connection[Any]) -> None:
        """A new connection: take back the run's lock and the held objects' locks."""
        if self.run_id is None:
            return
        conn.execute(
            "SELECT set_config('application_name', %s, false)", (self._application_name(),)
        )
        conn.execute(_LOCK, (run_lock_key(self.run_id),))
        revived = conn.execute(
            """UPDATE pipeline_runs SET status = 'processing', error = NULL, finished_at = NULL
               WHERE run_id = %s AND status = 'failed' AND error LIKE 'abandoned:%%'
               RETURNING 1""",
            (self.run_id,),
        ).fetchone()
        if revived:
            log.warning(
                "Run %s had been marked abandoned while its database connection was down; "
                "it is alive: marked processing again",
                self.run_id,
            )
        for key, obj in list(self._held.items()):
            got = conn.execute(_TRY_LOCK, (key,)).fetchone()
            if not got or not got[0]:
                del self._held[key]
                self._lost.add((obj.uri, obj.version))
                log.warning(
                    "Lost the lock on %s with the database connection, and another run "
                    "holds it now: stopping that object here (the other run resumes it "
                    "from its checkpoint)",
                    obj.uri,
                )
        log.info("Database connection of the ledger restored; locks taken again")

    def _application_name(self) -> str:
        return f"batch-pipeline {self.run_id} {socket.gethostname()}"[:63]

    def close(self) -> None:
        self.stop_heartbeat()
        self.db.close()

    # -- runs ------------------------------------------------------------------

    def start_run(
        self,
        now: datetime,
        source_uri: str | None,
        settings: dict[str, Any],
        run_group: str | None = None,
        worker_index: int | None = None,
    ) -> str:
        """Insert the run row; the id is unique even for two runs started in one second.

        The run holds an advisory lock on its own id for as long as its connection
        lives, taken in the same transaction as the insert: a run seen as
        `processing` whose lock is free, and which has not beaten for a while,
        belongs to a process that is gone.
        """
        base = run_id_base(now)
        for n in range(1, 1000):
            run_id = base if n == 1 else f"{base}_{n}"

            def insert(conn: psycopg.Connection[Any], run_id: str = run_id) -> bool:
                with conn.transaction():
                    row = conn.execute(
                        """INSERT INTO pipeline_runs (run_id, status, source_uri, settings,
                               run_group, worker_index)
                           VALUES (%s, 'processing', %s, %s, %s, %s)
                           ON CONFLICT (run_id) DO NOTHING RETURNING run_id""",
                        (
                            run_id,
                            source_uri,
                            orjson.dumps(settings).decode(),
                            run_group,
                            worker_index,
                        ),
                    ).fetchone()
                    if row:
                        conn.execute(_LOCK, (run_lock_key(run_id),))
                return row is not None

            if self.db.run("starting the run", insert):
                self.run_id = run_id
                self.db.run(
                    "naming the session",
                    lambda conn: conn.execute(
                        "SELECT set_config('application_name', %s, false)",
                        (self._application_name(),),
                    ),
                )
                self.close_abandoned()
                return run_id
        raise RuntimeError("could not allocate a run id")

    def close_abandoned(self, wait: bool = False) -> None:
        """Mark `processing` runs whose process is gone as failed, saying so.

        Gone means: its lock is free and it has not beaten for ABANDON_GRACE_SECONDS.
        A run whose lock is free but which beat recently may be a live run whose
        connection was just dropped: it is looked at again later (by the heartbeat,
        and at the end of this run, `wait=True`, which waits out the grace)."""
        assert self.run_id is not None
        if wait and self._suspects:
            remaining = ABANDON_GRACE_SECONDS - (time.monotonic() - min(self._suspects.values()))
            if remaining > 0:
                time.sleep(remaining)
        self.db.run("looking for abandoned runs", self._close_abandoned)

    def settle_abandoned(self) -> None:
        """Close every abandoned run now, waiting out the grace of recent ones."""
        self.close_abandoned()
        if self._suspects:
            self.close_abandoned(wait=True)

    def _close_abandoned(self, conn: psycopg.Connection[Any]) -> None:
        others = conn.execute(
            """SELECT run_id, EXTRACT(EPOCH FROM now() - heartbeat_at)::float8 FROM pipeline_runs
               WHERE status = 'processing' AND run_id <> %s""",
            (self.run_id,),
        ).fetchall()
        still: dict[str, float] = {}
        for other, silent_for in others:
            key = run_lock_key(other)
            free = conn.execute(_TRY_LOCK, (key,)).fetchone()
            if not free or not free[0]:
                continue  # alive: another run working right now
            try:
                if silent_for < ABANDON_GRACE_SECONDS:
                    still[other] = self._suspects.get(other, time.monotonic() - silent_for)
                    continue
                conn.execute(
                    """UPDATE pipeline_runs SET status = 'failed', error = %s,
                           finished_at = heartbeat_at
                       WHERE run_id = %s AND status = 'processing'""",
                    (ABANDONED.format(by=self.run_id), other),
                )
                log.warning(
                    "Run %s was abandoned (its process is gone): marked failed; "
                    "its objects resume from their checkpoints",
                    other,
                )
            finally:
                conn.execute(_UNLOCK, (key,))
        self._suspects = still

    def set_objects_total(self, run_id: str, total: int) -> None:
        self.db.run(
            "recording the listing",
            lambda conn: conn.execute(
                "UPDATE pipeline_runs SET objects_total = %s WHERE run_id = %s", (total, run_id)
            ),
        )

    def finish_run(
        self,
        run_id: str,
        status: RunStatus,
        error: str | None,
        summary: dict[str, Any] | None,
        model_version: str | None,
    ) -> None:
        self.stop_heartbeat()
        self.db.run(
            "recording the end of the run",
            lambda conn: conn.execute(
                """UPDATE pipeline_runs SET status = %s, finished_at = now(),
                       heartbeat_at = now(), error = %s, summary = %s,
                       model_version = COALESCE(%s, model_version)
                   WHERE run_id = %s""",
                (
                    status,
                    error,
                    orjson.dumps(summary).decode() if summary is not None else None,
                    model_version,
                    run_id,
                ),
            ),
        )
        if self._suspects:
            try:
                self.close_abandoned(wait=True)
            except DatabaseError as exc:
                log.warning("could not look for abandoned runs: %s", exc)

    # -- the heartbeat ---------------------------------------------------------

    def start_heartbeat(self) -> None:
        """Beat every HEARTBEAT_SECONDS on the ledger connection: says the run is alive,
        brings a dropped connection (and its locks) back within a second, and closes
        runs found lockless at the start once their grace has passed."""
        if self._heart is not None:
            return
        self._stopping.clear()
        self._heart = threading.Thread(target=self._beat, name="ledger-heartbeat", daemon=True)
        self._heart.start()

    def stop_heartbeat(self) -> None:
        self._stopping.set()
        if self._heart is not None and self._heart is not threading.current_thread():
            self._heart.join()
        self._heart = None

    def _beat(self) -> None:
        # A wait on the event, not a sleep: the end of a run does not wait out a beat.
        while not self._stopping.wait(HEARTBEAT_SECONDS):
            try:
                self.db.run(
                    "beating",
                    lambda conn: conn.execute(
                        "UPDATE pipeline_runs SET heartbeat_at = now() WHERE run_id = %s"
                        " AND status = 'processing'",
                        (self.run_id,),
                    ),
                )
                if self._suspects and any(
                    time.monotonic() - seen >= ABANDON_GRACE_SECONDS
                    for seen in self._suspects.values()
                ):
                    self.db.run("looking for abandoned runs", self._close_abandoned)
            except DatabaseError as exc:
                # The writer meets the same outage and decides the run's fate.
                log.debug("heartbeat failed: %s", exc)

    # -- objects ---------------------------------------------------------------

    def claim(
        self,
        run_id: str,
        obj: SourceObject,
        reprocess: bool = False,
        run_group: str | None = None,
    ) -> Claim:
        """Lock an object for this run, bump its fence, and say where to start reading it.

        With a run group, an object another worker of the group has already completed
        or failed is `finished`: the group reads each object once (--reprocess too)."""
        claim = self.db.run(
            f"claiming {obj.uri}",
            lambda conn: self._claim(conn, run_id, obj, reprocess, run_group),
        )
        if claim.status in ("new", "resume"):
            self._held[object_lock_key(obj)] = obj
            self._lost.discard((obj.uri, obj.version))
        return claim

    def _claim(
        self,
        conn: psycopg.Connection[Any],
        run_id: str,
        obj: SourceObject,
        reprocess: bool,
        run_group: str | None,
    ) -> Claim:
        key = object_lock_key(obj)
        locked = conn.execute(_TRY_LOCK, (key,)).fetchone()
        if not locked or not locked[0]:
            holder = conn.execute(
                """SELECT run_id FROM source_objects WHERE source_uri = %s
                   AND status = 'processing' ORDER BY started_at DESC LIMIT 1""",
                (obj.uri,),
            ).fetchone()
            return Claim("locked", held_by=holder[0] if holder else None)
        try:
            row = conn.execute(
                """SELECT s.status, s.checkpoint_line, s.rows_read, s.rows_valid,
                          s.rows_invalid, s.rows_scored, s.rows_failed, s.run_id, p.run_group
                   FROM source_objects s LEFT JOIN pipeline_runs p USING (run_id)
                   WHERE s.source_uri = %s AND s.source_version = %s""",
                (obj.uri, obj.version),
            ).fetchone()
            if (
                row is not None
                and run_group is not None
                and row[8] == run_group
                and row[0] in ("completed", "failed")
            ):
                conn.execute(_UNLOCK, (key,))
                return Claim("finished", checkpoint_line=row[1], held_by=row[7])
            if row is not None and row[0] == "completed" and not reprocess:
                conn.execute(_UNLOCK, (key,))
                return Claim("completed", checkpoint_line=row[1])
            if row is None or row[0] == "completed":  # new, or reprocessing from the top
                fenced = conn.execute(
                    """INSERT INTO source_objects (source_uri, source_version, size_bytes, run_id,
                           claim_fence)
                       VALUES (%s, %s, %s, %s, 1)
                       ON CONFLICT (source_uri, source_version) DO UPDATE SET
                         status = 'processing', run_id = EXCLUDED.run_id, checkpoint_line = 1,
                         rows_read = 0, rows_valid = 0, rows_invalid = 0, rows_scored = 0,
                         rows_failed = 0, error = NULL, started_at = now(), finished_at = NULL,
                         claim_fence = source_objects.claim_fence + 1
                       RETURNING claim_fence""",
                    (obj.uri, obj.version, obj.size, run_id),
                ).fetchone()
                assert fenced is not None
                return Claim("new", fence=fenced[0])
            fenced = conn.execute(
                """UPDATE source_objects SET status = 'processing', run_id = %s, error = NULL,
                       finished_at = NULL, claim_fence = claim_fence + 1
                   WHERE source_uri = %s AND source_version = %s
                   RETURNING claim_fence""",
                (run_id, obj.uri, obj.version),
            ).fetchone()
            assert fenced is not None
        except BaseException:
            if not conn.closed:
                conn.execute(_UNLOCK, (key,))
            raise
        prior = Counts(read=row[2], valid=row[3], invalid=row[4], scored=row[5], failed=row[6])
        return Claim("resume", checkpoint_line=row[1], prior=prior, fence=fenced[0])

    def release(self, obj: SourceObject) -> None:
        key = object_lock_key(obj)
        if self._held.pop(key, None) is None:
            return  # never held, or lost with a connection: nothing to release
        # The lock lives in the connection's session: a lost connection took it with it,
        # and a new one (which takes back only the locks still held) never had it.
        self.db.run_in_session("releasing an object", lambda conn: conn.execute(_UNLOCK, (key,)))

    def mark_lost(self, obj: SourceObject) -> None:
        """Another run claimed the object since this one did (a flush was refused)."""
        self._lost.add((obj.uri, obj.version))

    def is_lost(self, obj: SourceObject) -> bool:
        return (obj.uri, obj.version) in self._lost

    def count_unresolved_failures(self, run: str | None) -> int:
        row = self.db.run(
            "counting failures",
            lambda conn: conn.execute(
                "SELECT count(*) FROM failed_transactions WHERE resolved_at IS NULL"
                " AND (%(run)s::text IS NULL OR run_id = %(run)s)",
                {"run": run},
            ).fetchone(),
        )
        return int(row[0]) if row else 0


# -- a flush's part: checkpoints, counts and the fence --------------------------
#
# The sink writes its data tables and the ledger's progress in one statement (one
# round trip per flush): `flush_statement` puts the sink's data-modifying CTEs in
# front of the ledger's, and `flush_params` gives the values of the ledger's part.
# Each flush sets (never increments) the counts, in the same statement as the rows
# they count: a flush retried after a lost connection writes the same values again.

# A CTE: each touched object's checkpoint, counts (earlier runs' included) and status.
_OBJECT_PROGRESS = """
object_progress AS (
    UPDATE source_objects s SET checkpoint_line = o.checkpoint_line,
        rows_read = o.rows_read, rows_valid = o.rows_valid, rows_invalid = o.rows_invalid,
        rows_scored = o.rows_scored, rows_failed = o.rows_failed,
        status = o.status, error = o.error,
        finished_at = CASE WHEN o.status = 'processing' THEN NULL ELSE now() END
    FROM jsonb_to_recordset(%(objects)s::jsonb) AS o(
        source_uri text, source_version text, checkpoint_line bigint, rows_read bigint,
        rows_valid bigint, rows_invalid bigint, rows_scored bigint, rows_failed bigint,
        status text, error text, claim_fence bigint)
    -- The fence: only the latest claim of an object may write it. The row lock
    -- taken here also makes a concurrent claim wait for this flush to commit.
    WHERE s.source_uri = o.source_uri AND s.source_version = o.source_version
        AND s.claim_fence = o.claim_fence
    RETURNING 1
)"""

# A CTE: this run's own share of each touched object (a resumed object is shared).
_RUN_OBJECTS = """
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
_RUN_PROGRESS = """
UPDATE pipeline_runs SET rows_read = %(read)s, rows_valid = %(valid)s,
    rows_invalid = %(invalid_count)s, rows_scored = %(scored)s, rows_failed = %(failed)s,
    objects_done = %(objects_done)s, objects_failed = %(objects_failed)s,
    objects_skipped = %(objects_skipped)s, model_version = COALESCE(%(model_version)s, model_version),
    heartbeat_at = now()
WHERE run_id = %(run_id)s
    -- Every object of the flush passed its fence, or the whole flush is refused.
    AND CASE WHEN (SELECT count(*) FROM object_progress) = %(objects_expected)s THEN true
        ELSE batch_pipeline_claim_lost(%(run_id)s) END"""


# Which objects of a refused flush another run has claimed since (their fence moved on).
_LOST_CLAIMS = """
SELECT o.source_uri, o.source_version, s.run_id
FROM jsonb_to_recordset(%(objects)s::jsonb) AS o(
    source_uri text, source_version text, claim_fence bigint)
JOIN source_objects s USING (source_uri, source_version)
WHERE s.claim_fence <> o.claim_fence"""


def flush_statement(data_ctes: str, returning: str | None = None) -> str:
    """One statement for a whole flush: `data_ctes` (the caller's data-modifying CTEs,
    `name AS (...), ...`, with no WITH) first, then the ledger's part, which writes
    each touched object's checkpoint and counts behind its fence, the run's share of
    each, and the run's counts. A fence that moved on makes the statement fail with
    SQLSTATE BPF01 (`batch_pipeline_claim_lost`, sql/V4), refusing the flush whole.
    `returning`: an expression the statement returns, in its one row (the caller's
    figures of its CTEs)."""
    tail = f"\nRETURNING {returning}" if returning else ""
    return (
        f"\nWITH {data_ctes.strip()}, {_OBJECT_PROGRESS.strip()}, {_RUN_OBJECTS.strip()}\n"
        f"{_RUN_PROGRESS.strip()}{tail}\n"
    )


@dataclass(frozen=True)
class ObjectFlush:
    """What a flush records of one touched object."""

    obj: SourceObject
    checkpoint_line: int
    counts: Counts  # the object's rows so far, earlier runs' included
    run_counts: Counts  # this run's share
    status: str
    error: str | None
    fence: int  # the claim the flush is made under


@dataclass(frozen=True)
class RunFlush:
    """What a flush records of the run: its totals once the flush is in."""

    counts: Counts
    objects_done: int
    objects_failed: int
    objects_skipped: int
    model_version: str | None


def flush_params(run_id: str, objects: list[ObjectFlush], run: RunFlush) -> dict[str, Any]:
    """The values of the ledger's part of `flush_statement`."""
    return {
        "run_id": run_id,
        "objects": orjson.dumps([_object_progress_json(o) for o in objects]).decode(),
        "objects_expected": len(objects),
        "run_objects": orjson.dumps([_run_object_json(o) for o in objects]).decode(),
        "read": run.counts.read,
        "valid": run.counts.valid,
        "invalid_count": run.counts.invalid,
        "scored": run.counts.scored,
        "failed": run.counts.failed,
        "objects_done": run.objects_done,
        "objects_failed": run.objects_failed,
        "objects_skipped": run.objects_skipped,
        "model_version": run.model_version,
    }


def lost_claims(
    conn: psycopg.Connection[Any], claims: list[tuple[SourceObject, int]]
) -> list[tuple[str, str, str | None]]:
    """Of (object, fence) pairs a refused flush was made under, those another run has
    claimed since: (uri, version, the run holding it now)."""
    fences = [
        {"source_uri": obj.uri, "source_version": obj.version, "claim_fence": fence}
        for obj, fence in claims
    ]
    rows = conn.execute(_LOST_CLAIMS, {"objects": orjson.dumps(fences).decode()}).fetchall()
    return [(uri, version, holder) for uri, version, holder in rows]


def _object_progress_json(o: ObjectFlush) -> dict[str, Any]:
    return {
        "claim_fence": o.fence,
        "source_uri": o.obj.uri,
        "source_version": o.obj.version,
        "checkpoint_line": o.checkpoint_line,
        "rows_read": o.counts.read,
        "rows_valid": o.counts.valid,
        "rows_invalid": o.counts.invalid,
        "rows_scored": o.counts.scored,
        "rows_failed": o.counts.failed,
        "status": o.status,
        "error": o.error,
    }


def _run_object_json(o: ObjectFlush) -> dict[str, Any]:
    return {
        "source_uri": o.obj.uri,
        "source_version": o.obj.version,
        "status": o.status,
        "rows_read": o.run_counts.read,
        "rows_valid": o.run_counts.valid,
        "rows_invalid": o.run_counts.invalid,
        "rows_scored": o.run_counts.scored,
        "rows_failed": o.run_counts.failed,
    }
