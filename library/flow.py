"""Scoring and writing in source order: the pool, the bounded queue, the writer thread.

    feeder (caller's thread)  submits each unit to the scoring pool, then queues it
    scoring pool              API_MAX_WORKERS threads, each scoring one unit at a time
    writer thread             takes units in queue order, waits for each one's scores
                              and hands it to the sink

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
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import polars as pl

from library import logs
from library.config import Settings, ThresholdSettings
from library.errors import DatabaseError, PipelineError, ThresholdExceededError
from library.faults import failpoint
from library.metrics import RunMetrics
from library.models import Counts, ScoreResult, SourceObject, WorkUnit
from library.progress import StageTimes
from library.score.client import ScoringClient
from library.score.codec import make_codec
from library.sink import Sink

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


def check_ratios(counts: Counts, thresholds: ThresholdSettings, final: bool) -> None:
    """Raise ThresholdExceededError when a ratio of the contract is crossed."""
    if counts.read == 0 or (not final and counts.read < MIN_ROWS_FOR_RATIO):
        return
    invalid_ratio = counts.invalid / counts.read
    if invalid_ratio > thresholds.max_invalid_ratio:
        raise ThresholdExceededError(
            f"MAX_INVALID_RATIO crossed: {counts.invalid} of {counts.read} rows read are invalid "
            f"({invalid_ratio:.2%} > {thresholds.max_invalid_ratio:.2%})"
        )
    if counts.valid:
        failed_ratio = counts.failed / counts.valid
        if failed_ratio > thresholds.max_failed_ratio:
            raise ThresholdExceededError(
                f"MAX_FAILED_RATIO crossed: {counts.failed} of {counts.valid} valid transactions "
                f"could not be scored ({failed_ratio:.2%} > {thresholds.max_failed_ratio:.2%})"
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
        thresholds: ThresholdSettings,
        flush_interval: float,
        on_abort: Callable[[PipelineError], None],
        queue_size: int,
        ratios: bool,
        times: StageTimes,
    ) -> None:
        super().__init__(name="writer", daemon=True)
        self.sink = sink
        self.thresholds = thresholds
        self.flush_interval = flush_interval
        self.items: queue.Queue[object] = queue.Queue(maxsize=queue_size)
        self.error: PipelineError | None = None
        self._on_abort = on_abort
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
        interval = self.flush_interval
        times = self._times
        logs.set_context(stage="write")
        while True:
            waited = time.perf_counter()
            try:
                item = self.items.get(timeout=interval)
            except queue.Empty:
                times.writer_waited_on_read += time.perf_counter() - waited
                if self.sink.pending_rows:
                    self.sink.flush()  # keep checkpoints fresh while scoring is slow
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
                if self._ratios:
                    check_ratios(self.sink.run.counts, self.thresholds, final=False)
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


class ScoreAndWrite:
    """The scoring pool and the ordered writer of one run. Feed it from one thread."""

    def __init__(
        self,
        settings: Settings,
        database_url: str,
        run_id: str,
        stop: StopSignal,
        ratios: bool = True,
        metrics: RunMetrics | None = None,
        on_claim_lost: Callable[[SourceObject], None] | None = None,
    ) -> None:
        assert settings.scoring.url
        self.settings = settings
        self.stop = stop
        self.client = ScoringClient(
            settings.scoring.url,
            make_codec(settings.scoring),
            timeout=settings.scoring.timeout,
            max_retries=settings.scoring.max_retries,
            backoff=settings.scoring.retry_backoff,
            backoff_max=settings.scoring.retry_backoff_max,
            pool_size=settings.scoring.max_workers,
            token=settings.scoring.token_value,
            adaptive=settings.scoring.concurrency == "adaptive",
            rate_limit=settings.scoring.rate_limit,
            down_timeout=settings.scoring.down_timeout,
        )
        self.times = StageTimes(workers=settings.scoring.max_workers)
        self._times_lock = threading.Lock()
        self.sink = Sink(
            database_url,
            run_id,
            settings.sink.row_batch_size,
            settings.sink.retry_timeout,
            on_flush=metrics.observe_flush if metrics else None,
            on_claim_lost=on_claim_lost,
        )
        if metrics:
            self.client.stats.on_request = metrics.observe_request
            self.client.stats.on_retry = metrics.observe_retry
        stop.on_set(lambda exc: self.client.stop(str(exc)))
        self.writer = Writer(
            self.sink,
            settings.thresholds,
            settings.sink.flush_interval,
            stop.set,
            queue_size=settings.scoring.writer_queue_size,
            ratios=ratios,
            times=self.times,
        )
        self.executor = ThreadPoolExecutor(settings.scoring.max_workers, thread_name_prefix="score")
        self._seq = 0

    def start(self) -> None:
        self.client.check_ready()
        self.writer.start()

    # -- feeding, in source order ----------------------------------------------

    def prepare(self, frame: pl.DataFrame, obj: SourceObject) -> pl.DataFrame:
        """Chunk-wide vectorised work for the later stages, done on the reader thread."""
        return Sink.prepare_rows(self.client.prepare(frame), obj)

    def next_seq(self) -> int:
        return self._seq

    def begin(
        self, obj: SourceObject, checkpoint_line: int, prior: Counts | None, fence: int
    ) -> None:
        self._put(_Begin(obj, checkpoint_line, prior, fence))

    def submit(self, unit: WorkUnit) -> None:
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
                return self.client.score(unit.transactions)
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

    def concurrency(self) -> dict[str, Any]:
        """What the limiter did: the mode, the ceiling, where it settled."""
        stats = self.client.limiter.stats()
        return {
            "mode": self.settings.scoring.concurrency,
            "ceiling": self.settings.scoring.max_workers,
            "settled": self.client.limiter.limit,
            "average": round(stats.average_limit, 2),
            "peak": int(stats.peak_limit),
            "decreases": stats.decreases,
            "paused_seconds": round(stats.paused_seconds, 3),
        }

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
