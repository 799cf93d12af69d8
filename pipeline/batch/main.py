"""`batch-pipeline`: the command line. Parses, loads settings, calls the library,
and turns the outcome into a message and an exit code (contract, section 5).

Every setting is an environment variable and a flag of the same name
(`API_MAX_WORKERS` -> `--api-max-workers`); flags win.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import logging
import os
import signal
import sys
from collections.abc import Sequence
from types import FrameType
from typing import Any

import orjson
import psycopg

from library import db, logs
from library.config import (
    ENV_FIELDS,
    ENV_NAMES,
    Settings,
    client_secrets,
    load_settings,
    misspelt_variables,
)
from library.contract import SCHEMAS
from library.errors import (
    EXIT_FAILED,
    EXIT_SIGINT,
    EXIT_SIGTERM,
    EXIT_USAGE,
    ConfigError,
    InterruptedRun,
    PipelineError,
    SchemaNotReadyError,
)

log = logging.getLogger("batch_pipeline")

FLAG_ALIASES = {"SOURCE_URI": ["--source"]}
RUN_ID_HELP = (
    "RUN_ID: each run's id, batch_YYYYMMDD_HHMMSS of its local start time (with _2, _3, ... "
    "for runs started in the same second); printed at the start and in the summary, listed "
    "by `batch-pipeline runs`, stored in pipeline_runs.run_id and in every row the run writes."
)


def flag_name(field: str) -> str:
    return "--" + field.lower().replace("_", "-")


# Each command lists (and reads) only the settings it uses: `status --help` is short.
SETTING_GROUPS: dict[str, tuple[str, ...]] = {
    "source": (
        "SOURCE_URI",
        "KEY",
        "SECRET",
        "ENDPOINT_URL",
        "MAX_QUOTED_FIELD_CHARS",
        "FAIL_ON_EMPTY_SOURCE",
    ),
    "database": ("DATABASE_URL", "EMBEDDED_DB_DIR", "DB_RETRY_TIMEOUT"),
    "model": (
        "ML_API_URL",
        "ML_API_PROTOCOL",
        "MODEL_NAME",
        "MODEL_VERSION",
        "ML_API_TOKEN",
        "FRAUD_THRESHOLD",
        "API_TIMEOUT",
    ),
    "scoring": (
        "API_WAIT_READY",
        "API_BATCH_SIZE",
        "API_MAX_WORKERS",
        "API_CONCURRENCY",
        "API_RATE_LIMIT",
        "API_DOWN_TIMEOUT",
        "API_MAX_RETRIES",
        "API_RETRY_BACKOFF",
        "API_RETRY_BACKOFF_MAX",
    ),
    "reading and writing": ("ROW_BATCH_SIZE", "DB_ROW_BATCH_SIZE", "DB_FLUSH_INTERVAL"),
    "thresholds": ("MAX_INVALID_RATIO", "MAX_FAILED_RATIO", "COMPLETED_WITH_ERRORS_EXIT_CODE"),
    "scale-out": ("RUN_GROUP", "JOB_COMPLETION_INDEX"),
    "logs": ("LOG_LEVEL", "LOG_FORMAT"),
    "progress": ("PROGRESS", "PROGRESS_INTERVAL"),
    "metrics": ("PUSHGATEWAY_URL", "METRICS_TEXTFILE", "METRICS_JOB"),
}
READ_ONLY_GROUPS = ("database", "logs")
COMMAND_GROUPS: dict[str, tuple[str, ...]] = {
    "run": tuple(SETTING_GROUPS),
    "check": ("source", "database", "model", "metrics", "logs"),
    "retry-failed": (
        "database",
        "model",
        "scoring",
        "reading and writing",
        "logs",
    ),
    "demo": (
        "database",
        "scoring",
        "reading and writing",
        "thresholds",
        "logs",
        "progress",
        "metrics",
    ),
    "migrate": READ_ONLY_GROUPS,
    "status": READ_ONLY_GROUPS,
    "runs": READ_ONLY_GROUPS,
    "report": READ_ONLY_GROUPS,
    "query": READ_ONLY_GROUPS,
}


def add_settings_flags(parser: argparse.ArgumentParser, command: str) -> None:
    for group_name in COMMAND_GROUPS[command]:
        group = parser.add_argument_group(
            f"{group_name} settings (each also an environment variable)"
        )
        for name in SETTING_GROUPS[group_name]:
            info = ENV_FIELDS[name].info
            default = info.get_default(call_default_factory=True)
            shown = "none" if default is None else default
            secret = (
                " Prefer the environment variable: flags show in `ps`."
                if name in ("SECRET", "DATABASE_URL")
                else ""
            )
            group.add_argument(
                flag_name(name),
                *FLAG_ALIASES.get(name, []),
                dest=name,
                metavar=name,
                default=None,
                help=f"{info.description} [env {name}, default {shown}]{secret}",
            )


def package_version() -> str:
    try:
        return importlib.metadata.version("batch-pipeline")
    except importlib.metadata.PackageNotFoundError:  # run from a source tree
        return "unknown"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="batch-pipeline",
        description="Stream transaction CSVs from S3 or local files, validate every row, "
        "score the valid ones against an ML API, and upsert everything into PostgreSQL.",
        epilog=RUN_ID_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--version", action="version", version=f"batch-pipeline {package_version()}"
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = commands.add_parser("run", help="process every object of SOURCE_URI")
    run.add_argument(
        "--dry-run", action="store_true", help="read and validate only: no API call, no write"
    )
    run.add_argument("--limit", type=int, metavar="N", help="process at most N objects")
    run.add_argument(
        "--reprocess", action="store_true", help="read objects again even if already completed"
    )
    run.add_argument(
        "--migrate", action="store_true", help="apply pending database migrations first"
    )
    run.add_argument(
        "--workers",
        type=int,
        metavar="N",
        help="run N worker processes in one run group (RUN_GROUP, or a new one), sharing "
        "the objects; exit with the group's code [default: one process, no group]",
    )
    add_settings_flags(run, "run")

    check = commands.add_parser(
        "check",
        help="check the source, the database, the model and the Pushgateway; exit 0 if all pass",
    )
    add_settings_flags(check, "check")

    migrate = commands.add_parser("migrate", help="apply the pending database migrations")
    add_settings_flags(migrate, "migrate")

    retry = commands.add_parser(
        "retry-failed", help="score the transactions in failed_transactions again"
    )
    retry.add_argument("--run", metavar="RUN_ID", help="only the failures of this run")
    add_settings_flags(retry, "retry-failed")

    status = commands.add_parser(
        "status", help="show a run (default: the latest)", epilog=RUN_ID_HELP
    )
    status.add_argument("run_id", nargs="?", metavar="RUN_ID", help="default: the latest run")
    status.add_argument("--format", choices=["text", "json"], default="text")
    status.add_argument(
        "--group",
        metavar="RUN_GROUP",
        help="a run group (scale-out): its workers, their sum; exits with the group's code",
    )
    add_settings_flags(status, "status")

    runs = commands.add_parser("runs", help="list the recent runs, newest first")
    runs.add_argument(
        "--limit", type=int, default=20, metavar="N", help="at most N runs [default 20]"
    )
    runs.add_argument("--format", choices=["text", "json"], default="text")
    add_settings_flags(runs, "runs")

    report = commands.add_parser("report", help="write a run's report (default: the latest run)")
    report.add_argument("run_id", nargs="?", metavar="RUN_ID")
    report.add_argument(
        "--group", metavar="RUN_GROUP", help="a run group's workers and their sum (scale-out)"
    )
    report.add_argument(
        "--format",
        choices=["json", "markdown", "csv", "html"],
        default="markdown",
        help="html: one self-contained page of charts (no network needed to open it)",
    )
    report.add_argument("--output", "-o", metavar="FILE", help="write to FILE instead of stdout")
    add_settings_flags(report, "report")

    demo = commands.add_parser(
        "demo",
        help="run the real pipeline on generated sample data, the reference model and the embedded database",
    )
    demo.add_argument(
        "--rows", type=int, default=20_000, help="sample rows to generate [default 20000]"
    )
    add_settings_flags(demo, "demo")

    query = commands.add_parser(
        "query", help="run one read-only SQL query against the database and print the rows"
    )
    query.add_argument("sql", help='e.g. "SELECT status, rows_read FROM pipeline_runs"')
    add_settings_flags(query, "query")

    schema = commands.add_parser(
        "schema",
        help="print the JSON Schema of the input row and of the /predict request and response",
    )
    schema.add_argument(
        "which",
        nargs="?",
        choices=["all", *SCHEMAS],
        default="all",
        help="one schema, or all of them in one document [default all]",
    )

    model = commands.add_parser(
        "model-server", help="serve the reference model API (for demos and tests)"
    )
    model.add_argument("--host", default="127.0.0.1", help="address to bind [default 127.0.0.1]")
    model.add_argument("--port", type=int, default=8000, help="port [default 8000]")
    model.add_argument(
        "--latency-ms",
        type=float,
        default=0.0,
        help="add this latency to every /predict (benchmarks)",
    )
    model.add_argument(
        "--capacity",
        type=int,
        default=None,
        help="answer 429 above this many requests in flight (benchmarks)",
    )
    model.add_argument("--log-level", default="INFO", dest="LOG_LEVEL")
    return parser


def settings_from(args: argparse.Namespace) -> Settings:
    overrides = {name: getattr(args, name, None) for name in ENV_NAMES}
    return load_settings(overrides)


# Threads waiting on sockets (scoring workers, the writer) must get the GIL back
# quickly from the CPU-bound reader: at the default 5 ms each answer waits up to 5 ms.
SWITCH_INTERVAL_SECONDS = 0.001


def main(argv: Sequence[str] | None = None) -> int:
    sys.setswitchinterval(SWITCH_INTERVAL_SECONDS)
    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # for `run --workers N`
    if args.command == "schema":
        return cmd_schema(args)
    try:
        if args.command == "model-server":
            return cmd_model_server(args)
        settings = settings_from(args)
    except ConfigError as exc:
        print(f"batch-pipeline: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    secrets = settings.secret_values() + client_secrets()
    logs.setup_logging(settings.observability.log_level, secrets, settings.observability.log_format)
    for name, meant in misspelt_variables():
        log.warning("%s is set but is not a setting: did you mean %s? (it is ignored)", name, meant)
    handlers = {
        "run": cmd_run,
        "check": cmd_check,
        "migrate": cmd_migrate,
        "retry-failed": cmd_retry_failed,
        "status": cmd_status,
        "runs": cmd_runs,
        "report": cmd_report,
        "demo": cmd_demo,
        "query": cmd_query,
    }
    handler = handlers.get(args.command)
    if handler is None:
        parser.error(f"unknown command {args.command}")
    try:
        return handler(args, settings)
    except PipelineError as exc:
        log.error("%s", exc)
        return exc.exit_code


def install_signal_handlers(stop: Any) -> None:
    """First SIGINT/SIGTERM: stop gracefully (flush what was scored). Second: exit now;
    every flush is one transaction, so even that loses nothing already written."""

    def handle(signum: int, frame: FrameType | None) -> None:
        code = EXIT_SIGINT if signum == signal.SIGINT else EXIT_SIGTERM
        name = signal.Signals(signum).name
        if stop.is_set():
            os._exit(code)
        log.warning(
            "%s received: stopping after flushing what was scored (again to exit now)", name
        )
        stop.set(InterruptedRun(name, code))

    signal.signal(signal.SIGINT, handle)
    signal.signal(signal.SIGTERM, handle)


def cmd_run(args: argparse.Namespace, settings: Settings) -> int:
    from library.run import RunOptions, StopSignal, run_pipeline

    if args.workers is not None and args.workers < 1:
        raise ConfigError("--workers must be at least 1")
    if args.workers is not None:
        from library.workers import run_workers, without_workers_flag

        if args.dry_run:
            raise ConfigError("--workers goes with a real run, not --dry-run")
        return run_workers(args.workers, without_workers_flag(args.argv), os.environ)

    options = RunOptions(
        dry_run=args.dry_run, limit=args.limit, reprocess=args.reprocess, migrate=args.migrate
    )
    stop = StopSignal()
    install_signal_handlers(stop)
    report = run_pipeline(settings, options, stop)
    c = report.counts
    if report.error:
        log.error("Run %s %s: %s", report.run_id, report.status, report.error)
    if not report.dry_run and c.valid:
        log.info("Successfully wrote %d transactions to database", c.valid)
    log.info(
        "Pipeline complete: %d processed, %d failed, %d invalid", c.scored, c.failed, c.invalid
    )
    print_summary(report, settings)
    return report.exit_code


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


def print_summary(report: Any, settings: Settings, retry: bool = False) -> None:
    """The end-of-run summary on stdout: text lines, or one JSON event with LOG_FORMAT=json.

    The error itself is logged once, on stderr, before the summary; the summary
    says the run failed and points there."""
    s = report.summary()
    notes = summary_notes(report, retry)
    if settings.observability.log_format == "json":
        s["notes"] = notes
        s["database"] = report.database
        if not did_work(report) and s.get("stage_times"):
            s["stage_times"].pop("limited_by", None)
        level = "ERROR" if report.status == "failed" else "INFO"
        print(logs.json_event("Run summary", level, run_id=s["run_id"], summary=s), flush=True)
        return
    rows = s["rows"]
    objects = ", ".join(f"{n} {k}" for k, n in sorted(s["objects"].items())) or "none"
    if s.get("objects_found") == 0:
        objects = f"none found under {settings.source.uri or 'SOURCE_URI'}"
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
    print("\n".join(lines), flush=True)


def cmd_retry_failed(args: argparse.Namespace, settings: Settings) -> int:
    from library.retry import retry_failed
    from library.run import StopSignal

    stop = StopSignal()
    install_signal_handlers(stop)
    report = retry_failed(settings, args.run, stop)
    c = report.counts
    if report.error:
        log.error("Run %s %s: %s", report.run_id, report.status, report.error)
    log.info("Retry complete: %d scored, %d still failing", c.scored, c.failed)
    print_summary(report, settings, retry=True)
    return report.exit_code


def read_only(settings: Settings, action: Any) -> Any:
    """Run `action(conn)` on the database in a read-only transaction.

    The embedded database is migrated first, as `run` does, so a command run before
    any `run` finds an empty history instead of a schema error."""
    from library.run import database

    with database(settings.sink) as (url, shown):
        conn = db.connect(url, "batch-pipeline read")
        try:
            with db.classified("reading the ledger"):
                if settings.database_url is None:
                    db.migrate(conn)
                pending = db.pending_migrations(conn)
            if pending:
                raise SchemaNotReadyError(
                    f"the database at {shown} is not migrated (pending: "
                    f"{', '.join(m.script for m in pending)}); run `batch-pipeline migrate` first"
                )
            with db.classified("reading the ledger"), conn.transaction():
                conn.execute("SET TRANSACTION READ ONLY")
                return action(conn)
        finally:
            conn.close()


def cmd_status(args: argparse.Namespace, settings: Settings) -> int:
    from library.reports import render_status, run_status

    if args.group:
        from library.reports import group_status, render_group_status

        group = read_only(settings, lambda c: group_status(c, args.group))
        if args.format == "json":
            print(orjson.dumps(group, default=str, option=orjson.OPT_INDENT_2).decode())
        else:
            print(render_group_status(group))
        return int(group["exit_code"])  # the group's code, for schedulers

    status = read_only(settings, lambda c: run_status(c, args.run_id))
    if args.format == "json":
        print(orjson.dumps(status, default=str, option=orjson.OPT_INDENT_2).decode())
    else:
        print(render_status(status))
    return 0


def cmd_runs(args: argparse.Namespace, settings: Settings) -> int:
    from library.history import TEXT_COLUMNS, recent_runs, text_rows

    if args.limit < 1:
        raise ConfigError("--limit must be at least 1")
    runs = read_only(settings, lambda c: recent_runs(c, args.limit))
    if args.format == "json":
        print(orjson.dumps(runs, default=str, option=orjson.OPT_INDENT_2).decode())
    elif not runs:
        print("no run recorded yet")
    else:
        print_table(list(TEXT_COLUMNS), text_rows(runs), count=False)
    return 0


def cmd_check(args: argparse.Namespace, settings: Settings) -> int:
    from library.check import run_checks

    results = run_checks(settings)
    for result in results:
        if settings.observability.log_format == "json":
            level = "INFO" if result.ok else "ERROR"
            line = logs.json_event(
                result.line(), level, check=result.name, ok=result.ok, detail=result.detail
            )
        else:
            line = result.line()
        print(line, flush=True)
    failed = [r.name for r in results if not r.ok]
    if failed:
        log.error("check failed: %s", ", ".join(failed))
        return EXIT_FAILED
    return 0


def cmd_schema(args: argparse.Namespace) -> int:
    from library.contract import json_schemas

    schemas = json_schemas()
    document = schemas if args.which == "all" else schemas[args.which]
    print(orjson.dumps(document, option=orjson.OPT_INDENT_2).decode())
    return 0


def cmd_report(args: argparse.Namespace, settings: Settings) -> int:
    from library.reports import GROUP_RENDERERS, RENDERERS, group_status, run_report

    if args.group:
        if args.format not in GROUP_RENDERERS:
            raise ConfigError(f"report --group writes {', '.join(GROUP_RENDERERS)}, not html")
        group = read_only(settings, lambda c: group_status(c, args.group))
        text = GROUP_RENDERERS[args.format](group)
        if args.output:
            with open(args.output, "w", encoding="utf-8") as out:
                out.write(text)
        else:
            sys.stdout.write(text)
        return 0
    report = read_only(settings, lambda c: run_report(c, args.run_id))
    text = RENDERERS[args.format](report)
    if args.output:
        with open(args.output, "w", encoding="utf-8") as out:
            out.write(text)
        log.info(
            "wrote the %s report of %s to %s", args.format, report["run"]["run_id"], args.output
        )
    else:
        sys.stdout.write(text)
    return 0


def cmd_demo(args: argparse.Namespace, settings: Settings) -> int:
    from library.demo import DEMO_FOLDER, LOOK_QUERY, run_demo
    from library.run import StopSignal

    if args.rows < 1:
        raise ConfigError("--rows must be at least 1")
    stop = StopSignal()
    install_signal_handlers(stop)
    report = run_demo(settings, args.rows, DEMO_FOLDER, stop)
    c = report.counts
    if report.error:
        log.error("Run %s %s: %s", report.run_id, report.status, report.error)
    log.info(
        "Pipeline complete: %d processed, %d failed, %d invalid", c.scored, c.failed, c.invalid
    )
    print_summary(report, settings)
    if report.status not in ("completed", "completed_with_errors"):
        return report.exit_code
    # Started by `python3 -m uv run --no-dev` (uv sets UV): batch-pipeline is not on the
    # PATH. --no-dev as in the README's command, or uv would add the dev tools to the venv.
    command = (
        "python3 -m uv run --no-dev batch-pipeline" if os.environ.get("UV") else "batch-pipeline"
    )
    if settings.observability.log_format == "json":
        print(
            logs.json_event(
                "Look at the predictions", "INFO", command=f"{command} query", sql=LOOK_QUERY
            )
        )
        return 0
    print(
        f"\nThe sample has about 1% invalid rows and 1% duplicates on purpose: see invalid_rows.\n"
        f"Look at the predictions:\n\n"
        f'  {command} query "{LOOK_QUERY}"\n'
    )
    return 0


def cmd_query(args: argparse.Namespace, settings: Settings) -> int:
    from library.run import database

    with database(settings.sink) as (url, _shown):
        conn = db.connect(url, "batch-pipeline query")
        try:
            with conn.transaction():
                conn.execute("SET TRANSACTION READ ONLY")
                cur = conn.execute(args.sql)
                columns = [d.name for d in cur.description or []]
                rows = cur.fetchall() if cur.description else []
        except psycopg.Error as exc:
            raise PipelineError(f"query failed: {db.first_line(exc)}") from None
        finally:
            conn.close()
    print_table(columns, rows)
    return 0


def print_table(columns: list[str], rows: list[tuple[Any, ...]], count: bool = True) -> None:
    cells = [[("" if v is None else str(v)) for v in r] for r in rows]
    widths = [max([len(c), *(len(r[i]) for r in cells)]) for i, c in enumerate(columns)]
    print(" | ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True)))
    print("-+-".join("-" * w for w in widths))
    for r in cells:
        print(" | ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)))
    if count:
        print(f"({len(rows)} row{'s' if len(rows) != 1 else ''})")


def cmd_migrate(args: argparse.Namespace, settings: Settings) -> int:
    from library.run import database

    with database(settings.sink) as (url, shown):
        conn = db.connect(url, "batch-pipeline migrate")
        try:
            with db.classified("migrating"):
                applied = db.migrate(conn)
        finally:
            conn.close()
    if applied:
        log.info("applied %s to %s", ", ".join(m.script for m in applied), shown)
    else:
        log.info("the database at %s is up to date", shown)
    return 0


def cmd_model_server(args: argparse.Namespace) -> int:
    from library.reference_model import serve

    logs.setup_logging(str(args.LOG_LEVEL).upper())
    try:
        serve(args.host, args.port, args.latency_ms, args.capacity)
    except KeyboardInterrupt:
        return 0
    except OSError as exc:
        log.error("cannot serve on %s:%s: %s", args.host, args.port, exc)
        return EXIT_FAILED
    return 0


if __name__ == "__main__":
    sys.exit(main())
