"""`batch-pipeline`: the command line. Parses, loads settings, calls the library,
renders what it returns (pipeline/batch/render.py) and turns the outcome into an
exit code (contract, section 5). `COMMANDS` maps each command to its handler; a
handler does no database or file work of its own.

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
from collections.abc import Callable, Sequence
from types import FrameType
from typing import Any

from library.config import (
    ENV_FIELDS,
    ENV_NAMES,
    Settings,
    client_secrets,
    load_settings,
    misspelt_variables,
)
from library.contract import SCHEMAS
from library.demo.sample_data import DEMO_ROWS
from library.errors import (
    EXIT_FAILED,
    EXIT_SIGINT,
    EXIT_SIGTERM,
    EXIT_USAGE,
    ConfigError,
    InterruptedRun,
    PipelineError,
)
from library.observability import logs
from pipeline.batch import render

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
        "--rows", type=int, default=DEMO_ROWS, help=f"sample rows to generate [default {DEMO_ROWS}]"
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


def json_logs(settings: Settings) -> bool:
    return settings.observability.log_format == "json"


def log_outcome(report: Any) -> None:
    """The run's error, logged once on stderr before the summary that points to it."""
    if report.error:
        log.error("Run %s %s: %s", report.run_id, report.status, report.error)


# -- the handlers: call the library, render, return the exit code ---------------------------


def cmd_run(args: argparse.Namespace, settings: Settings) -> int:
    from library.jobs.run import RunOptions, StopSignal, run_pipeline

    if args.workers is not None and args.workers < 1:
        raise ConfigError("--workers must be at least 1")
    if args.workers is not None:
        from library.jobs.workers import run_workers, without_workers_flag

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
    log_outcome(report)
    if not report.dry_run and c.valid:
        log.info("Successfully wrote %d transactions to database", c.valid)
    log.info(
        "Pipeline complete: %d processed, %d failed, %d invalid", c.scored, c.failed, c.invalid
    )
    render.print_summary(report, json_logs(settings), settings.source.uri)
    return report.exit_code


def cmd_retry_failed(args: argparse.Namespace, settings: Settings) -> int:
    from library.jobs.retry import retry_failed
    from library.jobs.run import StopSignal

    stop = StopSignal()
    install_signal_handlers(stop)
    report = retry_failed(settings, args.run, stop)
    log_outcome(report)
    log.info(
        "Retry complete: %d scored, %d still failing", report.counts.scored, report.counts.failed
    )
    render.print_summary(report, json_logs(settings), settings.source.uri, retry=True)
    return report.exit_code


def cmd_status(args: argparse.Namespace, settings: Settings) -> int:
    from library.jobs import admin
    from library.jobs.reports import render_group_status, render_status

    if args.group:
        group = admin.group_status(settings.sink, args.group)
        if args.format == "json":
            render.print_json(group)
        else:
            render.print_text(render_group_status(group))
        return int(group["exit_code"])  # the group's code, for schedulers

    status = admin.run_status(settings.sink, args.run_id)
    if args.format == "json":
        render.print_json(status)
    else:
        render.print_text(render_status(status))
    return 0


def cmd_runs(args: argparse.Namespace, settings: Settings) -> int:
    from library.jobs import admin
    from library.jobs.history import TEXT_COLUMNS, text_rows

    if args.limit < 1:
        raise ConfigError("--limit must be at least 1")
    runs = admin.recent_runs(settings.sink, args.limit)
    if args.format == "json":
        render.print_json(runs)
    elif not runs:
        render.print_text("no run recorded yet")
    else:
        render.print_table(TEXT_COLUMNS, text_rows(runs), count=False)
    return 0


def cmd_check(args: argparse.Namespace, settings: Settings) -> int:
    from library.jobs.check import run_checks

    results = run_checks(settings)
    for result in results:
        if json_logs(settings):
            level = "INFO" if result.ok else "ERROR"
            render.print_event(
                result.line(), level, check=result.name, ok=result.ok, detail=result.detail
            )
        else:
            render.print_text(result.line())
    failed = [r.name for r in results if not r.ok]
    if failed:
        log.error("check failed: %s", ", ".join(failed))
        return EXIT_FAILED
    return 0


def cmd_schema(args: argparse.Namespace) -> int:
    from library.contract import json_schemas

    schemas = json_schemas()
    render.print_json(schemas if args.which == "all" else schemas[args.which])
    return 0


def write_document(text: str, output: str | None) -> None:
    """A report as rendered (Markdown, CSV, HTML, JSON): to FILE, or to stdout as is."""
    if output:
        with open(output, "w", encoding="utf-8") as out:
            out.write(text)
    else:
        sys.stdout.write(text)


def cmd_report(args: argparse.Namespace, settings: Settings) -> int:
    from library.jobs import admin
    from library.jobs.reports import GROUP_RENDERERS, RENDERERS

    if args.group:
        if args.format not in GROUP_RENDERERS:
            raise ConfigError(f"report --group writes {', '.join(GROUP_RENDERERS)}, not html")
        group = admin.group_status(settings.sink, args.group)
        write_document(GROUP_RENDERERS[args.format](group), args.output)
        return 0
    report = admin.run_report(settings.sink, args.run_id)
    write_document(RENDERERS[args.format](report), args.output)
    if args.output:
        log.info(
            "wrote the %s report of %s to %s", args.format, report["run"]["run_id"], args.output
        )
    return 0


def cmd_demo(args: argparse.Namespace, settings: Settings) -> int:
    from library.demo.run import DEMO_FOLDER, LOOK_QUERY, run_demo
    from library.jobs.run import StopSignal

    if args.rows < 1:
        raise ConfigError("--rows must be at least 1")
    stop = StopSignal()
    install_signal_handlers(stop)
    report = run_demo(settings, args.rows, DEMO_FOLDER, stop)
    c = report.counts
    log_outcome(report)
    log.info(
        "Pipeline complete: %d processed, %d failed, %d invalid", c.scored, c.failed, c.invalid
    )
    render.print_summary(report, json_logs(settings), settings.source.uri)
    if report.status not in ("completed", "completed_with_errors"):
        return report.exit_code
    # Started by `python3 -m uv run --no-dev` (uv sets UV): batch-pipeline is not on the
    # PATH. --no-dev as in the README's command, or uv would add the dev tools to the venv.
    command = (
        "python3 -m uv run --no-dev batch-pipeline" if os.environ.get("UV") else "batch-pipeline"
    )
    if json_logs(settings):
        render.print_event("Look at the predictions", command=f"{command} query", sql=LOOK_QUERY)
        return 0
    render.print_text(
        f"\nThe sample has about 1% invalid rows and 1% duplicates on purpose: see invalid_rows.\n"
        f"Look at the predictions:\n\n"
        f'  {command} query "{LOOK_QUERY}"\n'
    )
    return 0


def cmd_query(args: argparse.Namespace, settings: Settings) -> int:
    from library.jobs import admin

    result = admin.query(settings.sink, args.sql)
    render.print_table(result.columns, result.rows)
    return 0


def cmd_migrate(args: argparse.Namespace, settings: Settings) -> int:
    from library.jobs import admin

    migrated = admin.migrate(settings.sink)
    if migrated.applied:
        scripts = ", ".join(m.script for m in migrated.applied)
        log.info("applied %s to %s", scripts, migrated.database)
    else:
        log.info("the database at %s is up to date", migrated.database)
    return 0


def cmd_model_server(args: argparse.Namespace) -> int:
    from library.demo.reference_model import serve

    logs.setup_logging(str(args.LOG_LEVEL).upper())
    try:
        serve(args.host, args.port, args.latency_ms, args.capacity)
    except KeyboardInterrupt:
        return 0
    except OSError as exc:
        log.error("cannot serve on %s:%s: %s", args.host, args.port, exc)
        return EXIT_FAILED
    return 0


# Each command and its handler: these get the settings, logging set up and their
# PipelineError turned into its exit code.
COMMANDS: dict[str, Callable[[argparse.Namespace, Settings], int]] = {
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
# Commands that read no setting: no environment, no settings errors.
STANDALONE: dict[str, Callable[[argparse.Namespace], int]] = {
    "schema": cmd_schema,
    "model-server": cmd_model_server,
}


def main(argv: Sequence[str] | None = None) -> int:
    sys.setswitchinterval(SWITCH_INTERVAL_SECONDS)
    args = build_parser().parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # for `run --workers N`
    standalone = STANDALONE.get(args.command)
    if standalone is not None:
        return standalone(args)
    try:
        settings = settings_from(args)
    except ConfigError as exc:
        print(f"batch-pipeline: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    secrets = settings.secret_values() + client_secrets()
    logs.setup_logging(settings.observability.log_level, secrets, settings.observability.log_format)
    for name, meant in misspelt_variables():
        log.warning("%s is set but is not a setting: did you mean %s? (it is ignored)", name, meant)
    try:
        return COMMANDS[args.command](args, settings)
    except PipelineError as exc:
        log.error("%s", exc)
        return exc.exit_code


if __name__ == "__main__":
    sys.exit(main())
