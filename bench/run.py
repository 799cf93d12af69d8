"""The benchmark: `python -m bench` (or `uv run python -m bench --help`).

It generates a deterministic input per the contract (about 1% invalid rows and 1%
duplicates, split into several objects), uploads it to an S3 server, starts
PostgreSQL, the S3 server and the reference model server on 127.0.0.1 (each in
its own process), and measures, as rows per second, median of --repeat runs:

1. end to end: `batch-pipeline run` over the whole input;
2. read + validate alone: `batch-pipeline run --dry-run`;
3. scoring alone: the same valid rows through the scoring client, nothing written;
4. write alone: the same rows, already scored, through the sink.

Then the efficiency (end to end / slowest stage alone), the client CPU per row
(user + system of the `batch-pipeline run` process, from `wait4`) with its
breakdown by stage, the peer (the seed's design, `../shared/peer/seed_baseline.py`)
side by side on the same rows in one object, the pipeline pinned to one core with
the services on the other (taskset), a before/after against another checkout
(--baseline), the peak RSS of the pipeline process, wall time and peak RSS at each of --scale sizes, the
end-to-end rate against a model that adds 20 ms to every request (5 and 20
workers) next to its ceiling (workers x API_BATCH_SIZE / latency), adaptive
concurrency against a model with a capacity of K requests in flight, and the cost
of progress, JSON logs and metrics. Figures go to a JSON file and a table.

Every run uses the job's defaults unless a measure says otherwise.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson

from bench.peer import PEER_SCRIPT, elapsed_seconds, one_object, peer_available, peer_python
from bench.services import PYTHON, Services, model_server, services
from library.config import DEFAULT_API_BATCH_SIZE
from library.demo.sample_data import write_sample

ROOT = Path(__file__).resolve().parent.parent
WORKDIR = ROOT / ".batch-pipeline" / "bench"
CLI = [PYTHON, "-m", "pipeline.batch.main"]
BUCKET = "bench"
LATENCY_MS = 20.0
LATENCY_ROWS = 200_000
CAPACITY = 4


@dataclass
class Measure:
    """One run. `seconds` is the time the work took, interpreter start-up excluded:
    the run's own summary time (listing included) or the stage's own timer."""

    rows: int
    seconds: float
    peak_rss_mb: float | None = None
    cpu_seconds: float | None = None
    output: str = ""
    wall_seconds: float | None = None  # the whole process, start-up included

    @property
    def rate(self) -> float:
        return self.rows / self.seconds if self.seconds else 0.0


def run_seconds(output: str) -> float:
    """The `time:` of the job's summary: 'time:          23.8s (41964 rows/s)', or its
    `seconds` with LOG_FORMAT=json (the summary is then one JSON event)."""
    for line in output.splitlines():
        if line.startswith("time:"):
            return float(line.split()[1].rstrip("s"))
        if line.startswith("{") and '"Run summary"' in line:
            return float(orjson.loads(line)["summary"]["seconds"])
    raise RuntimeError("no 'time:' line in the output:\n" + output[-2000:])


def log(message: str) -> None:
    print(f"[bench {datetime.now():%H:%M:%S}] {message}", file=sys.stderr, flush=True)


# -- input ---------------------------------------------------------------------


def dataset(rows: int, objects: int, seed: int = 7) -> list[Path]:
    """Deterministic objects of the contract; cached under .batch-pipeline/bench/data."""
    folder = WORKDIR / "data" / f"{rows}_{objects}_{seed}"
    marker = folder / ".complete"
    if marker.exists():
        return sorted(p for p in folder.iterdir() if p.name.endswith(".csv"))
    log(f"generating {rows:,} rows in {objects} objects")
    paths = write_sample(folder, rows, objects, seed, suffixes=(".csv",))
    marker.touch()
    return paths


def upload(svc: Services, paths: list[Path], prefix: str) -> str:
    with contextlib.suppress(svc.s3.exceptions.BucketAlreadyOwnedByYou):
        svc.s3.create_bucket(Bucket=BUCKET)
    for path in paths:
        svc.s3.upload_file(str(path), BUCKET, f"{prefix}/{path.name}")
    return f"s3://{BUCKET}/{prefix}/"


# -- running ---------------------------------------------------------------------


def timed_process(
    args: list[str], env: dict[str, str], cwd: Path = ROOT
) -> tuple[float, float, int, str, float]:
    """Wall seconds, peak RSS (MB), exit code, output and CPU seconds (user + system,
    from `wait4`) of one child process.

    The peak RSS is the child's own high-water mark (VmHWM), read from /proc while it
    runs, not `wait4`'s ru_maxrss: Linux records the forking process's high-water mark
    in the child's ru_maxrss at exec, so every child of this process (which holds the
    generated input) would report at least this process's peak."""
    began = time.perf_counter()
    proc = subprocess.Popen(
        args, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    assert proc.stdout is not None
    peak = HighWaterMark(proc.pid)
    peak.start()
    output = proc.stdout.read().decode("utf-8", "replace")
    peak.stop()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    seconds = time.perf_counter() - began
    cpu = usage.ru_utime + usage.ru_stime
    return seconds, peak.kib / 1024, proc.returncode, output, cpu


class HighWaterMark(threading.Thread):
    """A running process's peak resident set (VmHWM, KiB), read every 20 ms until
    `stop`: it only grows, so the last value read is the peak up to then (an exited
    process has no memory left to read)."""

    def __init__(self, pid: int) -> None:
        super().__init__(daemon=True)
        self.path = Path(f"/proc/{pid}/status")
        self.kib = 0
        self._stopping = threading.Event()

    def run(self) -> None:
        while True:
            self._read()
            if self._stopping.wait(0.02):
                return

    def stop(self) -> None:
        self._stopping.set()
        self.join()
        self._read()

    def _read(self) -> None:
        with contextlib.suppress(OSError, ValueError):
            for line in self.path.read_text().splitlines():
                if line.startswith("VmHWM:"):
                    self.kib = max(self.kib, int(line.split()[1]))


def end_to_end(
    svc: Services,
    source_uri: str,
    rows: int,
    prefix: list[str] | None = None,
    cwd: Path = ROOT,
    **env: str,
) -> Measure:
    """One `batch-pipeline run` on a fresh database; `prefix` (taskset) wraps the command,
    `cwd` another checkout of the project (the baseline of a before/after)."""
    database = svc.fresh_database()
    try:
        seconds, rss, code, output, cpu = timed_process(
            [*(prefix or []), *CLI, "run"], svc.env(database, SOURCE_URI=source_uri, **env), cwd
        )
    finally:
        svc.drop_database(database)
    if code not in (0, 3):
        raise RuntimeError(f"batch-pipeline run exited {code}:\n{output[-3000:]}")
    return Measure(rows, run_seconds(output), rss, cpu, output=output, wall_seconds=seconds)


def dry_run(svc: Services, source_uri: str, rows: int) -> Measure:
    # Reading and validating alone: no embedded database for the dry run's ledger lookup.
    no_database = {"EMBEDDED_DB_DIR": "/nonexistent/batch-pipeline-bench"}
    seconds, rss, code, output, _ = timed_process(
        [*CLI, "run", "--dry-run"], svc.env("", SOURCE_URI=source_uri, **no_database)
    )
    if code not in (0, 3):
        raise RuntimeError(f"dry run exited {code}:\n{output[-3000:]}")
    return Measure(rows, run_seconds(output), rss, output=output, wall_seconds=seconds)


def stage(svc: Services, name: str, source_uri: str, **env: str) -> Measure:
    database = svc.fresh_database()
    try:
        _, rss, code, output, _ = timed_process(
            [PYTHON, "-m", "bench.stages", name], svc.env(database, SOURCE_URI=source_uri, **env)
        )
    finally:
        svc.drop_database(database)
    if code != 0:
        raise RuntimeError(f"stage {name} exited {code}:\n{output[-3000:]}")
    figures = orjson.loads(output.strip().splitlines()[-1])
    return Measure(int(figures["rows"]), figures["seconds"], rss, figures["cpu_seconds"])


def median(measure: Callable[[], Measure], repeat: int, label: str) -> tuple[Measure, list[float]]:
    runs = []
    for i in range(repeat):
        m = measure()
        log(f"{label} {i + 1}/{repeat}: {m.rate:,.0f} rows/s ({m.seconds:.1f}s)")
        runs.append(m)
    runs.sort(key=lambda m: m.rate)
    return runs[len(runs) // 2], [round(m.rate) for m in runs]


def summary_value(output: str, key: str) -> str:
    for line in output.splitlines():
        if line.startswith(key):
            return line.split(":", 1)[1].strip()
    return ""


# -- the measures ----------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n\n")[1])
    parser.add_argument(
        "--rows", type=int, default=1_000_000, help="rows of the main input [1000000]"
    )
    parser.add_argument(
        "--objects", type=int, default=10, help="objects the input is split into [10]"
    )
    parser.add_argument(
        "--repeat", type=int, default=3, help="runs per measure; the median is kept [3]"
    )
    parser.add_argument(
        "--scale",
        default="100000,1000000,5000000",
        help="sizes for the growth table, comma-separated",
    )
    parser.add_argument(
        "--quick", action="store_true", help="100k rows, 1 run each, scale 100k and 300k"
    )
    parser.add_argument("--output", default=str(WORKDIR / "results" / "latest.json"))
    parser.add_argument(
        "--only",
        default="stages,cpu,peer,one_core,scale,latency,adaptive,observability,protocols",
        help="which measures to take, comma-separated",
    )
    parser.add_argument(
        "--baseline",
        help="another checkout of the project (say `git worktree add /tmp/base main`): its"
        " runs alternate with this one's on the same input, for a before/after",
    )
    args = parser.parse_args(argv)
    if args.quick:
        args.rows, args.repeat, args.scale = 100_000, 1, "100000,300000"
    only = set(args.only.split(","))
    results: dict[str, Any] = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": {
            "cpus": os.cpu_count(),
            "memory_gb": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
            "python": platform.python_version(),
            "platform": platform.platform(),
        },
        "rows": args.rows,
        "objects": args.objects,
        "repeat": args.repeat,
    }
    with services(WORKDIR) as svc:
        main_uri = upload(svc, dataset(args.rows, args.objects), f"rows{args.rows}")
        if "stages" in only:
            measure_stages(svc, main_uri, args, results)
        if "cpu" in only:
            measure_cpu(svc, main_uri, args, results)
        if args.baseline:
            measure_baseline(svc, main_uri, args, results)
        if "peer" in only:
            measure_peer(svc, args, results)
        if "one_core" in only:
            measure_one_core(svc, main_uri, args, results)
        if "scale" in only:
            measure_scale(svc, args, results)
        if "latency" in only:
            measure_latency(svc, args, results)
        if "adaptive" in only:
            measure_adaptive(svc, args, results)
        if "observability" in only:
            measure_observability(svc, main_uri, args, results)
        if "protocols" in only:
            measure_protocols(svc, args, results)
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(orjson.dumps(results, option=orjson.OPT_INDENT_2))
    print(render(results))
    log(f"figures written to {out}")
    return 0


def measure_stages(
    svc: Services, uri: str, args: argparse.Namespace, results: dict[str, Any]
) -> None:
    rows, repeat = args.rows, args.repeat
    e2e, e2e_runs = median(lambda: end_to_end(svc, uri, rows), repeat, "end to end")
    read, read_runs = median(lambda: dry_run(svc, uri, rows), repeat, "read + validate")
    score, score_runs = median(lambda: stage(svc, "score", uri), repeat, "scoring alone")
    write, write_runs = median(lambda: stage(svc, "write", uri), repeat, "write alone")
    stages = {"read_validate": read.rate, "score": score.rate, "write": write.rate}
    slowest = min(stages, key=lambda k: stages[k])
    results["stages"] = {
        "end_to_end": {
            "rows_per_second": round(e2e.rate),
            "runs": e2e_runs,
            "seconds": round(e2e.seconds, 2),
        },
        "read_validate": {"rows_per_second": round(read.rate), "runs": read_runs},
        "score": {
            "rows_per_second": round(score.rate),
            "runs": score_runs,
            "client_cpu_ms_per_1000_rows": round(
                1000 * (score.cpu_seconds or 0) / score.rows * 1000, 2
            ),
        },
        "write": {"rows_per_second": round(write.rate), "runs": write_runs},
        "slowest_stage": slowest,
        "efficiency": round(e2e.rate / stages[slowest], 3),
        "peak_rss_mb": round(e2e.peak_rss_mb or 0, 1),
        "summary": {
            k: summary_value(e2e.output, k) for k in ("concurrency", "stage times", "limited by")
        },
    }


def measure_scale(svc: Services, args: argparse.Namespace, results: dict[str, Any]) -> None:
    table = []
    for size in [int(s) for s in args.scale.split(",") if s]:
        uri = upload(svc, dataset(size, max(args.objects, size // 100_000)), f"rows{size}")
        m = end_to_end(svc, uri, size)
        log(f"scale {size:,}: {m.seconds:.1f}s, peak RSS {m.peak_rss_mb:.0f} MB")
        table.append(
            {
                "rows": size,
                "seconds": round(m.seconds, 2),
                "rows_per_second": round(m.rate),
                "peak_rss_mb": round(m.peak_rss_mb or 0, 1),
            }
        )
    results["scale"] = table
    by_rows = {t["rows"]: t for t in table}
    if 1_000_000 in by_rows and 5_000_000 in by_rows:
        one, five = by_rows[1_000_000], by_rows[5_000_000]
        results["scale_ratios"] = {
            "time_5m_over_1m": round(five["seconds"] / one["seconds"], 2),
            "rss_5m_over_1m": round(five["peak_rss_mb"] / one["peak_rss_mb"], 3),
        }


def measure_latency(svc: Services, args: argparse.Namespace, results: dict[str, Any]) -> None:
    """Against a model that adds 20 ms to every request: the rate next to the ceiling
    workers x API_BATCH_SIZE / latency, or the machine's own end-to-end limit (the
    rate without latency, on the same input) when that is lower: "up to the CPU
    limit". The limit is measured here, on these rows: a run of 200k rows pays its
    start and its last flush over fewer rows than the main input's."""
    rows = min(LATENCY_ROWS, args.rows)
    uri = upload(svc, dataset(rows, 4, seed=11), f"latency{rows}")
    limit, _ = median(lambda: end_to_end(svc, uri, rows), args.repeat, "latency input, no latency")
    cpu_limit = limit.rate
    table = []
    with model_server(latency_ms=LATENCY_MS) as slow:
        for workers in (5, 20):
            m, _ = median(
                lambda w=workers: end_to_end(
                    svc, uri, rows, ML_API_URL=slow, API_MAX_WORKERS=str(w)
                ),
                args.repeat,
                f"latency {LATENCY_MS:g} ms, {workers} workers",
            )
            ceiling = workers * DEFAULT_API_BATCH_SIZE / (LATENCY_MS / 1000)
            reachable = min(ceiling, cpu_limit) if cpu_limit else ceiling
            # Against the ceiling, count only the valid rows (about 99%: the invalid
            # ones are never sent); the CPU limit was measured on the same kind of input.
            scored_rate = m.rate * 0.99 if reachable == ceiling else m.rate
            log(
                f"latency {LATENCY_MS:g} ms, {workers} workers: {m.rate:,.0f} rows/s (ceiling {ceiling:,.0f})"
            )
            table.append(
                {
                    "workers": workers,
                    "rows_per_second": round(m.rate),
                    "ceiling_rows_per_second": round(ceiling),
                    "reachable_rows_per_second": round(reachable),
                    "fraction_of_reachable": round(scored_rate / reachable, 3),
                    "concurrency": summary_value(m.output, "concurrency"),
                }
            )
    results["latency_20ms"] = table
    results["latency_20ms_cpu_limit"] = round(cpu_limit)


def measure_adaptive(svc: Services, args: argparse.Namespace, results: dict[str, Any]) -> None:
    rows = min(LATENCY_ROWS, args.rows)
    uri = upload(svc, dataset(rows, 4, seed=11), f"latency{rows}")
    table = {}
    with model_server(latency_ms=5, capacity=CAPACITY) as limited:
        cases = {
            f"fixed_at_capacity_{CAPACITY}": {
                "API_CONCURRENCY": "fixed",
                "API_MAX_WORKERS": str(CAPACITY),
            },
            f"adaptive_ceiling_{4 * CAPACITY}": {
                "API_CONCURRENCY": "adaptive",
                "API_MAX_WORKERS": str(4 * CAPACITY),
            },
            f"fixed_at_{4 * CAPACITY}": {
                "API_CONCURRENCY": "fixed",
                "API_MAX_WORKERS": str(4 * CAPACITY),
            },
        }
        for name, env in cases.items():
            m = end_to_end(svc, uri, rows, ML_API_URL=limited, MAX_FAILED_RATIO="1", **env)
            failed = summary_value(m.output, "rows").split(",")[-1].strip()
            log(f"capacity {CAPACITY}, {name}: {m.rate:,.0f} rows/s, {failed}")
            table[name] = {
                "rows_per_second": round(m.rate),
                "failed": failed,
                "api_requests": summary_value(m.output, "api requests"),
                "concurrency": summary_value(m.output, "concurrency"),
            }
    fixed = table[f"fixed_at_capacity_{CAPACITY}"]["rows_per_second"]
    adaptive = table[f"adaptive_ceiling_{4 * CAPACITY}"]["rows_per_second"]
    results["adaptive"] = {
        "capacity": CAPACITY,
        "cases": table,
        "adaptive_over_fixed_at_capacity": round(adaptive / fixed, 3),
    }


def measure_observability(
    svc: Services, uri: str, args: argparse.Namespace, results: dict[str, Any]
) -> None:
    """Off and on in alternation, so that the machine's drift during the measure falls
    on both sides alike; the cost is from the medians."""
    textfile = WORKDIR / "metrics.prom"
    on_env = {
        "PROGRESS": "log",
        "PROGRESS_INTERVAL": "1",
        "LOG_FORMAT": "json",
        "METRICS_TEXTFILE": str(textfile),
    }
    pairs = max(args.repeat, OBSERVABILITY_PAIRS) if args.repeat > 1 else 1
    off_runs: list[float] = []
    on_runs: list[float] = []
    for i in range(pairs):
        off_runs.append(end_to_end(svc, uri, args.rows).rate)
        on_runs.append(end_to_end(svc, uri, args.rows, **on_env).rate)
        log(
            f"observability pair {i + 1}/{pairs}: off {off_runs[-1]:,.0f}, on {on_runs[-1]:,.0f} rows/s"
        )
    off, on = statistics.median(off_runs), statistics.median(on_runs)
    results["observability"] = {
        "off_rows_per_second": round(off),
        "on_rows_per_second": round(on),
        "off_runs": [round(r) for r in off_runs],
        "on_runs": [round(r) for r in on_runs],
        "cost": round(1 - on / off, 4),
        "on": "PROGRESS=log every 1 s, LOG_FORMAT=json, METRICS_TEXTFILE",
    }


def cpu_us(m: Measure) -> float:
    """Client CPU per row (user + system of the whole process), microseconds."""
    return 1e6 * (m.cpu_seconds or 0.0) / m.rows


def interleaved(
    cases: dict[str, Callable[[], Measure]], repeat: int, label: str
) -> dict[str, list[Measure]]:
    """Rounds of every case in turn, so that the machine's drift falls on all alike."""
    runs: dict[str, list[Measure]] = {name: [] for name in cases}
    for i in range(repeat):
        for name, measure in cases.items():
            m = measure()
            runs[name].append(m)
            log(
                f"{label} {i + 1}/{repeat}, {name}: {m.rate:,.0f} rows/s ({m.seconds:.1f}s),"
                f" CPU {cpu_us(m):.1f} us/row, peak RSS {m.peak_rss_mb or 0:.0f} MB"
            )
    return runs


def medians(runs: list[Measure]) -> dict[str, Any]:
    return {
        "rows_per_second": round(statistics.median(m.rate for m in runs)),
        "seconds": round(statistics.median(m.seconds for m in runs), 2),
        "cpu_us_per_row": round(statistics.median(cpu_us(m) for m in runs), 2),
        "peak_rss_mb": round(statistics.median(m.peak_rss_mb or 0.0 for m in runs), 1),
        "runs": [round(m.rate) for m in runs],
    }


STARTUP = [
    PYTHON,
    "-c",
    "import pipeline.batch.main, library.jobs.run, library.jobs.flow, boto3, smart_open",
]


def measure_cpu(svc: Services, uri: str, args: argparse.Namespace, results: dict[str, Any]) -> None:
    """Client CPU per row of `batch-pipeline run` (user + system of the process, from
    `wait4`), and where it goes: each stage's CPU alone (bench.stages cpu), the
    interpreter's start-up with the imports, and the rest ("other": threads, queues,
    HTTP and database clients, the ledger, logs)."""
    runs = [end_to_end(svc, uri, args.rows) for _ in range(args.repeat)]
    e2e = medians(runs)
    log(f"client CPU: {e2e['cpu_us_per_row']} us/row end to end")
    _, _, code, output, startup = timed_process(STARTUP, svc.env(""))
    if code != 0:
        raise RuntimeError(f"start-up probe exited {code}:\n{output[-2000:]}")
    database = svc.fresh_database()
    try:
        _, _, code, output, _ = timed_process(
            [PYTHON, "-m", "bench.stages", "cpu"], svc.env(database, SOURCE_URI=uri)
        )
    finally:
        svc.drop_database(database)
    if code != 0:
        raise RuntimeError(f"stage cpu exited {code}:\n{output[-3000:]}")
    figures = orjson.loads(output.strip().splitlines()[-1])
    rows = int(figures.pop("rows"))
    per_row = {k: round(1e6 * v / rows, 2) for k, v in figures.items()}
    per_row["start_up"] = round(1e6 * startup / args.rows, 2)
    per_row["other"] = round(e2e["cpu_us_per_row"] - sum(per_row.values()), 2)
    results["cpu"] = {**e2e, "us_per_row_by_stage": per_row}


def measure_baseline(
    svc: Services, uri: str, args: argparse.Namespace, results: dict[str, Any]
) -> None:
    """This checkout against --baseline, alternating, on the main input."""
    base = Path(args.baseline).resolve()
    runs = interleaved(
        {
            "this": lambda: end_to_end(svc, uri, args.rows),
            "baseline": lambda: end_to_end(svc, uri, args.rows, cwd=base),
        },
        args.repeat,
        "before/after",
    )
    this, before = medians(runs["this"]), medians(runs["baseline"])
    results["baseline"] = {
        "baseline": str(base),
        "this": this,
        "before": before,
        "speed_up": round(this["rows_per_second"] / before["rows_per_second"], 3),
        "cpu_ratio": round(this["cpu_us_per_row"] / before["cpu_us_per_row"], 3),
    }


def peer_run(svc: Services, python: Path, uri: str, rows: int) -> Measure:
    database = svc.empty_database()
    try:
        seconds, rss, code, output, cpu = timed_process(
            [str(python), str(PEER_SCRIPT)], svc.env(database, SOURCE_URI=uri)
        )
    finally:
        svc.drop_database(database)
    if code != 0:
        raise RuntimeError(f"the peer exited {code}:\n{output[-3000:]}")
    return Measure(rows, elapsed_seconds(output), rss, cpu, output=output, wall_seconds=seconds)


def measure_peer(svc: Services, args: argparse.Namespace, results: dict[str, Any]) -> None:
    """The seed's design beside the pipeline: the same rows in one object, the same
    services, a database each, interleaved rounds, medians."""
    if not peer_available():
        log(f"no peer at {PEER_SCRIPT}: skipped")
        results["peer"] = {"skipped": f"no peer at {PEER_SCRIPT}"}
        return
    python = peer_python(WORKDIR)
    folder = WORKDIR / "data" / f"{args.rows}_{args.objects}_7_one"
    path = one_object(dataset(args.rows, args.objects), folder)
    prefix = f"one{args.rows}"
    with contextlib.suppress(svc.s3.exceptions.BucketAlreadyOwnedByYou):
        svc.s3.create_bucket(Bucket=BUCKET)
    svc.s3.upload_file(str(path), BUCKET, f"{prefix}/{path.name}")
    uri = f"s3://{BUCKET}/{prefix}/{path.name}"
    runs = interleaved(
        {
            "pipeline": lambda: end_to_end(svc, uri, args.rows),
            "peer": lambda: peer_run(svc, python, uri, args.rows),
        },
        args.repeat,
        "side by side",
    )
    ours, peer = medians(runs["pipeline"]), medians(runs["peer"])
    results["peer"] = {
        "input": "the same rows in one object",
        "pipeline": ours,
        "peer": peer,
        "speed_up": round(ours["rows_per_second"] / peer["rows_per_second"], 2),
        "cpu_ratio": round(peer["cpu_us_per_row"] / ours["cpu_us_per_row"], 2),
    }


def measure_one_core(
    svc: Services, uri: str, args: argparse.Namespace, results: dict[str, Any]
) -> None:
    """The pipeline on CPU 0 alone, PostgreSQL, S3 and the model on CPU 1 (taskset): the
    rate, and the pipeline's own rate per core from its CPU per row. Other processes of
    the machine are not pinned."""
    if (os.cpu_count() or 1) < 2:
        results["one_core"] = {"skipped": "needs two CPUs"}
        return
    with svc.pinned("1"):
        runs = [
            end_to_end(svc, uri, args.rows, prefix=["taskset", "-c", "0"])
            for _ in range(args.repeat)
        ]
    m = medians(runs)
    log(f"one core: {m['rows_per_second']:,} rows/s, CPU {m['cpu_us_per_row']} us/row")
    busy = min(runs, key=lambda r: abs(r.rate - m["rows_per_second"]))
    results["one_core"] = {
        **m,
        "own_rate_per_core": round(1e6 / m["cpu_us_per_row"]) if m["cpu_us_per_row"] else 0,
        "limited_by": summary_value(busy.output, "limited by"),
        "stage_times": summary_value(busy.output, "stage times"),
        "pinned_database": not os.environ.get("BENCH_DATABASE_URL"),
    }


PROTOCOL_ROWS = 100_000
OBSERVABILITY_PAIRS = 5  # the difference is small: more runs than the other measures


def measure_protocols(svc: Services, args: argparse.Namespace, results: dict[str, Any]) -> None:
    """Each protocol against its real server: rows per second end to end, and the
    client's CPU per 1000 rows in the scoring stage alone."""
    from bench.services import free_port
    from tools.model_servers.servers import (
        ensure_venvs,
        mlflow_server,
        mlserver_server,
        train_models,
    )

    rows = min(PROTOCOL_ROWS, args.rows)
    uri = upload(svc, dataset(rows, 4, seed=13), f"protocols{rows}")
    log("building the model servers' venvs and training the model (first time: ~1 minute)")
    ensure_venvs()
    for folder in ("mlflow", "mlserver"):
        (WORKDIR / folder).mkdir(parents=True, exist_ok=True)
    trained = train_models(WORKDIR / "model")
    servers = {
        "mlflow": (
            mlflow_server(trained.mlflow_model, free_port(), WORKDIR / "mlflow"),
            {"ML_API_PROTOCOL": "mlflow", "MODEL_VERSION": trained.model_version},
        ),
        "v2": (
            mlserver_server(
                trained.mlserver_repository,
                trained.model_name,
                free_port(),
                free_port(),
                WORKDIR / "mlserver",
            ),
            {"ML_API_PROTOCOL": "v2", "MODEL_NAME": trained.model_name},
        ),
    }
    table: dict[str, Any] = {}

    def measure(name: str, url: str, env: dict[str, str]) -> None:
        e2e = end_to_end(svc, uri, rows, ML_API_URL=url, **env)
        alone = stage(svc, "score", uri, ML_API_URL=url, **env)
        cpu_per_1000 = 1000 * (alone.cpu_seconds or 0) / alone.rows * 1000
        log(
            f"protocol {name}: {e2e.rate:,.0f} rows/s end to end, client CPU {cpu_per_1000:.1f} ms/1000 rows"
        )
        table[name] = {
            "rows_per_second": round(e2e.rate),
            "scoring_alone_rows_per_second": round(alone.rate),
            "client_cpu_ms_per_1000_rows": round(cpu_per_1000, 2),
            "limited_by": summary_value(e2e.output, "limited by"),
        }

    measure("native", svc.model_url, {"ML_API_PROTOCOL": "native"})
    for name, (server, env) in servers.items():
        server.start()
        try:
            measure(name, server.url, env)
        finally:
            server.stop()
    results["protocols"] = {"rows": rows, "cases": table, "model_auc": trained.auc}


# -- the table -------------------------------------------------------------------


def render(r: dict[str, Any]) -> str:
    lines = [
        f"batch-pipeline benchmark, {r['date']}, {r['machine']['cpus']} CPUs, Python {r['machine']['python']}"
    ]
    if "stages" in r:
        s = r["stages"]
        lines += [
            f"input: {r['rows']:,} rows in {r['objects']} objects; median of {r['repeat']}",
            f"  end to end          {s['end_to_end']['rows_per_second']:>9,} rows/s  ({s['end_to_end']['seconds']}s)",
            f"  read + validate     {s['read_validate']['rows_per_second']:>9,} rows/s",
            f"  scoring alone       {s['score']['rows_per_second']:>9,} rows/s  (client CPU {s['score']['client_cpu_ms_per_1000_rows']} ms / 1000 rows)",
            f"  write alone         {s['write']['rows_per_second']:>9,} rows/s",
            f"  efficiency          {s['efficiency']:>9}  (end to end / {s['slowest_stage']} alone; target >= 0.6)",
            f"  peak RSS            {s['peak_rss_mb']:>9} MB (target <= 300)",
        ]
    if "cpu" in r:
        c = r["cpu"]
        by = ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in c["us_per_row_by_stage"].items())
        lines.append(
            f"client CPU per row: {c['cpu_us_per_row']} us (target <= 11); by stage, us: {by}"
        )
    if "baseline" in r:
        b = r["baseline"]
        lines.append(
            f"before/after (alternating, {b['baseline']}): {b['this']['rows_per_second']:,} vs"
            f" {b['before']['rows_per_second']:,} rows/s ({b['speed_up']}x), CPU"
            f" {b['this']['cpu_us_per_row']} vs {b['before']['cpu_us_per_row']} us/row,"
            f" peak RSS {b['this']['peak_rss_mb']} vs {b['before']['peak_rss_mb']} MB"
        )
    if "peer" in r:
        p = r["peer"]
        if "skipped" in p:
            lines.append(f"peer: {p['skipped']}")
        else:
            us, them = p["pipeline"], p["peer"]
            lines += [
                "side by side with the peer (the seed's design), one object, interleaved:",
                f"  batch-pipeline  {us['rows_per_second']:>8,} rows/s  ({us['seconds']}s), CPU {us['cpu_us_per_row']} us/row, peak RSS {us['peak_rss_mb']} MB",
                f"  peer            {them['rows_per_second']:>8,} rows/s  ({them['seconds']}s), CPU {them['cpu_us_per_row']} us/row, peak RSS {them['peak_rss_mb']} MB",
                f"  {p['speed_up']}x the peer's rate (target >= 4), {p['cpu_ratio']}x less CPU per row",
            ]
    if "one_core" in r:
        o = r["one_core"]
        if "skipped" in o:
            lines.append(f"one core: {o['skipped']}")
        else:
            lines.append(
                f"one core (pipeline on CPU 0, services on CPU 1): {o['rows_per_second']:,} rows/s"
                f" (target >= 80,000), CPU {o['cpu_us_per_row']} us/row = {o['own_rate_per_core']:,}"
                f" rows/s per core of its own; {o['limited_by']}"
            )
    if "scale" in r:
        lines.append("scale:  rows        seconds   rows/s    peak RSS MB")
        for t in r["scale"]:
            lines.append(
                f"        {t['rows']:>10,}  {t['seconds']:>7}  {t['rows_per_second']:>8,}  {t['peak_rss_mb']:>8}"
            )
        if "scale_ratios" in r:
            q = r["scale_ratios"]
            lines.append(
                f"        5M/1M time {q['time_5m_over_1m']} (target <= 5.5), RSS {q['rss_5m_over_1m']} (target <= 1.15)"
            )
    if "latency_20ms" in r:
        lines.append("model latency 20 ms:")
        for t in r["latency_20ms"]:
            bound = (
                "ceiling"
                if t["reachable_rows_per_second"] == t["ceiling_rows_per_second"]
                else f"CPU limit {t['reachable_rows_per_second']:,}"
            )
            lines.append(
                f"  {t['workers']:>2} workers  {t['rows_per_second']:>8,} rows/s; ceiling {t['ceiling_rows_per_second']:,}:"
                f" {t['fraction_of_reachable']:.0%} of the {bound} (target >= 80%)  {t['concurrency']}"
            )
    if "adaptive" in r:
        a = r["adaptive"]
        lines.append(f"model capacity {a['capacity']} in flight:")
        for name, t in a["cases"].items():
            lines.append(
                f"  {name:<22} {t['rows_per_second']:>8,} rows/s  {t['failed']}, {t['api_requests']}"
            )
        lines.append(
            f"  adaptive / fixed at capacity: {a['adaptive_over_fixed_at_capacity']} (target >= 0.8)"
        )
    if "protocols" in r:
        p = r["protocols"]
        lines.append(
            f"protocols ({p['rows']:,} rows, each against its real server; model AUC {p['model_auc']}):"
        )
        for name, t in p["cases"].items():
            lines.append(
                f"  {name:<7} {t['rows_per_second']:>8,} rows/s end to end, scoring alone {t['scoring_alone_rows_per_second']:>8,}"
                f" rows/s, client CPU {t['client_cpu_ms_per_1000_rows']} ms / 1000 rows"
            )
    if "observability" in r:
        o = r["observability"]
        lines.append(
            f"progress, JSON logs and metrics: {o['on_rows_per_second']:,} vs {o['off_rows_per_second']:,} rows/s off: "
            f"cost {o['cost']:.1%} (target < 3%)"
        )
    return "\n".join(lines)
