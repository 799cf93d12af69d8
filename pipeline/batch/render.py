"""What the command line prints on stdout: summaries, tables, check lines, JSON.

Rendered with rich. On a terminal, labels and headers are bold and a table folds
its cells to the terminal's width; anywhere else (a pipe, a file, a CI log) the
output is the same plain text as ever, one line per row at any length, so that
scripts and `grep` keep working. Logs go to stderr, never here.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable, Sequence
from typing import Any

import orjson
from rich.box import Box
from rich.console import Console
from rich.table import Table
from rich.text import Text

from library.observability import logs

LABEL_WIDTH = 15  # "run_id:        batch_..." : every summary label is padded to this
# Off a terminal nothing is wrapped: a row stays one line whatever its length.
UNWRAPPED_WIDTH = 1_000_000
# `a | b` cells, a `--+--` rule under the header, no outer frame: plain text that reads
# the same on a terminal and in a file.
PIPES = Box(
    "    \n"  # top
    "  | \n"  # head
    " -+ \n"  # head_row
    "  | \n"  # mid
    " -+ \n"  # row
    " -+ \n"  # foot_row
    "  | \n"  # foot
    "    \n",  # bottom
    ascii=True,
)


def console() -> Console:
    """stdout as rich sees it; user data (file names, SQL results) is never markup."""
    terminal = sys.stdout.isatty()
    return Console(
        width=None if terminal else UNWRAPPED_WIDTH,
        markup=False,
        highlight=False,
        emoji=False,
    )


def print_json(document: Any) -> None:
    """Indented JSON, exactly as `--format json` has always printed it."""
    print(orjson.dumps(document, default=str, option=orjson.OPT_INDENT_2).decode(), flush=True)


def print_text(text: str) -> None:
    """A block of text rendered by the library (a status, a group's status)."""
    console().print(Text(text))


def labelled(line: str) -> Text:
    """A summary line, `label:` padded to LABEL_WIDTH then its value; the label in bold."""
    text = Text(line)
    if line[:LABEL_WIDTH].rstrip().endswith(":"):
        text.stylize("bold", 0, LABEL_WIDTH)
    return text


def print_labelled(lines: Iterable[str]) -> None:
    out = console()
    for line in lines:
        out.print(labelled(line))


def print_table(columns: Sequence[str], rows: Sequence[Sequence[Any]], count: bool = True) -> None:
    """Rows under their column names, `|` between cells; `(N rows)` after them if `count`."""
    table = Table(
        box=PIPES,
        show_edge=False,
        pad_edge=False,
        padding=(0, 1),
        header_style="bold",
    )
    for column in columns:
        table.add_column(column, overflow="fold")
    for row in rows:
        table.add_row(*("" if v is None else str(v) for v in row))
    out = console()
    out.print(table)
    if count:
        out.print(f"({len(rows)} row{'s' if len(rows) != 1 else ''})")


def print_event(message: str, level: str = "INFO", **fields: Any) -> None:
    """One JSON event on stdout (LOG_FORMAT=json): the same shape as the log lines."""
    print(logs.json_event(message, level, **fields), flush=True)


# -- a run's end-of-run summary ------------------------------------------------------------

ALL_SKIPPED_NOTE = (
    "every object was skipped: already completed at this version; "
    "use --reprocess to read them again"
)


def summary_notes(report: Any, retry: bool = False) -> list[str]:
    """What a user should know about a run that did no work, instead of tuning advice."""
    if retry:
        done_nothing = report.counts.read == 0 and report.status == "completed"
        return ["nothing to score again: no unresolved failure"] if done_nothing else []
    statuses = [o.status for o in report.objects]
    if statuses and all(s == "skipped" for s in statuses):
        return [ALL_SKIPPED_NOTE]
    if statuses and all(s in ("skipped", "locked") for s in statuses):
        return ["no object was read: each was completed already or held by another run"]
    if not statuses and report.status != "failed" and report.counts.read == 0:
        return ["no object to read under SOURCE_URI"] if not report.dry_run else []
    return []


def plan_lines(report: Any) -> list[str]:
    """A dry run's plan (read, skip, resume each object) and its invalid rows by reason."""
    lines = [f"plan:          {report.plan_note}"] if report.plan_note else []
    label = "plan:          "
    for planned in report.plan or []:
        lines.append(label + planned.describe())
        label = " " * len(label)
    label = "invalid:       "
    for reason in report.invalid_reasons.lines() if report.invalid_reasons else []:
        lines.append(label + reason)
        label = " " * len(label)
    return lines


def did_work(report: Any) -> bool:
    """A run that read rows and ended normally: only then do its stage times say anything."""
    return report.counts.read > 0 and report.status in ("completed", "completed_with_errors")


def summary_lines(report: Any, source_uri: str | None, notes: list[str]) -> list[str]:
    """The summary as `label: value` lines."""
    s = report.summary()
    rows = s["rows"]
    objects = ", ".join(f"{n} {k}" for k, n in sorted(s["objects"].items())) or "none"
    if s.get("objects_found") == 0:
        objects = f"none found under {source_uri or 'SOURCE_URI'}"
    status = f"{s['status']} (exit {s['exit_code']})"
    if s["error"]:
        status += ": the error is logged above"
    lines = [
        f"run_id:        {s['run_id']}{' (dry run)' if s['dry_run'] else ''}",
        f"status:        {status}",
        f"rows:          {rows['read']} read, {rows['valid']} valid, {rows['invalid']} invalid, "
        f"{rows['scored']} scored, {rows['failed']} failed",
        f"objects:       {objects}",
        f"time:          {s['seconds']:.1f}s ({s['rows_per_second']:.0f} rows/s)",
    ]
    lines.extend(f"note:          {note}" for note in notes)
    if report.dry_run:
        lines.extend(plan_lines(report))
    if s["model_version"]:
        lines.append(f"model_version: {s['model_version']}")
    if s.get("api_requests"):
        lines.append(f"api requests:  {s['api_requests']} ({s['api_retries']} retries)")
    if s.get("concurrency") and s.get("api_requests"):
        c = s["concurrency"]
        if c["mode"] == "adaptive":
            lines.append(
                f"concurrency:   adaptive, settled at {c['settled']} (ceiling {c['ceiling']}, "
                f"average {c['average']}, {c['decreases']} decreases)"
            )
        else:
            lines.append(f"concurrency:   fixed at {c['ceiling']}")
    if report.stage_times is not None and report.counts.read > 0:
        lines.extend(report.stage_times.lines(advise=did_work(report)))
    if report.database:
        lines.append(f"database:      {report.database}")
    return lines


def print_summary(
    report: Any, json_logs: bool, source_uri: str | None, retry: bool = False
) -> None:
    """The end-of-run summary on stdout: `label: value` lines, or one JSON event with
    LOG_FORMAT=json.

    The error itself is logged once, on stderr, before the summary; the summary
    says the run failed and points there."""
    notes = summary_notes(report, retry)
    if json_logs:
        s = report.summary()
        s["notes"] = notes
        s["database"] = report.database
        if not did_work(report) and s.get("stage_times"):
            s["stage_times"].pop("limited_by", None)
        level = "ERROR" if report.status == "failed" else "INFO"
        print_event("Run summary", level, run_id=s["run_id"], summary=s)
        return
    print_labelled(summary_lines(report, source_uri, notes))
