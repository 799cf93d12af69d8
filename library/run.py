"""The orchestrator: wires source -> validate -> score -> sink, in that one direction.

    main thread        reads objects, parses and validates chunks, cuts them into
                       units and submits each unit to the scoring pool
    scoring pool       API_MAX_WORKERS threads, each scoring one unit at a time
    writer thread      takes units in source order from a bounded queue, waits for
                       each one's scores and hands it to the sink

The queue bounds the units read but not yet written, so memory stays flat
however large the input. Writing in source order is what makes the latest row
win and every checkpoint exact. Whatever stops the run (an interrupt, the API
down, a threshold crossed, a database error) stops reading first, then lets the
writer flush every unit that was fully scored before the first one that was
not, so nothing is half-written and the next run resumes where this one ended.
"""

from __future__ import annotations

import functools
import logging
import queue
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from library import db, logs, source
from library.batching import plan_units
from library.config import Settings, redact_url, url_secrets
from library.errors import (
    EXIT_COMPLETED,
    EXIT_COMPLETED_WITH_ERRORS,
    EXIT_FAILED,
    ConfigError,
    DatabaseError,
    MissingColumnsError,
    PipelineError,
    SourceError,
    ThresholdExceededError,
)
from library.ledger import Ledger, RunStatus
from library.models import Counts, ScoreResult, SourceObject, WorkUnit
from library.score.client import ScoringClient, ScoringStopped
from library.score.codec import NativeCodec
from library.sink import Sink
from library.validate import validate_chunk

log = logging.getLogger(__name__)

MIN_ROWS_FOR_RATIO = (
    1000  # a ratio over fewer rows read says little; the end-of-run check still applies
)


@dataclass(frozen=True)
class RunOptions:
    dry_run: bool = False
    limit: int | None = None  # at most this many objects
    reprocess: bool = False  # read objects again even if completed at this version
    migrate: bool = False  # apply pending migrations before running


@dataclass
class ObjectOutcome:
    uri: str
    status: str  # completed, failed, refused, skipped, locked
    counts: Counts = field(default_factory=Counts)
    error: str | None = None


@dataclass
class RunReport:
    run_id: str
    status: RunStatus
    exit_code: int
    counts: Counts
    objects: list[ObjectOutcome]
    started_at: float
    finished_at: float
    error: str | None = None
    model_version: str | None = None
    database: str | None = None  # where the data is, secrets removed
    dry_run: bool = False
    api_requests: int = 0
    api_retries: int = 0
    flushes: int = 0

    @property
    def seconds(self) -> float:
        return max(self.finished_at - self.started_at, 1e-9)

    def summary(self) -> dict[str, Any]:
        by_status: dict[str, int] = {}
        for o in self.objects:
            by_status[o.status] = by_status.get(o.status, 0) + 1
        return {
            "run_id": self.run_id,
            "status": self.status,
            "exit_code": self.exit_code,
            "dry_run": self.dry_run,
            "rows": self.counts.as_dict(),
            "objects": by_status,
            "seconds": round(self.seconds, 3),
            "rows_per_second": round(self.counts.read / self.seconds, 1),
            "model_version": self.model_version,
            "api_requests": self.api_requests,
            "api_retries": self.api_retries,
            "flushes": self.flushes,
            "error": self.error,
        }


# -- the writer ----------------------------------------------------------------


@dataclass
class _Begin:
    obj: SourceObject
    checkpoint_line: int
    prior: Counts | None


@dataclass
class _Unit:
    unit: WorkUnit
    future: Future[ScoreResult]


@dataclass
class _End:
    obj: SourceObject
    error: str | None
    release: Callable[[], None]


_STOP = object()


class Writer(threading.Thread):
    """Consumes units in source order and writes them through the sink."""

    def __init__(
        self,
        sink: Sink,
        settings: Settings,
        on_abort: Callable[[PipelineError], None],
        queue_size: int,
    ) -> None:
        super().__init__(name="writer", daemon=True)
        self.sink = sink
        self.settings = settings
        self.items: queue.Queue[object] = queue.Queue(maxsize=queue_size)
        self.error: PipelineError | None = None
        self._on_abort = on_abort
        self._chunk_counts = Counts()

    def run(self) -> None:
        try:
            self._consume()
        except DatabaseError as exc:
            self._abort(exc)
        except PipelineError as exc:
            self._abort(exc)
            self._flush_after_abort()
        except Exception as exc:  # a bug: still stop cleanly and say so
            log.exception("writer failed")
            self._abort(PipelineError(f"internal error in the writer: {exc}"))
        finally:
            self._drain()

    def _flush_after_abort(self) -> None:
        """Keep what was fully scored before the stop; a failing database is left alone."""
        try:
            self.sink.flush()
        except PipelineError as exc:
            log.error("could not flush after the stop: %s", exc)

    def _abort(self, exc: PipelineError) -> None:
        if self.error is None:
            self.error = exc
            self._on_abort(exc)

    def _consume(self) -> None:
        interval = self.settings.DB_FLUSH_INTERVAL
        while True:
            try:
                item = self.items.get(timeout=interval)
            except queue.Empty:
                if self.sink.pending_rows:
                    self.sink.flush()  # keep checkpoints fresh while scoring is slow
                continue
            if item is _STOP:
                self.sink.flush()
                return
            if isinstance(item, _Begin):
                self.sink.begin_object(item.obj, item.checkpoint_line, item.prior)
            elif isinstance(item, _Unit):
                try:
                    result = item.future.result()
                except (ScoringStopped, PipelineError) as exc:
                    self.sink.flush()  # everything before this unit is complete: keep it
                    raise exc from None
                self.sink.add(item.unit, result)
                self._log_chunk(item.unit, result)
                self._check_ratios(final=False)
            elif isinstance(item, _End):
                self.sink.end_object(item.obj, item.error)
                item.release()

    def _drain(self) -> None:
        """After a stop: cancel what was queued so that no worker scores for nothing."""
        while True:
            try:
                item = self.items.get_nowait()
            except queue.Empty:
                return
            if isinstance(item, _Unit):
                item.future.cancel()
            elif isinstance(item, _End):
                item.release()

    def _log_chunk(self, unit: WorkUnit, result: ScoreResult) -> None:
        self._chunk_counts.add(unit.counts(result))
        if unit.last_of_chunk:
            c = self._chunk_counts
            log.info(
                "Batch %d: processed %d transactions (%d scored, %d failed, %d invalid) from %s",
                unit.chunk,
                c.read,
                c.scored,
                c.failed,
                c.invalid,
                unit.obj.uri,
            )
            self._chunk_counts = Counts()

    def _check_ratios(self, final: bool) -> None:
        check_ratios(self.sink.run.counts, self.settings, final)


def check_ratios(counts: Counts, settings: Settings, final: bool) -> None:
    """Raise ThresholdExceededError when a ratio of the contract is crossed."""
    if counts.read == 0 or (not final and counts.read < MIN_ROWS_FOR_RATIO):
        return
    invalid_ratio = counts.invalid / counts.read
    if invalid_ratio > settings.MAX_INVALID_RATIO:
        raise ThresholdExceededError(
            f"MAX_INVALID_RATIO crossed: {counts.invalid} of {counts.read} rows read are invalid "
            f"({invalid_ratio:.2%} > {settings.MAX_INVALID_RATIO:.2%})"
        )
    if counts.valid:
        failed_ratio = counts.failed / counts.valid
        if failed_ratio > settings.MAX_FAILED_RATIO:
            raise ThresholdExceededError(
                f"MAX_FAILED_RATIO crossed: {counts.failed} of {counts.valid} valid transactions "
                f"could not be scored ({failed_ratio:.2%} > {settings.MAX_FAILED_RATIO:.2%})"
            )


# -- the run -------------------------------------------------------------------


class StopSignal:
    """Set by a signal handler or an aborting stage; the reader checks it between units.

    The first error set is the root cause and the one reported."""

    def __init__(self) -> None:
        self.event = threading.Event()
        self.error: PipelineError | None = None
        self._listeners: list[Callable[[PipelineError], None]] = []

    def set(self, error: PipelineError) -> None:
        if self.error is None:
            self.error = error
        self.event.set()
        for listener in list(self._listeners):
            listener(self.error)

    def on_set(self, listener: Callable[[PipelineError], None]) -> None:
        self._listeners.append(listener)
        if self.error is not None:
            listener(self.error)

    def is_set(self) -> bool:
        return self.event.is_set()


@contextmanager
def database(settings: Settings) -> Iterator[tuple[str, str]]:
    """The database URL to use (given, or the embedded server) and how to show it."""
    url = settings.database_url
    if url:
        yield url, redact_url(url)
        return
    with db.embedded_postgres(settings.EMBEDDED_DB_DIR) as embedded:
        folder = settings.EMBEDDED_DB_DIR.expanduser().resolve()
        log.info(
            "DATABASE_URL is unset: using the embedded PostgreSQL in %s (%s)", folder, embedded
        )
        yield embedded, embedded


def s3_client_for(settings: Settings) -> Any | None:
    if settings.SOURCE_URI and source.is_s3(settings.SOURCE_URI):
        secret = settings.SECRET.get_secret_value() if settings.SECRET else None
        return source.make_s3_client(settings.KEY, secret, settings.ENDPOINT_URL)
    return None


def require_run_settings(settings: Settings, options: RunOptions) -> None:
    if not settings.SOURCE_URI:
        raise ConfigError("SOURCE_URI is required: set it or pass --source s3://bucket/prefix/")
    if not options.dry_run and not settings.ML_API_URL:
        raise ConfigError("ML_API_URL is required: set it or pass --ml-api-url http://host:port")
    if not source.is_s3(settings.SOURCE_URI):
        from pathlib import Path

        if not Path(settings.SOURCE_URI).exists():
            raise ConfigError(f"SOURCE_URI: no such file or folder: {settings.SOURCE_URI}")
    if options.limit is not None and options.limit < 1:
        raise ConfigError("--limit must be at least 1")


def run_pipeline(
    settings: Settings, options: RunOptions, stop: StopSignal | None = None
) -> RunReport:
    """Run the job once. Raises only for errors before any work (configuration)."""
    require_run_settings(settings, options)
    stop = stop or StopSignal()
    if options.dry_run:
        return DryRun(settings, options, stop).execute()
    return Run(settings, options, stop).execute()


class Run:
    def __init__(self, settings: Settings, options: RunOptions, stop: StopSignal) -> None:
        self.settings = settings
        self.options = options
        self.stop = stop
        self.outcomes: list[ObjectOutcome] = []
        self.started = time.time()
        self.run_id = ""
        self.client: ScoringClient | None = None
        self.sink: Sink | None = None
        self.database_shown: str | None = None

    def execute(self) -> RunReport:
        settings = self.settings
        with ExitStack() as stack:
            url, shown = stack.enter_context(database(settings))
            self.database_shown = shown
            logs.add_secrets(settings.secret_values() + url_secrets(url))
            conn = db.connect(url, "batch-pipeline ledger")
            stack.callback(conn.close)
            self._prepare_schema(conn, embedded=settings.database_url is None)
            ledger = Ledger(conn)
            self.run_id = ledger.start_run(datetime.now(), settings.SOURCE_URI, settings.redacted())
            log.info("Starting batch pipeline")
            log.info("Pipeline Run ID: %s", self.run_id)
            error: PipelineError | None = None
            try:
                self._process(ledger, url)
            except PipelineError as exc:
                error = exc
            except Exception as exc:  # a bug: record the run as failed all the same
                log.exception("internal error")
                error = PipelineError(f"internal error: {type(exc).__name__}: {exc}")
            report = self._report(error)
            self._finish(ledger, report)
            return report
        raise AssertionError("unreachable")

    def _prepare_schema(self, conn: Any, embedded: bool) -> None:
        if self.options.migrate or embedded:
            applied = db.migrate(conn)
            if applied:
                log.info(
                    "applied %d migration(s): %s",
                    len(applied),
                    ", ".join(m.script for m in applied),
                )
        db.require_schema(conn)

    def _process(self, ledger: Ledger, url: str) -> None:
        settings = self.settings
        assert settings.SOURCE_URI and settings.ML_API_URL
        s3 = s3_client_for(settings)
        objects = source.list_objects(settings.SOURCE_URI, s3)
        if self.options.limit is not None:
            objects = objects[: self.options.limit]
        ledger.set_objects_total(self.run_id, len(objects))
        log.info("Found %d object(s) under %s", len(objects), settings.SOURCE_URI)

        client = ScoringClient(
            settings.ML_API_URL,
            NativeCodec(),
            timeout=settings.API_TIMEOUT,
            max_retries=settings.API_MAX_RETRIES,
            backoff=settings.API_RETRY_BACKOFF,
            backoff_max=settings.API_RETRY_BACKOFF_MAX,
            pool_size=settings.API_MAX_WORKERS,
        )
        self.client = client
        client.check_ready()
        sink = Sink(url, self.run_id, settings.DB_ROW_BATCH_SIZE)
        self.sink = sink

        self.stop.on_set(lambda exc: client.stop(str(exc)))

        def abort(exc: PipelineError) -> None:
            self.stop.set(exc)

        writer = Writer(sink, settings, abort, queue_size=max(8, 4 * settings.API_MAX_WORKERS))
        executor = ThreadPoolExecutor(settings.API_MAX_WORKERS, thread_name_prefix="score")
        writer.start()
        try:
            self._read_all(objects, ledger, s3, client, executor, writer)
        finally:
            self._put(writer, _STOP, force=True)
            writer.join()
            executor.shutdown(wait=True, cancel_futures=True)
            client.close()
            sink.close()
        if self.stop.error is not None:
            raise self.stop.error  # the root cause, not what it caused downstream
        if writer.error is not None:
            raise writer.error
        check_ratios(sink.run.counts, settings, final=True)

    def _put(self, writer: Writer, item: object, force: bool = False) -> None:
        """Queue an item for the writer, giving up if the run is stopping."""
        while True:
            if not writer.is_alive():
                return
            if self.stop.is_set() and not force:
                raise _Stopping
            try:
                writer.items.put(item, timeout=0.2)
                return
            except queue.Full:
                continue

    def _read_all(
        self,
        objects: list[SourceObject],
        ledger: Ledger,
        s3: Any,
        client: ScoringClient,
        executor: ThreadPoolExecutor,
        writer: Writer,
    ) -> None:
        seq = 0
        chunk_number = 0
        try:
            for obj in objects:
                if self.stop.is_set():
                    return
                claim = ledger.claim(self.run_id, obj, self.options.reprocess)
                if claim.status == "completed":
                    log.info("Skipping %s: already completed at version %s", obj.uri, obj.version)
                    self.outcomes.append(ObjectOutcome(obj.uri, "skipped"))
                    assert self.sink is not None
                    self.sink.skip_object()
                    continue
                if claim.status == "locked":
                    log.warning(
                        "Skipping %s: another run (%s) is processing it",
                        obj.uri,
                        claim.held_by or "unknown",
                    )
                    self.outcomes.append(ObjectOutcome(obj.uri, "locked"))
                    continue
                if claim.status == "resume":
                    log.info("Resuming %s after line %d", obj.uri, claim.checkpoint_line)
                outcome = ObjectOutcome(obj.uri, "completed")
                self.outcomes.append(outcome)
                self._put(writer, _Begin(obj, claim.checkpoint_line, claim.prior))
                error: str | None = None
                try:
                    with source.open_text(obj, s3) as (text, _counter):
                        for chunk in source.read_chunks(
                            obj, text, self.settings.ROW_BATCH_SIZE, claim.checkpoint_line
                        ):
                            validated = validate_chunk(chunk)
                            validated.valid = client.prepare(validated.valid)
                            for unit in plan_units(
                                validated, self.settings.API_BATCH_SIZE, seq, chunk_number
                            ):
                                seq += 1
                                future = self._submit(executor, client, unit)
                                self._put(writer, _Unit(unit, future))
                            chunk_number += 1
                except MissingColumnsError as exc:
                    error = str(exc)
                    outcome.status = "refused"
                    log.error("Refused %s", exc)
                except SourceError as exc:
                    error = str(exc)
                    outcome.status = "failed"
                    log.error("Cannot read %s: %s", obj.uri, exc)
                except (OSError, UnicodeError, ValueError, EOFError) as exc:
                    error = f"{obj.uri}: {type(exc).__name__}: {exc}"
                    outcome.status = "failed"
                    log.error("Cannot read %s: %s", obj.uri, error)
                except Exception as exc:
                    from botocore.exceptions import BotoCoreError, ClientError

                    if not isinstance(exc, BotoCoreError | ClientError):
                        raise
                    error = source.describe_s3_error(exc, obj.uri)
                    outcome.status = "failed"
                    log.error("Cannot read %s: %s", obj.uri, error)
                outcome.error = error
                self._put(writer, _End(obj, error, functools.partial(ledger.release, obj)))
        except _Stopping:
            return

    def _submit(
        self, executor: ThreadPoolExecutor, client: ScoringClient, unit: WorkUnit
    ) -> Future[ScoreResult]:
        if unit.transactions.height == 0:
            done: Future[ScoreResult] = Future()
            done.set_result(ScoreResult())
            return done
        return executor.submit(client.score, unit.transactions)

    def _report(self, error: PipelineError | None) -> RunReport:
        sink = self.sink
        counts = sink.run.counts if sink else Counts()
        refused = any(o.status == "refused" for o in self.outcomes)
        failed_objects = any(o.status == "failed" for o in self.outcomes)
        status: RunStatus
        if error is not None:
            exit_code = error.exit_code
            status = "interrupted" if exit_code in (130, 143) else "failed"
            message: str | None = str(error)
        elif failed_objects:
            exit_code, status = EXIT_FAILED, "failed"
            bad = [o for o in self.outcomes if o.status == "failed"]
            message = f"{len(bad)} object(s) could not be read: " + "; ".join(
                str(o.error) for o in bad[:5]
            )
        elif counts.invalid or counts.failed or refused:
            exit_code, status, message = EXIT_COMPLETED_WITH_ERRORS, "completed_with_errors", None
        else:
            exit_code, status, message = EXIT_COMPLETED, "completed", None
        client = self.client
        return RunReport(
            run_id=self.run_id,
            status=status,
            exit_code=exit_code,
            counts=counts,
            objects=self.outcomes,
            started_at=self.started,
            finished_at=time.time(),
            error=message,
            model_version=sink.run.model_version if sink else None,
            database=self.database_shown,
            api_requests=client.stats.requests if client else 0,
            api_retries=client.stats.retries if client else 0,
            flushes=sink.run.flushes if sink else 0,
        )

    def _finish(self, ledger: Ledger, report: RunReport) -> None:
        try:
            ledger.finish_run(
                self.run_id, report.status, report.error, report.summary(), report.model_version
            )
        except Exception as exc:  # the report still reaches the user
            log.error("could not record the end of run %s: %s", self.run_id, db.first_line(exc))


class _Stopping(Exception):
    """Internal: the reader noticed the stop signal while queueing."""


class DryRun:
    """Read and validate everything; no API call, no database, no write."""

    def __init__(self, settings: Settings, options: RunOptions, stop: StopSignal) -> None:
        self.settings = settings
        self.options = options
        self.stop = stop

    def execute(self) -> RunReport:
        started = time.time()
        settings = self.settings
        assert settings.SOURCE_URI
        run_id = "dry_run_" + datetime.now().strftime("%Y%m%d_%H%M%S")
        log.info("Starting batch pipeline (dry run: no API calls, no writes)")
        counts = Counts()
        outcomes: list[ObjectOutcome] = []
        error: PipelineError | None = None
        try:
            s3 = s3_client_for(settings)
            objects = source.list_objects(settings.SOURCE_URI, s3)
            if self.options.limit is not None:
                objects = objects[: self.options.limit]
            for obj in objects:
                if self.stop.is_set():
                    break
                outcome = ObjectOutcome(obj.uri, "completed")
                outcomes.append(outcome)
                try:
                    with source.open_text(obj, s3) as (text, _counter):
                        for chunk in source.read_chunks(obj, text, settings.ROW_BATCH_SIZE):
                            validated = validate_chunk(chunk)
                            c = Counts(
                                read=chunk.rows_read,
                                valid=validated.valid.height,
                                invalid=len(validated.invalid),
                            )
                            outcome.counts.add(c)
                            counts.add(c)
                except MissingColumnsError as exc:
                    outcome.status, outcome.error = "refused", str(exc)
                    log.error("Refused %s", exc)
                except (SourceError, OSError, ValueError, EOFError) as exc:
                    outcome.status, outcome.error = "failed", str(exc)
                    log.error("Cannot read %s: %s", obj.uri, exc)
            if self.stop.error is not None:
                raise self.stop.error
        except PipelineError as exc:
            error = exc
        refused = any(o.status == "refused" for o in outcomes)
        failed = any(o.status == "failed" for o in outcomes)
        status: RunStatus
        if error is not None:
            exit_code = error.exit_code
            status = "interrupted" if exit_code in (130, 143) else "failed"
        elif failed:
            exit_code, status = EXIT_FAILED, "failed"
        else:
            try:
                check_ratios(counts, settings, final=True)
            except ThresholdExceededError as exc:
                error = exc
            if error is not None:
                exit_code, status = error.exit_code, "failed"
            elif counts.invalid or refused:
                exit_code, status = EXIT_COMPLETED_WITH_ERRORS, "completed_with_errors"
            else:
                exit_code, status = EXIT_COMPLETED, "completed"
        return RunReport(
            run_id=run_id,
            status=status,
            exit_code=exit_code,
            counts=counts,
            objects=outcomes,
            started_at=started,
            finished_at=time.time(),
            error=str(error) if error else None,
            dry_run=True,
        )
