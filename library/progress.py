"""What a run is doing, while it runs: progress with an ETA, and the metrics pushes.

The reader updates `LiveState` (objects, bytes, rows read); the writer's
committed counts come from the sink. A reporter thread turns them into, by
PROGRESS:

    bar   a live rich display on a terminal; log lines print above it, ungarbled
    log   one line every PROGRESS_INTERVAL seconds (cron, docker logs, Kubernetes)
    off   nothing
    auto  bar when stderr is a terminal, log otherwise

Object sizes come from the listing, so the ETA (bytes left / bytes per second)
is real from the first seconds. The same thread publishes the metrics every
PROGRESS_INTERVAL.
"""

from __future__ import annotations

import logging
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from library.metrics import RunMetrics
from library.models import Counts
from library.source import CountingReader

log = logging.getLogger("batch_pipeline.progress")

BAR_REFRESH_SECONDS = 0.5


@dataclass
class LiveState:
    """Updated by the reader thread; read by the reporter (plain ints: reads are atomic)."""

    objects_total: int = 0
    bytes_total: int = 0
    objects_finished: int = 0
    bytes_finished: int = 0
    rows_read: int = 0
    current: CountingReader | None = None
    current_size: int = 0
    started: float = field(default_factory=time.monotonic)

    def begin_object(self, reader: CountingReader, size: int | None) -> None:
        self.current, self.current_size = reader, size or 0

    def finish_object(self, size: int | None) -> None:
        self.objects_finished += 1
        self.bytes_finished += size or 0
        self.current, self.current_size = None, 0

    def bytes_read(self) -> int:
        current = self.current
        part = min(current.bytes_read, self.current_size) if current is not None else 0
        return self.bytes_finished + part


def resolve_mode(mode: str) -> str:
    if mode != "auto":
        return mode
    return "bar" if sys.stderr.isatty() else "log"


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "unknown"
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


def snapshot(state: LiveState, written: Counts) -> dict[str, Any]:
    elapsed = max(time.monotonic() - state.started, 1e-9)
    done = state.bytes_read()
    rate = done / elapsed
    eta = (state.bytes_total - done) / rate if rate > 0 and state.bytes_total else None
    return {
        "objects_done": state.objects_finished,
        "objects_total": state.objects_total,
        "bytes_read": done,
        "bytes_total": state.bytes_total,
        "percent": round(100 * done / state.bytes_total, 1) if state.bytes_total else None,
        "rows_read": state.rows_read,
        "rows_per_second": round(state.rows_read / elapsed),
        "scored": written.scored,
        "failed": written.failed,
        "invalid": written.invalid,
        "eta_seconds": round(eta) if eta is not None else None,
        "elapsed_seconds": round(elapsed, 1),
    }


def describe(s: dict[str, Any]) -> str:
    mb = 1024 * 1024
    percent = f" ({s['percent']:.0f}%)" if s["percent"] is not None else ""
    return (
        f"{s['objects_done']}/{s['objects_total']} objects, "
        f"{s['bytes_read'] / mb:.1f} of {s['bytes_total'] / mb:.1f} MB{percent}, "
        f"{s['rows_read']:,} rows read ({s['rows_per_second']:,} rows/s), "
        f"{s['scored']:,} scored, {s['failed']:,} failed, {s['invalid']:,} invalid, "
        f"ETA {_duration(s['eta_seconds'])}"
    )


class Reporter(threading.Thread):
    def __init__(
        self,
        mode: str,
        interval: float,
        state: LiveState,
        written: Callable[[], Counts],
        metrics: RunMetrics | None = None,
        on_tick: Callable[[], None] | None = None,
    ) -> None:
        super().__init__(name="progress", daemon=True)
        self.mode = resolve_mode(mode)
        self.interval = interval
        self.state = state
        self.written = written
        self.metrics = metrics
        self.on_tick = on_tick
        self._halt = threading.Event()
        self._bar: Any = None
        self._task: Any = None

    @property
    def needed(self) -> bool:
        return self.mode in ("bar", "log") or bool(self.metrics and self.metrics.enabled)

    def run(self) -> None:
        if self.mode == "bar":
            self._open_bar()
        tick = BAR_REFRESH_SECONDS if self.mode == "bar" else self.interval
        last_publish = time.monotonic()
        try:
            while not self._halt.wait(tick):
                s = snapshot(self.state, self.written())
                if self.mode == "bar":
                    self._draw(s)
                elif self.mode == "log":
                    log.info(
                        "Progress: %s", describe(s), extra={"progress": s, "stage": "progress"}
                    )
                if time.monotonic() - last_publish >= self.interval:
                    self._publish()
                    last_publish = time.monotonic()
        finally:
            if self._bar is not None:
                self._draw(snapshot(self.state, self.written()))
                self._bar.stop()

    def _publish(self) -> None:
        if self.on_tick:
            self.on_tick()
        if self.metrics:
            self.metrics.publish()

    def stop(self) -> None:
        self._halt.set()
        if self.is_alive():
            self.join(timeout=5)

    # -- the rich display --------------------------------------------------------

    def _open_bar(self) -> None:
        from rich.console import Console
        from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn

        self._bar = Progress(
            TextColumn("[bold]scoring"),
            BarColumn(),
            TaskProgressColumn(),
            TextColumn("{task.fields[detail]}"),
            console=Console(stderr=True),
            redirect_stderr=True,
            redirect_stdout=False,
        )
        self._bar.start()
        self._task = self._bar.add_task("run", total=self.state.bytes_total or None, detail="")

    def _draw(self, s: dict[str, Any]) -> None:
        detail = (
            f"{s['objects_done']}/{s['objects_total']} objects · "
            f"{s['bytes_read'] / 1048576:.1f}/{s['bytes_total'] / 1048576:.1f} MB · "
            f"{s['rows_read']:,} rows · {s['rows_per_second']:,}/s · "
            f"{s['scored']:,} scored · {s['failed']:,} failed · {s['invalid']:,} invalid · "
            f"ETA {_duration(s['eta_seconds'])}"
        )
        self._bar.update(
            self._task, completed=s["bytes_read"], total=s["bytes_total"] or None, detail=detail
        )


@dataclass
class StageTimes:
    """Where the run's time went: each stage's busy time, and who waited on whom."""

    read: float = 0.0  # parsing CSV (reader thread)
    validate: float = 0.0  # validating and encoding chunks (reader thread)
    reader_waited: float = 0.0  # reader blocked on a full queue: scoring or writing is behind
    score: float = 0.0  # summed over the scoring workers
    write: float = 0.0  # flushes (writer thread)
    writer_waited_on_score: float = 0.0  # the next unit was still being scored
    writer_waited_on_read: float = 0.0  # the queue was empty: reading is behind
    workers: int = 1
    wall: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            k: round(v, 3) for k, v in self.__dict__.items() if isinstance(v, float)
        }
        out["workers"] = self.workers
        out["limited_by"] = self.limited_by()
        return out

    def limited_by(self) -> str:
        """The stage the others waited on most."""
        waits = {
            "score": self.writer_waited_on_score,
            "read": self.writer_waited_on_read,
            "write": self.reader_waited - self.writer_waited_on_score
            if self.reader_waited
            else 0.0,
        }
        busiest = {
            "read": self.read + self.validate,
            "score": self.score / max(self.workers, 1),
            "write": self.write,
        }
        stage = max(waits, key=lambda k: waits[k])
        if waits[stage] <= 0.05 * max(self.wall, 1e-9):
            stage = max(busiest, key=lambda k: busiest[k])
        return stage

    def lines(self, advise: bool = True) -> list[str]:
        """The summary's lines; `advise` adds the limiting stage and what to tune, which
        only a run that did its work normally can say (not an empty, skipped or failed one)."""
        hints = {
            "score": "raise API_MAX_WORKERS (if the model has capacity) or API_BATCH_SIZE",
            "read": "reading and validating is the limit: faster storage, or split the input into more objects",
            "write": "raise DB_ROW_BATCH_SIZE, or give PostgreSQL more resources",
        }
        stage = self.limited_by()
        lines = [
            f"stage times:   read {self.read:.1f}s, validate {self.validate:.1f}s, "
            f"score {self.score:.1f}s over {self.workers} workers, write {self.write:.1f}s",
            f"waiting:       reader waited {self.reader_waited:.1f}s on a full queue; writer waited "
            f"{self.writer_waited_on_score:.1f}s on scoring, {self.writer_waited_on_read:.1f}s on reading",
        ]
        if advise:
            lines.append(f"limited by:    {stage} ({hints[stage]})")
        return lines
