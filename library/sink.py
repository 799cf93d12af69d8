"""Sink stage: scored units -> PostgreSQL, one database transaction per flush.

A flush writes, together and atomically: the transactions (valid rows, scored
or not), their predictions, the failures, the invalid rows, each touched
object's checkpoint and the run's counts. A crash therefore leaves either the
whole flush or none of it, and the checkpoint always says exactly which rows
are stored.

Writing uses PostgreSQL's fast path: COPY into temporary staging tables, then
one `INSERT ... ON CONFLICT DO UPDATE` per table. A transaction_id repeated in
a flush is reduced to its latest row first (the latest row wins, and ON
CONFLICT never meets the same key twice). Units arrive in source order, so the
latest row of a run is also the last one written.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import orjson
import polars as pl
import psycopg

from library import db, ledger
from library.faults import failpoint
from library.models import (
    LINE_COLUMN,
    Counts,
    Failure,
    Prediction,
    ScoreResult,
    SourceObject,
    WorkUnit,
)

log = logging.getLogger(__name__)

TRANSACTION_COLUMNS = (
    "transaction_id",
    "event_time",
    "account_id",
    "merchant_id",
    "merchant_category",
    "amount",
    "currency",
    "country",
    "channel",
    "card_present",
    "source_uri",
    "source_version",
    "source_line",
)

STAGING_DDL = """
CREATE TEMP TABLE IF NOT EXISTS stage_transactions (
    transaction_id text, event_time timestamptz, account_id text, merchant_id text,
    merchant_category text, amount numeric(12, 2), currency text, country text,
    channel text, card_present boolean, source_uri text, source_version text,
    source_line bigint,
    seq bigint GENERATED ALWAYS AS IDENTITY  -- COPY order: the latest row has the largest
) ON COMMIT DELETE ROWS;
CREATE TEMP TABLE IF NOT EXISTS stage_predictions (
    transaction_id text, model_version text, fraud_score double precision, prediction boolean
) ON COMMIT DELETE ROWS;
CREATE TEMP TABLE IF NOT EXISTS stage_failures (
    transaction_id text, model_version text, reason text, http_status integer, attempts integer
) ON COMMIT DELETE ROWS;
CREATE TEMP TABLE IF NOT EXISTS stage_invalid (
    source_uri text, source_version text, line_number bigint, raw_text text, reasons jsonb
) ON COMMIT DELETE ROWS;
"""

_DATA_COLUMNS = TRANSACTION_COLUMNS[1:10]
UPSERT_TRANSACTIONS = f"""
INSERT INTO transactions ({", ".join(TRANSACTION_COLUMNS)}, run_id)
SELECT DISTINCT ON (transaction_id) {", ".join(TRANSACTION_COLUMNS)}, %(run_id)s
FROM stage_transactions
ORDER BY transaction_id, seq DESC
ON CONFLICT (transaction_id) DO UPDATE SET
    {", ".join(f"{c} = EXCLUDED.{c}" for c in TRANSACTION_COLUMNS[1:])},
    run_id = EXCLUDED.run_id, updated_at = now()
WHERE ({", ".join(f"transactions.{c}" for c in TRANSACTION_COLUMNS[1:])})
    IS DISTINCT FROM ({", ".join(f"EXCLUDED.{c}" for c in TRANSACTION_COLUMNS[1:])})
"""

UPSERT_PREDICTIONS = """
INSERT INTO predictions (transaction_id, model_version, fraud_score, prediction, run_id)
SELECT transaction_id, model_version, fraud_score, prediction, %(run_id)s FROM stage_predictions
ORDER BY transaction_id
ON CONFLICT (transaction_id, model_version) DO UPDATE SET
    fraud_score = EXCLUDED.fraud_score, prediction = EXCLUDED.prediction,
    run_id = EXCLUDED.run_id, scored_at = now()
WHERE (predictions.fraud_score, predictions.prediction)
    IS DISTINCT FROM (EXCLUDED.fraud_score, EXCLUDED.prediction)
"""

# Scored now: any open failure of the transaction is resolved.
RESOLVE_FAILURES = """
UPDATE failed_transactions f SET resolved_at = now(), resolved_by_run = %(run_id)s
FROM stage_predictions s
WHERE f.transaction_id = s.transaction_id AND f.resolved_at IS NULL
"""

# Failed now: the prediction of the same model version described an older row.
DELETE_STALE_PREDICTIONS = """
DELETE FROM predictions p USING stage_failures s
WHERE p.transaction_id = s.transaction_id AND p.model_version = s.model_version
"""

UPSERT_FAILURES = """
INSERT INTO failed_transactions (transaction_id, model_version, reason, http_status, attempts, run_id)
SELECT transaction_id, model_version, reason, http_status, attempts, %(run_id)s FROM stage_failures
ORDER BY transaction_id
ON CONFLICT (transaction_id) WHERE resolved_at IS NULL DO UPDATE SET
    model_version = EXCLUDED.model_version, reason = EXCLUDED.reason,
    http_status = EXCLUDED.http_status,
    attempts = failed_transactions.attempts + EXCLUDED.attempts,
    run_id = EXCLUDED.run_id, failed_at = now()
"""

INSERT_INVALID = """
INSERT INTO invalid_rows (source_uri, source_version, line_number, raw_text, reasons, run_id)
SELECT source_uri, source_version, line_number, raw_text, reasons, %(run_id)s FROM stage_invalid
ON CONFLICT (source_uri, source_version, line_number) DO UPDATE SET run_id = EXCLUDED.run_id
WHERE invalid_rows.run_id IS DISTINCT FROM EXCLUDED.run_id
"""

ObjectStatus = Literal["processing", "completed", "failed"]


@dataclass
class ObjectProgress:
    obj: SourceObject
    counts: Counts  # the object's rows so far, earlier runs' included
    checkpoint_line: int
    status: ObjectStatus = "processing"
    error: str | None = None
    run_counts: Counts = field(default_factory=Counts)  # this run's share


@dataclass
class FlushBuffer:
    units: list[tuple[WorkUnit, ScoreResult]] = field(default_factory=list)
    rows: int = 0
    touched: dict[tuple[str, str], ObjectProgress] = field(default_factory=dict)

    def clear(self) -> None:
        self.units.clear()
        self.rows = 0
        self.touched.clear()


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


class Sink:
    """Buffers scored units in order and writes them, one transaction per flush."""

    def __init__(
        self,
        database_url: str,
        run_id: str,
        flush_rows: int,
        on_flush: Callable[[float], None] | None = None,
    ) -> None:
        self.on_flush = on_flush
        self.database_url = database_url
        self.run_id = run_id
        self.flush_rows = flush_rows
        self.run = RunProgress()
        self._objects: dict[tuple[str, str], ObjectProgress] = {}
        self._buffer = FlushBuffer()
        self._conn: psycopg.Connection[Any] | None = None
        self._run_dirty = False

    # -- lifecycle -------------------------------------------------------------

    def _connection(self) -> psycopg.Connection[Any]:
        if self._conn is None or self._conn.closed:
            self._conn = db.connect(self.database_url, "batch-pipeline sink")
            with self._conn.transaction():
                self._conn.execute(STAGING_DDL)
        return self._conn

    def _reconnect(self) -> None:
        if self._conn is not None:
            with contextlib.suppress(psycopg.Error):
                self._conn.close()
        self._conn = None

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()

    # -- input, in source order ------------------------------------------------

    def begin_object(self, obj: SourceObject, checkpoint_line: int, prior: Counts | None) -> None:
        counts = Counts()
        if prior is not None:
            counts.add(prior)
        self._objects[(obj.uri, obj.version)] = ObjectProgress(obj, counts, checkpoint_line)

    def skip_object(self) -> None:
        self.run.objects_skipped += 1
        self._run_dirty = True  # written by the next flush, even one with no rows

    def add(self, unit: WorkUnit, result: ScoreResult) -> None:
        """Buffer a scored unit; units of an object not begun (retry-failed) are not tracked."""
        key = (unit.obj.uri, unit.obj.version)
        progress = self._objects.get(key)
        if progress is not None:
            progress.checkpoint_line = max(progress.checkpoint_line, unit.checkpoint_line)
            self._buffer.touched[key] = progress
        self._buffer.units.append((unit, result))
        self._buffer.rows += unit.rows
        if self._buffer.rows >= self.flush_rows:
            self.flush()

    def end_object(self, obj: SourceObject, error: str | None = None) -> None:
        """The object is fully read (or failed): mark it in the next flush, written now."""
        progress = self._objects[(obj.uri, obj.version)]
        progress.status = "failed" if error else "completed"
        progress.error = error
        self._buffer.touched[(obj.uri, obj.version)] = progress
        self.flush()
        del self._objects[(obj.uri, obj.version)]

    @property
    def pending_rows(self) -> int:
        return self._buffer.rows

    # -- preparing, on the reader thread ------------------------------------------

    @staticmethod
    def prepare_rows(frame: pl.DataFrame, obj: SourceObject) -> pl.DataFrame:
        """Add each row's COPY line: formatted once per chunk by polars, on the reader
        thread, so that the writer only joins strings (polars calls made by the writer
        would queue behind the reader's on polars' shared thread pool)."""
        if frame.height == 0:
            return frame.with_columns(pl.lit("").alias(COPY_LINE))
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
                _quoted(pl.lit(obj.uri)),
                _quoted(pl.lit(obj.version)),
                pl.col(LINE_COLUMN).cast(pl.String),
            ],
            separator=",",
        )
        return frame.with_columns(line.alias(COPY_LINE))

    # -- writing ---------------------------------------------------------------

    def flush(self) -> None:
        """Write everything buffered in one transaction, retrying a lost connection."""
        if not self._buffer.units and not self._buffer.touched and not self._run_dirty:
            return
        failpoint("before_flush")
        began = time.perf_counter()
        batch = self._prepare()
        db.with_retries(lambda: self._write(batch), "writing a flush", on_retry=self._reconnect)
        failpoint("after_flush")
        self._account(batch)
        elapsed = time.perf_counter() - began
        self.run.busy_seconds += elapsed
        if self.on_flush:
            self.on_flush(elapsed)
        self._buffer.clear()
        self._run_dirty = False

    def _prepare(self) -> PreparedFlush:
        return PreparedFlush.build(self._buffer, self.run.model_version)

    def _write(self, batch: PreparedFlush) -> None:
        began = time.perf_counter()
        conn = self._connection()
        params = {"run_id": self.run_id}
        with conn.transaction(), conn.cursor() as cur:
            if batch.transactions:
                copy_text(cur, STAGE_TRANSACTIONS, batch.transactions, "csv")
                cur.execute(UPSERT_TRANSACTIONS, params)
            if batch.failures:
                copy_rows(cur, STAGE_FAILURES, batch.failures)
                cur.execute(DELETE_STALE_PREDICTIONS)
                cur.execute(UPSERT_FAILURES, params)
            if batch.predictions:
                copy_text(cur, STAGE_PREDICTIONS, predictions_text(batch.predictions), "text")
                cur.execute(UPSERT_PREDICTIONS, params)
                cur.execute(RESOLVE_FAILURES, params)
            if batch.invalid:
                copy_rows(cur, STAGE_INVALID, batch.invalid)
                cur.execute(INSERT_INVALID, params)
            counts = Counts()
            counts.add(self.run.counts)
            counts.add(batch.counts)
            for progress, delta in batch.objects:
                ledger.record_object_progress(
                    cur,
                    progress.obj,
                    progress.checkpoint_line,
                    plus(progress.counts, delta),
                    progress.status,
                    progress.error,
                )
                ledger.record_run_object(
                    cur,
                    self.run_id,
                    progress.obj,
                    plus(progress.run_counts, delta),
                    progress.status,
                )
            ledger.record_run_progress(
                cur,
                self.run_id,
                counts,
                self.run.objects_done + batch.objects_completed,
                self.run.objects_failed + batch.objects_failed,
                self.run.objects_skipped,
                batch.model_version,
            )
            failpoint("flush_before_commit")
        self.run.flush_seconds += time.perf_counter() - began

    def _account(self, batch: PreparedFlush) -> None:
        """After commit: fold the flush into the in-memory totals."""
        self.run.counts.add(batch.counts)
        self.run.objects_done += batch.objects_completed
        self.run.objects_failed += batch.objects_failed
        self.run.flushes += 1
        if batch.model_version:
            self.run.model_version = batch.model_version
        for progress, delta in batch.objects:
            progress.counts.add(delta)
            progress.run_counts.add(delta)


STAGE_FAILURES = "stage_failures (transaction_id, model_version, reason, http_status, attempts)"
STAGE_INVALID = "stage_invalid (source_uri, source_version, line_number, raw_text, reasons)"


STAGE_TRANSACTIONS = f"stage_transactions ({', '.join(TRANSACTION_COLUMNS)})"
STAGE_PREDICTIONS = "stage_predictions (transaction_id, model_version, fraud_score, prediction)"
COPY_LINE = "_copy"
COPY_DATETIME = "%Y-%m-%dT%H:%M:%S%.6f+00:00"


def _quoted(expr: pl.Expr) -> pl.Expr:
    return pl.lit('"') + expr.str.replace_all('"', '""', literal=True) + pl.lit('"')


def _escape_text(value: str) -> str:
    """A value for COPY's text format."""
    return (
        value.replace("\\", "\\\\").replace("\t", "\\t").replace("\n", "\\n").replace("\r", "\\r")
    )


def predictions_text(predictions: list[Prediction]) -> str:
    """COPY text lines. Transaction ids are validated (no character to escape); the
    model version is the server's, escaped once per distinct value."""
    escaped: dict[str, str] = {}
    out = []
    for p in predictions:
        version = escaped.get(p.model_version)
        if version is None:
            version = escaped[p.model_version] = _escape_text(p.model_version)
        out.append(
            f"{p.transaction_id}\t{version}\t{p.fraud_score!r}\t{'t' if p.is_fraud else 'f'}\n"
        )
    return "".join(out)


def copy_text(cur: psycopg.Cursor[Any], target: str, text: str, fmt: str) -> None:
    with cur.copy(f"COPY {target} FROM STDIN (FORMAT {fmt})") as copy:
        copy.write(text)


def plus(a: Counts, b: Counts) -> Counts:
    total = Counts()
    total.add(a)
    total.add(b)
    return total


def copy_rows(cur: psycopg.Cursor[Any], target: str, rows: Iterable[Sequence[Any]]) -> None:
    with cur.copy(f"COPY {target} FROM STDIN") as copy:
        for row in rows:
            copy.write_row(row)


@dataclass
class PreparedFlush:
    """Everything one flush writes, reduced to the latest row per transaction_id."""

    transactions: str  # COPY csv text, one line per row
    predictions: list[Prediction]
    failures: list[tuple[str, str | None, str, int | None, int]]
    invalid: list[tuple[str, str, int, str, str]]
    counts: Counts
    objects: list[tuple[ObjectProgress, Counts]]
    objects_completed: int
    objects_failed: int
    model_version: str | None

    @classmethod
    def build(cls, buffer: FlushBuffer, known_version: str | None) -> PreparedFlush:
        # Each row's COPY line was made on the reader thread (Sink.prepare_rows): here
        # they are only joined. Repeated ids are reduced by DISTINCT ON in SQL.
        lines: list[str] = []
        for unit, _ in buffer.units:
            tx = unit.transactions
            if tx.height:
                if COPY_LINE not in tx.columns:
                    tx = Sink.prepare_rows(tx, unit.obj)
                lines.extend(tx.get_column(COPY_LINE).to_list())
        transactions = "\n".join(lines) + "\n" if lines else ""

        latest: dict[str, Prediction | Failure] = {}
        counts = Counts()
        deltas: dict[tuple[str, str], Counts] = {}
        invalid: list[tuple[str, str, int, str, str]] = []
        model_version = known_version
        for unit, result in buffer.units:
            for p in result.predictions:
                latest[p.transaction_id] = p
            for f in result.failures:
                latest[f.transaction_id] = f
            if result.predictions:
                model_version = result.predictions[-1].model_version
            for row in unit.invalid:
                reasons = orjson.dumps([r.as_json() for r in row.reasons]).decode()
                invalid.append(
                    (unit.obj.uri, unit.obj.version, row.line_number, row.raw_text, reasons)
                )
            unit_counts = unit.counts(result)
            deltas.setdefault((unit.obj.uri, unit.obj.version), Counts()).add(unit_counts)
            counts.add(unit_counts)
        predictions = [o for o in latest.values() if isinstance(o, Prediction)]
        failures = [
            (o.transaction_id, model_version, o.reason, o.http_status, o.attempts)
            for o in latest.values()
            if isinstance(o, Failure)
        ]

        objects = []
        completed = failed_objects = 0
        for key, progress in buffer.touched.items():
            objects.append((progress, deltas.get(key, Counts())))
            if progress.status == "completed":
                completed += 1
            elif progress.status == "failed":
                failed_objects += 1
        return cls(
            transactions,
            predictions,
            failures,
            invalid,
            counts,
            objects,
            completed,
            failed_objects,
            model_version,
        )
