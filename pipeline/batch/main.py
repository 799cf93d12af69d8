"""`batch-pipeline`: the command line. Parses, loads settings, calls the library,
and turns the outcome into a message and an exit code (contract, section 5).

Every setting is an environment variable and a flag of the same name
(`API_MAX_WORKERS` -> `--api-max-workers`); flags win.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
from collections.abc import Sequence
from types import FrameType
from typing import Any

import psycopg

from library import db, logs
from library.config import Settings, client_secrets, load_settings
from library.errors import (
    EXIT_FAILED,
    EXIT_SIGINT,
    EXIT_SIGTERM,
    EXIT_USAGE,
    ConfigError,
    InterruptedRun,
    PipelineError,
)

log = logging.getLogger("batch_pipeline")

FLAG_ALIASES = {"SOURCE_URI": ["--source"]}


def flag_name(field: str) -> str:
    return "--" + field.lower().replace("_", "-")


def add_settings_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("settings (each also an environment variable)")
    for name, info in Settings.model_fields.items():
        default = info.default
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="batch-pipeline",
        description="Stream transaction CSVs from S3 or local files, validate every row, "
        "score the valid ones against an ML API, and upsert everything into PostgreSQL.",
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
    add_settings_flags(run)

    migrate = commands.add_parser("migrate", help="apply the pending database migrations")
    add_settings_flags(migrate)

    retry = commands.add_parser(
        "retry-failed", help="score the transactions in failed_transactions again"
    )
    retry.add_argument("--run", metavar="RUN_ID", help="only the failures of this run")
    add_settings_flags(retry)

    status = commands.add_parser("status", help="show a run (default: the latest)")
    status.add_argument("run_id", nargs="?", metavar="RUN_ID")
    add_settings_flags(status)

    report = commands.add_parser("report", help="write a run's report (default: the latest run)")
    report.add_argument("run_id", nargs="?", metavar="RUN_ID")
    report.add_argument(
        "--format",
        choices=["json", "markdown", "csv", "html"],
        default="markdown",
        help="html: one self-contained page of charts (no network needed to open it)",
    )
    report.add_argument("--output", "-o", metavar="FILE", help="write to FILE instead of stdout")
    add_settings_flags(report)

    demo = commands.add_parser(
        "demo",
        help="run the real pipeline on generated sample data, the reference model and the embedded database",
    )
    demo.add_argument(
        "--rows", type=int, default=20_000, help="sample rows to generate [default 20000]"
    )
    add_settings_flags(demo)

    query = commands.add_parser(
        "query", help="run one read-only SQL query against the database and print the rows"
    )
    query.add_argument("sql", help='e.g. "SELECT status, rows_read FROM pipeline_runs"')
    add_settings_flags(query)

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
    overrides = {name: getattr(args, name, None) for name in Settings.model_fields}
    return load_settings(overrides)


# Threads waiting on sockets (scoring workers, the writer) must get the GIL back
# quickly from the CPU-bound reader: at the default 5 ms each answer waits up to 5 ms.
SWITCH_INTERVAL_SECONDS = 0.001


def main(argv: Sequence[str] | None = None) -> int:
    sys.setswitchinterval(SWITCH_INTERVAL_SECONDS)
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if args.command == "model-server":
            return cmd_model_server(args)
        settings = settings_from(args)
    except ConfigError as exc:
        print(f"batch-pipeline: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    secrets = settings.secret_values() + client_secrets()
    logs.setup_logging(settings.LOG_LEVEL, secrets, settings.LOG_FORMAT)
    try:
        if args.command == "run":
            return cmd_run(args, settings)
        if args.command == "migrate":
            return cmd_migrate(settings)
        if args.command == "retry-failed":
            return cmd_retry_failed(args, settings)
        if args.command == "status":
            return cmd_status(args, settings)
        if args.command == "report":
            return cmd_report(args, settings)
        if args.command == "demo":
            return cmd_demo(args, settings)
        if args.command == "query":
            return cmd_query(args, settings)
    except PipelineError as exc:
        log.error("%s", exc)
        return exc.exit_code
    parser.error(f"unknown command {args.command}")
    return EXIT_USAGE


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
    print_summary(report, settings.SOURCE_URI)
    return report.exit_code


def print_summary(report: Any, source_uri: str | None = None) -> None:
    s = report.summary()
    rows = s["rows"]
    objects = ", ".join(f"{n} {k}" for k, n in sorted(s["objects"].items())) or "none"
    if s.get("objects_found") == 0:
        objects = f"none found under {source_uri or 'SOURCE_URI'}"
    lines = [
        f"run_id:        {s['run_id']}{' (dry run)' if s['dry_run'] else ''}",
        f"status:        {s['status']} (exit {s['exit_code']})",
        f"rows:          {rows['read']} read, {rows['valid']} valid, {rows['invalid']} invalid, "
        f"{rows['scored']} scored, {rows['failed']} failed",
        f"objects:       {objects}",
        f"time:          {s['seconds']:.1f}s ({s['rows_per_second']:.0f} rows/s)",
    ]
    if s["model_version"]:
        lines.append(f"model_version: {s['model_version']}")
    if s.get("api_requests"):
        lines.append(f"api requests:  {s['api_requests']} ({s['api_retries']} retries)")
    if s.get("concurrency"):
        c = s["concurrency"]
        if c["mode"] == "adaptive":
            lines.append(
                f"concurrency:   adaptive, settled at {c['settled']} (ceiling {c['ceiling']}, "
                f"average {c['average']}, {c['decreases']} decreases)"
            )
        else:
            lines.append(f"concurrency:   fixed at {c['ceiling']}")
    if report.stage_times is not None:
        lines.extend(report.stage_times.lines())
    if report.database:
        lines.append(f"database:      {report.database}")
    if s["error"]:
        lines.append(f"error:         {s['error']}")
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
    print_summary(report)
    return report.exit_code


def read_only(settings: Settings, action: Any) -> Any:
    """Run `action(conn)` on the database in a read-only transaction."""
    from library.run import database

    with database(settings) as (url, _shown):
        conn = db.connect(url, "batch-pipeline report")
        try:
            with db.classified("reading the ledger"), conn.transaction():
                conn.execute("SET TRANSACTION READ ONLY")
                db.require_schema(conn)
                return action(conn)
        finally:
            conn.close()


def cmd_status(args: argparse.Namespace, settings: Settings) -> int:
    from library.reports import render_status, run_status

    print(render_status(read_only(settings, lambda c: run_status(c, args.run_id))))
    return 0


def cmd_report(args: argparse.Namespace, settings: Settings) -> int:
    from library.reports import RENDERERS, run_report

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
    log.info(
        "Pipeline complete: %d processed, %d failed, %d invalid", c.scored, c.failed, c.invalid
    )
    print_summary(report)
    if report.status not in ("completed", "completed_with_errors"):
        return report.exit_code
    # Started by `python3 -m uv run --no-dev` (uv sets UV): batch-pipeline is not on the
    # PATH. --no-dev as in the README's command, or uv would add the dev tools to the venv.
    command = (
        "python3 -m uv run --no-dev batch-pipeline" if os.environ.get("UV") else "batch-pipeline"
    )
    print(
        f"\nThe sample has about 1% invalid rows and 1% duplicates on purpose: see invalid_rows.\n"
        f"Look at the predictions:\n\n"
        f'  {command} query "{LOOK_QUERY}"\n'
    )
    return 0


def cmd_query(args: argparse.Namespace, settings: Settings) -> int:
    from library.run import database

    with database(settings) as (url, _shown):
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


def print_table(columns: list[str], rows: list[tuple[Any, ...]]) -> None:
    cells = [[("" if v is None else str(v)) for v in r] for r in rows]
    widths = [max([len(c), *(len(r[i]) for r in cells)]) for i, c in enumerate(columns)]
    print(" | ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True)))
    print("-+-".join("-" * w for w in widths))
    for r in cells:
        print(" | ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)))
    print(f"({len(rows)} row{'s' if len(rows) != 1 else ''})")


def cmd_migrate(settings: Settings) -> int:
    from library.run import database

    with database(settings) as (url, shown):
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
