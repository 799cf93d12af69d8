"""Run groups: N workers share one night's objects, with the same exactly-once guarantees.

Workers started with the same RUN_GROUP (on Kubernetes, the Job's controller-uid:
a new nightly Job is a new group, a retried pod stays in its group):

* share one listing of the source: the first worker to arrive lists it and
  stores it in `run_group_objects`; the others read it, so every worker works on
  the same objects even if the prefix changes meanwhile;
* claim objects one at a time through the ledger's locks and fences: a worker
  keeps claiming until every object of the listing is finished for the group,
  revisiting objects it found held by another worker and taking over an object
  whose holder died (its lock released, status still processing) from its
  checkpoint. Workers start at different points of the listing (by
  JOB_COMPLETION_INDEX) so they do not all contend for the first key;
* stop together: a crossed threshold or a configuration error in one worker
  stops the group from claiming more (a retried pod must not let bad input in).

All of it lives in the database: a worker holds nothing the others need.
Without RUN_GROUP a run is a group of one: one pass over its own listing, and
an object held by another run is skipped (today's behaviour).
"""

from __future__ import annotations

import logging
import socket
import threading
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import orjson
import psycopg

from library.errors import (
    EXIT_COMPLETED,
    EXIT_COMPLETED_WITH_ERRORS,
    EXIT_FAILED,
    EXIT_SIGINT,
    EXIT_SIGTERM,
    EXIT_THRESHOLD,
    EXIT_USAGE,
    PipelineError,
)
from library.models import SourceObject
from library.state.ledger import Claim, Ledger

log = logging.getLogger(__name__)

CLAIM_POLL_SECONDS = 0.5  # between two passes when every object left is held by others
# Errors that stop the whole group: bad configuration, a crossed threshold.
GROUP_STOPPING_EXIT_CODES = frozenset({EXIT_USAGE, EXIT_THRESHOLD})
# The group's exit code is its workers' worst, in this order.
EXIT_SEVERITY = (
    EXIT_USAGE,
    EXIT_THRESHOLD,
    EXIT_FAILED,
    EXIT_SIGTERM,
    EXIT_SIGINT,
    EXIT_COMPLETED_WITH_ERRORS,
    EXIT_COMPLETED,
)


# (finished, listed) objects of a group: finished is completed, or failed by the group.
OBJECTS_FINISHED = """
SELECT count(*) FILTER (WHERE s.status = 'completed'
                        OR (s.status = 'failed' AND p.run_group = g.run_group)),
       count(*)
FROM run_group_objects g
LEFT JOIN source_objects s USING (source_uri, source_version)
LEFT JOIN pipeline_runs p ON p.run_id = s.run_id
WHERE g.run_group = %(group)s"""


class GroupStopped(PipelineError):
    """Another worker of the group stopped it; this worker claims nothing more."""

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code


def group_exit_code(codes: list[int]) -> int:
    """The worst of the workers' exit codes (EXIT_SEVERITY); 0 for no worker."""
    for code in EXIT_SEVERITY:
        if code in codes:
            return code
    return max(codes, default=EXIT_COMPLETED)


@dataclass
class Stop:
    run_id: str
    reason: str
    exit_code: int


class RunGroup:
    """One worker's view of its run group, on the ledger's connection."""

    def __init__(self, ledger: Ledger, name: str | None, index: int | None) -> None:
        self.ledger = ledger
        self.name = name
        # Where this worker starts in the listing. docker compose --scale sets no index:
        # the host name (the container's id) spreads the replicas instead.
        self.index = index if index is not None else zlib.crc32(socket.gethostname().encode())

    @property
    def alone(self) -> bool:
        return self.name is None

    # -- the shared listing ---------------------------------------------------------

    def listing(
        self, source_uri: str, list_source: Callable[[], list[SourceObject]], limit: int | None
    ) -> list[SourceObject]:
        """The objects of the group: listed by the first worker, read by the others."""
        if self.name is None:
            objects = list_source()
            return objects[:limit] if limit is not None else objects
        name = self.name

        def shared(conn: psycopg.Connection[Any]) -> list[SourceObject]:
            with conn.transaction():
                conn.execute(
                    "SELECT pg_advisory_xact_lock(hashtextextended(%s, 0))",
                    (f"batch-pipeline:group:{name}",),
                )
                known = conn.execute(
                    "SELECT 1 FROM run_groups WHERE run_group = %s", (name,)
                ).fetchone()
                if known:
                    rows = conn.execute(
                        """SELECT source_uri, source_version, size_bytes, position
                           FROM run_group_objects WHERE run_group = %s ORDER BY position""",
                        (name,),
                    ).fetchall()
                    log.info("Joined run group %s: %d object(s) listed", name, len(rows))
                    return [SourceObject(u, v, s, i) for u, v, s, i in rows]
                objects = list_source()
                if limit is not None:
                    objects = objects[:limit]
                conn.execute(
                    """INSERT INTO run_groups (run_group, source_uri, objects_total)
                       VALUES (%s, %s, %s)""",
                    (name, source_uri, len(objects)),
                )
                listed = [
                    {"p": i, "u": o.uri, "v": o.version, "s": o.size} for i, o in enumerate(objects)
                ]
                conn.execute(
                    """INSERT INTO run_group_objects
                           (run_group, position, source_uri, source_version, size_bytes)
                       SELECT %s, o.p, o.u, o.v, o.s FROM jsonb_to_recordset(%s::jsonb)
                           AS o(p integer, u text, v text, s bigint)""",
                    (name, orjson.dumps(listed).decode()),
                )
                log.info("Started run group %s: %d object(s) listed", name, len(objects))
                return objects

        return self.ledger.db.run("sharing the listing of the run group", shared)

    # -- stopping together ------------------------------------------------------------

    def stopped(self) -> Stop | None:
        if self.name is None:
            return None
        row = self.ledger.db.run(
            "reading the run group",
            lambda conn: conn.execute(
                """SELECT stopped_by, stop_reason, stop_exit_code FROM run_groups
                   WHERE run_group = %s AND stopped_by IS NOT NULL""",
                (self.name,),
            ).fetchone(),
        )
        return Stop(row[0], row[1], row[2]) if row else None

    def stop(self, run_id: str, error: PipelineError) -> None:
        """Record that this worker stops the group (the first stop is the one kept)."""
        if self.name is None or error.exit_code not in GROUP_STOPPING_EXIT_CODES:
            return
        self.ledger.db.run(
            "stopping the run group",
            lambda conn: conn.execute(
                """UPDATE run_groups SET stopped_by = %s, stop_reason = %s, stop_exit_code = %s
                   WHERE run_group = %s AND stopped_by IS NULL""",
                (run_id, str(error), error.exit_code, self.name),
            ),
        )
        log.error("Run group %s stopped: no worker claims anything more", self.name)

    def raise_if_stopped(self) -> None:
        stop = self.stopped()
        if stop is not None:
            raise GroupStopped(
                f"run group {self.name} was stopped by run {stop.run_id}: {stop.reason}",
                stop.exit_code,
            )

    # -- claiming -----------------------------------------------------------------------

    def claims(
        self,
        objects: list[SourceObject],
        run_id: str,
        reprocess: bool,
        stopping: threading.Event,
    ) -> Iterator[tuple[SourceObject, Claim]]:
        """Claim the objects one at a time, yielding each one this worker should handle.

        A group of one makes one pass and yields every claim (skips included). A group
        yields only what this worker holds, or skips because an earlier night did,
        and passes again over what others held until nothing is left; it stops when
        the group is stopped (GroupStopped) or `stopping` is set."""
        if self.name is None:
            for obj in objects:
                if stopping.is_set():
                    return
                yield obj, self.ledger.claim(run_id, obj, reprocess)
            return
        start = self.index % len(objects) if objects else 0
        pending = objects[start:] + objects[:start]
        while pending:
            held_elsewhere: list[SourceObject] = []
            claimed_any = False
            for obj in pending:
                if stopping.is_set():
                    return
                self.raise_if_stopped()
                claim = self.ledger.claim(run_id, obj, reprocess, self.name)
                if claim.status == "locked":
                    held_elsewhere.append(obj)
                    continue
                if claim.status == "finished":
                    continue  # another worker of the group read it
                claimed_any = True
                yield obj, claim
            pending = held_elsewhere
            if pending and not claimed_any:
                log.debug(
                    "%d object(s) held by other workers: looking again in %.0fs",
                    len(pending),
                    CLAIM_POLL_SECONDS,
                )
                if stopping.wait(CLAIM_POLL_SECONDS):
                    return

    # -- the end ------------------------------------------------------------------------

    def close_if_done(self, run_id: str) -> tuple[bool, int] | None:
        """After this worker's run is recorded: if every object of the listing is
        finished and no other worker is still processing, mark the group finished.
        Returns (finished now, the group's exit code), or None for a group of one."""
        if self.name is None:
            return None
        name = self.name
        # A worker killed mid-run is still `processing`: call it abandoned first (after its
        # grace), or the group would wait for it forever.
        self.ledger.settle_abandoned()

        def close(conn: psycopg.Connection[Any]) -> tuple[bool, int]:
            with conn.transaction():
                conn.execute(
                    "SELECT pg_advisory_xact_lock(hashtextextended(%s, 0))",
                    (f"batch-pipeline:group:{name}",),
                )
                counted = conn.execute(OBJECTS_FINISHED, {"group": name}).fetchone()
                runs = conn.execute(
                    """SELECT status, (summary->>'exit_code')::int FROM pipeline_runs
                       WHERE run_group = %s""",
                    (name,),
                ).fetchall()
                code = group_exit_code([c for s, c in runs if c is not None])
                busy = any(s == "processing" for s, _c in runs)
                stopped = conn.execute(
                    "SELECT stopped_by IS NOT NULL FROM run_groups WHERE run_group = %s", (name,)
                ).fetchone()
                all_finished = counted is not None and counted[0] == counted[1]
                done = all_finished or bool(stopped and stopped[0])
                if not done or busy:
                    return False, code
                closed = conn.execute(
                    """UPDATE run_groups SET finished_at = now()
                       WHERE run_group = %s AND finished_at IS NULL RETURNING 1""",
                    (name,),
                ).fetchone()
                return closed is not None, code

        finished, code = self.ledger.db.run("closing the run group", close)
        if finished:
            log.info("Run group %s is finished: exit code %d for the group", name, code)
        return finished, code
