"""The job's session, the object reader and the orchestrators, in process.

`run` and `retry-failed` are driven here with a fake scoring client (their
flow factory builds `ScoreAndWrite` around it) and the real sink, ledger and
PostgreSQL: what the orchestrator decides and records is checked without a
model server or a subprocess. The CLI tests stay for the CLI.
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import closing
from pathlib import Path
from typing import Any

import pytest

from library.config import Settings, load_settings, redact_url
from library.jobs.flow import ScoreAndWrite, StopSignal
from library.jobs.reading import ObjectReader
from library.jobs.retry import retry_failed
from library.jobs.run import RunOptions, run_pipeline
from library.jobs.run_report import RunStats
from library.jobs.session import job_session
from library.models import SourceObject
from library.observability.metrics import RunMetrics
from library.stages.sink import Sink
from tests.conftest import Database
from tests.helpers.data import row, rows, to_csv
from tests.helpers.fakes import FakeClient


def settings_for(database_url: str, source: Path | None = None, **extra: str) -> Settings:
    env = {
        "DATABASE_URL": database_url,
        "ML_API_URL": "http://127.0.0.1:9",  # never called: the fake client answers
        "PROGRESS": "off",
        **extra,
    }
    if source is not None:
        env["SOURCE_URI"] = str(source)
    return load_settings(environ=env)


def flow_with(client: FakeClient) -> Any:
    """A flow factory that builds the run's ScoreAndWrite around `client`."""

    def make(
        settings: Settings,
        url: str,
        run_id: str,
        stop: StopSignal,
        *,
        ratios: bool = True,
        metrics: RunMetrics | None = None,
        on_claim_lost: Any = None,
    ) -> ScoreAndWrite:
        from library.jobs.flow import Ratios

        sink = Sink(url, run_id, 50, settings.sink.retry_timeout, on_claim_lost=on_claim_lost)
        return ScoreAndWrite(
            client,  # type: ignore[arg-type]
            sink,
            ThreadPoolExecutor(2),
            stop,
            api_batch_size=settings.scoring.batch_size,
            flush_interval=settings.sink.flush_interval,
            queue_size=settings.scoring.writer_queue_size,
            ratios=Ratios.of(settings.thresholds) if ratios else None,
            workers=2,
        )

    return make


def write_input(folder: Path) -> None:
    folder.mkdir()
    (folder / "a.csv").write_text(to_csv(rows(120)))
    bad = [*rows(30, start=200), row(230, amount="lots"), row(231, currency="EURO")]
    (folder / "b.csv").write_text(to_csv(bad))


def test_object_reader_resumes_after_its_checkpoint_and_times_its_stages(tmp_path: Path) -> None:
    path = tmp_path / "a.csv"
    path.write_text(to_csv([*rows(10), row(10, amount="x"), *rows(5, start=11)]))
    obj = SourceObject(str(path), "v1")
    reader = ObjectReader(None, row_batch_size=4, max_quoted_field_chars=1 << 20)
    with closing(reader.chunks(obj, resume_after_line=6)) as chunks:
        got = list(chunks)
    lines = [line for c in got for line in c.valid.get_column("_line").to_list()]
    assert lines == [7, 8, 9, 10, 11, 13, 14, 15, 16, 17]  # line 12 holds the invalid row
    assert [r.line_number for c in got for r in c.invalid] == [12]
    assert sum(c.rows for c in got) == 11 == reader.live.rows_read
    assert reader.times.read > 0 and reader.times.validate > 0


def test_a_run_in_process_writes_every_row_once_and_records_its_end(
    tmp_path: Path, database_url: str, database: Database
) -> None:
    write_input(tmp_path / "in")
    settings = settings_for(database_url, tmp_path / "in", API_BATCH_SIZE="7")
    client = FakeClient(failed_ids=frozenset({"tx-000005"}))
    report = run_pipeline(settings, RunOptions(), make_flow=flow_with(client))

    assert (report.status, report.exit_code) == ("completed_with_errors", 3)
    assert report.counts.as_dict() == {
        "read": 152,
        "valid": 150,
        "invalid": 2,
        "scored": 149,
        "failed": 1,
    }
    assert [o.status for o in report.objects] == ["completed", "completed"]
    assert report.objects_found == 2 and report.database == redact_url(database_url)
    assert database.value("SELECT count(*) FROM transactions") == 150
    assert database.value("SELECT count(*) FROM predictions WHERE model_version = 'm1'") == 149
    assert database.value("SELECT count(*) FROM invalid_rows") == 2
    assert database.rows(
        "SELECT status, error FROM pipeline_runs WHERE run_id = %s", (report.run_id,)
    ) == [("completed_with_errors", None)]
    summary = database.value(
        "SELECT summary FROM pipeline_runs WHERE run_id = %s", (report.run_id,)
    )
    assert summary["rows"]["failed"] == 1 and summary["exit_code"] == 3

    again = run_pipeline(settings, RunOptions(), make_flow=flow_with(FakeClient()))
    assert [o.status for o in again.objects] == ["skipped", "skipped"]
    assert (again.status, again.exit_code, again.counts.read) == ("completed", 0, 0)


def test_retry_failed_in_process_resolves_what_now_scores(
    tmp_path: Path, database_url: str, database: Database
) -> None:
    write_input(tmp_path / "in")
    settings = settings_for(database_url, tmp_path / "in")
    failing = frozenset({"tx-000005", "tx-000207"})
    first = run_pipeline(
        settings, RunOptions(), make_flow=flow_with(FakeClient(failed_ids=failing))
    )
    assert first.counts.failed == 2

    still = frozenset({"tx-000207"})
    report = retry_failed(
        settings, None, StopSignal(), make_flow=flow_with(FakeClient(failed_ids=still))
    )
    assert (report.counts.valid, report.counts.scored, report.counts.failed) == (2, 1, 1)
    assert report.status == "completed_with_errors"
    assert database.rows(
        "SELECT transaction_id FROM failed_transactions WHERE resolved_at IS NULL"
    ) == [("tx-000207",)]
    assert (
        database.value("SELECT source_uri FROM pipeline_runs WHERE run_id = %s", (report.run_id,))
        == "retry-failed"
    )


def test_a_session_records_the_run_and_its_end_even_when_the_job_failed(
    database_url: str, database: Database
) -> None:
    from library.errors import ApiUnavailableError

    settings = settings_for(database_url)
    with job_session(settings, time.time(), "s3://bucket/in/") as session:
        assert (
            database.value("SELECT status FROM pipeline_runs WHERE run_id = %s", (session.run_id,))
            == "processing"
        )
        report = session.finish(RunStats(), [], ApiUnavailableError("the ML API is down"))
    assert (report.status, report.exit_code, report.error) == ("failed", 1, "the ML API is down")
    assert database.rows(
        "SELECT status, error, source_uri FROM pipeline_runs WHERE run_id = %s", (session.run_id,)
    ) == [("failed", "the ML API is down", "s3://bucket/in/")]


def test_a_session_that_cannot_record_its_end_still_returns_the_report(
    database_url: str, database: Database, caplog: pytest.LogCaptureFixture
) -> None:
    settings = settings_for(database_url, DB_RETRY_TIMEOUT="0")
    with job_session(settings, time.time(), "x") as session:
        database.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name LIKE %s",
            (f"%{session.run_id}%",),
        )
        session.ledger.stop_heartbeat()
        database.execute("ALTER TABLE pipeline_runs RENAME TO pipeline_runs_gone")
        try:
            report = session.finish(RunStats(), [], None)
        finally:
            database.execute("ALTER TABLE pipeline_runs_gone RENAME TO pipeline_runs")
    assert report.status == "completed"
    assert f"could not record the end of run {session.run_id}" in caplog.text
