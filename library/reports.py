"""`status` and `report`: what a run did, read back from the ledger.

`status` shows a run (or the latest): status, counts, duration, throughput,
objects done and left. `report` writes a run's full summary as JSON, Markdown
or CSV: per-object counts, invalid reasons grouped with examples, failures
grouped by reason, and timings.
"""

from __future__ import annotations

import csv
import io
from datetime import datetime
from typing import Any

import orjson
import psycopg

from library.errors import PipelineError

EXAMPLES_PER_GROUP = 3


class RunNotFound(PipelineError):
    pass


def _one(conn: psycopg.Connection[Any], sql: str, params: Any) -> dict[str, Any] | None:
    cur = conn.execute(sql, params)
    row = cur.fetchone()
    if row is None:
        return None
    return {d.name: v for d, v in zip(cur.description or [], row, strict=True)}


def _all(conn: psycopg.Connection[Any], sql: str, params: Any) -> list[dict[str, Any]]:
    cur = conn.execute(sql, params)
    names = [d.name for d in cur.description or []]
    return [dict(zip(names, row, strict=True)) for row in cur.fetchall()]


def run_status(conn: psycopg.Connection[Any], run_id: str | None = None) -> dict[str, Any]:
    """One row of the run_progress view: the run, or the latest one."""
    if run_id:
        row = _one(conn, "SELECT * FROM run_progress WHERE run_id = %s", (run_id,))
    else:
        row = _one(
            conn, "SELECT * FROM run_progress ORDER BY started_at DESC, run_id DESC LIMIT 1", ()
        )
    if row is None:
        raise RunNotFound(f"no run {run_id}" if run_id else "no run recorded yet")
    row["duration_seconds"] = round(row.pop("duration").total_seconds(), 3)
    row["rows_per_second"] = int(row["rows_per_second"] or 0)
    return row


def run_report(conn: psycopg.Connection[Any], run_id: str) -> dict[str, Any]:
    status = run_status(conn, run_id)
    summary = _one(conn, "SELECT summary FROM pipeline_runs WHERE run_id = %s", (run_id,))
    objects = _all(
        conn,
        """SELECT source_uri, source_version, status, rows_read, rows_valid, rows_invalid,
                  rows_scored, rows_failed
           FROM run_objects WHERE run_id = %s ORDER BY source_uri""",
        (run_id,),
    )
    invalid = _all(
        conn,
        """SELECT r->>'column' AS column_name, r->>'message' AS reason, COUNT(*) AS rows,
                  (array_agg(jsonb_build_object('source_uri', i.source_uri,
                      'line_number', i.line_number, 'raw_text', i.raw_text)
                      ORDER BY i.source_uri, i.line_number))[1:%s] AS examples
           FROM invalid_rows i, jsonb_array_elements(i.reasons) r
           WHERE i.run_id = %s
           GROUP BY 1, 2 ORDER BY 3 DESC, 1, 2""",
        (EXAMPLES_PER_GROUP, run_id),
    )
    failures = _all(
        conn,
        """SELECT reason, http_status, COUNT(*) AS transactions,
                  COUNT(*) FILTER (WHERE resolved_at IS NOT NULL) AS resolved_since,
                  (array_agg(transaction_id ORDER BY transaction_id))[1:%s] AS examples
           FROM failed_transactions WHERE run_id = %s
           GROUP BY 1, 2 ORDER BY 3 DESC, 1""",
        (EXAMPLES_PER_GROUP, run_id),
    )
    stored = (summary or {}).get("summary") or {}
    timings = {
        "started_at": status["started_at"],
        "finished_at": status["finished_at"],
        "duration_seconds": status["duration_seconds"],
        "rows_per_second": status["rows_per_second"],
        "flushes": stored.get("flushes"),
        "flush_seconds": stored.get("flush_seconds"),
        "api_requests": stored.get("api_requests"),
        "api_retries": stored.get("api_retries"),
    }
    return {
        "run": status,
        "objects": objects,
        "invalid_reasons": invalid,
        "failures": failures,
        "timings": timings,
    }


# -- rendering -------------------------------------------------------------------


def _text(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, datetime):
        return value.isoformat(timespec="seconds")
    return str(value)


def render_status(status: dict[str, Any]) -> str:
    s = status
    lines = [
        f"run_id:      {s['run_id']}",
        f"status:      {s['status']}",
        f"source:      {_text(s['source_uri'])}",
        f"started:     {_text(s['started_at'])}",
        f"finished:    {_text(s['finished_at']) or '(still running)'}",
        f"duration:    {s['duration_seconds']:.1f}s",
        f"rows:        {s['rows_read']} read, {s['rows_valid']} valid, {s['rows_invalid']} invalid, "
        f"{s['rows_scored']} scored, {s['rows_failed']} failed",
        f"throughput:  {s['rows_per_second']} rows/s",
        f"objects:     {s['objects_total']} total: {s['objects_done']} done, {s['objects_failed']} failed, "
        f"{s['objects_skipped']} skipped, {s['objects_left']} left",
    ]
    if s.get("model_version"):
        lines.append(f"model:       {s['model_version']}")
    if s.get("error"):
        lines.append(f"error:       {s['error']}")
    return "\n".join(lines)


def render_json(report: dict[str, Any]) -> str:
    return orjson.dumps(report, default=str, option=orjson.OPT_INDENT_2).decode()


def _md_table(headers: list[str], rows: list[list[Any]]) -> list[str]:
    def cell(v: Any) -> str:
        return _text(v).replace("|", "\\|").replace("\n", "\\n")

    out = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    out.extend("| " + " | ".join(cell(v) for v in r) + " |" for r in rows)
    return out


def render_markdown(report: dict[str, Any]) -> str:
    run = report["run"]
    lines = [f"# Run {run['run_id']}", "", render_status(run).replace("\n", "  \n"), ""]
    lines += ["## Objects", ""]
    lines += _md_table(
        ["object", "version", "status", "read", "valid", "invalid", "scored", "failed"],
        [
            [
                o["source_uri"],
                o["source_version"],
                o["status"],
                o["rows_read"],
                o["rows_valid"],
                o["rows_invalid"],
                o["rows_scored"],
                o["rows_failed"],
            ]
            for o in report["objects"]
        ],
    )
    lines += ["", "## Invalid rows by reason", ""]
    lines += _md_table(
        ["column", "reason", "rows", "examples"],
        [
            [
                g["column_name"],
                g["reason"],
                g["rows"],
                "; ".join(
                    f"{e['source_uri']}:{e['line_number']} `{e['raw_text'][:80]}`"
                    for e in g["examples"]
                ),
            ]
            for g in report["invalid_reasons"]
        ],
    )
    lines += ["", "## Failures by reason", ""]
    lines += _md_table(
        ["reason", "HTTP status", "transactions", "resolved since", "examples"],
        [
            [
                f["reason"],
                f["http_status"],
                f["transactions"],
                f["resolved_since"],
                ", ".join(f["examples"]),
            ]
            for f in report["failures"]
        ],
    )
    lines += ["", "## Timings", ""]
    lines += _md_table(["measure", "value"], [[k, v] for k, v in report["timings"].items()])
    return "\n".join(lines) + "\n"


def render_csv(report: dict[str, Any]) -> str:
    """One flat table: section, name, detail, count."""
    out = io.StringIO()
    w = csv.writer(out, lineterminator="\n")
    w.writerow(["section", "name", "detail", "count"])
    run = report["run"]
    for key in ("rows_read", "rows_valid", "rows_invalid", "rows_scored", "rows_failed"):
        w.writerow(["run", key, run["status"], run[key]])
    for o in report["objects"]:
        for key in ("rows_read", "rows_valid", "rows_invalid", "rows_scored", "rows_failed"):
            w.writerow(["object", o["source_uri"], key, o[key]])
    for g in report["invalid_reasons"]:
        example = g["examples"][0] if g["examples"] else {}
        detail = f"{g['reason']} (e.g. {example.get('source_uri')}:{example.get('line_number')})"
        w.writerow(["invalid_reason", g["column_name"], detail, g["rows"]])
    for f in report["failures"]:
        w.writerow(
            ["failure_reason", f["reason"], f"HTTP {_text(f['http_status'])}", f["transactions"]]
        )
    for key, value in report["timings"].items():
        w.writerow(["timing", key, _text(value), ""])
    return out.getvalue()


RENDERERS = {"json": render_json, "markdown": render_markdown, "csv": render_csv}
