"""The orchestrator of `run`: wires source -> validate -> score -> sink, in that one direction.

For each object of SOURCE_URI, in key order: claim it in the ledger (skip it if
it is completed at this version or another run holds it; resume it from its
checkpoint if a run died on it), read it through `ObjectReader` (parsed and
validated chunks) and feed the chunks to `ScoreAndWrite`, which scores them in
parallel and writes them in order. `JobSession` records the run and its end;
the run's outcome decides the exit code (`run_report.decide`).
"""

from __future__ import annotations

import functools
import logging
import socket
import time
from contextlib import closing
from pathlib import Path

from library.config import Settings, WorkerSettings
from library.errors import (
    ConfigError,
    PipelineError,
    SourceError,
)
from library.jobs.dry_run import DryRun
from library.jobs.flow import FlowFactory, Ratios, ScoreAndWrite, Stopping, StopSignal
from library.jobs.options import RunOptions
from library.jobs.reading import ObjectReader, check_found, read_outcome
from library.jobs.run_report import ObjectOutcome, RunReport, RunStats
from library.jobs.session import JobSession, job_session
from library.models import SourceObject
from library.observability import logs
from library.observability.metrics import RunMetrics
from library.observability.progress import LiveState, Reporter
from library.score.ready import wait_until_ready
from library.stages import source
from library.state.group import GroupStopped, RunGroup
from library.state.ledger import Claim, Ledger

log = logging.getLogger(__name__)

__all__ = ["RunOptions", "RunReport", "StopSignal", "run_pipeline"]


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


def run_pipeline(
    settings: Settings,
    options: RunOptions,
    stop: StopSignal | None = None,
    make_flow: FlowFactory = ScoreAndWrite.from_settings,
) -> RunReport:
    """Run the job once. Raises only for errors before any work (configuration, schema)."""
    require_run_settings(settings, options)
    stop = stop or StopSignal()
    if options.dry_run:
        return DryRun(settings, options, stop).execute()
    return Run(settings, options, stop, make_flow).execute()


class ClaimLost(Exception):
    """Raised to the reader of an object that another run has claimed since."""


class Run:
    def __init__(
        self,
        settings: Settings,
        options: RunOptions,
        stop: StopSignal,
        make_flow: FlowFactory = ScoreAndWrite.from_settings,
    ) -> None:
        self.settings = settings
        self.options = options
        self.stop = stop
        self.make_flow = make_flow
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
        self.metrics.publish_final(
            report.status,
            report.counts,
            report.objects_found,
            [o.status for o in report.objects],
            self.group_outcome,
        )
        return report

    def _execute(self) -> RunReport:
        settings = self.settings
        with job_session(
            settings,
            self.started,
            settings.source.uri,
            migrate=self.options.migrate,
            run_group=settings.worker.run_group,
            worker_index=settings.worker.index,
        ) as session:
            group = RunGroup(session.ledger, settings.worker.run_group, settings.worker.index)
            self.metrics.set_run(session.run_id)
            log.info("Starting batch pipeline")
            log.info("Pipeline Run ID: %s", session.run_id)
            if settings.worker.run_group is not None:
                log.info(
                    "Run group %s, worker %d",
                    settings.worker.run_group,
                    settings.worker.index or 0,
                )
            error: PipelineError | None = None
            try:
                self._process(session, group)
            except PipelineError as exc:
                error = exc
            except Exception as exc:  # a bug: record the run as failed all the same
                log.exception("internal error")
                error = PipelineError(f"internal error: {type(exc).__name__}: {exc}")
            if error is not None and not isinstance(error, GroupStopped):
                try:
                    group.stop(session.run_id, error)
                except PipelineError as exc:
                    log.error("could not stop the run group: %s", exc)
            report = session.finish(
                self._stats(),
                self.outcomes,
                error,
                objects_found=self.objects_found,
                progress=self.reporter.samples.as_dict() if self.reporter else None,
            )
            try:
                self.group_outcome = group.close_if_done(session.run_id)
            except PipelineError as exc:
                log.error("could not check whether the run group is finished: %s", exc)
            return report
        raise AssertionError("unreachable")

    def _stats(self) -> RunStats:
        if self.flow is None:
            return RunStats()
        stats = self.flow.stats()
        if stats.stage_times is not None:
            stats.stage_times.wall = time.time() - self.started
        return stats

    def _process(self, session: JobSession, group: RunGroup) -> None:
        settings, ledger, run_id = self.settings, session.ledger, session.run_id
        source_uri = settings.source.uri
        assert source_uri
        s3 = source.s3_client_for(settings.source)
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
        flow = self.make_flow(
            settings,
            session.url,
            run_id,
            self.stop,
            metrics=self.metrics,
            on_claim_lost=ledger.mark_lost,
        )
        self.flow = flow
        reader = ObjectReader.from_settings(settings.source, s3, self.live)
        reader.times = flow.times

        def publish_tick() -> None:
            self.metrics.set_counts(flow.counts)
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
            lambda: flow.counts,
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
            for obj, claim in group.claims(
                objects, run_id, self.options.reprocess, self.stop.event
            ):
                if self.stop.is_set():
                    break
                self._object(obj, claim, ledger, reader, flow)
        except Stopping:
            pass
        finally:
            logs.set_context()  # what follows is about the run, not the last object read
            try:
                flow.finish()
            finally:
                reporter.stop()
        Ratios.of(settings.thresholds).check(flow.counts, final=True)

    def _object(
        self,
        obj: SourceObject,
        claim: Claim,
        ledger: Ledger,
        reader: ObjectReader,
        flow: ScoreAndWrite,
    ) -> None:
        """One claimed object: skipped, or read from its checkpoint into the flow."""
        logs.set_context(obj.uri, None, "read")
        if claim.status == "completed":
            log.info("Skipping %s: already completed at version %s", obj.uri, obj.version)
            self.outcomes.append(ObjectOutcome(obj.uri, "skipped"))
            self.live.skip_object(obj.size)
            flow.skip()
            return
        if claim.status == "locked":
            log.warning(
                "Skipping %s: another run (%s) is processing it",
                obj.uri,
                claim.held_by or "unknown",
            )
            self.outcomes.append(ObjectOutcome(obj.uri, "locked"))
            self.live.skip_object(obj.size)
            return
        if claim.status == "resume":
            log.info("Resuming %s after line %d", obj.uri, claim.checkpoint_line)
        outcome = ObjectOutcome(obj.uri, "completed")
        self.outcomes.append(outcome)
        flow.begin(obj, claim.checkpoint_line, claim.prior, claim.fence)
        try:
            with closing(reader.chunks(obj, claim.checkpoint_line)) as chunks:
                for chunk in chunks:
                    if ledger.is_lost(obj):
                        raise ClaimLost
                    flow.feed(chunk)
        except ClaimLost:
            outcome.status = "lost"
            log.warning("Stopped reading %s: another run has claimed it since", obj.uri)
        except SourceError as exc:
            outcome.status, outcome.error = read_outcome(exc)
            log.error(
                "%s %s", "Refused" if outcome.status == "refused" else "Cannot read", outcome.error
            )
        self.live.finish_object(obj.size)
        flow.end(
            obj,
            outcome.error,
            functools.partial(ledger.release, obj),
            lost=outcome.status == "lost",
        )
