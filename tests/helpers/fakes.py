"""Fakes for the scoring client and the sink: the collaborators ScoreAndWrite receives."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Any

import polars as pl

from library.errors import DatabaseError
from library.models import (
    Counts,
    Failure,
    Prediction,
    Predictions,
    ScoreResult,
    SourceObject,
    WorkUnit,
)
from library.score.concurrency import Limiter


class FakeStats:
    requests = 0
    retries = 0


class FakeClient:
    """Scores each id (0.1, model m1) after `delay(ids)` seconds; raises `fail_with`
    for a batch holding `fail_on`; answers `failed_ids` as failures."""

    def __init__(
        self,
        delay: Any = lambda ids: 0.0,
        fail_on: str | None = None,
        fail_with: Exception | None = None,
        failed_ids: frozenset[str] = frozenset(),
    ) -> None:
        self.delay = delay
        self.fail_on = fail_on
        self.fail_with = fail_with
        self.failed_ids = failed_ids  # answered as failures (HTTP 422), not raised
        self.limiter = Limiter(4, False, None, time.monotonic)
        self.stats = FakeStats()
        self.stopped: str | None = None
        self.scored: list[str] = []
        self._lock = threading.Lock()

    def prepare(self, frame: pl.DataFrame) -> pl.DataFrame:
        return frame

    def check_ready(self) -> None:
        pass

    def score(self, batch: pl.DataFrame, requests: pl.DataFrame | None = None) -> ScoreResult:
        ids = batch.get_column("transaction_id").to_list()
        time.sleep(self.delay(ids))
        if self.fail_on in ids and self.fail_with is not None:
            raise self.fail_with
        with self._lock:
            self.scored.extend(ids)
        return ScoreResult(
            predictions=Predictions.of(
                Prediction(i, 0.1, False, "m1") for i in ids if i not in self.failed_ids
            ),
            failures=[Failure(i, "HTTP 422: refused", 422, 1) for i in ids if i in self.failed_ids],
        )

    def stop(self, reason: str) -> None:
        self.stopped = reason

    def close(self) -> None:
        pass


@dataclass
class FakeRunStats:
    counts: Counts = field(default_factory=Counts)
    model_version: str | None = None
    flushes: int = 0
    flush_seconds: float = 0.0
    busy_seconds: float = 0.0


class FakeSink:
    """Records what the writer hands it; `fail_on_add` makes add() raise on that unit;
    `flushes_in_flight` > 0 with `fail_in_flight` makes the next flush raise, as a
    flush sent earlier that failed on the sink's thread."""

    def __init__(self, fail_on_add: int | None = None) -> None:
        self.events: list[tuple[str, Any]] = []
        self.pending: list[WorkUnit] = []
        self.written: list[int] = []  # seqs flushed, in order
        self.run = FakeRunStats()
        self.fail_on_add = fail_on_add
        self.flushes_in_flight = 0
        self.fail_in_flight = False
        self.closed = False

    @staticmethod
    def prepare_copy_lines(frame: pl.DataFrame) -> pl.Series:
        return pl.Series("copy_lines", [""] * frame.height, dtype=pl.String)

    def begin_object(self, obj: SourceObject, checkpoint: int, prior: Any, fence: int) -> None:
        self.events.append(("begin", obj.uri))

    def add(self, unit: WorkUnit, result: ScoreResult) -> None:
        if unit.seq == self.fail_on_add:
            raise DatabaseError("database error while writing a flush: the test says so")
        self.pending.append(unit)
        self.run.counts.add(unit.counts(result))
        self.run.model_version = "m1"

    @property
    def pending_rows(self) -> int:
        return sum(u.rows for u in self.pending)

    def flush(self) -> None:
        if self.flushes_in_flight:
            self.flushes_in_flight = 0
            if self.fail_in_flight:
                raise DatabaseError("database error while writing a flush: sent earlier")
        self.written.extend(u.seq for u in self.pending)
        self.pending.clear()
        self.run.flushes += 1

    def end_object(self, obj: SourceObject, error: str | None = None) -> None:
        self.events.append(("end", obj.uri))

    def forget_object(self, obj: SourceObject) -> None:
        self.events.append(("forget", obj.uri))

    def skip_object(self) -> None:
        self.events.append(("skip", None))

    def close(self) -> None:
        self.closed = True
