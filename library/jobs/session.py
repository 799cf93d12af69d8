"""A job's session with the ledger: database, schema, the run's row, its end.

`run`, `retry-failed` and the demo (which is a `run`) all go through one
`JobSession`: it finds the database (DATABASE_URL, or the embedded one),
checks the schema, records the run as `processing` and keeps it beating, then
records how it ended with the report that `build_report` made. A job only
supplies what it did.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from library.config import Settings, url_secrets
from library.errors import PipelineError
from library.jobs.run_report import ObjectOutcome, RunReport, RunStats, build_report
from library.observability import logs
from library.state import db
from library.state.db import database
from library.state.ledger import Ledger

log = logging.getLogger(__name__)


@dataclass
class JobSession:
    """One recorded run: its id, its ledger, and where its data goes."""

    ledger: Ledger
    url: str  # the database, with its secrets: for connections only
    shown: str  # the database as it may be printed
    run_id: str
    started_at: float
    with_errors_exit: int  # COMPLETED_WITH_ERRORS_EXIT_CODE

    def finish(
        self,
        stats: RunStats,
        objects: list[ObjectOutcome],
        error: PipelineError | None,
        **context: Any,
    ) -> RunReport:
        """Build the run's report and record it; a failure to record it is logged, not
        raised: the report still reaches the user."""
        report = build_report(
            self.run_id,
            self.started_at,
            stats,
            objects,
            error,
            self.with_errors_exit,
            database=self.shown,
            **context,
        )
        try:
            self.ledger.finish_run(
                report.run_id, report.status, report.error, report.summary(), report.model_version
            )
        except Exception as exc:
            log.error("could not record the end of run %s: %s", report.run_id, db.first_line(exc))
        return report


@contextmanager
def open_ledger(
    settings: Settings, migrate: bool, purpose: str
) -> Iterator[tuple[Ledger, str, str]]:
    """Database, schema check (the embedded one is migrated), and the ledger's connection."""
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


@contextmanager
def job_session(
    settings: Settings,
    started_at: float,
    label: str | None,
    *,
    migrate: bool = False,
    purpose: str = "ledger",
    run_group: str | None = None,
    worker_index: int | None = None,
) -> Iterator[JobSession]:
    """Open the ledger and record a new run (`label`: its source, or what it retries).

    The run beats while the session is open; `JobSession.finish` records its end."""
    with open_ledger(settings, migrate, purpose) as (ledger, url, shown):
        run_id = ledger.start_run(
            datetime.now(), label, settings.redacted(), run_group, worker_index
        )
        ledger.start_heartbeat()
        logs.set_run(run_id)
        yield JobSession(
            ledger,
            url,
            shown,
            run_id,
            started_at,
            settings.thresholds.completed_with_errors_exit_code,
        )
