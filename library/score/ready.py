"""Waiting for a model server that is still starting, before a run scores anything.

`mlflow models serve ... &` followed at once by a run used to fail 0.2 s later
with "connection refused": the server needs seconds to load its model (MLflow
6-9 s, MLServer 2-3 s on the development machine). A run now polls the health
endpoint with a growing delay until it answers 2xx or API_WAIT_READY seconds
have passed, then fails with the client's own error ("cannot reach the ML API
at ...: connection refused") saying how long it waited. An interrupt stops the
wait at once.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from library.errors import ApiUnavailableError, PipelineError

log = logging.getLogger(__name__)

FIRST_DELAY_SECONDS = 0.25
LONGEST_DELAY_SECONDS = 5.0


def wait_until_ready(
    check_ready: Callable[[], None],
    wait_seconds: float,
    stop: threading.Event | None = None,
    stop_error: Callable[[], PipelineError | None] | None = None,
    clock: Callable[[], float] = time.monotonic,
) -> float:
    """Call `check_ready` (it raises ApiUnavailableError while the service is not ready)
    until it passes or `wait_seconds` have passed; return the seconds waited.

    The last error is raised at the deadline, with the wait named; `stop` (set by a
    signal) ends the wait at once with `stop_error()`, the run's own stop reason."""
    started = clock()
    deadline = started + wait_seconds
    delay = FIRST_DELAY_SECONDS
    announced = False
    while True:
        try:
            check_ready()
        except ApiUnavailableError as exc:
            left = deadline - clock()
            if left <= 0:
                if wait_seconds <= 0:
                    raise
                raise ApiUnavailableError(
                    f"{exc} (waited {clock() - started:.0f}s: API_WAIT_READY={wait_seconds:g})"
                ) from None
            if not announced:
                log.info(
                    "The ML API is not ready yet (%s); waiting up to %gs for it (API_WAIT_READY)",
                    exc,
                    wait_seconds,
                )
                announced = True
            pause = min(delay, left)
            if stop is not None and stop.wait(pause):
                error = stop_error() if stop_error else None
                raise error or ApiUnavailableError(str(exc)) from None
            if stop is None:
                time.sleep(pause)
            delay = min(delay * 2, LONGEST_DELAY_SECONDS)
            continue
        waited = clock() - started
        if announced:
            log.info("The ML API is ready after %.1fs", waited)
        return waited
