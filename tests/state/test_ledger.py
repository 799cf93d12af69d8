"""The ledger in process, on a real PostgreSQL: run ids, claims, fences, locks,
abandoned runs. The fault and scale-out suites drive the same rules through
whole runs; these pin each rule down on its own."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from datetime import datetime

import pytest

from library.models import SourceObject
from library.state.ledger import ABANDON_GRACE_SECONDS, Ledger
from tests.conftest import Database

OBJ = SourceObject("s3://bucket/in/a.csv", "etag-1", size=100)
NOON = datetime(2026, 12, 4, 12, 0, 0)


@pytest.fixture
def ledgers(database_url: str) -> Iterator[Callable[[], Ledger]]:
    opened: list[Ledger] = []

    def open_ledger() -> Ledger:
        ledger = Ledger(database_url, retry_window=5)
        opened.append(ledger)
        return ledger

    yield open_ledger
    for ledger in opened:
        ledger.close()


def test_two_runs_started_in_the_same_second_get_distinct_ids(
    ledgers: Callable[[], Ledger], database: Database
) -> None:
    first = ledgers().start_run(NOON, "s3://bucket/in/", {"ROW_BATCH_SIZE": 5000})
    second = ledgers().start_run(NOON, "s3://bucket/in/", {})
    assert first == "batch_20261204_120000" and second == "batch_20261204_120000_2"
    assert database.rows("SELECT run_id, status FROM pipeline_runs ORDER BY run_id") == [
        (first, "processing"),
        (second, "processing"),
    ]
    assert database.value("SELECT settings FROM pipeline_runs WHERE run_id = %s", (first,)) == {
        "ROW_BATCH_SIZE": 5000
    }


def test_a_claim_is_new_then_locked_for_others_then_resumed_with_a_new_fence(
    ledgers: Callable[[], Ledger],
) -> None:
    one, two = ledgers(), ledgers()
    run_one = one.start_run(NOON, "s3://bucket/in/", {})
    run_two = two.start_run(NOON, "s3://bucket/in/", {})

    claim = one.claim(run_one, OBJ)
    assert (claim.status, claim.checkpoint_line, claim.fence) == ("new", 1, 1)
    locked = two.claim(run_two, OBJ)
    assert (locked.status, locked.held_by) == ("locked", run_one)

    one.release(OBJ)  # released while still processing: a run that stopped mid-object
    resumed = two.claim(run_two, OBJ)
    assert (resumed.status, resumed.fence) == ("resume", 2)
    assert resumed.prior is not None and resumed.prior.read == 0


def test_releasing_after_the_connection_was_lost_neither_reconnects_nor_raises(
    ledgers: Callable[[], Ledger], database: Database
) -> None:
    # The lock lived in the lost session and went with it. Releasing it through a new
    # connection would wait out DB_RETRY_TIMEOUT when the server is gone (it did, after
    # a stop, and then raised from the writer's thread).
    one, two = ledgers(), ledgers()
    run_one = one.start_run(NOON, "s3://bucket/in/", {})
    run_two = two.start_run(NOON, "s3://bucket/in/", {})
    assert one.claim(run_one, OBJ).status == "new"
    sessions = "SELECT count(*) FROM pg_stat_activity WHERE application_name LIKE %s"
    assert database.value(sessions, (f"batch-pipeline {run_one} %",)) == 1
    database.execute(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name LIKE %s",
        (f"batch-pipeline {run_one} %",),
    )
    one.release(OBJ)
    assert (
        database.value(sessions, (f"batch-pipeline {run_one} %",)) == 0
    )  # no new connection for it
    assert two.claim(run_two, OBJ).status == "resume"  # the lock is free


def test_a_completed_object_is_skipped_unless_reprocessed_and_a_new_version_is_new(
    ledgers: Callable[[], Ledger], database: Database
) -> None:
    ledger = ledgers()
    run_id = ledger.start_run(NOON, "s3://bucket/in/", {})
    ledger.claim(run_id, OBJ)
    database.execute("UPDATE source_objects SET status = 'completed', checkpoint_line = 41")
    ledger.release(OBJ)

    assert ledger.claim(run_id, OBJ).status == "completed"
    again = ledger.claim(run_id, OBJ, reprocess=True)
    assert (again.status, again.checkpoint_line, again.fence) == ("new", 1, 2)
    ledger.release(OBJ)
    changed = SourceObject(OBJ.uri, "etag-2", size=120)
    assert ledger.claim(run_id, changed).status == "new"


def test_in_a_run_group_an_object_finished_by_another_worker_is_not_read_again(
    ledgers: Callable[[], Ledger], database: Database
) -> None:
    worker0, worker1 = ledgers(), ledgers()
    run0 = worker0.start_run(NOON, "s3://bucket/in/", {}, run_group="night", worker_index=0)
    run1 = worker1.start_run(NOON, "s3://bucket/in/", {}, run_group="night", worker_index=1)
    worker0.claim(run0, OBJ, run_group="night")
    database.execute("UPDATE source_objects SET status = 'failed'")
    worker0.release(OBJ)
    finished = worker1.claim(run1, OBJ, reprocess=True, run_group="night")
    assert (finished.status, finished.held_by) == ("finished", run0)


def test_a_run_whose_process_is_gone_is_closed_as_abandoned_only_after_its_grace(
    database_url: str, ledgers: Callable[[], Ledger], database: Database
) -> None:
    gone = Ledger(database_url, retry_window=5)
    gone_run = gone.start_run(NOON, "s3://bucket/in/", {})
    gone.close()  # its lock goes with its connection; it never beat since

    survivor = ledgers()
    survivor_run = survivor.start_run(NOON, "s3://bucket/in/", {})
    survivor.close_abandoned()  # silent for less than the grace: only suspected
    assert database.value("SELECT status FROM pipeline_runs WHERE run_id = %s", (gone_run,)) == (
        "processing"
    )
    database.execute(
        "UPDATE pipeline_runs SET heartbeat_at = now() - make_interval(secs => %s) WHERE run_id = %s",
        (ABANDON_GRACE_SECONDS + 1, gone_run),
    )
    survivor.close_abandoned()
    status, error = database.rows(
        "SELECT status, error FROM pipeline_runs WHERE run_id = %s", (gone_run,)
    )[0]
    assert status == "failed" and f"run {survivor_run} found it" in error


def test_a_live_run_holding_its_lock_is_never_closed_as_abandoned(
    ledgers: Callable[[], Ledger], database: Database
) -> None:
    alive, other = ledgers(), ledgers()
    alive_run = alive.start_run(NOON, "s3://bucket/in/", {})
    other.start_run(NOON, "s3://bucket/in/", {})
    database.execute("UPDATE pipeline_runs SET heartbeat_at = now() - interval '1 hour'")
    other.close_abandoned()
    assert database.value("SELECT status FROM pipeline_runs WHERE run_id = %s", (alive_run,)) == (
        "processing"
    )


def test_finishing_a_run_records_its_status_summary_and_model(
    ledgers: Callable[[], Ledger], database: Database
) -> None:
    ledger = ledgers()
    run_id = ledger.start_run(NOON, "s3://bucket/in/", {})
    ledger.start_heartbeat()
    ledger.finish_run(run_id, "completed_with_errors", None, {"exit_code": 3}, "model-7")
    assert database.rows(
        "SELECT status, summary, model_version, finished_at IS NOT NULL FROM pipeline_runs"
    ) == [("completed_with_errors", {"exit_code": 3}, "model-7", True)]


def test_a_lost_object_is_remembered_until_claimed_again(ledgers: Callable[[], Ledger]) -> None:
    ledger = ledgers()
    run_id = ledger.start_run(NOON, "s3://bucket/in/", {})
    ledger.claim(run_id, OBJ)
    assert not ledger.is_lost(OBJ)
    ledger.mark_lost(OBJ)
    assert ledger.is_lost(OBJ)
    ledger.release(OBJ)
    ledger.claim(run_id, OBJ)
    assert not ledger.is_lost(OBJ)
