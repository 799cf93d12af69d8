"""`batch-pipeline runs`: the recent runs, newest first, from the run_progress view.

One line per run, so that a user can pick the RUN_ID to pass to `status`,
`report` or `retry-failed --run` without writing SQL.
"""

from __future__ import annotations

from typing import Any

import psycopg

RECENT_RUNS = """
SELECT run_id, status, started_at, finished_at,
       round(EXTRACT(EPOCH FROM duration)::numeric, 1)::float AS duration_seconds,
       rows_read, rows_invalid, rows_scored, rows_failed,
       objects_done, objects_skipped, objects_failed, source_uri, error
FROM run_progress
ORDER BY started_at DESC, run_id DESC
LIMIT %s
"""

TEXT_COLUMNS = (
    "run_id",
    "status",
    "started",
    "duration",
    "read",
    "invalid",
    "scored",
    "failed",
    "objects",
    "source",
)


def recent_runs(conn: psycopg.Connection[Any], limit: int) -> list[dict[str, Any]]:
    cur = conn.execute(RECENT_RUNS, (limit,))
    names = [d.name for d in cur.description or []]
    return [dict(zip(names, row, strict=True)) for row in cur.fetchall()]


def text_rows(runs: list[dict[str, Any]]) -> list[tuple[Any, ...]]:
    """The runs as the rows of `TEXT_COLUMNS`: what fits a terminal line."""
    out = []
    for r in runs:
        objects = f"{r['objects_done']} done"
        if r["objects_skipped"]:
            objects += f", {r['objects_skipped']} skipped"
        if r["objects_failed"]:
            objects += f", {r['objects_failed']} failed"
        out.append(
            (
                r["run_id"],
                r["status"],
                r["started_at"].strftime("%Y-%m-%d %H:%M:%S") if r["started_at"] else "",
                f"{r['duration_seconds']:.1f}s",
                r["rows_read"],
                r["rows_invalid"],
                r["rows_scored"],
                r["rows_failed"],
                objects,
                r["source_uri"] or "",
            )
        )
    return out
