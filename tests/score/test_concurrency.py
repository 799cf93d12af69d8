"""The limiter: adaptive concurrency (AIMD), shared pauses, rate limit."""

from __future__ import annotations

import threading
import time

from library.score.concurrency import INITIAL_ADAPTIVE_LIMIT, Limiter, Outcome


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def attempt(limiter: Limiter, outcome: Outcome, latency: float = 0.01) -> None:
    with limiter.slot() as report:
        report(outcome, latency)


def test_fixed_mode_keeps_the_ceiling() -> None:
    limiter = Limiter(8, adaptive=False)
    for _ in range(50):
        attempt(limiter, Outcome.OVERLOAD)
    assert limiter.limit == 8


def test_additive_increase_up_to_the_ceiling() -> None:
    clock = Clock()
    limiter = Limiter(10, adaptive=True, clock=clock)
    assert limiter.limit == INITIAL_ADAPTIVE_LIMIT
    for _ in range(INITIAL_ADAPTIVE_LIMIT + 1):
        clock.now += 0.01
        attempt(limiter, Outcome.SUCCESS)
    assert limiter.limit == INITIAL_ADAPTIVE_LIMIT + 1  # about one more slot per round of successes
    for _ in range(500):
        clock.now += 0.01
        attempt(limiter, Outcome.SUCCESS)
    assert limiter.limit == 10


def test_multiplicative_decrease_once_per_round() -> None:
    clock = Clock()
    limiter = Limiter(20, adaptive=True, clock=clock)
    for _ in range(300):
        clock.now += 0.01
        attempt(limiter, Outcome.SUCCESS)
    assert limiter.limit == 20
    # Ten requests sent together are all rejected: that is one signal, not ten.
    slots = [limiter.slot() for _ in range(10)]
    reports = [s.__enter__() for s in slots]
    clock.now += 0.01
    for report, s in zip(reports, slots, strict=True):
        report(Outcome.OVERLOAD, 0.01)
        s.__exit__(None, None, None)
    assert limiter.limit == 14
    clock.now += 0.01
    attempt(limiter, Outcome.OVERLOAD)  # a fresh request rejected: a new signal
    assert limiter.limit == 9
    for _ in range(20):
        clock.now += 0.01
        attempt(limiter, Outcome.OVERLOAD)
    assert limiter.limit == 1  # never below one
    assert limiter.stats().decreases >= 3


def test_sustained_latency_well_above_the_typical_is_a_signal_a_spike_is_not() -> None:
    clock = Clock()
    limiter = Limiter(20, adaptive=True, clock=clock)
    for i in range(200):
        clock.now += 0.01
        attempt(limiter, Outcome.SUCCESS, latency=0.010 if i % 3 else 0.030)  # noisy but steady
    assert limiter.limit == 20
    clock.now += 0.01
    attempt(limiter, Outcome.SUCCESS, latency=0.500)  # one slow answer: noise
    assert limiter.limit == 20
    for _ in range(10):  # the service slows down for good
        clock.now += 0.01
        attempt(limiter, Outcome.SUCCESS, latency=0.200)
    assert limiter.limit == 18


def test_no_more_requests_in_flight_than_the_limit() -> None:
    limiter = Limiter(3, adaptive=False)
    active = 0
    peak = 0
    lock = threading.Lock()

    def work() -> None:
        nonlocal active, peak
        with limiter.slot() as report:
            with lock:
                active += 1
                peak = max(peak, active)
            time.sleep(0.02)
            with lock:
                active -= 1
            report(Outcome.SUCCESS, 0.02)

    threads = [threading.Thread(target=work) for _ in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert peak == 3


def test_a_pause_holds_every_worker() -> None:
    limiter = Limiter(4, adaptive=False)
    limiter.pause(0.3)
    began = time.monotonic()
    done: list[float] = []
    threads = [
        threading.Thread(
            target=lambda: (attempt(limiter, Outcome.SUCCESS), done.append(time.monotonic()))
        )
        for _ in range(3)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert min(done) - began >= 0.28
    assert limiter.stats().paused_seconds >= 0.29


def test_rate_limit_spaces_request_starts() -> None:
    limiter = Limiter(8, adaptive=False, rate=20.0)
    began = time.monotonic()
    for _ in range(6):
        attempt(limiter, Outcome.SUCCESS)
    assert time.monotonic() - began >= 0.24  # 5 intervals of 50 ms
