"""Scoring and writing in source order: the pool, the bounded queue, the writer thread.

    feeder (caller's thread)  prepares each validated chunk, cuts it into units, submits
                              each unit to the scoring pool, then queues it
    scoring pool              API_MAX_WORKERS threads, each scoring one unit at a time
    writer thread             takes units in queue order, waits for each one's scores
                              and hands it to the sink
    the sink's flush thread   writes each flush the sink sends it, in order, while the
                              writer gathers the next (stages/sink.py)

The queue bounds the units read but not yet written, so memory stays flat
however large the input. Writing in source order is what makes the latest row
win and every checkpoint exact. Whatever stops the run (an interrupt, the API
down, a threshold crossed, a database error) stops the feeder first, then lets
the writer flush every unit fully scored before the first one that was not:
nothing is half-written, and the next run resumes where this one ended.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Executor, Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from library.config import ScoringSettings, Settings, ThresholdSettings
from library.errors import DatabaseError, PipelineError, ThresholdExceededError
from library.faults import failpoint
from library.jobs.run_report import RunStats
from library.models import (
    Counts,
    PreparedChunk,
    ScoreResult,
    SourceObject,
    ValidatedChunk,
    WorkUnit,
)
from library.observability import logs
from library.observability.metrics import RunMetrics
from library.observability.progress import StageTimes
from library.score.client import ScoringClient
from library.score.codec import make_codec
from library.stages.batching import plan_units
from library.stages.sink import Sink

log = logging.getLogger(__name__)

MIN_ROWS_FOR_RATIO = 1000  # a ratio over fewer rows says little; the end-of-run check still applies


class StopSignal:
    """Set by a signal handler or an aborting stage; the feeder checks it between units.

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


class Stopping(Exception):
    """Raised to the feeder when the run is stopping: stop reading."""


@dataclass(frozen=True)
class Ratios:
    """The contract's two ratios (MAX_INVALID_RATIO, MAX_FAILED_RATIO) and their check."""

    max_invalid: float
    max_failed: float

    @classmethod
    def of(cls, settings: ThresholdSettings) -> Ratios:
        return cls(settings.max_invalid_ratio, settings.max_failed_ratio)

    def check(self, counts: Counts, final: bool) -> None:
        """Raise ThresholdExceededError when a ratio is crossed."""
        if counts.read == 0 or (not final and counts.read < MIN_ROWS_FOR_RATIO):
            return
        invalid_ratio = counts.invalid / counts.read
        if invalid_ratio > self.max_invalid:
            raise ThresholdExceededError(
                f"MAX_INVALID_RATIO crossed: {counts.invalid} of {counts.read} rows read are "
                f"invalid ({invalid_ratio:.2%} > {self.max_invalid:.2%})"
            )
        if counts.valid:
            failed_ratio = counts.failed / counts.valid
            if failed_ratio > self.max_failed:
                raise ThresholdExceededError(
                    f"MAX_FAILED_RATIO crossed: {counts.failed} of {counts.valid} valid "
                    f"transactions could not be scored ({failed_ratio:.2%} > {self.max_failed:.2%})"
                )


@dataclass
class _Begin:
    obj: SourceObject
    checkpoint_line: int
    prior: Counts | None
    fence: int


@dataclass
class _Unit:
    unit: WorkUnit
    future: Future[ScoreResult]


@dataclass
class _End:
    obj: SourceObject
    error: str | None
    release: Callable[[], None]
    lost: bool = False  # another run claimed the object since: its status is theirs


@dataclass
class _Skip:
    pass


_STOP = object()


class Writer(threading.Thread):
    """Consumes the queue in order and writes through the sink."""

    def __init__(
        self,
        sink: Sink,
        on_abort: Callable[[PipelineError], None],
        *,
        queue_size: int,
        flush_interval: float,
        ratios: Ratios | None,
        times: StageTimes,
    ) -> None:
        super().__init__(name="writer", daemon=True)
        self.sink = sink
        self.items: queue.Queue[object] = queue.Queue(maxsize=queue_size)
        self.error: PipelineError | None = None
        self._on_abort = on_abort
        self._flush_interval = flush_interval
        self._ratios = ratios
        self._times = times
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
        interval = self._flush_interval
        times = self._times
        logs.set_context(stage="write")
        while True:
            waited = time.perf_counter()
            try:
                item = self.items.get(timeout=interval)
            except queue.Empty:
                times.writer_waited_on_read += time.perf_counter() - waited
                if self.sink.pending_rows or self.sink.flushes_in_flight:
                    # Keep checkpoints fresh while scoring is slow, and learn of a
                    # failed write without waiting for the next flush.
                    self.sink.flush()
                continue
            times.writer_waited_on_read += time.perf_counter() - waited
            if item is _STOP:
                self.sink.flush()
                return
            if isinstance(item, _Begin):
                self.sink.begin_object(item.obj, item.checkpoint_line, item.prior, item.fence)
            elif isinstance(item, _Unit):
                logs.set_context(item.unit.obj.uri, item.unit.seq, "write")
                waited = time.perf_counter()
                try:
                    result = item.future.result()
                except PipelineError:
                    self.sink.flush()  # everything before this unit is complete: keep it
                    raise
                finally:
                    times.writer_waited_on_score += time.perf_counter() - waited
                self.sink.add(item.unit, result)
                self._log_chunk(item.unit, result)
                if self._ratios is not None:
                    self._ratios.check(self.sink.run.counts, final=False)
            elif isinstance(item, _End):
                if item.lost:
                    self.sink.forget_object(item.obj)
                else:
                    self.sink.end_object(item.obj, item.error)
                item.release()
                failpoint("after_object")
            elif isinstance(item, _Skip):
                self.sink.skip_object()

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


def prepare_units(
    chunk: ValidatedChunk,
    client: ScoringClient,
    sink: Sink | type[Sink],
    api_batch_size: int,
    first_seq: int,
    chunk_number: int,
) -> list[WorkUnit]:
    """A validated chunk prepared for the later stages and cut into work units.

    The chunk-wide vectorised work (the codec's request rows, the sink's COPY lines)
    is done here, once per chunk rather than once per batch; each unit carries its
    slice of both (WorkUnit.requests, WorkUnit.copy_lines)."""
    valid = chunk.valid
    prepared = PreparedChunk(chunk, client.prepare(valid), sink.prepare_copy_lines(valid))
    return list(plan_units(prepared, api_batch_size, first_seq, chunk_number))


def make_client(settings: ScoringSettings) -> ScoringClient:
    """The scoring client of the settings (ML_API_*, API_*)."""
    assert settings.url
    return ScoringClient(
        settings.url,
        make_codec(settings),
        timeout=settings.timeout,
        max_retries=settings.max_retries,
        backoff=settings.retry_backoff,
        backoff_max=settings.retry_backoff_max,
        pool_size=settings.max_workers,
        token=settings.token_value,
        adaptive=settings.concurrency == "adaptive",
        rate_limit=settings.rate_limit,
        down_timeout=settings.down_timeout,
    )


class ScoreAndWrite:
    """The scoring pool and the ordered writer of one run. Feed it from one thread.

    It receives its collaborators (the scoring client, the sink, the executor that
    scores): `from_settings` builds the real ones; tests pass their own.
    """

    def __init__(
        self,
        client: ScoringClient,
        sink: Sink,
        executor: Executor,
        stop: StopSignal,
        *,
        api_batch_size: int,
        flush_interval: float,
        queue_size: int,
        ratios: Ratios | None,
        workers: int,
    ) -> None:
        self.client = client
        self.sink = sink
        self.executor = executor
        self.stop = stop
        self.api_batch_size = api_batch_size
        self.times = StageTimes(workers=workers)
        self._times_lock = threading.Lock()
        stop.on_set(lambda exc: self.client.stop(str(exc)))
        self.writer = Writer(
            sink,
            stop.set,
            queue_size=queue_size,
            flush_interval=flush_interval,
            ratios=ratios,
            times=self.times,
        )
        self._seq = 0
        self._chunk_number = 0

    @classmethod
    def from_settings(
        cls,
        settings: Settings,
        database_url: str,
        run_id: str,
        stop: StopSignal,
        *,
        ratios: bool = True,
        metrics: RunMetrics | None = None,
        on_claim_lost: Callable[[SourceObject], None] | None = None,
    ) -> ScoreAndWrite:
        client = make_client(settings.scoring)
        sink = Sink(
            database_url,
            run_id,
            settings.sink.row_batch_size,
            settings.sink.retry_timeout,
            on_flush=metrics.observe_flush if metrics else None,
            on_claim_lost=on_claim_lost,
        )
        if metrics:
            client.stats.on_request = metrics.observe_request
            client.stats.on_retry = metrics.observe_retry
        workers = settings.scoring.max_workers
        return cls(
            client,
            sink,
            ThreadPoolExecutor(workers, thread_name_prefix="score"),
            stop,
            api_batch_size=settings.scoring.batch_size,
            flush_interval=settings.sink.flush_interval,
            queue_size=settings.scoring.writer_queue_size,
            ratios=Ratios.of(settings.thresholds) if ratios else None,
            workers=workers,
        )

    def start(self) -> None:
        self.client.check_ready()
        self.writer.start()

    # -- feeding, in source order ----------------------------------------------

    def begin(
        self, obj: SourceObject, checkpoint_line: int, prior: Counts | None, fence: int
    ) -> None:
        self._put(_Begin(obj, checkpoint_line, prior, fence))

    def feed(self, chunk: ValidatedChunk) -> None:
        """Prepare a validated chunk, cut it into units and submit them (on the reader's
        thread: see prepare_units)."""
        began = time.perf_counter()
        units = prepare_units(
            chunk, self.client, self.sink, self.api_batch_size, self._seq, self._chunk_number
        )
        self._chunk_number += 1
        self.times.validate += time.perf_counter() - began
        for unit in units:
            self._submit(unit)

    def _submit(self, unit: WorkUnit) -> None:
        self._seq = unit.seq + 1
        if unit.transactions.height == 0:
            future: Future[ScoreResult] = Future()
            future.set_result(ScoreResult())
        else:
            future = self.executor.submit(self._score, unit)
        self._put(_Unit(unit, future))

    def _score(self, unit: WorkUnit) -> ScoreResult:
        """Runs on a scoring worker: the unit's log context, and its busy time."""
        began = time.perf_counter()
        with logs.context(unit.obj.uri, unit.seq, "score"):
            try:
                return self.client.score(unit.transactions, unit.requests)
            finally:
                with self._times_lock:
                    self.times.score += time.perf_counter() - began

    def end(
        self,
        obj: SourceObject,
        error: str | None,
        release: Callable[[], None],
        lost: bool = False,
    ) -> None:
        self._put(_End(obj, error, release, lost))

    def skip(self) -> None:
        self._put(_Skip())

    def _put(self, item: object, force: bool = False) -> None:
        began = time.perf_counter()
        try:
            while self.writer.is_alive():
                if self.stop.is_set() and not force:
                    raise Stopping
                try:
                    self.writer.items.put(item, timeout=0.2)
                    return
                except queue.Full:
                    continue
        finally:
            self.times.reader_waited += time.perf_counter() - began
        if not force:
            raise Stopping

    # -- what it did -----------------------------------------------------------

    @property
    def counts(self) -> Counts:
        """Rows written so far, by outcome."""
        return self.sink.run.counts

    def concurrency(self) -> dict[str, Any]:
        """What the limiter did: the mode, the ceiling, where it settled."""
        limiter = self.client.limiter
        stats = limiter.stats()
        return {
            "mode": "adaptive" if limiter.adaptive else "fixed",
            "ceiling": limiter.ceiling,
            "settled": limiter.limit,
            "average": round(stats.average_limit, 2),
            "peak": int(stats.peak_limit),
            "decreases": stats.decreases,
            "paused_seconds": round(stats.paused_seconds, 3),
        }

    def stats(self) -> RunStats:
        """A snapshot of the figures of the run's report."""
        run = self.sink.run
        return RunStats(
            counts=run.counts,
            model_version=run.model_version,
            api_requests=self.client.stats.requests,
            api_retries=self.client.stats.retries,
            flushes=run.flushes,
            flush_seconds=run.flush_seconds,
            concurrency=self.concurrency(),
            stage_times=self.times,
        )

    # -- the end ---------------------------------------------------------------

    def finish(self) -> None:
        """Flush and stop; raise what stopped the run, the root cause first."""
        try:
            if self.writer.is_alive():
                self._put(_STOP, force=True)
                self.writer.join()
        finally:
            self.executor.shutdown(wait=True, cancel_futures=True)
            self.client.close()
            self.sink.close()
            self.times.write = self.sink.run.busy_seconds
        if self.stop.error is not None:
            raise self.stop.error
        if self.writer.error is not None:
            raise self.writer.error


# Builds a job's ScoreAndWrite from (settings, database URL, run id, stop signal, and
# the keywords of `ScoreAndWrite.from_settings`); tests pass one that builds fakes.
FlowFactory = Callable[..., ScoreAndWrite]
