"""Prometheus metrics of one run: pushed to a Pushgateway and/or written for node_exporter.

Metrics (job label METRICS_JOB):

    batch_pipeline_rows_total{outcome}                      read, valid, invalid, scored, failed
    batch_pipeline_objects_total{status}                    completed, failed, refused, skipped, locked
    batch_pipeline_objects_found                            objects the listing of SOURCE_URI found
                                                            (0: no input; absent if it never listed)
    batch_pipeline_api_requests_total{status}               HTTP status, or "error" (no answer)
    batch_pipeline_api_request_duration_seconds             histogram
    batch_pipeline_api_retries_total
    batch_pipeline_api_concurrency_limit                    where the adaptive limiter stands
    batch_pipeline_flushes_total
    batch_pipeline_flush_duration_seconds                   histogram
    batch_pipeline_run_duration_seconds
    batch_pipeline_run_status{status}                       1 for the run's status, 0 for the others
    batch_pipeline_run_info{run_id}                         1
    batch_pipeline_last_success_timestamp_seconds           set only when a run ends completed or
                                                            completed_with_errors (exit 0 or 3)

Pushes use `pushadd` (HTTP POST), which replaces only the metrics pushed: a
failed or interrupted run never pushes the last-success timestamp, so it cannot
wipe the previous one, and the "has not succeeded in 26 hours" alert stays
true. The textfile is written atomically, carrying the previous last-success
timestamp over in the same way.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from pathlib import Path

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.exposition import pushadd_to_gateway, write_to_textfile
from prometheus_client.parser import text_string_to_metric_families

from library.errors import EXIT_COMPLETED, EXIT_COMPLETED_WITH_ERRORS
from library.models import Counts

log = logging.getLogger(__name__)

RUN_STATUSES = ("processing", "completed", "completed_with_errors", "failed", "interrupted")
SUCCESS_STATUSES = ("completed", "completed_with_errors")
LAST_SUCCESS = "batch_pipeline_last_success_timestamp_seconds"
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


class RunMetrics:
    def __init__(
        self,
        job: str,
        pushgateway: str | None,
        textfile: Path | None,
        run_id: str = "",
        worker: str | None = None,
    ) -> None:
        self.job = job
        # A worker of a run group pushes under its own grouping key, so that N pods do
        # not overwrite each other in the Pushgateway; the last-success timestamp is the
        # group's, pushed under the job alone by the worker that finishes the group.
        self.grouping = {"worker": worker} if worker is not None else {}
        self.pushgateway = pushgateway
        self.textfile = textfile
        self.started = time.monotonic()
        self._lock = threading.Lock()
        self._pushed_counts = Counts()
        self._warned = False
        r = self.registry = CollectorRegistry()
        self.rows = Counter(
            "batch_pipeline_rows", "Rows of this run by outcome.", ["outcome"], registry=r
        )
        self.objects = Counter(
            "batch_pipeline_objects", "Objects of this run by status.", ["status"], registry=r
        )
        self.api_requests = Counter(
            "batch_pipeline_api_requests",
            "Model API requests by HTTP status.",
            ["status"],
            registry=r,
        )
        self.api_latency = Histogram(
            "batch_pipeline_api_request_duration_seconds",
            "Model API request latency.",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.api_retries = Counter("batch_pipeline_api_retries", "Model API retries.", registry=r)
        self.concurrency = Gauge(
            "batch_pipeline_api_concurrency_limit", "Requests allowed in flight now.", registry=r
        )
        self.flushes = Counter("batch_pipeline_flushes", "Database flushes.", registry=r)
        self.flush_duration = Histogram(
            "batch_pipeline_flush_duration_seconds",
            "Database flush duration.",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.duration = Gauge(
            "batch_pipeline_run_duration_seconds", "Run duration so far.", registry=r
        )
        self.status = Gauge(
            "batch_pipeline_run_status", "1 for the run's status.", ["status"], registry=r
        )
        self.info = Gauge("batch_pipeline_run_info", "The run's id.", ["run_id"], registry=r)
        self.objects_found: Gauge | None = None  # see set_objects_found
        for outcome in ("read", "valid", "invalid", "scored", "failed"):
            self.rows.labels(outcome)
        self.set_status("processing")
        if run_id:
            self.set_run(run_id)

    @property
    def enabled(self) -> bool:
        return bool(self.pushgateway or self.textfile)

    # -- updates (cheap: called per request and per flush, never per row) -------

    def set_run(self, run_id: str) -> None:
        self.info.clear()
        self.info.labels(run_id).set(1)

    def observe_request(self, status: str, seconds: float) -> None:
        self.api_requests.labels(status).inc()
        self.api_latency.observe(seconds)

    def observe_retry(self) -> None:
        self.api_retries.inc()

    def observe_flush(self, seconds: float) -> None:
        self.flushes.inc()
        self.flush_duration.observe(seconds)

    def observe_object(self, status: str) -> None:
        self.objects.labels(status).inc()

    def set_objects_found(self, found: int) -> None:
        """Registered only once the source was listed: a run that failed before
        listing must not report an empty source."""
        if self.objects_found is None:
            self.objects_found = Gauge(
                "batch_pipeline_objects_found",
                "Objects the listing of SOURCE_URI found (0: no input).",
                registry=self.registry,
            )
        self.objects_found.set(found)

    def set_counts(self, counts: Counts) -> None:
        """Counters move by the difference since the last call."""
        with self._lock:
            last = self._pushed_counts
            for outcome in ("read", "valid", "invalid", "scored", "failed"):
                delta = getattr(counts, outcome) - getattr(last, outcome)
                if delta > 0:
                    self.rows.labels(outcome).inc(delta)
            self._pushed_counts = Counts(
                counts.read, counts.valid, counts.invalid, counts.scored, counts.failed
            )

    def set_status(self, status: str) -> None:
        for s in RUN_STATUSES:
            self.status.labels(s).set(1 if s == status else 0)

    # -- publishing --------------------------------------------------------------

    def publish_final(
        self,
        status: str,
        counts: Counts,
        objects_found: int | None,
        object_statuses: list[str],
        group_outcome: tuple[bool, int] | None,
    ) -> None:
        """The run's final figures, pushed once. A worker of a run group reports the
        group's success (`group_outcome`: finished by this worker, the group's code)."""
        self.set_counts(counts)
        if objects_found is not None:
            self.set_objects_found(objects_found)
        for object_status in object_statuses:
            self.observe_object(object_status)
        succeeded = None
        if group_outcome is not None:
            finished, code = group_outcome
            succeeded = finished and code in (EXIT_COMPLETED, EXIT_COMPLETED_WITH_ERRORS)
        self.publish(final_status=status, succeeded=succeeded)

    def publish(self, final_status: str | None = None, succeeded: bool | None = None) -> None:
        """Push and/or write the metrics; at the end, with the run's final status.

        `succeeded` says whether to record the last success (default: the status is a
        success); a worker of a run group passes whether the whole group succeeded."""
        if not self.enabled:
            return
        self.duration.set(time.monotonic() - self.started)
        success_registry = None
        if final_status is not None:
            self.set_status(final_status)
            if succeeded is None:
                succeeded = final_status in SUCCESS_STATUSES
            if succeeded:
                success_registry = CollectorRegistry()
                Gauge(LAST_SUCCESS, "When a run last succeeded.", registry=success_registry).set(
                    time.time()
                )
        if self.pushgateway:
            self._push(success_registry)
        if self.textfile:
            self._write_textfile(success_registry is not None)

    def _push(self, success_registry: CollectorRegistry | None) -> None:
        assert self.pushgateway
        try:
            pushadd_to_gateway(
                self.pushgateway,
                job=self.job,
                registry=self.registry,
                grouping_key=self.grouping,
                timeout=5,
            )
            if success_registry is not None:
                pushadd_to_gateway(
                    self.pushgateway, job=self.job, registry=success_registry, timeout=5
                )
        except Exception as exc:  # metrics must never fail the run
            if not self._warned:
                log.warning("cannot push metrics to the Pushgateway: %s", exc)
                self._warned = True

    def _write_textfile(self, succeeded: bool) -> None:
        assert self.textfile
        path = self.textfile
        registry = CollectorRegistry()
        registry.register(_Union(self.registry))
        last = time.time() if succeeded else previous_last_success(path)
        if last is not None:
            Gauge(LAST_SUCCESS, "When a run last succeeded.", registry=registry).set(last)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            write_to_textfile(str(path), registry)  # temp file + rename: atomic
        except OSError as exc:
            if not self._warned:
                log.warning("cannot write the metrics textfile %s: %s", path, exc)
                self._warned = True


class _Union:
    """A collector that re-exports another registry's metrics."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self._registry = registry

    def collect(self):  # type: ignore[no-untyped-def]
        return self._registry.collect()


def previous_last_success(path: Path) -> float | None:
    """The last-success timestamp an earlier run wrote, so that a failed run keeps it."""
    if not os.path.exists(path):
        return None
    try:
        text = path.read_text(encoding="utf-8")
        for family in text_string_to_metric_families(text):
            if family.name == LAST_SUCCESS:
                for sample in family.samples:
                    return float(sample.value)
    except (OSError, ValueError) as exc:
        log.warning("cannot read the previous metrics textfile %s: %s", path, exc)
    return None
