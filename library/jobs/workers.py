"""`batch-pipeline run --workers N`: a run group of N worker processes on one machine.

The same thing Kubernetes does with an Indexed Job, for one machine with many
cores: N copies of the same `run` command, each with the group's RUN_GROUP and
its own JOB_COMPLETION_INDEX, sharing the work through the database (see
`library.state.group`). The parent only starts them, passes signals on (SIGTERM and
SIGINT reach every worker, which flush and stop), waits, and exits with the
group's code: the worst of the workers' codes.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
from collections.abc import Mapping, Sequence
from datetime import datetime
from types import FrameType

from library.errors import EXIT_FAILED
from library.state.group import group_exit_code

log = logging.getLogger(__name__)


def new_group_name(now: datetime | None = None) -> str:
    return f"local-{(now or datetime.now()):%Y%m%d-%H%M%S}-{os.getpid()}"


def without_workers_flag(argv: Sequence[str]) -> list[str]:
    """The command line minus `--workers N` / `--workers=N`, for the workers themselves."""
    out: list[str] = []
    skip = False
    for arg in argv:
        if skip:
            skip = False
            continue
        if arg == "--workers":
            skip = True
            continue
        if arg.startswith("--workers="):
            continue
        out.append(arg)
    return out


def run_workers(count: int, argv: Sequence[str], environ: Mapping[str, str]) -> int:
    """Start `count` workers of `batch-pipeline <argv>` in one run group; their worst code."""
    group = environ.get("RUN_GROUP") or new_group_name()
    log.info("Starting %d workers in run group %s", count, group)
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "pipeline.batch.main", *argv],
            env={**environ, "RUN_GROUP": group, "JOB_COMPLETION_INDEX": str(index)},
        )
        for index in range(count)
    ]

    def forward(signum: int, _frame: FrameType | None) -> None:
        for proc in procs:
            if proc.poll() is None:
                proc.send_signal(signum)

    previous = {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        codes = [proc.wait() for proc in procs]
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    # A worker killed by a signal (OOM, SIGKILL) has a negative code: a failure.
    codes = [c if c >= 0 else EXIT_FAILED for c in codes]
    code = group_exit_code(codes)
    log.info(
        "Run group %s: worker exit codes %s; exit code %d for the group (see `batch-pipeline "
        "status --group %s`)",
        group,
        codes,
        code,
        group,
    )
    return code
