"""Sink stage: scored units -> PostgreSQL, one database transaction per flush.

A flush writes, together and atomically: the transactions (valid rows, scored
or not), their predictions, the failures, the invalid rows, each touched
object's checkpoint and the run's counts. A crash therefore leaves either the
whole flush or none of it, and the checkpoint always says exactly which rows
are stored.

A flush is five round trips, whatever it holds: BEGIN, one COPY of every row
(each transaction with its outcome, prediction or failure) into a temporary
staging table, one statement whose data-modifying CTEs upsert transactions and
predictions, resolve or record failures, drop stale predictions, insert the
invalid rows and update the ledger, then COMMIT. (On a busy two-core machine
each round trip waits for the backend to be scheduled; fourteen of them per
flush cost more than the SQL.) A transaction_id repeated in a flush is reduced
to its latest row before the COPY (`latest_of_each`), so ON CONFLICT never meets
the same key twice; units arrive in source order, so the latest row of a run is
also the last one written.

Flushes are written on the sink's own thread, in the order they are sent, and
the writer goes on meanwhile: it waits for the next units' scores and builds the
next flush while PostgreSQL writes this one. Up to two are in flight, the second
queued behind the first, so that PostgreSQL, the usual limit of a run, never
waits for the writer between two flushes (measured: about 1 ms of every 13 did,
before). Each flush's parameters (the counts it sets) are made on the sink's
thread once the flush before has committed and been counted; its checkpoints
are those of its own units, taken when it was built. After a failure no later
flush is written: the run stops, or, for a claim lost to another run, the
refused flushes are sent again without the lost object's rows. `flush()` (the
end of an object, of the run, a stop) writes and waits, so whatever follows it
sees everything committed; `run.counts` is always what committed.

PostgreSQL is the usual limit of a run, so the staged rows are kept lean: a row
names its source object by its number in the flush (`source`, an index into the
flush's `source_uris` and `source_versions`), not by URI and ETag, which were a
third of the COPY's bytes; the staging table has no ordering column and no
DISTINCT ON to sort, and each CTE reads it directly rather than a materialised
copy.
"""

from __future__ import annotations

import contextlib
import logging
import operator
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Literal

import orjson
import polars as pl
import psycopg

from library.contract import REQUIRED_COLUMNS
from library.errors import DatabaseError, PipelineError
from library.faults import failpoint
from library.models import (
    LINE_COLUMN,
    Counts,
    Failure,
    ScoreResult,
    SourceObject,
    WorkUnit,
    latest_positions,
)
from library.state import db, ledger

log = logging.getLogger(__name__)

TRANSACTION_COLUMNS = (*REQUIRED_COLUMNS, "source_uri", "source_version", "source_line")
# A staged row: the transaction (its source object as a number, see the module's
# docstring), then its outcome. The order of the COPY lines' fields.
STAGED_COLUMNS = (*REQUIRED_COLUMNS, "source_line", "source")
OUTCOME_COLUMNS = (
    "model_version",
    "fraud_score",
    "prediction",
    "reason",
    "http_status",
    "attempts",
)

STAGING_DDL = """
CREATE TEMP TABLE IF NOT EXISTS stage_rows (
    transaction_id text COLLATE "C", event_time timestamptz, account_id text, merchant_id text,
    merchant_category text, amount numeric(12, 2), currency text, country text,
    channel text, card_present boolean, source_line bigint,
    source integer,  -- the object: an index into the flush's source_uris / source_versions
    model_version text, fraud_score double precision, prediction boolean,  -- scored
    reason text, http_status integer, attempts integer                     -- or failed
) ON COMMIT DELETE ROWS
"""

# The sink's session joins at most a flush of staged rows to tables that grow to
# millions of rows: index lookups are always the plan. Left to itself, the planner
# (the temporary table has no statistics) may cache a generic plan chosen while the
# tables were still small, which hashes a whole table, and keep it until the table
# is analyzed again: every flush then reads all of `predictions` (seen here: 3 times
# slower). Sequential scans stay allowed: a table too small for its index to pay is
# scanned, and analyzed (so the plan is made again) long before it grows.
SESSION_SETTINGS = "SET enable_hashjoin = off; SET enable_mergejoin = off"

_DATA = TRANSACTION_COLUMNS[1:]

# Rows stored already, exactly as staged, are left alone: ON CONFLICT DO UPDATE would
# lock them (writing their tuple header and WAL) even when its WHERE is false. Probing
# for them first costs one more index descent per row and table: 11-28% of the flush
# statement's time on new rows (measured), which a nightly run of new files pays for
# nothing. So each flush is written by one of two statements: the probing one
# after a flush that found most of its rows stored as they were (a new version of an
# object, a rerun), the lean one otherwise (`Sink._probe_stored`). Either writes the same.
_UNCHANGED_TRANSACTION = f"""
    WHERE NOT EXISTS (
        SELECT 1 FROM transactions t WHERE t.transaction_id = l.transaction_id
        AND ({", ".join(f"t.{c}" for c in _DATA)}) IS NOT DISTINCT FROM ({", ".join(f"l.{c}" for c in _DATA)}))"""
_UNCHANGED_PREDICTION = """
    AND NOT EXISTS (
        SELECT 1 FROM predictions p WHERE p.transaction_id = l.transaction_id
        AND p.model_version = l.model_version
        AND (p.fraud_score, p.prediction) IS NOT DISTINCT FROM (l.fraud_score, l.prediction))"""


def _data_ctes(probe_stored: bool) -> str:
    """The data tables' part of a flush; the ledger adds its own (`ledger.flush_statement`)."""
    unchanged_transaction = _UNCHANGED_TRANSACTION if probe_stored else ""
    unchanged_prediction = _UNCHANGED_PREDICTION if probe_stored else ""
    return f"""
sourced AS (
    -- The staged transactions with their source object's URI and version.
    SELECT s.*, (%(source_uris)s::text[])[s.source] AS source_uri,
        (%(source_versions)s::text[])[s.source] AS source_version
    FROM stage_rows s
), upsert_transactions AS (
    INSERT INTO transactions ({", ".join(TRANSACTION_COLUMNS)}, run_id)
    SELECT {", ".join(TRANSACTION_COLUMNS)}, %(run_id)s FROM sourced l{unchanged_transaction}
    ORDER BY transaction_id
    ON CONFLICT (transaction_id) DO UPDATE SET
        {", ".join(f"{c} = EXCLUDED.{c}" for c in _DATA)},
        run_id = EXCLUDED.run_id, updated_at = now()
    WHERE ({", ".join(f"transactions.{c}" for c in _DATA)})
        IS DISTINCT FROM ({", ".join(f"EXCLUDED.{c}" for c in _DATA)})
    RETURNING 1
), upsert_predictions AS (
    INSERT INTO predictions (transaction_id, model_version, fraud_score, prediction, run_id)
    SELECT transaction_id, model_version, fraud_score, prediction, %(run_id)s
    FROM stage_rows l WHERE fraud_score IS NOT NULL{unchanged_prediction}
    ORDER BY transaction_id
    ON CONFLICT (transaction_id, model_version) DO UPDATE SET
        fraud_score = EXCLUDED.fraud_score, prediction = EXCLUDED.prediction,
        run_id = EXCLUDED.run_id, scored_at = now()
    WHERE (predictions.fraud_score, predictions.prediction)
        IS DISTINCT FROM (EXCLUDED.fraud_score, EXCLUDED.prediction)
    RETURNING 1
), resolve_failures AS (
    -- Scored now: any open failure of the transaction is resolved.
    UPDATE failed_transactions f SET resolved_at = now(), resolved_by_run = %(run_id)s
    FROM stage_rows l
    WHERE l.fraud_score IS NOT NULL AND f.transaction_id = l.transaction_id AND f.resolved_at IS NULL
    RETURNING 1
), drop_stale_predictions AS (
    -- Failed now: the prediction of the same model version described an older row.
    DELETE FROM predictions p USING stage_rows l
    WHERE l.reason IS NOT NULL AND p.transaction_id = l.transaction_id
        AND p.model_version = l.model_version
    RETURNING 1
), upsert_failures AS (
    INSERT INTO failed_transactions (transaction_id, model_version, reason, http_status, attempts, run_id)
    SELECT transaction_id, model_version, reason, http_status, attempts, %(run_id)s
    FROM stage_rows WHERE reason IS NOT NULL ORDER BY transaction_id
    ON CONFLICT (transaction_id) WHERE resolved_at IS NULL DO UPDATE SET
        model_version = EXCLUDED.model_version, reason = EXCLUDED.reason,
        http_status = EXCLUDED.http_status,
        attempts = failed_transactions.attempts + EXCLUDED.attempts,
        run_id = EXCLUDED.run_id, failed_at = now()
    RETURNING 1
), insert_invalid AS (
    INSERT INTO invalid_rows (source_uri, source_version, line_number, raw_text, reasons, run_id)
    SELECT r.source_uri, r.source_version, r.line_number, r.raw_text, r.reasons, %(run_id)s
    FROM jsonb_to_recordset(%(invalid)s::jsonb) AS r(
        source_uri text, source_version text, line_number bigint, raw_text text, reasons jsonb)
    ON CONFLICT (source_uri, source_version, line_number) DO UPDATE SET run_id = EXCLUDED.run_id
    WHERE invalid_rows.run_id IS DISTINCT FROM EXCLUDED.run_id
    RETURNING 1
)"""


# The rows a flush changed (inserted or updated), returned by its statement.
_CHANGED = "(SELECT count(*) FROM upsert_transactions)"
# By whether the flush probes for rows stored as they are.
FLUSH_STATEMENTS = {
    probe: ledger.flush_statement(_data_ctes(probe), returning=_CHANGED) for probe in (False, True)
}

STAGE_ROWS = f"stage_rows ({', '.join(STAGED_COLUMNS + OUTCOME_COLUMNS)})"
COPY_LINE = "copy_line"  # the name of the series `prepare_copy_lines` gives
COPY_DATETIME = "%Y-%m-%dT%H:%M:%S%.6f+00:00"

ObjectStatus = Literal["processing", "completed", "failed"]


@dataclass
class ObjectProgress:
    obj: SourceObject
    counts: Counts  # the object's rows so far, earlier runs' included
    checkpoint_line: int
    fence: int  # the claim this run holds: every flush for the object names it
    status: ObjectStatus = "processing"
    error: str | None = None
    run_counts: Counts = field(default_factory=Counts)  # this run's share


@dataclass
class FlushBuffer:
    units: list[tuple[WorkUnit, ScoreResult]] = field(default_factory=list)
    rows: int = 0
    touched: dict[tuple[str, str], ObjectProgress] = field(default_factory=dict)

    def extend(self, later: FlushBuffer) -> None:
        """Add a later buffer's units after this one's."""
        self.units += later.units
        self.rows += later.rows
        self.touched.update(later.touched)


@dataclass
class InFlight:
    """A flush sent to the sink's thread and not yet settled by the writer."""

    batch: PreparedFlush
    buffer: FlushBuffer  # its units: written again without a lost object's rows if refused
    written: Future[tuple[float, float]]  # seconds writing it, and in its last transaction
    prepared_seconds: float  # building it, on the writer's thread


class _NotSent(Exception):
    """A flush not written because one sent before it failed: the writer sends it again
    (after a lost claim) or the run stops."""


MAX_IN_FLIGHT = 2  # one being written, the next queued behind it: no pause between them


@dataclass
class RunProgress:
    counts: Counts = field(default_factory=Counts)
    objects_done: int = 0
    objects_failed: int = 0
    objects_skipped: int = 0
    flushes: int = 0
    flush_seconds: float = 0.0  # inside the database transaction
    busy_seconds: float = 0.0  # preparing and writing
    model_version: str | None = None


def _quoted(expr: pl.Expr) -> pl.Expr:
    return pl.lit('"') + expr.str.replace_all('"', '""', literal=True) + pl.lit('"')


def csv_quote(value: str) -> str:
    return '"' + value.replace('"', '""') + '"'


class Sink:
    """Buffers scored units in order and writes them, one transaction per flush."""

    def __init__(
        self,
        database_url: str,
        run_id: str,
        flush_rows: int,
        retry_window: float,
        on_flush: Callable[[float], None] | None = None,
        on_claim_lost: Callable[[SourceObject], None] | None = None,
    ) -> None:
        self.on_flush = on_flush
        self.on_claim_lost = on_claim_lost
        self.run_id = run_id
        self.flush_rows = flush_rows
        self.run = RunProgress()
        self._objects: dict[tuple[str, str], ObjectProgress] = {}
        self._lost: set[tuple[str, str]] = set()
        self._buffer = FlushBuffer()
        self._run_dirty = False
        self._probe_stored = False  # which statement writes the next flush (FLUSH_STATEMENTS)
        self._version_seen: str | None = None  # the latest model version of the flushes built
        self._in_flight: deque[InFlight] = deque()  # sent, oldest first
        # The one thread that writes flushes, in the order they are sent, and accounts
        # each once committed. After a failure it writes none until the writer has
        # settled every flush in flight (`_refused`).
        self._writes = ThreadPoolExecutor(1, thread_name_prefix="flush")
        self._refused = False
        # The staging table lives in the session: a new connection creates it again.
        self.db = db.Supervised(
            database_url,
            f"batch-pipeline sink {run_id}"[:63],
            retry_window,
            on_reconnect=self._set_up_session,
        )

    # -- lifecycle -------------------------------------------------------------

    @staticmethod
    def _set_up_session(conn: psycopg.Connection[Any]) -> None:
        conn.execute(STAGING_DDL)
        conn.execute(SESSION_SETTINGS)

    def close(self) -> None:
        try:
            self._settle_all()  # flushes still in flight after a failure elsewhere: let them end
        except PipelineError as exc:
            log.error("the last flush was not written: %s", exc)
        finally:
            self._writes.shutdown(wait=True)
            self.db.close()

    # -- preparing, on the reader thread ------------------------------------------

    @staticmethod
    def prepare_copy_lines(frame: pl.DataFrame) -> pl.Series:
        """Each row's COPY line (its transaction part, up to `source_line`), aligned with
        `frame`: formatted once per chunk by polars on the reader thread, so that the
        writer only joins strings (polars calls made by the writer would queue behind the
        reader's on polars' shared pool). It travels to the flush in
        `WorkUnit.copy_lines`; the flush adds the source object's number and the outcome."""
        if frame.height == 0:
            return pl.Series(COPY_LINE, [], dtype=pl.String)
        line = pl.concat_str(
            [
                pl.col("transaction_id"),
                pl.col("event_time").dt.strftime(COPY_DATETIME),
                _quoted(pl.col("account_id")),
                _quoted(pl.col("merchant_id")),
                pl.col("merchant_category"),
                pl.col("amount").cast(pl.String),
                pl.col("currency"),
                pl.col("country"),
                pl.col("channel"),
                pl.when(pl.col("card_present")).then(pl.lit("t")).otherwise(pl.lit("f")),
                pl.col(LINE_COLUMN).cast(pl.String),
            ],
            separator=",",
        )
        return frame.select(line.alias(COPY_LINE)).to_series()

    # -- input, in source order ------------------------------------------------

    def begin_object(
        self, obj: SourceObject, checkpoint_line: int, prior: Counts | None, fence: int
    ) -> None:
        counts = Counts()
        if prior is not None:
            counts.add(prior)
        key = (obj.uri, obj.version)
        self._objects[key] = ObjectProgress(obj, counts, checkpoint_line, fence)
        self._lost.discard(key)

    def skip_object(self) -> None:
        self.run.objects_skipped += 1
        self._run_dirty = True  # written by the next flush, even one with no rows

    def add(self, unit: WorkUnit, result: ScoreResult) -> None:
        """Buffer a scored unit; units of an object not begun (retry-failed) are not tracked."""
        key = (unit.obj.uri, unit.obj.version)
        if key in self._lost:
            return  # another run owns the object now and reads these rows itself
        progress = self._objects.get(key)
        if progress is not None:
            progress.checkpoint_line = max(progress.checkpoint_line, unit.checkpoint_line)
            self._buffer.touched[key] = progress
        self._buffer.units.append((unit, result))
        self._buffer.rows += unit.rows
        if self._buffer.rows >= self.flush_rows:
            self._send()

    def end_object(self, obj: SourceObject, error: str | None = None) -> None:
        """The object is fully read (or failed): mark it in a flush, written now."""
        progress = self._objects.get((obj.uri, obj.version))
        if progress is None:
            return  # lost to another run: its status is theirs to write
        progress.status = "failed" if error else "completed"
        progress.error = error
        self._buffer.touched[(obj.uri, obj.version)] = progress
        self.flush()  # may find the claim lost, and drop the object itself
        self._objects.pop((obj.uri, obj.version), None)

    def forget_object(self, obj: SourceObject) -> None:
        """The object was lost to another run: write what the fences still allow, then
        stop tracking it (its status and checkpoint are the other run's to write)."""
        self.flush()
        key = (obj.uri, obj.version)
        self._objects.pop(key, None)
        self._lost.add(key)

    @property
    def pending_rows(self) -> int:
        """Rows buffered, not yet sent to the sink's thread."""
        return self._buffer.rows

    @property
    def flushes_in_flight(self) -> int:
        """Flushes sent and not yet settled: an error of theirs shows when they are."""
        return len(self._in_flight)

    # -- writing ---------------------------------------------------------------

    def flush(self) -> None:
        """Write everything buffered and wait until it is committed (retrying a lost
        connection), with every flush sent before it."""
        self._send()
        self._settle_all()

    def _send(self) -> None:
        """Build a flush of everything buffered and send it to the sink's thread, which
        writes it as soon as the flush before it has committed. The writer goes on
        meanwhile; it waits only to keep at most MAX_IN_FLIGHT flushes sent."""
        if not self._buffer.units and not self._buffer.touched and not self._run_dirty:
            return
        failpoint("before_flush")
        while self._in_flight and (
            len(self._in_flight) >= MAX_IN_FLIGHT or self._in_flight[0].written.done()
        ):
            if self._settle_oldest():
                return  # a refused flush was written again, with this buffer
        began = time.perf_counter()
        buffer, self._buffer = self._buffer, FlushBuffer()
        self._run_dirty = False
        batch = PreparedFlush.build(buffer, self._version_seen, self.run.objects_skipped)
        self._version_seen = batch.model_version
        written = self._writes.submit(self._write_and_account, batch)
        prepared = time.perf_counter() - began
        self._in_flight.append(InFlight(batch, buffer, written, prepared))

    def _settle_all(self) -> None:
        while self._in_flight:
            self._settle_oldest()

    def _settle_oldest(self) -> bool:
        """Wait for the oldest flush in flight; raise its error once every flush sent
        after it has ended too (none of them is written after a failure). A flush
        refused by a fence (another run claimed one of its objects) is written again,
        with the flushes after it and what was buffered since, without the lost
        objects' rows: then True."""
        flight = self._in_flight.popleft()
        try:
            writing, in_transaction = flight.written.result()
        except db.ClaimLostError:
            # Nothing of it or of the flushes after it was written: their units go back
            # in front of the buffer, in order.
            refused = FlushBuffer()
            for f in [flight, *self._drain_in_flight()]:
                refused.extend(f.buffer)
            refused.extend(self._buffer)
            self._buffer = refused
            self._run_dirty = True  # the run's counts too (they are set, never added)
            self._refused = False
            self._forget_lost_objects(flight.batch)
            self.flush()  # may find another claim lost, and drop that object too
            return True
        except BaseException:
            self._drain_in_flight()
            self._refused = False
            raise
        elapsed = flight.prepared_seconds + writing
        self.run.flush_seconds += in_transaction
        self.run.busy_seconds += elapsed
        if self.on_flush:
            self.on_flush(elapsed)
        return False

    def _drain_in_flight(self) -> list[InFlight]:
        """Wait for every flush still in flight after a failure: none was written."""
        drained = list(self._in_flight)
        self._in_flight.clear()
        for f in drained:
            with contextlib.suppress(_NotSent):
                f.written.result()
        return drained

    def _write_and_account(self, batch: PreparedFlush) -> tuple[float, float]:
        """On the sink's thread: write a flush, then count it as written. Its parameters
        are made here, once the flush before has committed and been accounted; the
        checkpoints and statuses come from the build (`TouchedObject`)."""
        if self._refused:
            raise _NotSent
        began = time.perf_counter()
        try:
            params = self._params(batch)
            statement = FLUSH_STATEMENTS[self._probe_stored]
            changed, in_transaction = self.db.run(
                "writing a flush", lambda conn: self._write(conn, batch.rows, statement, params)
            )
        except BaseException:
            self._refused = True
            raise
        if batch.staged:
            # Most rows stored as they were: the rows ahead are likely so too.
            self._probe_stored = changed * 2 < batch.staged
        self._account(batch)
        failpoint("after_flush")
        return time.perf_counter() - began, in_transaction

    def _forget_lost_objects(self, batch: PreparedFlush) -> None:
        """A flush was refused by a fence: drop the objects another run claimed since."""
        claims = [(t.progress.obj, t.progress.fence) for t in batch.objects]
        lost = self.db.run(
            "finding the objects claimed by another run",
            lambda conn: ledger.lost_claims(conn, claims),
        )
        if not lost:
            raise DatabaseError("a flush was refused by its fence, but every claim still holds")
        for uri, version, holder in lost:
            key = (uri, version)
            progress = self._objects.pop(key)
            self._lost.add(key)
            self._buffer.touched.pop(key, None)
            kept = [(u, r) for u, r in self._buffer.units if (u.obj.uri, u.obj.version) != key]
            dropped = sum(u.rows for u, _r in self._buffer.units) - sum(u.rows for u, _r in kept)
            self._buffer.units[:] = kept
            self._buffer.rows -= dropped
            log.warning(
                "Lost the claim on %s: run %s has claimed it since; %d row(s) of it not "
                "written here (that run reads them from the object's checkpoint)",
                uri,
                holder,
                dropped,
            )
            if self.on_claim_lost:
                self.on_claim_lost(progress.obj)

    def _params(self, batch: PreparedFlush) -> dict[str, Any]:
        objects = [
            ledger.ObjectFlush(
                t.progress.obj,
                t.checkpoint_line,
                plus(t.progress.counts, t.delta),
                plus(t.progress.run_counts, t.delta),
                t.status,
                t.error,
                t.progress.fence,
            )
            for t in batch.objects
        ]
        run = ledger.RunFlush(
            plus(self.run.counts, batch.counts),
            self.run.objects_done + batch.objects_completed,
            self.run.objects_failed + batch.objects_failed,
            batch.objects_skipped,
            batch.model_version,
        )
        return {
            **ledger.flush_params(self.run_id, objects, run),
            "source_uris": [uri for uri, _version in batch.sources],
            "source_versions": [version for _uri, version in batch.sources],
            "invalid": orjson.dumps(batch.invalid).decode(),
        }

    @staticmethod
    def _write(
        conn: psycopg.Connection[Any], rows: str, statement: str, params: dict[str, Any]
    ) -> tuple[int, float]:
        """Write a flush, on the sink's thread: how many of its transactions were
        inserted or changed, and the seconds its database transaction took."""
        began = time.perf_counter()
        with conn.transaction(), conn.cursor() as cur:
            if rows:
                with cur.copy(f"COPY {STAGE_ROWS} FROM STDIN (FORMAT csv)") as copy:
                    copy.write(rows)
            cur.execute(statement, params)
            row = cur.fetchone()
            failpoint("flush_before_commit")
        return (int(row[0]) if row else 0), time.perf_counter() - began

    def _account(self, batch: PreparedFlush) -> None:
        """After commit, on the sink's thread: fold the flush into the in-memory totals.
        Each total is replaced, never changed in place: the writer's thread reads them
        (the ratios' check) and sees either the old figures or the new, whole."""
        self.run.counts = plus(self.run.counts, batch.counts)
        self.run.objects_done += batch.objects_completed
        self.run.objects_failed += batch.objects_failed
        self.run.flushes += 1
        if batch.model_version:
            self.run.model_version = batch.model_version
        for t in batch.objects:
            t.progress.counts = plus(t.progress.counts, t.delta)
            t.progress.run_counts = plus(t.progress.run_counts, t.delta)


def plus(a: Counts, b: Counts) -> Counts:
    total = Counts()
    total.add(a)
    total.add(b)
    return total


@dataclass
class TouchedObject:
    """An object a flush writes the progress of: as it was when the flush was built
    (units added since belong to a later flush), and the flush's own rows of it."""

    progress: ObjectProgress
    delta: Counts
    checkpoint_line: int
    status: ObjectStatus
    error: str | None


@dataclass
class PreparedFlush:
    """Everything one flush writes."""

    rows: str  # COPY csv text: each transaction row with its outcome
    staged: int  # its lines
    sources: list[tuple[str, str]]  # (uri, version) of the objects the rows name by number, 1 first
    invalid: list[dict[str, Any]]
    counts: Counts
    objects: list[TouchedObject]
    objects_completed: int
    objects_failed: int
    objects_skipped: int  # the run's, when the flush was built
    model_version: str | None

    @classmethod
    def build(
        cls, buffer: FlushBuffer, known_version: str | None, objects_skipped: int
    ) -> PreparedFlush:
        model_version = known_version
        for _unit, result in buffer.units:
            model_version = result.predictions.last_version or model_version
        quoted_versions: dict[str, str] = {}

        def quoted(version: str) -> str:
            text = quoted_versions.get(version)
            if text is None:
                text = quoted_versions[version] = csv_quote(version)
            return text

        lines: list[str] = []
        ids: list[str] = []  # each line's transaction_id
        sources: dict[tuple[str, str], int] = {}
        invalid: list[dict[str, Any]] = []
        counts = Counts()
        deltas: dict[tuple[str, str], Counts] = {}
        for unit, result in buffer.units:
            tx = unit.transactions
            if tx.height:
                source = sources.setdefault((unit.obj.uri, unit.obj.version), len(sources) + 1)
                # Each row's transaction part was made on the reader thread
                # (Sink.prepare_copy_lines, aligned row for row with the unit's
                # transactions: WorkUnit checks it); here it only gets its source
                # object's number and its outcome. Each answered row's outcome, with
                # its leading comma, made from the answer's columns by map() in C (no
                # bytecode per row), one model version at a time.
                predictions = result.predictions
                texts: list[str] = []
                start = 0
                for count, version in predictions.versions:
                    head = f",{source},{quoted(version)},"
                    end = start + count
                    texts += map(
                        operator.add,
                        map(head.__add__, _score_texts(predictions.scores[start:end])),
                        map(_FRAUD_TAILS.__getitem__, predictions.is_fraud[start:end]),
                    )
                    start = end
                unit_ids = result.ids_of(tx)
                copy_lines = unit.copy_lines.to_list()
                if not result.failures and predictions.ids == unit_ids:
                    # The usual unit: answered in the order sent, nothing failed.
                    lines.extend(map(operator.add, copy_lines, texts))
                else:
                    # By transaction_id (a row repeated in the unit gets the one
                    # answer); joined in C by map().
                    outcome = dict(zip(predictions.ids, texts, strict=True))
                    version = quoted(model_version) if model_version else ""
                    outcome.update(
                        (f.transaction_id, _failed(f, source, version)) for f in result.failures
                    )
                    lines.extend(map(operator.add, copy_lines, map(outcome.__getitem__, unit_ids)))
                ids += unit_ids
            for row in unit.invalid:
                invalid.append(
                    {
                        "source_uri": unit.obj.uri,
                        "source_version": unit.obj.version,
                        "line_number": row.line_number,
                        "raw_text": row.raw_text,
                        "reasons": [r.as_json() for r in row.reasons],
                    }
                )
            unit_counts = unit.counts(result)
            deltas.setdefault((unit.obj.uri, unit.obj.version), Counts()).add(unit_counts)
            counts.add(unit_counts)

        objects = []
        completed = failed_objects = 0
        for key, progress in buffer.touched.items():
            objects.append(
                TouchedObject(
                    progress,
                    deltas.get(key, Counts()),
                    progress.checkpoint_line,
                    progress.status,
                    progress.error,
                )
            )
            if progress.status == "completed":
                completed += 1
            elif progress.status == "failed":
                failed_objects += 1
        lines = latest_of_each(lines, ids)
        rows = "\n".join(lines) + "\n" if lines else ""
        return cls(
            rows,
            len(lines),
            list(sources),
            invalid,
            counts,
            objects,
            completed,
            failed_objects,
            objects_skipped,
            model_version,
        )


# A scored row's last fields (prediction, then no reason, status or attempts), by
# is_fraud: a bool indexes the tuple.
_FRAUD_TAILS = (",f,,,", ",t,,,")


def _score_texts(scores: list[float]) -> list[str]:
    """Each score as text, exactly (the shortest text that reads back as the same
    double, as repr gives): orjson writes a whole list in one call, about a third of
    the CPU of a repr per score."""
    if not scores:
        return []
    return orjson.dumps(scores)[1:-1].decode().split(",")


def _failed(failure: Failure, source: int, quoted_version: str) -> str:
    """A failed row's outcome, with its leading comma."""
    status = "" if failure.http_status is None else str(failure.http_status)
    reason = csv_quote(failure.reason)
    return f",{source},{quoted_version},,,{reason},{status},{failure.attempts}"


def latest_of_each(lines: list[str], ids: list[str]) -> list[str]:
    """The lines of a flush with the same transaction_id twice reduced to the latest of
    each, in order: ON CONFLICT cannot meet a key twice in one statement, and the latest
    row of the input is the one kept."""
    keep = latest_positions(ids)
    return lines if keep is None else [lines[i] for i in keep]
