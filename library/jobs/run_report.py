"""What a run did, and what it means: its status, its exit code, its report.

Every job (`run`, `run --dry-run`, `retry-failed`, the demo) ends the same way:
its stages' figures are taken as one `RunStats` snapshot, `build_report` turns
the snapshot, the objects' outcomes and the error that stopped the run (if
any) into a `RunReport`, and `decide` is the one rule from outcome to exit code
(contract, section 5).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from library.errors import EXIT_COMPLETED, EXIT_COMPLETED_WITH_ERRORS, EXIT_FAILED, PipelineError
from library.models import Counts
from library.observability.progress import StageTimes
from library.state.ledger import RunStatus

if TYPE_CHECKING:  # the plan is built from the ledger's state: library.jobs.plan reads it
    from library.jobs.plan import InvalidReasons, PlannedObject


@dataclass
class ObjectOutcome:
    uri: str
    status: str  # completed, failed, refused, skipped, locked, lost
    counts: Counts = field(default_factory=Counts)
    error: str | None = None


@dataclass
class RunStats:
    """A snapshot of the stages' figures at the end of a run (see ScoreAndWrite.stats)."""

    counts: Counts = field(default_factory=Counts)
    model_version: str | None = None
    api_requests: int = 0
    api_retries: int = 0
    flushes: int = 0
    flush_seconds: float = 0.0
    concurrency: dict[str, Any] | None = None
    stage_times: StageTimes | None = None


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


def build_report(
    run_id: str,
    started_at: float,
    stats: RunStats,
    objects: list[ObjectOutcome],
    error: PipelineError | None,
    with_errors_exit: int,
    **context: Any,
) -> RunReport:
    """The one place a report is made: the decision, then the snapshot's figures.

    `context` holds what only some jobs know (database, objects_found, progress, and
    a dry run's plan), as RunReport's fields of the same names.
    """
    status, exit_code, message = decide(error, stats.counts, objects, with_errors_exit)
    return RunReport(
        run_id=run_id,
        status=status,
        exit_code=exit_code,
        counts=stats.counts,
        objects=objects,
        started_at=started_at,
        finished_at=time.time(),
        error=message,
        model_version=stats.model_version,
        api_requests=stats.api_requests,
        api_retries=stats.api_retries,
        flushes=stats.flushes,
        flush_seconds=stats.flush_seconds,
        concurrency=stats.concurrency,
        stage_times=stats.stage_times,
        **context,
    )
