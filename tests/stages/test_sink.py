"""The sink against a real PostgreSQL: one transaction per flush, latest row wins."""

from __future__ import annotations

import threading
import time
from decimal import Decimal

import polars as pl
import pytest
from hypothesis import given
from hypothesis import strategies as st

from library.errors import DatabaseError
from library.models import (
    Failure,
    InvalidRow,
    Prediction,
    Predictions,
    Reason,
    RowChunk,
    ScoreResult,
    SourceObject,
    WorkUnit,
)
from library.score.codec import NativeCodec
from library.stages.sink import Sink, _score_texts
from library.stages.validate import validate_chunk
from library.state.ledger import Ledger
from tests.conftest import Database
from tests.helpers.data import row
from tests.stages.test_validate import as_frame

OBJ = SourceObject("s3://b/in.csv", "etag-1")
OTHER = SourceObject("s3://b/other.csv", "etag-9")


def valid(records: list[dict[str, str]]) -> pl.DataFrame:
    chunk = RowChunk(OBJ, 0, as_frame(records), [""] * len(records), [], len(records) + 1)
    return validate_chunk(chunk).valid


def unit(
    records: list[dict[str, str]],
    seq: int = 0,
    invalid: list[InvalidRow] | None = None,
    line: int = 10,
    obj: SourceObject = OBJ,
) -> WorkUnit:
    transactions = valid(records)
    return WorkUnit(
        obj,
        seq,
        transactions,
        NativeCodec().prepare(transactions),
        Sink.prepare_copy_lines(transactions),
        invalid or [],
        line,
    )


def scored(*ids: str, version: str = "v1", score: float = 0.25) -> ScoreResult:
    return ScoreResult(
        predictions=Predictions.of(Prediction(i, score, score >= 0.5, version) for i in ids)
    )


def failed(*ids: str, status: int = 422) -> ScoreResult:
    return ScoreResult(failures=[Failure(i, "rejected", status, 1) for i in ids])


@pytest.fixture
def sink(database_url: str) -> Sink:
    from datetime import datetime

    ledger = Ledger(database_url, retry_window=5)
    run_id = ledger.start_run(datetime(2026, 1, 1), "s3://b/", {})
    claim = ledger.claim(run_id, OBJ)
    assert claim.status == "new" and claim.fence == 1
    s = Sink(database_url, run_id, flush_rows=1000, retry_window=5)
    s.begin_object(OBJ, 1, None, claim.fence)
    return s


def test_one_flush_writes_every_table_and_the_checkpoint(sink: Sink, database: Database) -> None:
    bad = InvalidRow(3, "tx-x,raw", (Reason("amount", "must be greater than 0", "-1"),))
    sink.add(unit([row(1), row(2)], invalid=[bad], line=4), scored("tx-000001", "tx-000002"))
    assert database.value("SELECT count(*) FROM transactions") == 0  # buffered, not yet written
    sink.flush()
    assert database.value("SELECT count(*) FROM transactions") == 2
    assert database.value("SELECT count(*) FROM predictions") == 2
    assert database.rows("SELECT line_number, raw_text, reasons FROM invalid_rows") == [
        (3, "tx-x,raw", [{"column": "amount", "message": "must be greater than 0", "value": "-1"}])
    ]
    assert database.rows(
        "SELECT checkpoint_line, rows_read, rows_valid, rows_invalid, rows_scored FROM source_objects"
    ) == [(4, 3, 2, 1, 2)]
    assert database.rows("SELECT rows_read, rows_scored FROM pipeline_runs") == [(3, 2)]


def test_a_repeated_id_in_one_flush_keeps_the_latest_row(sink: Sink, database: Database) -> None:
    sink.add(
        unit([row(1, amount="1.00"), row(1, amount="2.00")], seq=0), scored("tx-000001", score=0.1)
    )
    sink.add(unit([row(1, amount="3.00")], seq=1), scored("tx-000001", score=0.9))
    sink.flush()
    assert database.rows("SELECT amount FROM transactions") == [(Decimal("3.00"),)]
    assert database.rows("SELECT fraud_score, prediction FROM predictions") == [(0.9, True)]


def test_each_row_gets_its_own_answer_in_any_order_and_version(
    sink: Sink, database: Database
) -> None:
    # Answered out of order, from two model versions (bisection merged two answers),
    # beside a failure: each row's outcome is found by its id.
    predictions = Predictions()
    predictions.extend(
        Predictions.answer(["tx-000003", "tx-000001"], [0.75, 0.5], [True, True], "v2")
    )
    predictions.extend(Predictions.answer(["tx-000002"], [1e-05], [False], "v1"))
    sink.add(
        unit([row(1), row(2), row(3), row(4)]),
        ScoreResult(predictions, [Failure("tx-000004", "rejected", 422, 1)]),
    )
    sink.flush()
    assert database.rows(
        "SELECT transaction_id, model_version, fraud_score, prediction FROM predictions ORDER BY 1"
    ) == [
        ("tx-000001", "v2", 0.5, True),
        ("tx-000002", "v1", 1e-05, False),
        ("tx-000003", "v2", 0.75, True),
    ]
    assert database.rows("SELECT transaction_id FROM failed_transactions") == [("tx-000004",)]


def test_scores_are_written_exactly(sink: Sink, database: Database) -> None:
    scores = [0.0, 1.0, 1e-05, 5e-324, 0.1 + 0.2, 1 / 3, 0.9999999999999999, 2.5e-08]
    ids = [f"tx-{i:06d}" for i in range(1, len(scores) + 1)]
    sink.add(
        unit([row(i) for i in range(1, len(scores) + 1)]),
        ScoreResult(Predictions.answer(ids, scores, [s >= 0.5 for s in scores], "v1")),
    )
    sink.flush()
    assert database.rows("SELECT fraud_score FROM predictions ORDER BY transaction_id") == [
        (s,) for s in scores
    ]


@given(st.lists(st.floats(min_value=0.0, max_value=1.0)))
def test_score_texts_read_back_as_the_same_doubles(scores: list[float]) -> None:
    texts = _score_texts(scores)
    assert len(texts) == len(scores)
    assert [float(t) for t in texts] == scores


def test_rows_of_two_objects_in_one_flush_name_their_own_object(
    database_url: str, sink: Sink, database: Database
) -> None:
    ledger = Ledger(database_url, retry_window=5)
    claim = ledger.claim(sink.run_id, OTHER)
    sink.begin_object(OTHER, 1, None, claim.fence)
    sink.add(unit([row(1), row(2)], line=3), scored("tx-000001", "tx-000002"))
    sink.add(unit([row(3)], seq=1, line=2, obj=OTHER), failed("tx-000003"))
    sink.add(unit([row(4)], seq=2, line=4), scored("tx-000004"))
    sink.flush()
    assert database.rows(
        "SELECT transaction_id, source_uri, source_version, source_line FROM transactions"
        " ORDER BY 1"
    ) == [
        ("tx-000001", OBJ.uri, OBJ.version, 2),
        ("tx-000002", OBJ.uri, OBJ.version, 3),
        ("tx-000003", OTHER.uri, OTHER.version, 2),
        ("tx-000004", OBJ.uri, OBJ.version, 2),
    ]
    assert database.rows("SELECT transaction_id, reason FROM failed_transactions") == [
        ("tx-000003", "rejected")
    ]


@pytest.mark.parametrize("probe_stored", [False, True], ids=["lean", "probing"])
def test_flushes_look_rows_up_by_index_from_the_first_one(
    sink: Sink, database: Database, monkeypatch: pytest.MonkeyPatch, probe_stored: bool
) -> None:
    # psycopg prepares the flush statement after a few flushes, and PostgreSQL may then
    # keep a generic plan made while the tables were empty: it must still find rows by
    # index, never read a whole data table (which grows to millions of rows). Both of
    # the flush's statements (FLUSH_STATEMENTS) are held to it.
    monkeypatch.setattr(
        Sink,
        "_probe_stored",
        property(lambda _s: probe_stored, lambda _s, _v: None),
        raising=False,
    )
    flushes, size = 15, 20
    for n in range(flushes):
        records = [row(n * size + i) for i in range(size)]
        sink.add(unit(records, seq=n), scored(*[r["transaction_id"] for r in records]))
        sink.flush()
    sink.close()  # the backend reports its table statistics as it exits
    stats = "SELECT relname, seq_scan FROM pg_stat_user_tables WHERE relname IN ({})"
    tables = "'transactions', 'predictions', 'failed_transactions'"
    deadline = time.monotonic() + 15
    while (
        database.value("SELECT n_tup_ins FROM pg_stat_user_tables WHERE relname = 'predictions'")
        != flushes * size
    ):
        assert time.monotonic() < deadline, "the sink's statistics never arrived"
        time.sleep(0.1)
    assert sorted(database.rows(stats.format(tables))) == [
        ("failed_transactions", 0),
        ("predictions", 0),
        ("transactions", 0),
    ]


def test_latest_row_wins_across_flushes_and_unchanged_rows_are_not_rewritten(
    sink: Sink, database: Database
) -> None:
    sink.add(unit([row(1)]), scored("tx-000001"))
    sink.flush()
    first = database.rows("SELECT updated_at FROM transactions")
    sink.add(unit([row(1)], seq=1), scored("tx-000001"))
    sink.flush()
    assert database.rows("SELECT updated_at FROM transactions") == first
    sink.add(unit([row(1, amount="77.00")], seq=2), scored("tx-000001"))
    sink.flush()
    assert database.rows("SELECT amount FROM transactions") == [(Decimal("77.00"),)]
    assert database.rows("SELECT updated_at FROM transactions") != first


def test_rows_stored_as_they_are_are_not_even_locked_after_the_first_such_flush(
    sink: Sink, database: Database
) -> None:
    # A rerun over rows already stored: its first flush finds them unchanged (and, by
    # the lean statement, locks them); the flushes after it probe for them first and
    # leave them untouched. New rows then go back to the lean statement.
    def lockers() -> list[object]:
        return database.rows("SELECT xmax::text FROM transactions ORDER BY transaction_id")

    records = [row(i) for i in range(1, 21)]
    ids = [r["transaction_id"] for r in records]
    sink.add(unit(records), scored(*ids))
    sink.flush()
    assert set(lockers()) == {("0",)}  # inserted: nobody has locked them
    assert not sink._probe_stored
    sink.add(unit(records, seq=1), scored(*ids))
    sink.flush()
    locked = lockers()
    assert set(locked) != {("0",)}  # the lean statement's ON CONFLICT locked them
    assert sink._probe_stored
    sink.add(unit(records, seq=2), scored(*ids))
    sink.flush()
    assert lockers() == locked  # probed first: not touched at all
    fresh = [row(i) for i in range(21, 41)]
    sink.add(unit(fresh, seq=3), scored(*[r["transaction_id"] for r in fresh]))
    sink.flush()
    assert not sink._probe_stored
    assert database.value("SELECT count(*) FROM transactions") == 40
    assert database.value("SELECT count(*) FROM predictions") == 40


def test_a_failure_later_scored_is_resolved(sink: Sink, database: Database) -> None:
    sink.add(unit([row(1)]), failed("tx-000001"))
    sink.flush()
    assert database.rows(
        "SELECT transaction_id, http_status, resolved_at IS NULL FROM failed_transactions"
    ) == [("tx-000001", 422, True)]
    sink.add(unit([row(1)], seq=1), scored("tx-000001"))
    sink.flush()
    assert database.value("SELECT count(*) FROM failed_transactions WHERE resolved_at IS NULL") == 0
    assert database.value("SELECT resolved_by_run FROM failed_transactions") == sink.run_id


def test_a_changed_row_that_fails_drops_its_stale_prediction(
    sink: Sink, database: Database
) -> None:
    sink.add(unit([row(1)]), scored("tx-000001", version="v1"))
    sink.flush()
    sink.add(unit([row(1, amount="5.00")], seq=1), failed("tx-000001"))
    sink.flush()
    # An unresolved failure is never also in predictions for the same model version.
    assert (
        database.value(
            "SELECT count(*) FROM failed_transactions f JOIN predictions p USING (transaction_id)"
            " WHERE f.resolved_at IS NULL AND p.model_version = f.model_version"
        )
        == 0
    )
    assert database.value("SELECT model_version FROM failed_transactions") == "v1"


def test_invalid_rows_of_one_object_version_are_stored_once(sink: Sink, database: Database) -> None:
    bad = InvalidRow(3, "raw", (Reason("_row", "broken"),))
    sink.add(unit([], invalid=[bad]), ScoreResult())
    sink.flush()
    sink.add(unit([], invalid=[bad], seq=1), ScoreResult())
    sink.flush()
    assert database.value("SELECT count(*) FROM invalid_rows") == 1


def test_flushes_every_db_row_batch_size_rows(
    database_url: str, sink: Sink, database: Database
) -> None:
    sink.flush_rows = 3
    sink.add(unit([row(1), row(2)], line=3), scored("tx-000001", "tx-000002"))
    assert database.value("SELECT count(*) FROM transactions") == 0
    sink.add(unit([row(3)], seq=1, line=4), scored("tx-000003"))
    # Sent to the sink's thread: written without another call, while the caller goes on.
    assert sink.pending_rows == 0
    deadline = time.monotonic() + 15
    while database.value("SELECT count(*) FROM transactions") != 3:
        assert time.monotonic() < deadline, "the flush was never written"
        time.sleep(0.02)
    assert database.value("SELECT checkpoint_line FROM source_objects") == 4


def test_end_object_marks_it_completed_in_the_same_flush(sink: Sink, database: Database) -> None:
    sink.add(unit([row(1)], line=2), scored("tx-000001"))
    sink.end_object(OBJ)
    assert database.rows("SELECT status, checkpoint_line, rows_read FROM source_objects") == [
        ("completed", 2, 1)
    ]
    assert database.value("SELECT objects_done FROM pipeline_runs") == 1


def test_a_lost_connection_is_retried_and_the_flush_applied_once(
    sink: Sink, database: Database
) -> None:
    sink.add(unit([row(1)]), scored("tx-000001"))
    sink.flush()
    # Kill the sink's connection from the server side, as a database restart would.
    database.execute(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = 'batch-pipeline sink'"
    )
    sink.add(unit([row(2)], seq=1), scored("tx-000002"))
    sink.flush()
    assert database.value("SELECT count(*) FROM transactions") == 2
    assert database.rows("SELECT rows_read, rows_scored FROM pipeline_runs") == [(2, 2)]


def test_a_permanent_error_is_not_retried(sink: Sink, database: Database) -> None:
    database.execute("ALTER TABLE transactions ADD CONSTRAINT small CHECK (amount < 1)")
    sink.add(unit([row(1, amount="5.00")]), scored("tx-000001"))
    with pytest.raises(DatabaseError, match="CheckViolation"):
        sink.flush()
    assert database.value("SELECT count(*) FROM predictions") == 0  # nothing half-written


def test_concurrent_sinks_writing_the_same_ids_do_not_deadlock(
    database_url: str, sink: Sink, database: Database
) -> None:
    other = Sink(database_url, sink.run_id, flush_rows=1000, retry_window=5)
    other.begin_object(OBJ, 1, None, fence=1)
    ids = [row(i) for i in range(300)]
    errors: list[BaseException] = []

    def write(s: Sink, records: list[dict[str, str]]) -> None:
        try:
            for n in range(5):
                s.add(unit(records, seq=n), scored(*[r["transaction_id"] for r in records]))
                s.flush()
        except BaseException as exc:
            errors.append(exc)

    threads = [
        threading.Thread(target=write, args=(sink, ids)),
        threading.Thread(target=write, args=(other, list(reversed(ids)))),
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors
    assert database.value("SELECT count(*) FROM transactions") == 300


def test_a_refused_flush_and_the_one_queued_behind_it_are_written_again_without_the_lost_object(
    database_url: str, database: Database
) -> None:
    # Flushes are written on the sink's thread while the writer goes on, two in flight
    # at most. Here the first is held at its fence while the second is queued behind
    # it; another run claims the first's object meanwhile. Neither may be written as
    # sent: the queued one would otherwise commit the other object's checkpoint after
    # a refused flush. Both come back, without the lost object's rows.
    from datetime import datetime

    import psycopg

    ledger = Ledger(database_url, retry_window=5)
    run_id = ledger.start_run(datetime(2026, 1, 1), "s3://b/", {})
    fences = {obj: ledger.claim(run_id, obj).fence for obj in (OBJ, OTHER)}
    lost: list[SourceObject] = []
    sink = Sink(database_url, run_id, flush_rows=2, retry_window=5, on_claim_lost=lost.append)
    for obj, fence in fences.items():
        sink.begin_object(obj, 1, None, fence)
    with psycopg.connect(database_url) as claimer:
        # Another run's claim of OBJ, not yet committed: the first flush waits for it.
        claimer.execute(
            "UPDATE source_objects SET claim_fence = claim_fence + 1 WHERE source_uri = %s",
            (OBJ.uri,),
        )
        sink.add(unit([row(1), row(2)], line=3), scored("tx-000001", "tx-000002"))
        waiting = "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock'"
        deadline = time.monotonic() + 15
        while database.value(waiting) == 0:
            assert time.monotonic() < deadline, "the first flush never reached the fence"
            time.sleep(0.02)
        sink.add(unit([row(3), row(4)], seq=1, line=3, obj=OTHER), scored("tx-000003", "tx-000004"))
        assert sink.pending_rows == 0  # both sent
        claimer.commit()
    sink.flush()
    assert lost == [OBJ]
    assert database.rows("SELECT transaction_id FROM transactions ORDER BY 1") == [
        ("tx-000003",),
        ("tx-000004",),
    ]
    assert database.rows(
        "SELECT source_uri, checkpoint_line, rows_read FROM source_objects ORDER BY 1"
    ) == [(OBJ.uri, 1, 0), (OTHER.uri, 3, 2)]
    assert sink.run.counts.read == 2
    sink.close()
    ledger.close()


def test_no_flush_is_written_after_one_that_failed(sink: Sink, database: Database) -> None:
    # The second flush is queued behind the first, which fails for good. Written
    # anyway, the second would commit a checkpoint past the first's rows, and a rerun
    # would resume after rows that were never stored.
    import psycopg

    sink.flush_rows = 2
    with psycopg.connect(database.url) as schema_change:
        # Not committed yet: the first flush waits for it, then breaks its CHECK.
        schema_change.execute("ALTER TABLE transactions ADD CONSTRAINT small CHECK (amount < 1)")
        sink.add(unit([row(1, amount="5.00"), row(2)], line=3), scored("tx-000001", "tx-000002"))
        waiting = "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock'"
        deadline = time.monotonic() + 15
        while database.value(waiting) == 0:
            assert time.monotonic() < deadline, "the first flush never waited for the lock"
            time.sleep(0.02)
        cheap = [row(3, amount="0.50"), row(4, amount="0.50")]
        sink.add(unit(cheap, seq=1, line=5), scored("tx-000003", "tx-000004"))
        assert sink.pending_rows == 0  # both sent
        schema_change.commit()
    with pytest.raises(DatabaseError, match="CheckViolation"):
        sink.flush()
    assert database.value("SELECT count(*) FROM transactions") == 0
    assert database.value("SELECT checkpoint_line FROM source_objects") == 1
    assert sink.run.counts.read == 0
