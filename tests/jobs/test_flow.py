"""ScoreAndWrite in process, with a fake scoring client and a fake sink.

The flow receives its collaborators, so its rules are tested here directly:
units are written in source order whatever order they are scored in, a stop
keeps everything fully scored before the first unit that was not and nothing
after it, the queue bounds what is read ahead, and the ratios stop the run.
The end-to-end tests (real model, real PostgreSQL) cover the real parts.
"""

from __future__ import annotations

import random
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import polars as pl
import pytest

from library.errors import ApiUnavailableError, DatabaseError, ThresholdExceededError
from library.jobs.flow import Ratios, ScoreAndWrite, Stopping, StopSignal
from library.models import LINE_COLUMN, Counts, InvalidRow, Reason, SourceObject, ValidatedChunk
from tests.helpers.fakes import FakeClient, FakeSink

OBJ = SourceObject("s3://bucket/a.csv", "v1")


def make_flow(
    client: FakeClient,
    sink: FakeSink,
    *,
    stop: StopSignal | None = None,
    queue_size: int = 8,
    ratios: Ratios | None = None,
    batch: int = 10,
) -> ScoreAndWrite:
    return ScoreAndWrite(
        client,  # type: ignore[arg-type]
        sink,  # type: ignore[arg-type]
        ThreadPoolExecutor(4),
        stop or StopSignal(),
        api_batch_size=batch,
        flush_interval=0.05,
        queue_size=queue_size,
        ratios=ratios,
        workers=4,
    )


def chunk(
    first: int, n: int, index: int = 0, invalid_lines: tuple[int, ...] = ()
) -> ValidatedChunk:
    """`n` valid rows with ids tx-first.. on lines first+2.., and invalid rows."""
    ids = [f"tx-{i}" for i in range(first, first + n)]
    lines = [i + 2 for i in range(first, first + n)]
    invalid = [
        InvalidRow(line, "bad", (Reason("amount", "not a number"),)) for line in invalid_lines
    ]
    last = max(lines + list(invalid_lines))
    frame = pl.DataFrame({"transaction_id": ids, LINE_COLUMN: lines})
    return ValidatedChunk(OBJ, index, frame, invalid, last)


def test_units_are_written_in_source_order_whatever_order_they_are_scored_in() -> None:
    rng = random.Random(7)
    client = FakeClient(delay=lambda ids: rng.random() * 0.01)
    sink = FakeSink()
    flow = make_flow(client, sink)
    flow.start()
    flow.begin(OBJ, 1, None, 1)
    for c in range(5):
        flow.feed(chunk(c * 40, 40, index=c))
    flow.end(OBJ, None, lambda: None)
    flow.finish()
    assert sink.written == list(range(20))  # 5 chunks of 40 rows, batches of 10
    assert sink.events == [("begin", OBJ.uri), ("end", OBJ.uri)]
    assert flow.counts == Counts(read=200, valid=200, invalid=0, scored=200, failed=0)
    stats = flow.stats()
    assert stats.counts.scored == 200 and stats.model_version == "m1"
    assert stats.stage_times is not None and stats.stage_times.validate > 0
    assert sink.closed


def test_a_failed_unit_stops_the_run_keeping_every_unit_before_it_and_none_after() -> None:
    # tx-55 is in the sixth unit (seq 5); later units score faster than it fails.
    client = FakeClient(
        delay=lambda ids: 0.05 if "tx-55" in ids else 0.0,
        fail_on="tx-55",
        fail_with=ApiUnavailableError("the ML API is down"),
    )
    sink = FakeSink()
    stop = StopSignal()
    flow = make_flow(client, sink, stop=stop)
    flow.start()
    flow.begin(OBJ, 1, None, 1)
    with pytest.raises(Stopping):
        for c in range(50):
            flow.feed(chunk(c * 20, 20, index=c))
            time.sleep(0.005)
    with pytest.raises(ApiUnavailableError, match="down"):
        flow.finish()
    assert sink.written == [0, 1, 2, 3, 4]
    assert not sink.pending
    assert isinstance(stop.error, ApiUnavailableError)
    assert client.stopped == "the ML API is down"  # no retry goes on after the stop


def test_a_database_error_in_the_writer_stops_the_feeder_and_is_raised() -> None:
    sink = FakeSink(fail_on_add=3)
    flow = make_flow(FakeClient(), sink)
    flow.start()
    flow.begin(OBJ, 1, None, 1)
    with pytest.raises(Stopping):
        for c in range(100):
            flow.feed(chunk(c * 10, 10, index=c))
            time.sleep(0.002)
    with pytest.raises(DatabaseError, match="the test says so"):
        flow.finish()
    assert sink.written == []  # a failing database is not flushed again after the error


def test_a_flush_that_failed_in_flight_stops_the_run_while_the_writer_waits_for_rows() -> None:
    # The sink writes flushes on its own thread; the writer, idle on an empty queue
    # (slow scoring, or nothing left to read), settles them within DB_FLUSH_INTERVAL
    # rather than at the next flush, which may never come.
    sink = FakeSink()
    stop = StopSignal()
    flow = make_flow(FakeClient(), sink, stop=stop)
    flow.start()
    flow.begin(OBJ, 1, None, 1)
    sink.flushes_in_flight, sink.fail_in_flight = 1, True
    deadline = time.monotonic() + 5
    while not stop.is_set():
        assert time.monotonic() < deadline, "the failed flush was never settled"
        time.sleep(0.01)
    assert isinstance(stop.error, DatabaseError)
    with pytest.raises(DatabaseError, match="sent earlier"):
        flow.finish()


def test_the_queue_bounds_what_is_read_ahead_of_the_writer() -> None:
    gate = threading.Event()
    client = FakeClient(delay=lambda ids: 0.0 if gate.is_set() else 0.02)
    sink = FakeSink()
    flow = make_flow(client, sink, queue_size=3, batch=10)
    flow.start()
    flow.begin(OBJ, 1, None, 1)
    ahead = 0
    for c in range(30):
        flow.feed(chunk(c * 10, 10, index=c))
        ahead = max(ahead, (c + 1) - len(sink.written) - len(sink.pending))
    gate.set()
    flow.end(OBJ, None, lambda: None)
    flow.finish()
    assert sink.written == list(range(30))
    # queued (3) + the one the writer waits on + one being put: never the whole input
    assert ahead <= 5


def test_an_invalid_ratio_crossed_stops_the_run_with_the_threshold_error() -> None:
    sink = FakeSink()
    stop = StopSignal()
    flow = make_flow(
        FakeClient(), sink, stop=stop, ratios=Ratios(max_invalid=0.05, max_failed=0.01)
    )
    flow.start()
    flow.begin(OBJ, 1, None, 1)
    # 1,200 rows, every tenth line invalid: 10% > 5% once past 1,000 rows read
    with pytest.raises(Stopping):
        for c in range(30):
            base = c * 40
            bad = tuple(range(base + 3, base + 43, 10))
            valid = chunk(base, 40, index=c)
            flow.feed(
                ValidatedChunk(
                    OBJ,
                    c,
                    valid.valid.filter(~pl.col(LINE_COLUMN).is_in(bad)),
                    [InvalidRow(line, "x", (Reason("amount", "bad"),)) for line in bad],
                    valid.last_line,
                )
            )
            time.sleep(0.002)
    with pytest.raises(ThresholdExceededError, match="MAX_INVALID_RATIO crossed"):
        flow.finish()
    assert flow.counts.read >= 1000
    assert sink.written  # what was complete before the stop is kept


def test_ratios_are_checked_only_past_a_thousand_rows_until_the_end() -> None:
    ratios = Ratios(max_invalid=0.05, max_failed=0.01)
    ratios.check(Counts(read=999, invalid=999), final=False)  # too few rows to judge
    with pytest.raises(ThresholdExceededError, match="MAX_INVALID_RATIO"):
        ratios.check(Counts(read=999, invalid=999), final=True)
    with pytest.raises(ThresholdExceededError, match="MAX_FAILED_RATIO"):
        ratios.check(Counts(read=2000, valid=2000, scored=1900, failed=100), final=False)
