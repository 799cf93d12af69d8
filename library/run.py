"""The orchestrator of `run`: wires source -> validate -> score -> sink, in that one direction.

For each object of SOURCE_URI, in key order: claim it in the ledger (skip it if
it is completed at this version or another run holds it; resume it from its
checkpoint if a run died on it), stream and parse it, validate each chunk, cut
it into units and feed them to `ScoreAndWrite`, which scores them in parallel
and writes them in order. The run's outcome decides the exit code.
"""

from __future__ import annotations

import functools
import logging
import socket
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from library import db, logs, source
from library.batching import plan_units
from library.config import (
    Settings,
    SinkSettings,
    SourceSettings,
    WorkerSettings,
    redact_url,
    url_secrets,
)
from library.errors import (
    EXIT_COMPLETED,
    EXIT_COMPLETED_WITH_ERRORS,
    EXIT_FAILED,
    ConfigError,
    MissingColumnsError,
    PipelineError,
    SourceError,
    ThresholdExceededError,
)
from library.flow import ScoreAndWrite, Stopping, StopSignal, check_ratios
from library.group import GroupStopped, RunGroup
from library.ledger import Ledger, RunStatus
from library.metrics import RunMetrics
from library.models import Counts, SourceObject
from library.plan import InvalidReasons, PlannedObject, ledger_state, plan_objects
from library.progress import LiveState, Reporter, StageTimes
from library.score.ready import wait_until_ready
from library.validate import validate_chunk

log = logging.getLogger(__name__)

__all__ = ["RunOptions", "RunReport", "StopSignal", "database", "run_pipeline"]


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
    flush_seconds: float = 0.0
    concurrency: dict[str, Any] | None = None
    stage_times: StageTimes | None = None
    objects_found: int | None = None  # by the listing of SOURCE_URI; None: not listed
    progress: dict[str, Any] | None = None  # ProgressSamples.as_dict(): the run over time
    plan: list[PlannedObject] | None = None  # dry runs: what a real run would do
    plan_note: str | None = None  # dry runs: why the ledger could not be checked
    invalid_reasons: InvalidReasons | None = None  # dry runs

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
            "flush_seconds": round(self.flush_seconds, 3),
            "concurrency": self.concurrency,
            "stage_times": self.stage_times.as_dict() if self.stage_times else None,
            "objects_found": self.objects_found,
            "progress": self.progress,
            "error": self.error,
            **(self._plan() if self.dry_run else {}),
        }

    def _plan(self) -> dict[str, Any]:
        return {
            "plan": [p.as_dict() for p in self.plan or []],
            "plan_note": self.plan_note,
            "invalid_reasons": self.invalid_reasons.as_list() if self.invalid_reasons else [],
        }


def decide(
    error: PipelineError | None,
    counts: Counts,
    objects: list[ObjectOutcome],
    with_errors_exit: int = EXIT_COMPLETED_WITH_ERRORS,
) -> tuple[RunStatus, int, str | None]:
    """The run's status, exit code (contract, section 5) and message.

    `with_errors_exit` (COMPLETED_WITH_ERRORS_EXIT_CODE) changes only the exit code of
    completed_with_errors: the status, and so the ledger, the metrics and the alerts, stay.
    """
    if error is not None:
        status: RunStatus = "interrupted" if error.exit_code in (130, 143) else "failed"
        return status, error.exit_code, str(error)
    unreadable = [o for o in objects if o.status == "failed"]
    if unreadable:
        detail = "; ".join(str(o.error) for o in unreadable[:5])
        return "failed", EXIT_FAILED, f"{len(unreadable)} object(s) could not be read: {detail}"
    if counts.invalid or counts.failed or any(o.status == "refused" for o in objects):
        return "completed_with_errors", with_errors_exit, None
    return "completed", EXIT_COMPLETED, None


@contextmanager
def database(settings: SinkSettings) -> Iterator[tuple[str, str]]:
    """The database URL to use (given, or the embedded server) and how to show it."""
    url = settings.database_url
    if url:
        yield url, redact_url(url)
        return
    with db.embedded_postgres(settings.embedded_dir) as embedded:
        folder = settings.embedded_dir.expanduser().resolve()
        log.info(
            "DATABASE_URL is unset: using the embedded PostgreSQL in %s (%s)", folder, embedded
        )
        # Its folder, not only its URL: the socket may live elsewhere when the path is long.
        yield embedded, f"{embedded} (embedded, in {folder})"


@contextmanager
def ledger_session(
    settings: Settings, migrate: bool, purpose: str
) -> Iterator[tuple[Ledger, str, str]]:
    """Database, schema check (the embedded one is migrated), and the run's ledger connection."""
    with ExitStack() as stack:
        url, shown = stack.enter_context(database(settings.sink))
        logs.add_secrets(settings.secret_values() + url_secrets(url))
        conn = db.connect(url, f"batch-pipeline {purpose}")
        ledger = Ledger(url, settings.sink.retry_timeout, conn=conn)
        stack.callback(ledger.close)
        with db.classified("checking the schema"):
            if migrate or settings.database_url is None:
                applied = db.migrate(conn)
                if applied:
                    log.info("applied migration(s): %s", ", ".join(m.script for m in applied))
            db.require_schema(conn)
        yield ledger, url, shown


def s3_client_for(settings: SourceSettings) -> Any | None:
    if settings.uri and source.is_s3(settings.uri):
        return source.make_s3_client(settings.key, settings.secret_value, settings.endpoint_url)
    return None


def worker_label(settings: WorkerSettings) -> str | None:
    """A worker's label in the metrics: its index, or (docker compose --scale, which sets
    none) its host name; none for a group of one."""
    if settings.run_group is None:
        return None
    if settings.index is not None:
        return str(settings.index)
    return socket.gethostname()


def require_run_settings(settings: Settings, options: RunOptions) -> None:
    if not settings.source.uri:
        raise ConfigError("SOURCE_URI is required: set it or pass --source s3://bucket/prefix/")
    if not options.dry_run and not settings.scoring.url:
        raise ConfigError("ML_API_URL is required: set it or pass --ml-api-url http://host:port")
    if not source.is_s3(settings.source.uri) and not Path(settings.source.uri).exists():
        raise ConfigError(f"SOURCE_URI: no such file or folder: {settings.source.uri}")
    if options.limit is not None and options.limit < 1:
        raise ConfigError("--limit must be at least 1")


def check_found(objects: list[SourceObject], settings: SourceSettings) -> None:
    """An empty listing: a nightly job that finds no input usually means a broken
    upstream, so say so, or fail the run if FAIL_ON_EMPTY_SOURCE is set."""
    if objects:
        return
    message = (
        f"no objects found under {settings.uri}: no .csv, .csv.gz or .csv.zst there; "
        "check SOURCE_URI and the upstream export"
    )
    if settings.fail_on_empty:
        raise SourceError(message + " (FAIL_ON_EMPTY_SOURCE is set)", settings.uri)
    log.warning("%s", message)


def run_pipeline(
    settings: Settings, options: RunOptions, stop: StopSignal | None = None
) -> RunReport:
    """Run the job once. Raises only for errors before any work (configuration, schema)."""
    require_run_settings(settings, options)
    stop = stop or StopSignal()
    if options.dry_run:
        return DryRun(settings, options, stop).execute()
    return Run(settings, options, stop).execute()


def read_errors(exc: SourceError) -> tuple[str, str]:
    """(status, message) for an object that could not be read (classified by the source)."""
    if isinstance(exc, MissingColumnsError):
        return "refused", str(exc)
    return "failed", str(exc)


class ClaimLost(Exception):
    """Raised to the reader of an object that another run has claimed since."""


class Run:
    def __init__(self, settings: Settings, options: RunOptions, stop: StopSignal) -> None:
        self.settings = settings
        self.options = options
        self.stop = stop
        self.outcomes: list[ObjectOutcome] = []
        self.started = time.time()
        self.flow: ScoreAndWrite | None = None
        self.reporter: Reporter | None = None
        self.live = LiveState()
        self.metrics = RunMetrics(
            settings.observability.metrics_job,
            settings.observability.pushgateway_url,
            settings.observability.metrics_textfile,
            worker=worker_label(settings.worker),
        )
        self.objects_found: int | None = None
        self.group_outcome: tuple[bool, int] | None = None  # (finished by this worker, code)

    def execute(self) -> RunReport:
        try:
            report = self._execute()
        except PipelineError:
            # Failed before the run could be recorded (database unreachable, ...): say so.
            self.metrics.publish(final_status="failed")
            raise
        self.metrics.set_counts(report.counts)
        if report.objects_found is not None:
            self.metrics.set_objects_found(report.objects_found)
        for outcome in report.objects:
            self.metrics.observe_object(outcome.status)
        succeeded = None
        if self.group_outcome is not None:  # a worker of a run group: the group's success
            finished, code = self.group_outcome
            succeeded = finished and code in (EXIT_COMPLETED, EXIT_COMPLETED_WITH_ERRORS)
        self.metrics.publish(final_status=report.status, succeeded=succeeded)
        return report

    def _execute(self) -> RunReport:
        with ledger_session(self.settings, self.options.migrate, "ledger") as (ledger, url, shown):
            settings = self.settings
            run_id = ledger.start_run(
                datetime.now(),
                settings.source.uri,
                settings.redacted(),
                settings.worker.run_group,
                settings.worker.index,
            )
            ledger.start_heartbeat()
            group = RunGroup(ledger, settings.worker.run_group, settings.worker.index)
            logs.set_run(run_id)
            self.metrics.set_run(run_id)
            log.info("Starting batch pipeline")
            log.info("Pipeline Run ID: %s", run_id)
            error: PipelineError | None = None
            if settings.worker.run_group is not None:
                log.info(
                    "Run group %s, worker %d", settings.worker.run_group, settings.worker.index or 0
                )
            try:
                self._process(ledger, group, url, run_id)
            except PipelineError as exc:
                error = exc
            except Exception as exc:  # a bug: record the run as failed all the same
                log.exception("internal error")
                error = PipelineError(f"internal error: {type(exc).__name__}: {exc}")
            if error is not None and not isinstance(error, GroupStopped):
                try:
                    group.stop(run_id, error)
                except PipelineError as exc:
                    log.error("could not stop the run group: %s", exc)
            report = self._report(run_id, error, shown)
            finish_run(ledger, report)
            try:
                self.group_outcome = group.close_if_done(run_id)
            except PipelineError as exc:
                log.error("could not check whether the run group is finished: %s", exc)
            return report
        raise AssertionError("unreachable")

    def _process(self, ledger: Ledger, group: RunGroup, url: str, run_id: str) -> None:
        settings = self.settings
        source_uri = settings.source.uri
        assert source_uri
        s3 = s3_client_for(settings.source)
        group.raise_if_stopped()  # a retried worker must not let bad input through
        objects = group.listing(
            source_uri, lambda: source.list_objects(source_uri, s3), self.options.limit
        )
        self.objects_found = len(objects)
        ledger.set_objects_total(run_id, len(objects))
        self.live.objects_total = len(objects)
        self.live.bytes_total = sum(o.size or 0 for o in objects)
        log.info("Found %d object(s) under %s", len(objects), settings.source.uri)
        check_found(objects, settings.source)
        flow = ScoreAndWrite(
            settings, url, run_id, self.stop, metrics=self.metrics, on_claim_lost=ledger.mark_lost
        )
        self.flow = flow

        def publish_tick() -> None:
            self.metrics.set_counts(flow.sink.run.counts)
            self.metrics.concurrency.set(flow.client.limiter.limit)

        # JSON logs are for a log pipeline: a live bar on stderr would be lines it cannot parse.
        json_logs = (
            settings.observability.log_format == "json"
            and settings.observability.progress == "auto"
        )
        reporter = Reporter(
            "log" if json_logs else settings.observability.progress,
            settings.observability.progress_interval,
            self.live,
            lambda: flow.sink.run.counts,
            self.metrics,
            on_tick=publish_tick,
            concurrency=lambda: flow.client.limiter.limit,
        )
        self.reporter = reporter
        try:
            wait_until_ready(
                flow.client.check_ready,
                settings.scoring.wait_ready,
                self.stop.event,
                lambda: self.stop.error,
            )
            flow.start()
            reporter.start()
            self._feed(objects, ledger, group, run_id, s3, flow)
        except Stopping:
            pass
        finally:
            logs.set_context()  # what follows is about the run, not the last object read
            try:
                flow.finish()
            finally:
                reporter.stop()
        check_ratios(flow.sink.run.counts, settings.thresholds, final=True)

    def _feed(
        self,
        objects: list[SourceObject],
        ledger: Ledger,
        group: RunGroup,
        run_id: str,
        s3: Any,
        flow: ScoreAndWrite,
    ) -> None:
        chunk_number = 0
        claims = group.claims(objects, run_id, self.options.reprocess, self.stop.event)
        for obj, claim in claims:
            if self.stop.is_set():
                return
            logs.set_context(obj.uri, None, "read")
            if claim.status == "completed":
                log.info("Skipping %s: already completed at version %s", obj.uri, obj.version)
                self.outcomes.append(ObjectOutcome(obj.uri, "skipped"))
                self.live.skip_object(obj.size)
                flow.skip()
                continue
            if claim.status == "locked":
                log.warning(
                    "Skipping %s: another run (%s) is processing it",
                    obj.uri,
                    claim.held_by or "unknown",
                )
                self.outcomes.append(ObjectOutcome(obj.uri, "locked"))
                self.live.skip_object(obj.size)
                continue
            if claim.status == "resume":
                log.info("Resuming %s after line %d", obj.uri, claim.checkpoint_line)
            outcome = ObjectOutcome(obj.uri, "completed")
            self.outcomes.append(outcome)
            flow.begin(obj, claim.checkpoint_line, claim.prior, claim.fence)
            times = flow.times
            try:
                with source.open_text(obj, s3) as (text, counter):
                    self.live.begin_object(counter, obj.size)
                    chunks = source.read_chunks(
                        obj,
                        text,
                        self.settings.source.row_batch_size,
                        claim.checkpoint_line,
                        max_quoted_field_chars=self.settings.source.max_quoted_field_chars,
                    )
                    while True:
                        began = time.perf_counter()
                        chunk = next(chunks, None)
                        parsed = time.perf_counter()
                        times.read += parsed - began
                        if chunk is None:
                            break
                        if ledger.is_lost(obj):
                            raise ClaimLost
                        self.live.rows_read += chunk.rows_read
                        validated = validate_chunk(chunk)
                        validated.valid = flow.prepare(validated.valid, obj)
                        units = list(
                            plan_units(
                                validated,
                                self.settings.scoring.batch_size,
                                flow.next_seq(),
                                chunk_number,
                            )
                        )
                        times.validate += time.perf_counter() - parsed
                        for unit in units:
                            flow.submit(unit)
                        chunk_number += 1
            except Stopping:
                raise
            except ClaimLost:
                outcome.status = "lost"
                log.warning("Stopped reading %s: another run has claimed it since", obj.uri)
            except SourceError as exc:
                outcome.status, outcome.error = read_errors(exc)
                log.error(
                    "%s %s",
                    "Refused" if outcome.status == "refused" else "Cannot read",
                    outcome.error,
                )
            self.live.finish_object(obj.size)
            flow.end(
                obj,
                outcome.error,
                functools.partial(ledger.release, obj),
                lost=outcome.status == "lost",
            )

    def _report(self, run_id: str, error: PipelineError | None, shown: str) -> RunReport:
        flow = self.flow
        counts = flow.sink.run.counts if flow else Counts()
        status, exit_code, message = decide(
            error, counts, self.outcomes, self.settings.thresholds.completed_with_errors_exit_code
        )
        return RunReport(
            run_id=run_id,
            status=status,
            exit_code=exit_code,
            counts=counts,
            objects=self.outcomes,
            started_at=self.started,
            finished_at=time.time(),
            error=message,
            model_version=flow.sink.run.model_version if flow else None,
            database=shown,
            api_requests=flow.client.stats.requests if flow else 0,
            api_retries=flow.client.stats.retries if flow else 0,
            flushes=flow.sink.run.flushes if flow else 0,
            flush_seconds=flow.sink.run.flush_seconds if flow else 0.0,
            concurrency=flow.concurrency() if flow else None,
            stage_times=self._stage_times(),
            objects_found=self.objects_found,
            progress=self.reporter.samples.as_dict() if self.reporter else None,
        )

    def _stage_times(self) -> StageTimes | None:
        if self.flow is None:
            return None
        times = self.flow.times
        times.wall = time.time() - self.started
        return times


def finish_run(ledger: Ledger, report: RunReport) -> None:
    try:
        ledger.finish_run(
            report.run_id, report.status, report.error, report.summary(), report.model_version
        )
    except Exception as exc:  # the report still reaches the user
        log.error("could not record the end of run %s: %s", report.run_id, db.first_line(exc))


class DryRun:
    """A plan: which objects a run would read, skip or resume (from the ledger, read only,
    when a database is there), then read and validate those: no API call, no write."""

    def __init__(self, settings: Settings, options: RunOptions, stop: StopSignal) -> None:
        self.settings = settings
        self.options = options
        self.stop = stop

    def execute(self) -> RunReport:
        started = time.time()
        settings = self.settings
        assert settings.source.uri
        run_id = "dry_run_" + datetime.now().strftime("%Y%m%d_%H%M%S")
        log.info("Starting batch pipeline (dry run: no API calls, no writes)")
        counts = Counts()
        outcomes: list[ObjectOutcome] = []
        plan: list[PlannedObject] = []
        note: str | None = None
        reasons = InvalidReasons()
        error: PipelineError | None = None
        found: int | None = None
        try:
            s3 = s3_client_for(settings.source)
            objects = source.list_objects(settings.source.uri, s3)
            found = len(objects)
            check_found(objects, settings.source)
            if self.options.limit is not None:
                objects = objects[: self.options.limit]
            state, note = ledger_state(settings.sink, objects)
            if note:
                log.warning("Dry run: %s; every object is counted as to be read", note)
            plan = plan_objects(objects, state, self.options.reprocess)
            for obj, planned in zip(objects, plan, strict=True):
                if self.stop.is_set():
                    break
                if planned.action == "skip":
                    outcomes.append(ObjectOutcome(obj.uri, "skipped"))
                    continue
                outcome = ObjectOutcome(obj.uri, "completed")
                outcomes.append(outcome)
                try:
                    with source.open_text(obj, s3) as (text, _counter):
                        for chunk in source.read_chunks(
                            obj,
                            text,
                            settings.source.row_batch_size,
                            planned.resume_after_line,
                            max_quoted_field_chars=settings.source.max_quoted_field_chars,
                        ):
                            validated = validate_chunk(chunk)
                            reasons.add(obj.uri, validated.invalid)
                            c = Counts(
                                read=chunk.rows_read,
                                valid=validated.valid.height,
                                invalid=len(validated.invalid),
                            )
                            outcome.counts.add(c)
                            counts.add(c)
                except SourceError as exc:
                    outcome.status, outcome.error = read_errors(exc)
                    log.error("Cannot read %s", outcome.error)
            if self.stop.error is not None:
                raise self.stop.error
            check_ratios(counts, settings.thresholds, final=True)
        except (PipelineError, ThresholdExceededError) as exc:
            error = exc
        status, exit_code, message = decide(
            error, counts, outcomes, settings.thresholds.completed_with_errors_exit_code
        )
        return RunReport(
            run_id=run_id,
            status=status,
            exit_code=exit_code,
            counts=counts,
            objects=outcomes,
            started_at=started,
            finished_at=time.time(),
            error=message,
            dry_run=True,
            objects_found=found,
            plan=plan,
            plan_note=note,
            invalid_reasons=reasons,
        )
