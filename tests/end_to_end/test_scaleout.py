"""Scale-out: N workers in one run group share one night's objects, with the same
exactly-once guarantees. Real processes on one machine, one database, one S3 server
and a model with latency; every table compared with a clean single run."""

from __future__ import annotations

import signal
import subprocess
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest

from tests.conftest import CLI, ROOT, Bucket, Database, free_port, run_cli, scratch_database
from tests.end_to_end.test_faults import model_server, stored, wait_for
from tests.end_to_end.test_resume import TOTALS, dump
from tests.helpers.data import row, rows, to_csv
from tests.observability.test_observability import gateway_metrics
from tests.observability.test_observability import pushgateway as pushgateway  # a fixture

OBJECTS = 12
LARGE = 5  # this object is ten times the others
SMALL_ROWS = 250


def object_rows(i: int) -> int:
    return (10 * SMALL_ROWS if i == LARGE else SMALL_ROWS) + 2  # an invalid row, a duplicate


def fill(bucket: Bucket) -> None:
    for i in range(OBJECTS):
        base = 100_000 * i
        n = object_rows(i) - 2
        records = [*rows(n, start=base), row(base + 1, amount="x"), row(base + 2, amount="2.22")]
        bucket.put(f"night/obj-{i:02d}.csv", to_csv(records))


@pytest.fixture(scope="module")
def slow_model() -> Iterator[str]:
    port = free_port()
    with model_server(port, latency_ms=10):
        yield f"http://127.0.0.1:{port}"


@pytest.fixture
def env(cli_env: dict[str, str], bucket: Bucket, slow_model: str) -> dict[str, str]:
    fill(bucket)
    return {
        **cli_env,
        "ML_API_URL": slow_model,
        "SOURCE_URI": bucket.uri("night/"),
        "ROW_BATCH_SIZE": "200",
        "API_BATCH_SIZE": "50",
        "DB_ROW_BATCH_SIZE": "100",
        "API_MAX_WORKERS": "2",
    }


@pytest.fixture
def clean(
    env: dict[str, str], pg_admin_url: str, template_db: str
) -> Iterator[tuple[dict[str, Any], tuple[Any, ...]]]:
    with scratch_database(pg_admin_url, template_db) as url:
        result = run_cli(["run"], {**env, "DATABASE_URL": url})
        assert result.code == 3, result.output
        yield dump(url), Database(url).rows(TOTALS)[0]


def worker(env: dict[str, str], group: str, index: int, **extra: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [*CLI, "run"],
        cwd=ROOT,
        env={**env, "RUN_GROUP": group, "JOB_COMPLETION_INDEX": str(index), **extra},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def finish(procs: list[subprocess.Popen[str]], timeout: float = 240) -> list[tuple[int, str]]:
    out = []
    for proc in procs:
        stdout, stderr = proc.communicate(timeout=timeout)
        out.append((proc.returncode, stdout + stderr))
    return out


def assert_exactly_once(database: Database, clean: tuple[dict[str, Any], tuple[Any, ...]]) -> None:
    """Every table as a clean single run, and every row of every object counted once."""
    expected, totals = clean
    assert dump(database.url) == expected
    assert database.rows(TOTALS)[0] == totals
    per_object = database.rows(
        "SELECT source_uri, sum(rows_read) FROM run_objects GROUP BY 1 ORDER BY 1"
    )
    assert [int(n) for _, n in per_object] == [object_rows(i) for i in range(OBJECTS)]


@pytest.mark.parametrize("workers", [1, 2, 4])
def test_n_workers_share_the_objects_exactly_once(
    env: dict[str, str],
    database: Database,
    clean: tuple[dict[str, Any], tuple[Any, ...]],
    workers: int,
) -> None:
    result = run_cli(["run", "--workers", str(workers)], {**env, "RUN_GROUP": "night-1"}, 240)
    assert result.code == 3, result.output
    assert_exactly_once(database, clean)
    # No object read twice in total: one run per object.
    reads = database.rows("SELECT source_uri, count(*) FROM run_objects GROUP BY 1")
    assert all(n == 1 for _, n in reads) and len(reads) == OBJECTS
    runs = database.rows(
        "SELECT run_group, worker_index, status FROM pipeline_runs ORDER BY worker_index"
    )
    assert [(g, i) for g, i, _s in runs] == [("night-1", i) for i in range(workers)]
    assert database.value("SELECT finished_at IS NOT NULL FROM run_groups") is True
    assert database.value("SELECT count(*) FROM run_group_objects") == OBJECTS
    assert "exit code 3 for the group" in result.output
    # The group in one look: its workers and their sum, and the group's exit code.
    status = run_cli(["status", "--group", "night-1"], env)
    assert status.code == 3, status.output
    assert f"workers:     {workers}\n" in status.stdout
    assert "state:       finished (exit 3 for the group)" in status.stdout
    assert f"objects:     {OBJECTS} of {OBJECTS} finished" in status.stdout
    total = sum(object_rows(i) for i in range(OBJECTS))
    assert f"rows:        {total} read" in status.stdout
    report = run_cli(["report", "--group", "night-1", "--format", "markdown"], env)
    assert report.code == 0 and "# Run group night-1" in report.stdout
    assert (
        report.stdout.count("| completed_with_errors |") + report.stdout.count("| completed |")
        == workers
    )


@pytest.mark.parametrize("flush", [1, 2])
def test_a_worker_killed_mid_object_is_taken_over_by_the_survivors(
    env: dict[str, str],
    database: Database,
    clean: tuple[dict[str, Any], tuple[Any, ...]],
    flush: int,
) -> None:
    # The worker dies right after its first or second flush: in the middle of its first
    # object (250 rows, flushes of 100). It starts first and the others once it holds
    # an object, so that they cannot leave it none. (Started together, a faster run of
    # the others sometimes did, and it finished alive; a later flush, up to the 12th,
    # was drawn at random before, for the same reason.)
    doomed = worker(env, "night-k", 1, BATCH_PIPELINE_FAILPOINTS=f"after_flush:{flush}")
    holding = (
        "SELECT count(*) FROM source_objects s JOIN pipeline_runs r USING (run_id)"
        " WHERE r.worker_index = 1"
    )
    wait_for(lambda: doomed.poll() is not None or database.value(holding) > 0)
    procs = [worker(env, "night-k", 0), doomed, worker(env, "night-k", 2)]
    results = finish(procs)
    assert results[1][0] == -signal.SIGKILL
    assert all(code in (0, 3) for code, _ in (results[0], results[2])), results
    assert_exactly_once(database, clean)
    # The dead worker is called abandoned, and the group is finished without it.
    statuses = database.rows("SELECT worker_index, status, error FROM pipeline_runs")
    dead = next(s for s in statuses if s[0] == 1)
    assert dead[1] == "failed" and dead[2].startswith("abandoned")
    assert database.value("SELECT finished_at IS NOT NULL FROM run_groups") is True


def test_a_late_joiner_reads_the_groups_listing_and_helps(
    env: dict[str, str], database: Database, clean: tuple[dict[str, Any], tuple[Any, ...]]
) -> None:
    first = worker(env, "night-l", 0)
    wait_for(lambda: stored(database.url) > 0, proc=first)
    late = worker(env, "night-l", 1)
    results = finish([first, late])
    assert all(code in (0, 3) for code, _ in results), results
    assert "Joined run group night-l: 12 object(s) listed" in results[1][1]
    assert_exactly_once(database, clean)


def test_two_groups_on_one_input_never_read_an_object_twice(
    env: dict[str, str], database: Database, clean: tuple[dict[str, Any], tuple[Any, ...]]
) -> None:
    procs = [worker(env, group, i) for group in ("night-a", "night-b") for i in range(2)]
    results = finish(procs)
    assert all(code in (0, 3) for code, _ in results), results
    assert_exactly_once(database, clean)
    # Whichever group read an object, the other skipped it as completed.
    assert database.value("SELECT count(*) FROM run_groups WHERE finished_at IS NOT NULL") == 2


def test_a_zombie_worker_cannot_write_after_its_object_was_taken_over(
    env: dict[str, str], database: Database, clean: tuple[dict[str, Any], tuple[Any, ...]]
) -> None:
    env = {**env, "API_BATCH_SIZE": "10"}  # slower, so that the zombie is caught mid-object
    zombie = worker(env, "night-z", 0)
    wait_for(lambda: stored(database.url) > 0, proc=zombie)
    zombie.send_signal(signal.SIGSTOP)
    try:
        run_id = database.value("SELECT run_id FROM pipeline_runs WHERE worker_index = 0")
        with psycopg.connect(database.url, autocommit=True) as conn:
            conn.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                " WHERE application_name LIKE %s",
                (f"%{run_id}%",),
            )
        held = database.value(
            "SELECT count(*) FROM source_objects WHERE run_id = %s AND status = 'processing'",
            (run_id,),
        )
        assert held >= 1  # mid-object (the reader may have claimed the next one already)
        rescuer = worker(env, "night-z", 1)
        rescued = finish([rescuer])[0]
        assert rescued[0] in (0, 3), rescued[1]
        assert (
            database.value("SELECT count(*) FROM source_objects WHERE status = 'completed'")
            == OBJECTS
        )
    finally:
        zombie.send_signal(signal.SIGCONT)
    code, said = finish([zombie])[0]
    assert code in (0, 3), said
    assert "Lost the claim on" in said or "another run holds it now" in said
    assert_exactly_once(database, clean)


def test_a_threshold_crossed_in_one_worker_stops_the_group(
    env: dict[str, str], bucket: Bucket, database: Database
) -> None:
    bad = [row(900_000 + i, amount="x") for i in range(300)]
    bucket.put("night/obj-00.csv", to_csv(bad))
    procs = [worker(env, "night-t", i) for i in range(2)]
    results = finish(procs)
    codes = sorted(code for code, _ in results)
    assert 4 in codes, results
    assert database.value("SELECT stop_exit_code FROM run_groups") == 4
    # A worker started later in the same group (a retried pod) claims nothing.
    late = worker(env, "night-t", 2)
    code, said = finish([late])[0]
    assert code == 4, said
    assert "was stopped by run" in said


def test_each_worker_pushes_under_its_index_and_the_group_its_last_success(
    env: dict[str, str], database: Database, pushgateway: str
) -> None:
    env = {**env, "PUSHGATEWAY_URL": pushgateway, "PROGRESS": "off"}
    result = run_cli(["run", "--workers", "2"], {**env, "RUN_GROUP": "night-m"}, 240)
    assert result.code == 3, result.output
    got = gateway_metrics(pushgateway)
    read = got["batch_pipeline_rows_total"]
    by_worker = {
        dict(labels)["worker"]: value
        for labels, value in read.items()
        if dict(labels).get("outcome") == "read"
    }
    # Two series, one per worker, that add up to the night's rows: no pod overwrote another.
    assert set(by_worker) == {"0", "1"}
    assert sum(by_worker.values()) == sum(object_rows(i) for i in range(OBJECTS))
    # The last success is the group's: pushed once, under the job alone, when it finished.
    assert list(got["batch_pipeline_last_success_timestamp_seconds"]) == [()]
