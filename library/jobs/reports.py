"""`status` and `report`: what a run did, read back from the ledger.

`status` shows a run (or the latest): status, counts, duration, throughput,
objects done and left. `report` writes a run's (default: the latest) full
summary as JSON, Markdown, CSV or a self-contained HTML page of charts
(`report_html.py`): per-object counts, invalid reasons grouped with examples,
failures grouped by reason, the score distribution, timings, progress over the
run, and the trend of the last runs.

Every value that comes from input (object names, raw rows, model error bodies)
is untrusted: each format escapes it its own way, so that a file named
`<img src=x onerror=alert(1)>.csv` stays text. Markdown: control characters
become their visible pictures (a CR or LF cannot break a table row), `<`, `>`
and `&` become entities, and the Markdown specials are backslash-escaped; no
untrusted value goes in a code span. CSV: a cell never starts with a formula
character. HTML: `html.escape`, and a Content-Security-Policy that forbids any
script or network load.
"""

from __future__ import annotations

import csv
import io
import re
from datetime import datetime
from typing import Any

import orjson
import psycopg

from library.errors import PipelineError
from library.jobs.report_html import ROW_COUNTS, render_html

EXAMPLES_PER_GROUP = 3
SCORE_BUCKETS = 20  # the score histogram's bins over [0, 1]
TREND_RUNS = 20  # runs in the trend: this one and those before it
RAW_TEXT_SHOWN = 80  # characters of an invalid row's raw text in the Markdown report
REASON_SHOWN = 200  # characters of a reason (a model's error body) in the Markdown report


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


def run_report(conn: psycopg.Connection[Any], run_id: str | None = None) -> dict[str, Any]:
    """Everything a report shows about a run (default: the latest), from the database."""
    status = run_status(conn, run_id)
    run_id = status["run_id"]
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
        "scores": score_distribution(conn, run_id),
        "stage_times": stored.get("stage_times"),
        "concurrency": stored.get("concurrency"),
        "progress": stored.get("progress"),
        "trend": trend(conn, status),
    }


def score_distribution(conn: psycopg.Connection[Any], run_id: str) -> dict[str, Any]:
    """The histogram of the fraud scores this run wrote, and the share predicted fraud.

    Counts the predictions whose `run_id` is this run: those it wrote last (a
    later run that scores the same transactions again takes them over).
    """
    rows = _all(
        conn,
        """SELECT LEAST(width_bucket(fraud_score, 0, 1, %s), %s) AS bucket,
                  COUNT(*) AS predictions, COUNT(*) FILTER (WHERE prediction) AS predicted_fraud
           FROM predictions WHERE run_id = %s GROUP BY 1 ORDER BY 1""",
        (SCORE_BUCKETS, SCORE_BUCKETS, run_id),
    )
    buckets = [0] * SCORE_BUCKETS
    fraud = [0] * SCORE_BUCKETS
    for r in rows:
        buckets[r["bucket"] - 1] = r["predictions"]
        fraud[r["bucket"] - 1] = r["predicted_fraud"]
    total, flagged = sum(buckets), sum(fraud)
    return {
        "predictions": total,
        "predicted_fraud": flagged,
        "fraud_share": round(flagged / total, 6) if total else None,
        "bucket_width": 1 / SCORE_BUCKETS,
        "buckets": buckets,
        "fraud_by_bucket": fraud,
    }


def trend(conn: psycopg.Connection[Any], status: dict[str, Any]) -> list[dict[str, Any]]:
    """This run and up to TREND_RUNS - 1 runs started before it, oldest first."""
    runs = _all(
        conn,
        """SELECT run_id, status, started_at, rows_read, rows_valid, rows_invalid, rows_scored,
                  rows_failed, rows_per_second
           FROM run_progress WHERE (started_at, run_id) <= (%s, %s)
           ORDER BY started_at DESC, run_id DESC LIMIT %s""",
        (status["started_at"], status["run_id"], TREND_RUNS),
    )
    shares = {
        r["run_id"]: r
        for r in _all(
            conn,
            """SELECT run_id, COUNT(*) AS predictions,
                      COUNT(*) FILTER (WHERE prediction) AS predicted_fraud
               FROM predictions WHERE run_id = ANY(%s) GROUP BY 1""",
            ([r["run_id"] for r in runs],),
        )
    }
    for r in runs:
        r["rows_per_second"] = int(r["rows_per_second"] or 0)
        share = shares.get(r["run_id"])
        r["fraud_share"] = (
            round(share["predicted_fraud"] / share["predictions"], 6) if share else None
        )
    return runs[::-1]


# -- rendering -------------------------------------------------------------------

# C0 control characters and DEL -> their visible pictures (CR -> U+240D, LF -> U+240A):
# nothing from input can start a new line, move the cursor or colour a terminal.
_CONTROL_PICTURES = {i: 0x2400 + i for i in range(32)} | {0x7F: 0x2421}
_MD_ESCAPES = str.maketrans(
    {c: "\\" + c for c in "\\`*[]|~"} | {"<": "&lt;", ">": "&gt;", "&": "&amp;"}
)
# `_` between two letters or digits cannot open or close emphasis (CommonMark): left
# as it is, run ids and file names stay readable in the Markdown source.
_MD_UNDERSCORE = re.compile(r"(?<![A-Za-z0-9])_|_(?![A-Za-z0-9])")
_CSV_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


def _text(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, datetime):
        return value.isoformat(timespec="seconds")
    return str(value)


def plain(value: Any) -> str:
    """A value as one line of plain text: control characters shown, not obeyed."""
    return _text(value).translate(_CONTROL_PICTURES)


def clip(text: str, limit: int) -> str:
    """At most `limit` characters; a cut shows as an ellipsis."""
    return text if len(text) <= limit else text[: limit - 1] + "…"


def md(value: Any, limit: int | None = None) -> str:
    """A value as inert Markdown inline text (safe in a table cell or a paragraph)."""
    text = plain(value)
    if limit is not None:
        text = clip(text, limit)
    return _MD_UNDERSCORE.sub(r"\\_", text.translate(_MD_ESCAPES))


def csv_cell(value: Any) -> Any:
    """A cell a spreadsheet shows as text: never a formula (OWASP CSV injection)."""
    if isinstance(value, str) and value.startswith(_CSV_FORMULA_START):
        return "'" + value
    return value


def _status_fields(s: dict[str, Any]) -> list[tuple[str, str]]:
    fields = [
        ("run_id", plain(s["run_id"])),
        ("status", plain(s["status"])),
        ("source", plain(s["source_uri"])),
        ("started", _text(s["started_at"])),
        ("finished", _text(s["finished_at"]) or "(still running)"),
        ("duration", f"{s['duration_seconds']:.1f}s"),
        (
            "rows",
            f"{s['rows_read']} read, {s['rows_valid']} valid, {s['rows_invalid']} invalid, "
            f"{s['rows_scored']} scored, {s['rows_failed']} failed",
        ),
        ("throughput", f"{s['rows_per_second']} rows/s"),
        (
            "objects",
            f"{s['objects_total']} total: {s['objects_done']} done, {s['objects_failed']} failed, "
            f"{s['objects_skipped']} skipped, {s['objects_left']} left",
        ),
    ]
    if s.get("model_version"):
        fields.append(("model", plain(s["model_version"])))
    if s.get("error"):
        fields.append(("error", plain(s["error"])))
    return fields


def render_status(status: dict[str, Any]) -> str:
    return "\n".join(f"{label + ':':<13}{value}" for label, value in _status_fields(status))


def render_json(report: dict[str, Any]) -> str:
    return orjson.dumps(report, default=str, option=orjson.OPT_INDENT_2).decode()


def _md_table(headers: list[str], rows: list[list[str]], empty: str) -> list[str]:
    """A table of already escaped cells, or one line saying there is nothing to show."""
    if not rows:
        return [empty]
    out = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    out.extend("| " + " | ".join(r) + " |" for r in rows)
    return out


def render_markdown(report: dict[str, Any]) -> str:
    run = report["run"]
    lines = [f"# Run {md(run['run_id'])}", ""]
    lines += [f"- **{label}:** {md(value)}" for label, value in _status_fields(run)]
    scores = report.get("scores")
    if scores and scores["predictions"]:
        lines.append(
            f"- **predicted fraud:** {scores['predicted_fraud']} of {scores['predictions']} "
            f"({100 * scores['fraud_share']:.2f}%)"
        )
    lines += ["", "## Objects", ""]
    lines += _md_table(
        ["object", "version", "status", "read", "valid", "invalid", "scored", "failed"],
        [
            [
                md(o["source_uri"]),
                md(o["source_version"]),
                md(o["status"]),
                *(md(o[k]) for k in ROW_COUNTS),
            ]
            for o in report["objects"]
        ],
        "No object was processed.",
    )
    lines += ["", "## Invalid rows by reason", ""]
    lines += _md_table(
        ["column", "reason", "rows", "examples"],
        [
            [
                md(g["column_name"]),
                md(g["reason"], REASON_SHOWN),
                md(g["rows"]),
                "; ".join(
                    f"{md(e['source_uri'])}:{md(e['line_number'])} "
                    f"“{md(e['raw_text'], RAW_TEXT_SHOWN)}”"
                    for e in g["examples"]
                ),
            ]
            for g in report["invalid_reasons"]
        ],
        "No invalid row.",
    )
    lines += ["", "## Failures by reason", ""]
    lines += _md_table(
        ["reason", "HTTP status", "transactions", "resolved since", "examples"],
        [
            [
                md(f["reason"], REASON_SHOWN),
                md(f["http_status"]),
                md(f["transactions"]),
                md(f["resolved_since"]),
                ", ".join(md(e) for e in f["examples"]),
            ]
            for f in report["failures"]
        ],
        "No transaction failed.",
    )
    lines += ["", "## Timings", ""]
    lines += _md_table(
        ["measure", "value"],
        [[md(k), md(v)] for k, v in report["timings"].items()],
        "Not recorded.",
    )
    return "\n".join(lines) + "\n"


def render_csv(report: dict[str, Any]) -> str:
    """One flat table: section, name, detail, count (RFC 4180: CRLF line ends).

    CRLF, not LF: the csv module quotes a field holding a character of the line
    terminator, so a lone CR in a value is quoted too instead of ending the row.
    """
    out = io.StringIO()
    w = csv.writer(out, lineterminator="\r\n")

    def row(section: str, name: Any, detail: Any, count: Any) -> None:
        w.writerow([section, csv_cell(_text(name)), csv_cell(_text(detail)), _text(count)])

    w.writerow(["section", "name", "detail", "count"])
    run = report["run"]
    for key in ROW_COUNTS:
        row("run", key, run["status"], run[key])
    for o in report["objects"]:
        for key in ROW_COUNTS:
            row("object", o["source_uri"], key, o[key])
    for g in report["invalid_reasons"]:
        example = g["examples"][0] if g["examples"] else {}
        detail = f"{g['reason']} (e.g. {example.get('source_uri')}:{example.get('line_number')})"
        row("invalid_reason", g["column_name"], detail, g["rows"])
    for f in report["failures"]:
        row("failure_reason", f["reason"], f"HTTP {_text(f['http_status'])}", f["transactions"])
    for key, value in report["timings"].items():
        row("timing", key, value, "")
    return out.getvalue()


RENDERERS = {
    "json": render_json,
    "markdown": render_markdown,
    "csv": render_csv,
    "html": render_html,
}


# -- run groups (scale-out) -------------------------------------------------------


def group_status(conn: psycopg.Connection[Any], group: str) -> dict[str, Any]:
    """A run group: its workers' runs, their sum, and the group's exit code."""
    from library.state.group import OBJECTS_FINISHED, group_exit_code

    head = _one(
        conn,
        """SELECT run_group, source_uri, created_at, finished_at, objects_total,
                  stopped_by, stop_reason, stop_exit_code
           FROM run_groups WHERE run_group = %s""",
        (group,),
    )
    runs = _all(
        conn,
        f"""SELECT run_id, worker_index, status, started_at, finished_at,
                   {", ".join(ROW_COUNTS)}, objects_done, objects_failed, objects_skipped,
                   (summary->>'exit_code')::int AS exit_code, error
            FROM pipeline_runs WHERE run_group = %s
            ORDER BY worker_index NULLS LAST, started_at""",
        (group,),
    )
    if head is None and not runs:
        raise RunNotFound(f"no run group {group}")
    total = {name: sum(int(r[name] or 0) for r in runs) for name in ROW_COUNTS}
    codes = [r["exit_code"] for r in runs if r["exit_code"] is not None]
    done = conn.execute(OBJECTS_FINISHED, {"group": group}).fetchone()
    running = any(r["status"] == "processing" for r in runs)
    return {
        "run_group": group,
        "source_uri": head["source_uri"] if head else None,
        "state": "running" if running else "finished" if head and head["finished_at"] else "ended",
        "objects_total": head["objects_total"] if head else None,
        "objects_finished": int(done[0]) if done else 0,
        "stopped_by": head["stopped_by"] if head else None,
        "stop_reason": head["stop_reason"] if head else None,
        "exit_code": group_exit_code(codes),
        "workers": len(runs),
        "rows": total,
        "runs": runs,
    }


def render_group_status(group: dict[str, Any]) -> str:
    rows = group["rows"]
    lines = [
        f"{'run group:':<13}{plain(group['run_group'])}",
        f"{'state:':<13}{group['state']} (exit {group['exit_code']} for the group)",
        f"{'source:':<13}{plain(group['source_uri'])}",
        f"{'objects:':<13}{group['objects_finished']} of {group['objects_total']} finished",
        f"{'workers:':<13}{group['workers']}",
        f"{'rows:':<13}{rows['rows_read']} read, {rows['rows_valid']} valid, "
        f"{rows['rows_invalid']} invalid, {rows['rows_scored']} scored, "
        f"{rows['rows_failed']} failed",
    ]
    if group["stopped_by"]:
        lines.append(
            f"{'stopped:':<13}by {plain(group['stopped_by'])}: {plain(group['stop_reason'])}"
        )
    lines.append("")
    lines.append("worker  run_id                        status                 read     exit")
    for r in group["runs"]:
        index = "-" if r["worker_index"] is None else str(r["worker_index"])
        code = "-" if r["exit_code"] is None else str(r["exit_code"])
        lines.append(
            f"{index:<8}{plain(r['run_id']):<30}{r['status']:<23}{r['rows_read']:<9}{code}"
        )
    return "\n".join(lines)


def render_group_markdown(group: dict[str, Any]) -> str:
    rows = group["rows"]
    lines = [
        f"# Run group {md(group['run_group'])}",
        "",
        f"- **state:** {group['state']} (exit {group['exit_code']} for the group)",
        f"- **source:** {md(group['source_uri'])}",
        f"- **objects:** {group['objects_finished']} of {group['objects_total']} finished",
        f"- **rows:** {rows['rows_read']} read, {rows['rows_valid']} valid, "
        f"{rows['rows_invalid']} invalid, {rows['rows_scored']} scored, "
        f"{rows['rows_failed']} failed",
    ]
    if group["stopped_by"]:
        lines.append(f"- **stopped by:** {md(group['stopped_by'])}: {md(group['stop_reason'])}")
    lines += ["", "## Workers", ""]
    lines += _md_table(
        ["worker", "run", "status", "read", "valid", "invalid", "scored", "failed", "exit"],
        [
            [
                md("-" if r["worker_index"] is None else r["worker_index"]),
                md(r["run_id"]),
                md(r["status"]),
                *(md(r[name]) for name in ROW_COUNTS),
                md("-" if r["exit_code"] is None else r["exit_code"]),
            ]
            for r in group["runs"]
        ],
        "No worker recorded.",
    )
    return "\n".join(lines) + "\n"


def render_group_csv(group: dict[str, Any]) -> str:
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\r\n")
    writer.writerow(["worker", "run_id", "status", *ROW_COUNTS, "exit_code"])
    for r in group["runs"]:
        writer.writerow(
            [
                csv_cell(r["worker_index"]),
                csv_cell(r["run_id"]),
                csv_cell(r["status"]),
                *(r[name] for name in ROW_COUNTS),
                r["exit_code"],
            ]
        )
    return out.getvalue()


GROUP_RENDERERS = {
    "json": render_json,
    "markdown": render_group_markdown,
    "csv": render_group_csv,
}
