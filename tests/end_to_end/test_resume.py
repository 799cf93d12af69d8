"""Crash-safe resume: kill the job at many points, rerun, and compare every table
with a clean uninterrupted run. Identical every time: no row lost, none twice."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import time
from collections.abc import Iterator

import pytest

from tests.conftest import CLI, ROOT, Bucket, Database, Result, run_cli, scratch_database
from tests.helpers.data import gz, row, rows, to_csv, zst
from tests.helpers.fake_model import FakeModel

# Every table, minus timestamps and run ids.
DUMP = {
    "transactions": "SELECT transaction_id, event_time, account_id, merchant_id, merchant_category, amount,"
    " currency, country, channel, card_present, source_uri, source_version, source_line FROM transactions ORDER BY 1",
    "predictions": "SELECT transaction_id, model_version, fraud_score, prediction FROM predictions ORDER BY 1, 2",
    "invalid_rows": "SELECT source_uri, source_version, line_number, raw_text, reasons FROM invalid_rows ORDER BY 1, 3",
    "failed_transactions": "SELECT transaction_id, model_version, reason, http_status, attempts, resolved_at IS NULL"
    " FROM failed_transactions ORDER BY 1",
    "source_objects": "SELECT source_uri, source_version, size_bytes, status, checkpoint_line, rows_read, rows_valid,"
    " rows_invalid, rows_scored, rows_failed, error FROM source_objects ORDER BY 1",
}
TOTALS = "SELECT sum(rows_read), sum(rows_valid), sum(rows_invalid), sum(rows_scored), sum(rows_failed) FROM pipeline_runs"
POISON = {"tx-000133", "tx-001502", "tx-002345"}


def dump(url: str) -> dict[str, list[tuple[object, ...]]]:
    db = Database(url)
    return {name: db.rows(sql) for name, sql in DUMP.items()}


def fill(bucket: Bucket) -> None:
    """Four objects: invalid rows, duplicates within and across objects, quoted newlines,
    poison transactions the model refuses, gzip and zstd."""
    a = [*rows(700), row(5, amount="12.34"), row(9, currency="usd"), row(44, account_id='a,"b"\nc')]
    b = [*rows(700, start=700), row(100, amount="99.99"), row(1000, amount="-1")]
    c = [*rows(700, start=1400), row(1500, channel="x"), row(1450, amount="1.11")]
    d = [*rows(700, start=2100), row(2, amount="2.22"), row(2200, event_time="nope")]
    bucket.put("in/a.csv", to_csv(a))
    bucket.put("in/b.csv.gz", gz(to_csv(b)))
    bucket.put("in/c.csv", to_csv(c))
    bucket.put("in/d.csv.zst", zst(to_csv(d)))


@pytest.fixture
def env(cli_env: dict[str, str], fake_model: FakeModel, bucket: Bucket) -> dict[str, str]:
    fake_model.knobs.poison_ids = set(POISON)
    fill(bucket)
    return {
        **cli_env,
        "ML_API_URL": fake_model.url,
        "SOURCE_URI": bucket.uri("in/"),
        "ROW_BATCH_SIZE": "300",
        "API_BATCH_SIZE": "50",
        "DB_ROW_BATCH_SIZE": "200",
        "API_MAX_WORKERS": "3",
        "MAX_FAILED_RATIO": "0.05",
    }


@pytest.fixture
def second_db(pg_admin_url: str, template_db: str) -> Iterator[str]:
    """A second migrated database, for the clean run to compare with."""
    with scratch_database(pg_admin_url, template_db) as url:
        yield url


@pytest.fixture
def clean(
    env: dict[str, str], second_db: str
) -> tuple[dict[str, list[tuple[object, ...]]], tuple[object, ...]]:
    result = run_cli(["run"], {**env, "DATABASE_URL": second_db})
    assert result.code == 3, result.output
    return dump(second_db), Database(second_db).rows(TOTALS)[0]


def killed(env: dict[str, str], failpoints: str) -> Result:
    result = run_cli(["run"], {**env, "BATCH_PIPELINE_FAILPOINTS": failpoints})
    assert result.code == -signal.SIGKILL, result.output
    return result


@pytest.mark.parametrize(
    "failpoints",
    [
        "before_flush:1",  # before the first flush: nothing written yet
        "after_flush:3",  # mid-object
        "flush_before_commit:5",  # during a flush, after every statement, before COMMIT
        "after_object:2",  # between two objects
        "after_flush:14",  # in the last object (about 4 flushes per object)
    ],
)
def test_killed_then_resumed_equals_a_clean_run(
    env: dict[str, str],
    database: Database,
    clean: tuple[dict[str, object], tuple[object, ...]],
    failpoints: str,
) -> None:
    killed(env, failpoints)
    resumed = run_cli(["run"], env)
    assert resumed.code == 3, resumed.output
    expected, totals = clean
    assert dump(database.url) == expected
    # Every row counted exactly once across the killed run and the one that resumed it.
    assert database.rows(TOTALS)[0] == totals
    statuses = database.rows("SELECT status, error FROM pipeline_runs ORDER BY started_at, run_id")
    assert statuses[0][0] == "failed" and statuses[0][1].startswith(
        "abandoned: its process stopped"
    )
    assert statuses[1] == ("completed_with_errors", None)


def test_killed_twice_at_different_points_then_resumed(
    env: dict[str, str], database: Database, clean: tuple[dict[str, object], tuple[object, ...]]
) -> None:
    killed(env, "after_flush:2")
    killed(env, "flush_before_commit:3")
    assert run_cli(["run"], env).code == 3
    expected, totals = clean
    assert dump(database.url) == expected
    assert database.rows(TOTALS)[0] == totals


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_killed_at_a_random_moment_then_resumed(
    env: dict[str, str],
    database: Database,
    clean: tuple[dict[str, object], tuple[object, ...]],
    seed: int,
) -> None:
    delay = random.Random(seed).uniform(0.3, 2.5)
    proc = subprocess.Popen(
        [*CLI, "run"], cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    time.sleep(delay)
    proc.send_signal(signal.SIGKILL)
    proc.wait(30)
    assert run_cli(["run"], env).code in (0, 3)
    expected, totals = clean
    assert dump(database.url) == expected
    assert database.rows(TOTALS)[0] == totals


def started_and_flushed(env: dict[str, str], database: Database) -> subprocess.Popen[str]:
    """A run in the background, once its first flush is committed."""
    proc = subprocess.Popen(
        [*CLI, "run"], cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    deadline = time.monotonic() + 60
    while database.value("SELECT count(*) FROM transactions") == 0:
        assert time.monotonic() < deadline and proc.poll() is None
        time.sleep(0.05)
    return proc


def test_sigterm_flushes_what_was_scored_exits_143_and_resumes(
    env: dict[str, str],
    database: Database,
    fake_model: FakeModel,
    clean: tuple[dict[str, object], tuple[object, ...]],
) -> None:
    fake_model.knobs.delay_seconds = 0.05
    proc = started_and_flushed(env, database)
    proc.send_signal(signal.SIGTERM)
    _stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 143, stderr
    assert "SIGTERM received: stopping after flushing what was scored" in stderr
    assert database.rows("SELECT status, error FROM pipeline_runs") == [
        ("interrupted", "interrupted by SIGTERM")
    ]
    stored, scored = database.rows(
        "SELECT (SELECT count(*) FROM transactions), rows_scored FROM pipeline_runs"
    )[0]
    assert 0 < scored < 2800 and stored > 0
    fake_model.knobs.delay_seconds = 0
    assert run_cli(["run"], env).code == 3
    expected, totals = clean
    assert dump(database.url) == expected
    assert database.rows(TOTALS)[0] == totals


def test_sigint_exits_130(env: dict[str, str], database: Database, fake_model: FakeModel) -> None:
    fake_model.knobs.delay_seconds = 0.05
    proc = started_and_flushed(env, database)
    os.kill(proc.pid, signal.SIGINT)
    proc.communicate(timeout=60)
    assert proc.returncode == 130
    assert database.value("SELECT status FROM pipeline_runs") == "interrupted"


def test_two_runs_at_once_never_process_the_same_object_twice(
    env: dict[str, str], bucket: Bucket, database: Database, second_db: str, fake_model: FakeModel
) -> None:
    # Concurrent runs share out the objects; when two objects carry the same
    # transaction_id, the one committed last wins (documented), so this input has
    # its duplicates within objects only.
    for n, name in enumerate(("a.csv", "b.csv.gz", "c.csv", "d.csv.zst")):
        records = [
            *rows(600, start=1000 * n),
            row(1000 * n + 7, amount="7.77"),
            row(1000 * n + 3, amount="x"),
        ]
        body = to_csv(records)
        bucket.put(
            f"solo/{name}",
            gz(body) if name.endswith(".gz") else zst(body) if name.endswith(".zst") else body,
        )
    env = {**env, "SOURCE_URI": bucket.uri("solo/")}
    assert run_cli(["run"], {**env, "DATABASE_URL": second_db}).code == 3
    clean = dump(second_db), Database(second_db).rows(TOTALS)[0]
    fake_model.knobs.delay_seconds = 0.01
    procs = [
        subprocess.Popen(
            [*CLI, "run"],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    outputs = [p.communicate(timeout=120) for p in procs]
    assert sorted(p.returncode for p in procs) in ([0, 3], [3, 3]), outputs
    per_object = database.rows("SELECT source_uri, count(*) FROM run_objects GROUP BY 1 ORDER BY 1")
    assert [n for _, n in per_object] == [1, 1, 1, 1]  # each object read by exactly one run
    expected, totals = clean
    assert dump(database.url) == expected
    assert database.rows(TOTALS)[0] == totals
    said = "".join(err for _, err in outputs)
    assert "another run (batch_" in said or "already completed at version" in said
