"""What a run is doing, while it runs: progress with an ETA, and the metrics pushes.

The reader updates `LiveState` (objects, bytes, rows read); the writer's
committed counts come from the sink. A reporter thread turns them into, by
PROGRESS:

    bar   a live rich display on a terminal; log lines print above it, ungarbled
    log   one line every PROGRESS_INTERVAL seconds (cron, docker logs, Kubernetes)
    off   nothing
    auto  bar when stderr is a terminal, log otherwise

The ETA follows rows done (written, the end of the pipeline) against rows
expected: the rows read so far scaled by the bytes left to read (sizes come from
the listing, so it is real from the first seconds, and exact once everything is
read). Bytes alone were wrong twice: compressed bytes are read well before their
rows are scored and written, so a bytes ETA said 0:00:02 eleven seconds before the
end. Skipped objects count neither bytes nor rows. The same thread publishes the
metrics every PROGRESS_INTERVAL, and samples the run's progress (whatever
PROGRESS is) for the charts of `report --format html`: throughput and
concurrency over the run.
"""

from __future__ import annotations

import io
import logging
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import IO, Any

from library.models import Counts
from library.observability.metrics import RunMetrics
from library.stages.source import CountingReader

log = logging.getLogger("batch_pipeline.progress")

BAR_REFRESH_SECONDS = 0.5
SAMPLE_SECONDS = 1.0  # at most this long between two progress samples
MAX_SAMPLES = 200  # samples kept in the run's summary (thinned evenly beyond that)
BAR_WIDTH = 16
FIXED_COLUMNS_WIDTH = 4 + 12 + BAR_WIDTH + 3 + 1  # percent, ETA, bar, the gaps, a spare


@dataclass
class LiveState:
    """Updated by the reader thread; read by the reporter (plain ints: reads are atomic)."""

    objects_total: int = 0
    bytes_total: int = 0
    objects_finished: int = 0
    bytes_finished: int = 0
    bytes_skipped: int = 0  # objects not read (completed already, or locked)
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

    def skip_object(self, size: int | None) -> None:
        self.bytes_skipped += size or 0
        self.finish_object(size)

    def rows_expected(self) -> int | None:
        """Rows read so far, scaled by the bytes to read: exact once all is read."""
        to_read = self.bytes_total - self.bytes_skipped
        done = self.bytes_read() - self.bytes_skipped
        if to_read <= 0 or done <= 0:
            return None
        if done >= to_read:
            return self.rows_read
        return max(self.rows_read, round(self.rows_read * to_read / done))

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
    rows_done = written.read
    expected = state.rows_expected()
    rate = rows_done / elapsed
    eta = max(expected - rows_done, 0) / rate if expected is not None and rate > 0 else None
    return {
        "objects_done": state.objects_finished,
        "objects_total": state.objects_total,
        "bytes_read": done,
        "bytes_total": state.bytes_total,
        "percent": round(100 * min(rows_done / expected, 1.0), 1) if expected else None,
        "rows_done": rows_done,
        "rows_expected": expected,
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
    percent = f"{s['percent']:.0f}%" if s["percent"] is not None else "?%"
    return (
        f"{percent} of rows done, ETA {_duration(s['eta_seconds'])}; "
        f"{s['objects_done']}/{s['objects_total']} objects, "
        f"{s['bytes_read'] / mb:.1f} of {s['bytes_total'] / mb:.1f} MB, "
        f"{s['rows_read']:,} rows read ({s['rows_per_second']:,} rows/s), "
        f"{s['scored']:,} scored, {s['failed']:,} failed, {s['invalid']:,} invalid"
    )


class ProgressSamples:
    """The run's progress over time: one point per tick, at most `cap` points kept.

    A point is [elapsed seconds, rows read, rows written, concurrency]. When the
    list is full, every other point is dropped and from then on only every
    second tick is kept (the stride doubles), so the points stay evenly spread
    over the whole run however long it is. The last point (the end) is always kept.
    """

    COLUMNS = ("elapsed_s", "rows_read", "rows_written", "concurrency")

    def __init__(self, cap: int = MAX_SAMPLES) -> None:
        self.cap = max(cap, 2)
        self.points: list[list[float | int]] = []
        self.stride = 1
        self._ticks = 0
        self._lock = threading.Lock()

    def add(self, point: list[float | int], final: bool = False) -> None:
        with self._lock:
            if final or self._ticks % self.stride == 0:
                self.points.append(point)
                if len(self.points) > self.cap:
                    last = self.points.pop() if final else None
                    self.points = self.points[::2]
                    if last is not None:
                        self.points.append(last)
                    self.stride *= 2
            self._ticks += 1

    def as_dict(self) -> dict[str, Any]:
        with self._lock:
            return {"columns": list(self.COLUMNS), "points": [list(p) for p in self.points]}


class Reporter(threading.Thread):
    def __init__(
        self,
        mode: str,
        interval: float,
        state: LiveState,
        written: Callable[[], Counts],
        metrics: RunMetrics | None = None,
        on_tick: Callable[[], None] | None = None,
        concurrency: Callable[[], int] | None = None,
    ) -> None:
        super().__init__(name="progress", daemon=True)
        self.mode = resolve_mode(mode)
        self.interval = interval
        self.state = state
        self.written = written
        self.metrics = metrics
        self.on_tick = on_tick
        self.concurrency = concurrency
        self.samples = ProgressSamples()
        self._halt = threading.Event()
        self._bar: Any = None
        self._task: Any = None

    def run(self) -> None:
        if self.mode == "bar":
            self._open_bar()
        every = min(self.interval, SAMPLE_SECONDS)
        tick = BAR_REFRESH_SECONDS if self.mode == "bar" else every
        last_publish = last_log = last_sample = time.monotonic()
        self._sample()
        try:
            while not self._halt.wait(tick):
                now = time.monotonic()
                if now - last_sample >= every - tick / 2:
                    self._sample()
                    last_sample = now
                s = snapshot(self.state, self.written())
                if self.mode == "bar":
                    self._draw(s)
                elif self.mode == "log" and now - last_log >= self.interval - tick / 2:
                    log.info(
                        "Progress: %s", describe(s), extra={"progress": s, "stage": "progress"}
                    )
                    last_log = now
                if now - last_publish >= self.interval - tick / 2:
                    self._publish()
                    last_publish = time.monotonic()
        finally:
            if self._bar is not None:
                self._draw(snapshot(self.state, self.written()))
                self._close_bar()

    def _sample(self, final: bool = False) -> None:
        written = self.written()
        self.samples.add(
            [
                round(time.monotonic() - self.state.started, 2),
                self.state.rows_read,
                written.scored + written.failed + written.invalid,
                self.concurrency() if self.concurrency else 0,
            ],
            final=final,
        )

    def _publish(self) -> None:
        if self.on_tick:
            self.on_tick()
        if self.metrics:
            self.metrics.publish()

    def stop(self) -> None:
        self._halt.set()
        if self.is_alive():
            self.join(timeout=5)
        self._sample(final=True)

    # -- the rich display --------------------------------------------------------

    def _open_bar(self) -> None:
        """Percentage and ETA first, so that they stay when the terminal is narrow (80
        columns): the details after the bar are cut with an ellipsis, never wrapped."""
        from rich.console import Console
        from rich.progress import BarColumn, Progress, TextColumn
        from rich.table import Column

        stream = sys.stderr
        console = Console(file=stream)
        self._bar = Progress(
            TextColumn("{task.fields[percent]}", table_column=Column(min_width=4, no_wrap=True)),
            TextColumn("ETA {task.fields[eta]}", table_column=Column(min_width=12, no_wrap=True)),
            BarColumn(bar_width=BAR_WIDTH),
            TextColumn(
                "{task.fields[detail]}",
                table_column=Column(no_wrap=True, overflow="ellipsis", ratio=1),
            ),
            console=console,
            redirect_stderr=False,
            redirect_stdout=False,
        )
        self._bar.start()
        self._task = self._bar.add_task(
            "run", total=None, detail="starting", percent="  ?%", eta="unknown"
        )
        self._restore_stderr = stream
        sys.stderr = LinesAbove(console, stream)

    def _close_bar(self) -> None:
        sys.stderr = self._restore_stderr
        self._bar.stop()

    def _draw(self, s: dict[str, Any]) -> None:
        detail = (
            f"{s['rows_read']:,} rows · {s['scored']:,} scored · {s['failed']:,} failed · "
            f"{s['invalid']:,} invalid · {s['objects_done']}/{s['objects_total']} objects · "
            f"{s['rows_per_second']:,}/s · "
            f"{s['bytes_read'] / 1048576:.1f}/{s['bytes_total'] / 1048576:.1f} MB"
        )
        # rich shrinks every column when one is too long: cut the details to the room left.
        room = max(self._bar.console.width - FIXED_COLUMNS_WIDTH, 8)
        if len(detail) > room:
            detail = detail[: room - 1] + "…"
        percent = f"{s['percent']:3.0f}%" if s["percent"] is not None else "  ?%"
        self._bar.update(
            self._task,
            completed=s["rows_done"],
            total=s["rows_expected"],
            detail=detail,
            percent=percent,
            eta=_duration(s["eta_seconds"]),
        )


class LinesAbove(io.TextIOBase):
    """Stands in for stderr while the bar is live: each complete line is printed above
    the bar as it is, soft-wrapped by the terminal (rich's own redirect cuts lines at the
    terminal's width, so a long log line became several)."""

    def __init__(self, console: Any, stream: IO[str]) -> None:
        super().__init__()
        self._console = console
        self._stream = stream
        self._partial = ""

    @property
    def rich_proxied_file(self) -> IO[str]:
        return self._stream

    def write(self, text: str) -> int:
        from rich.text import Text

        *lines, self._partial = (self._partial + text).split("\n")
        if lines:
            self._console.print(
                Text("\n".join(lines)), soft_wrap=True, highlight=False, markup=False
            )
        return len(text)

    def flush(self) -> None:
        self._stream.flush()

    def isatty(self) -> bool:
        return self._stream.isatty()

    def fileno(self) -> int:
        return self._stream.fileno()


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
