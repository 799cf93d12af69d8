"""Scale-out benchmark: one run group of N workers (`run --workers N`) against one
PostgreSQL, one S3 server and one model, all on 127.0.0.1.

    python -m bench.scaleout            # 100k rows in 16 objects, N = 1, 2, 4
    python -m bench.scaleout --quick    # 30k rows

Two cases:

* latency-bound: a model that takes 50 ms per request, API_MAX_WORKERS=5 per
  worker (fixed): one worker is capped at 5 / 0.05 s x API_BATCH_SIZE rows/s,
  so N workers should scale almost linearly (target: N=4 at least 3.2 x N=1);
* CPU-bound: the reference model at full speed, to show where this machine's
  PostgreSQL bends: PostgreSQL's CPU (its processes' user+system time) and the
  wait events its backends are seen in (sampled from pg_stat_activity).

Rates are rows over the group's span (its first worker's start to its last one's end,
from pipeline_runs): interpreter start-up excluded, as in the main benchmark. The
launcher's wall time is kept beside it.
"""

from __future__ import annotations

import argparse
import collections
import os
import platform
import threading
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson
import psutil
import psycopg

from bench.run import CLI, WORKDIR, dataset, log, timed_process, upload
from bench.services import Services, model_server, services

LATENCY_MS = 50
PER_WORKER_IN_FLIGHT = 5
# Small requests keep the latency-bound case about latency: with 100-row requests, four
# workers would need 40k rows/s of client, model and PostgreSQL CPU, more than two cores
# give; with 25 the ceiling is 2,500 rows/s per worker and the machine stays out of the way.
API_BATCH_SIZE = 25


def postgres_cpu_seconds(admin_url: str) -> float:
    """User+system seconds of every PostgreSQL process so far (the postmaster's tree)."""
    with psycopg.connect(admin_url) as conn:
        row = conn.execute("SELECT pg_backend_pid()").fetchone()
        assert row is not None
        postmaster = psutil.Process(row[0]).parent()  # backends are its children
    assert postmaster is not None
    # The postmaster reaps its backends: their CPU is in its children_* times once they exit.
    total = 0.0
    for proc in [postmaster, *postmaster.children(recursive=True)]:
        try:
            times = proc.cpu_times()
            total += times.user + times.system + times.children_user + times.children_system
        except psutil.NoSuchProcess:
            continue
    return total


class WaitSampler(threading.Thread):
    """Counts the wait events of the job's backends every 100 ms while a run goes on."""

    def __init__(self, database_url: str) -> None:
        super().__init__(daemon=True)
        self.url = database_url
        self.seen: collections.Counter[str] = collections.Counter()
        self.samples = 0
        self.done = threading.Event()

    def run(self) -> None:
        with psycopg.connect(self.url, autocommit=True) as conn:
            while not self.done.wait(0.1):
                rows = conn.execute(
                    """SELECT COALESCE(wait_event_type || ':' || wait_event, 'CPU (no wait)')
                       FROM pg_stat_activity
                       WHERE application_name LIKE 'batch-pipeline%%' AND state = 'active'"""
                ).fetchall()
                self.samples += 1
                self.seen.update(r[0] for r in rows)


def group_run(
    svc: Services, source_uri: str, rows: int, workers: int, model_url: str, **extra: str
) -> dict[str, Any]:
    database = svc.fresh_database()
    sampler = WaitSampler(database)
    sampler.start()
    pg_before = postgres_cpu_seconds(svc.admin_url)
    try:
        env = svc.env(
            database,
            SOURCE_URI=source_uri,
            ML_API_URL=model_url,
            RUN_GROUP=f"bench-{uuid.uuid4().hex[:8]}",
            **extra,
        )
        wall, _rss, code, output, _cpu = timed_process(
            [*CLI, "run", "--workers", str(workers)], env
        )
        with psycopg.connect(database) as conn:
            # The group's span, from its first run's start to its last run's end: interpreter
            # start-up excluded, as in the main benchmark.
            span = conn.execute(
                "SELECT EXTRACT(EPOCH FROM max(finished_at) - min(started_at))::float8"
                " FROM pipeline_runs"
            ).fetchone()
    finally:
        sampler.done.set()
        sampler.join()
        pg_cpu = postgres_cpu_seconds(svc.admin_url) - pg_before
        svc.drop_database(database)
    seconds = float(span[0]) if span and span[0] else wall
    if code not in (0, 3):
        raise RuntimeError(f"run --workers {workers} exited {code}:\n{output[-3000:]}")
    waits = {k: round(v / max(sampler.samples, 1), 2) for k, v in sampler.seen.most_common(6)}
    return {
        "workers": workers,
        "seconds": round(seconds, 2),
        "wall_seconds": round(wall, 2),  # the launcher's, interpreter start-ups included
        "rows_per_second": round(rows / seconds),
        "postgres_cpu_seconds": round(pg_cpu, 2),
        "postgres_cpu_share": round(pg_cpu / seconds, 2),  # cores PostgreSQL kept busy
        "backends_waiting_on": waits,  # mean backends seen in each state per sample
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.scaleout")
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--objects", type=int, default=16)
    parser.add_argument("--workers", default="1,2,4")
    parser.add_argument("--quick", action="store_true", help="30k rows")
    parser.add_argument("--output", default=str(WORKDIR / "results" / "scaleout.json"))
    args = parser.parse_args(argv)
    if args.quick:
        args.rows = 30_000
    counts = [int(n) for n in args.workers.split(",")]
    results: dict[str, Any] = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
        "rows": args.rows,
        "objects": args.objects,
    }
    with services(WORKDIR) as svc:
        uri = upload(svc, dataset(args.rows, args.objects), f"scaleout{args.rows}")
        with model_server(latency_ms=LATENCY_MS) as slow:
            latency = []
            for n in counts:
                log(f"latency-bound, {n} worker(s)")
                latency.append(
                    group_run(
                        svc,
                        uri,
                        args.rows,
                        n,
                        slow,
                        API_MAX_WORKERS=str(PER_WORKER_IN_FLIGHT),
                        API_CONCURRENCY="fixed",
                        API_BATCH_SIZE=str(API_BATCH_SIZE),
                    )
                )
        results["latency_bound"] = latency
        cpu = []
        for n in counts:
            log(f"CPU-bound, {n} worker(s)")
            cpu.append(group_run(svc, uri, args.rows, n, svc.model_url))
        results["cpu_bound"] = cpu
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(orjson.dumps(results, option=orjson.OPT_INDENT_2))
    print(render(results))
    return 0


def render(r: dict[str, Any]) -> str:
    ceiling = PER_WORKER_IN_FLIGHT / (LATENCY_MS / 1000) * API_BATCH_SIZE
    lines = [
        f"scale-out, {r['rows']:,} rows in {r['objects']} objects ({r['date']})",
        f"latency-bound ({LATENCY_MS} ms per request, {PER_WORKER_IN_FLIGHT} in flight per "
        f"worker: {ceiling:,.0f} rows/s per worker at most):",
    ]
    base = r["latency_bound"][0]["rows_per_second"]
    for m in r["latency_bound"]:
        lines.append(
            f"  N={m['workers']}: {m['rows_per_second']:>7,} rows/s  "
            f"{m['rows_per_second'] / base:.2f}x N=1  ({m['seconds']} s; wall {m['wall_seconds']} s)"
        )
    lines.append("CPU-bound (reference model at full speed):")
    base = r["cpu_bound"][0]["rows_per_second"]
    for m in r["cpu_bound"]:
        waits = ", ".join(f"{k} {v}" for k, v in m["backends_waiting_on"].items())
        lines.append(
            f"  N={m['workers']}: {m['rows_per_second']:>7,} rows/s  "
            f"{m['rows_per_second'] / base:.2f}x N=1  PostgreSQL {m['postgres_cpu_share']} cores; "
            f"backends: {waits}"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
