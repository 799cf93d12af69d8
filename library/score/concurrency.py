"""How many requests may be in flight, and when: adaptive concurrency, pauses, rate.

`Limiter.slot()` wraps every HTTP attempt. Three rules decide when it opens:

* **Concurrency.** In `adaptive` mode the limit follows the service with AIMD,
  as Netflix's concurrency-limits (AIMDLimit) and Envoy's adaptive concurrency
  filter do: each success adds 1/limit (one more slot per "round" of requests);
  a 429, a 503, a timeout, or a sustained latency well above the baseline (the
  median of the last 10 answers over 2.5 times the median of the last 200: on a
  shared machine single slow answers are noise, not a signal) cuts the limit by
  a factor, at most once per round so that a
  burst of rejections of requests sent together counts as one signal. After a
  cut the limit holds for a few rounds before probing upward again, so that the
  retries of the rejected requests land below the service's capacity; each
  probe that fails again at the same level doubles the hold (as TCP backs off),
  so a limit that has found the capacity rarely pays for probing. The limit
  stays between 1 and API_MAX_WORKERS (the ceiling). In `fixed` mode the
  limit is always the ceiling.
* **Pauses.** A `Retry-After` pauses every worker, not only the one that got it.
* **Rate.** With API_RATE_LIMIT, request starts are spaced at least 1/rate apart.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from enum import Enum

INITIAL_ADAPTIVE_LIMIT = 4
DECREASE_FACTOR = 0.7  # multiplicative decrease on a rejection
LATENCY_DECREASE_FACTOR = 0.9  # gentler, on slow answers
LATENCY_TOLERANCE = 2.5  # "well above the baseline": the recent median this many times the typical
LATENCY_FLOOR = 0.005  # seconds: below this, latency noise is not a signal
BASELINE_WINDOW = 200  # answers the typical latency is the median of
RECENT_WINDOW = 10  # answers the recent latency is the median of
MIN_BASELINE_SAMPLES = 50
TYPICAL_REFRESH = 20  # answers between two computations of the typical latency
HOLD_ROUNDS = 5  # after a decrease, rounds of successes before probing upward again
MAX_HOLD_DOUBLINGS = 5  # failed probes in a row double the hold, up to 2^5 times


class Outcome(Enum):
    SUCCESS = "success"  # answered in time, as expected
    OVERLOAD = "overload"  # 429, 503, a timeout: the service wants less
    NEUTRAL = "neutral"  # anything else: no signal about capacity


@dataclass
class LimiterStats:
    limit: float
    peak_limit: float
    in_flight: int
    decreases: int
    paused_seconds: float
    limit_seconds: float  # integral of the limit over time, for the average
    elapsed: float

    @property
    def average_limit(self) -> float:
        return self.limit_seconds / self.elapsed if self.elapsed > 0 else self.limit


class Limiter:
    def __init__(
        self,
        ceiling: int,
        adaptive: bool,
        rate: float | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.ceiling = ceiling
        self.adaptive = adaptive
        self._clock = clock
        self._limit = float(min(INITIAL_ADAPTIVE_LIMIT, ceiling) if adaptive else ceiling)
        self._peak = self._limit
        self._in_flight = 0
        self._cond = threading.Condition()
        self._pause_until = 0.0
        self._paused_total = 0.0
        self._interval = 1.0 / rate if rate else 0.0
        self._next_start = 0.0
        self._latencies: deque[float] = deque(maxlen=BASELINE_WINDOW)
        self._recent: deque[float] = deque(maxlen=RECENT_WINDOW)
        self._typical: float | None = None  # median of _latencies, refreshed every 20 answers
        self._answers = 0  # successes seen, to refresh _typical every TYPICAL_REFRESH of them
        self._last_decrease_at = float("-inf")
        self._decreases = 0
        self._hold = 0  # successes to wait before the next increase
        self._failed_probes = 0
        self._level_after_decrease = float("-inf")
        self._started = clock()
        self._limit_since = self._started
        self._limit_seconds = 0.0

    # -- entering and leaving --------------------------------------------------

    @contextmanager
    def slot(self) -> Iterator[Callable[[Outcome, float], None]]:
        """Wait for a slot; the caller reports how the attempt went, then leaves."""
        began = self._enter()
        reported = False

        def report(outcome: Outcome, latency: float) -> None:
            nonlocal reported
            reported = True
            self._leave(outcome, latency, began)

        try:
            yield report
        finally:
            if not reported:
                self._leave(Outcome.NEUTRAL, 0.0, began)

    def _enter(self) -> float:
        with self._cond:
            while True:
                now = self._clock()
                if now < self._pause_until:
                    self._cond.wait(self._pause_until - now)
                    continue
                if self._in_flight >= max(1, int(self._limit)):
                    self._cond.wait(0.5)
                    continue
                if self._interval:
                    if now < self._next_start:
                        self._cond.wait(self._next_start - now)
                        continue
                    self._next_start = max(now, self._next_start) + self._interval
                self._in_flight += 1
                return now

    def _leave(self, outcome: Outcome, latency: float, began: float) -> None:
        with self._cond:
            self._in_flight -= 1
            if self.adaptive:
                self._adapt(outcome, latency, began)
            self._cond.notify_all()

    # -- AIMD ------------------------------------------------------------------

    def _set_limit(self, value: float) -> None:
        now = self._clock()
        self._limit_seconds += self._limit * (now - self._limit_since)
        self._limit_since = now
        self._limit = min(float(self.ceiling), max(1.0, value))
        self._peak = max(self._peak, self._limit)

    def _adapt(self, outcome: Outcome, latency: float, began: float) -> None:
        # Requests sent before the last decrease report on the old limit: one signal per round.
        fresh = began > self._last_decrease_at
        if outcome is Outcome.OVERLOAD:
            if fresh:
                self._decrease(DECREASE_FACTOR)
            return
        if outcome is not Outcome.SUCCESS:
            return
        self._latencies.append(latency)
        self._recent.append(latency)
        self._answers += 1
        # Counted apart from the window: once the window is full its length is always a
        # multiple of 20, and the median of 200 was sorted again at every answer.
        if self._answers % TYPICAL_REFRESH == 0 and len(self._latencies) >= MIN_BASELINE_SAMPLES:
            self._typical = _median(self._latencies)
        typical = self._typical
        if typical is not None and fresh and len(self._recent) == RECENT_WINDOW:
            recent = _median(self._recent)
            if recent > max(typical * LATENCY_TOLERANCE, typical + LATENCY_FLOOR):
                self._decrease(LATENCY_DECREASE_FACTOR)
                self._recent.clear()  # judge the new limit on its own answers
                return
        if self._hold > 0:
            self._hold -= 1
            return
        self._set_limit(self._limit + 1.0 / self._limit)

    def _decrease(self, factor: float) -> None:
        # A cut that comes before the limit grew a whole slot past the last one is a failed probe.
        if self._limit < self._level_after_decrease + 1.5:
            self._failed_probes = min(self._failed_probes + 1, MAX_HOLD_DOUBLINGS)
        else:
            self._failed_probes = 0
        self._set_limit(self._limit * factor)
        self._level_after_decrease = self._limit
        self._last_decrease_at = self._clock()
        self._decreases += 1
        self._hold = int(HOLD_ROUNDS * self._limit * 2**self._failed_probes)

    # -- pauses ----------------------------------------------------------------

    def pause(self, seconds: float) -> None:
        """Hold every request back for `seconds` (a Retry-After applies to all workers)."""
        if seconds <= 0:
            return
        with self._cond:
            now = self._clock()
            until = now + seconds
            if until > self._pause_until:
                self._paused_total += until - max(now, self._pause_until)
                self._pause_until = until
            self._cond.notify_all()

    # -- reading ---------------------------------------------------------------

    def baseline_latency(self) -> float | None:
        """The typical answer time: the service's own time scale."""
        with self._cond:
            if self._typical is not None:
                return self._typical
            return _median(self._latencies) if self._latencies else None

    @property
    def limit(self) -> int:
        return max(1, int(self._limit))

    def stats(self) -> LimiterStats:
        with self._cond:
            now = self._clock()
            seconds = self._limit_seconds + self._limit * (now - self._limit_since)
            return LimiterStats(
                limit=self._limit,
                peak_limit=self._peak,
                in_flight=self._in_flight,
                decreases=self._decreases,
                paused_seconds=self._paused_total,
                limit_seconds=seconds,
                elapsed=now - self._started,
            )


def _median(values: deque[float]) -> float:
    ordered = sorted(values)
    return ordered[len(ordered) // 2]
