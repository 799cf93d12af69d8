"""`retry-failed`: score the transactions in failed_transactions again.

The unresolved failures (all, or one run's) are read back with their stored
transactions and fed to the same scoring flow as a run: the ones that score
now get their prediction and their failure resolved in the same flush; the
others stay failed with their new reason and attempts. Recorded as a run of
its own in pipeline_runs.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator

import polars as pl

from library.config import Settings
from library.errors import ConfigError, PipelineError
from library.jobs.flow import FlowFactory, ScoreAndWrite, Stopping, StopSignal
from library.jobs.run_report import RunReport
from library.jobs.session import job_session
from library.models import LINE_COLUMN, SourceObject, ValidatedChunk
from library.score.ready import wait_until_ready
from library.state import db

log = logging.getLogger(__name__)

FAILED_ROWS = """
SELECT t.transaction_id, t.event_time, t.account_id, t.merchant_id, t.merchant_category,
       t.amount, t.currency::text, t.country::text, t.channel, t.card_present,
       t.source_line, t.source_uri, t.source_version
FROM failed_transactions f JOIN transactions t USING (transaction_id)
WHERE f.resolved_at IS NULL AND (%(run)s::text IS NULL OR f.run_id = %(run)s)
ORDER BY t.source_uri, t.source_version, t.source_line
"""

SCHEMA = pl.Schema(
    {
        "transaction_id": pl.String(),
        "event_time": pl.Datetime("us", "UTC"),
        "account_id": pl.String(),
        "merchant_id": pl.String(),
        "merchant_category": pl.String(),
        "amount": pl.Decimal(12, 2),
        "currency": pl.String(),
        "country": pl.String(),
        "channel": pl.String(),
        "card_present": pl.Boolean(),
        LINE_COLUMN: pl.Int64(),
    }
)


def failed_chunks(url: str, run: str | None, size: int) -> Iterator[ValidatedChunk]:
    """The unresolved failures as chunks of typed transactions, one object at a time."""
    conn = db.connect(url, "batch-pipeline retry reader")
    try:
        with (
            db.classified("reading the failed transactions"),
            conn.transaction(),
            conn.cursor(name="failed_rows") as cur,
        ):
            cur.itersize = size
            cur.execute(FAILED_ROWS, {"run": run})
            index = 0
            while rows := cur.fetchmany(size):
                by_object: dict[tuple[str, str], list[tuple[object, ...]]] = {}
                for r in rows:
                    by_object.setdefault((r[11], r[12]), []).append(r[:11])
                for (uri, version), part in by_object.items():
                    frame = pl.DataFrame(part, schema=SCHEMA, orient="row")
                    last = max(int(r[10]) for r in part)  # type: ignore[call-overload]
                    yield ValidatedChunk(SourceObject(uri, version), index, frame, [], last)
                    index += 1
    finally:
        conn.close()


def retry_failed(
    settings: Settings,
    run: str | None,
    stop: StopSignal,
    make_flow: FlowFactory = ScoreAndWrite.from_settings,
) -> RunReport:
    if not settings.scoring.url:
        raise ConfigError("ML_API_URL is required: set it or pass --ml-api-url http://host:port")
    label = "retry-failed" + (f" --run {run}" if run else "")
    with job_session(settings, time.time(), label, purpose="retry") as session:
        waiting = session.ledger.count_unresolved_failures(run)
        log.info(
            "Pipeline Run ID: %s (%s: %d transaction(s) to score again)",
            session.run_id,
            label,
            waiting,
        )
        flow = make_flow(settings, session.url, session.run_id, stop, ratios=False)
        error: PipelineError | None = None
        try:
            try:
                wait_until_ready(
                    flow.client.check_ready,
                    settings.scoring.wait_ready,
                    stop.event,
                    lambda: stop.error,
                )
                flow.start()
                for chunk in failed_chunks(session.url, run, settings.source.row_batch_size):
                    flow.feed(chunk)
            except Stopping:
                pass
            finally:
                flow.finish()
        except PipelineError as exc:
            error = exc
        return session.finish(flow.stats(), [], error)
    raise AssertionError("unreachable")
