"""`run --dry-run`: what a run would do, without calling the model or writing a row.

The plan comes from the ledger (read only, when a database is there): which
objects a run would read, skip or resume. Those are then read and validated
through the same `ObjectReader` as a run, so the counts and the reasons of the
invalid rows are the ones a real run would store.
"""

from __future__ import annotations

import logging
import time
from contextlib import closing
from datetime import datetime

from library.config import Settings
from library.errors import PipelineError, SourceError, ThresholdExceededError
from library.jobs.flow import Ratios, StopSignal
from library.jobs.options import RunOptions
from library.jobs.plan import InvalidReasons, PlannedObject, ledger_state, plan_objects
from library.jobs.reading import ObjectReader, check_found, read_outcome
from library.jobs.run_report import ObjectOutcome, RunReport, RunStats, build_report
from library.models import Counts
from library.stages import source

log = logging.getLogger(__name__)


class DryRun:
    """A plan: which objects a run would read, skip or resume (from the ledger, read only,
    when a database is there), then read and validate those: no API call, no write."""

    def __init__(self, settings: Settings, options: RunOptions, stop: StopSignal) -> None:
        self.settings = settings
        self.options = options
        self.stop = stop

    def execute(self) -> RunReport:
        started = time.time()
        settings = self.settings
        assert settings.source.uri
        run_id = "dry_run_" + datetime.now().strftime("%Y%m%d_%H%M%S")
        log.info("Starting batch pipeline (dry run: no API calls, no writes)")
        counts = Counts()
        outcomes: list[ObjectOutcome] = []
        plan: list[PlannedObject] = []
        note: str | None = None
        reasons = InvalidReasons()
        error: PipelineError | None = None
        found: int | None = None
        try:
            s3 = source.s3_client_for(settings.source)
            objects = source.list_objects(settings.source.uri, s3)
            found = len(objects)
            check_found(objects, settings.source)
            if self.options.limit is not None:
                objects = objects[: self.options.limit]
            state, note = ledger_state(settings.sink, objects)
            if note:
                log.warning("Dry run: %s; every object is counted as to be read", note)
            plan = plan_objects(objects, state, self.options.reprocess)
            reader = ObjectReader.from_settings(settings.source, s3)
            for obj, planned in zip(objects, plan, strict=True):
                if self.stop.is_set():
                    break
                if planned.action == "skip":
                    outcomes.append(ObjectOutcome(obj.uri, "skipped"))
                    continue
                outcome = ObjectOutcome(obj.uri, "completed")
                outcomes.append(outcome)
                try:
                    with closing(reader.chunks(obj, planned.resume_after_line)) as chunks:
                        for chunk in chunks:
                            reasons.add(obj.uri, chunk.invalid)
                            c = Counts(
                                read=chunk.rows,
                                valid=chunk.valid.height,
                                invalid=len(chunk.invalid),
                            )
                            outcome.counts.add(c)
                            counts.add(c)
                except SourceError as exc:
                    outcome.status, outcome.error = read_outcome(exc)
                    log.error("Cannot read %s", outcome.error)
            if self.stop.error is not None:
                raise self.stop.error
            Ratios.of(settings.thresholds).check(counts, final=True)
        except (PipelineError, ThresholdExceededError) as exc:
            error = exc
        return build_report(
            run_id,
            started,
            RunStats(counts=counts),
            outcomes,
            error,
            settings.thresholds.completed_with_errors_exit_code,
            dry_run=True,
            objects_found=found,
            plan=plan,
            plan_note=note,
            invalid_reasons=reasons,
        )
