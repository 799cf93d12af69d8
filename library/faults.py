"""Failpoints: named places where a fault-injection test can make the job die.

`BATCH_PIPELINE_FAILPOINTS="flush_before_commit:3"` makes the process SIGKILL
itself the third time it reaches `failpoint("flush_before_commit")`: exactly
what a power loss or an OOM kill at that point would do, but repeatable.
Several points are separated by commas. Unset (always, in production), a
failpoint is one dictionary lookup, and none sits on a per-row path.

The points: before_flush, flush_before_commit (inside the flush's transaction,
after every statement), after_flush, after_object (an object completed, the
next not yet claimed).
"""

from __future__ import annotations

import os
import signal
import threading

ENV_VAR = "BATCH_PIPELINE_FAILPOINTS"


def _parse(spec: str) -> dict[str, int]:
    points: dict[str, int] = {}
    for item in spec.split(","):
        name, _, nth = item.strip().partition(":")
        if name:
            points[name] = int(nth or 1)
    return points


_armed = _parse(os.environ.get(ENV_VAR, ""))
_reached: dict[str, int] = {}
_lock = threading.Lock()


def failpoint(name: str) -> None:
    if not _armed or name not in _armed:
        return
    with _lock:
        _reached[name] = _reached.get(name, 0) + 1
        if _reached[name] == _armed[name]:
            os.kill(os.getpid(), signal.SIGKILL)
