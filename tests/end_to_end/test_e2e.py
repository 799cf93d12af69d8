"""End to end: the real `batch-pipeline run`, as a subprocess, against the real
S3 server, PostgreSQL and model servers; assertions on the rows of every table."""

from __future__ import annotations

import re
from decimal import Decimal
from pathlib import Path

import pytest

from tests.conftest import S3_SECRET, Bucket, Database, run_cli, with_database
from tests.helpers.data import HEADER, gz, row, rows, to_csv, zst
from tests.helpers.fake_model import FakeModel

TABLES = {
    "transactions": "SELECT transaction_id, event_time, account_id, merchant_id, merchant_category, amount,"
    " currency, country, channel, card_present, source_uri, source_version, source_line"
    " FROM transactions ORDER BY 1",
    "predictions": "SELECT transaction_id, model_version, fraud_score, prediction FROM predictions ORDER BY 1, 2",
    "invalid_rows": "SELECT source_uri, source_version, line_number, raw_text, reasons FROM invalid_rows ORDER BY 1, 3",
    "failed_transactions": "SELECT transaction_id, reason, http_status, attempts, resolved_at IS NULL"
    " FROM failed_transactions ORDER BY 1",
    "source_objects": "SELECT source_uri, source_version, status, checkpoint_line, rows_read, rows_valid,"
    " rows_invalid, rows_scored, rows_failed FROM source_objects ORDER BY 1",
}


def dump(database: Database) -> dict[str, list[tuple[object, ...]]]:
    """Every table, minus timestamps and run ids."""
    return {name: database.rows(sql) for name, sql in TABLES.items()}


def run(env: dict[str, str], *args: str) -> object:
    return run_cli(["run", *args], env)


def test_clean_input_is_completed_with_exit_0(
    bucket: Bucket, cli_env: dict[str, str], database: Database
) -> None:
    bucket.put("in/a.csv", to_csv(rows(250)))
    result = run_cli(["run", "--source", bucket.uri("in/")], cli_env)
    assert result.code == 0, result.output
    assert "Pipeline complete: 250 processed, 0 failed, 0 invalid" in result.stderr
    assert "Pipeline Run ID: batch_" in result.stderr
    assert database.value("SELECT count(*) FROM transactions") == 250
    assert database.value("SELECT count(*) FROM predictions") == 250
    assert database.rows(
        "SELECT status, rows_read, rows_valid, rows_invalid, rows_scored, rows_failed FROM pipeline_runs"
    ) == [("completed", 250, 250, 0, 250, 0)]
    assert (
        database.value(
            "SELECT count(*) FROM (SELECT prediction, COUNT(*) AS count, AVG(fraud_score) AS avg_score"
            " FROM predictions GROUP BY prediction) s"
        )
        >= 1
    )


def test_mixed_file_lands_exactly(
    bucket: Bucket, cli_env: dict[str, str], database: Database
) -> None:
    records = [
        row(1),
        row(2, amount="-4.00", currency="usd"),  # invalid, two reasons
        row(3, account_id='acc "quoted",\nmultiline'),  # spans two lines
        row(1, amount="55.55"),  # duplicate: the later row wins
        row(5, event_time="2026-02-30T00:00:00Z"),  # invalid date
    ]
    text = to_csv(records)
    uri = bucket.put("in/mixed.csv", text)
    result = run(cli_env, "--source", uri, "--max-invalid-ratio", "1")
    assert result.code == 3, result.output
    tx = {r[0]: r for r in database.rows(TABLES["transactions"])}
    assert set(tx) == {"tx-000001", "tx-000003"}
    assert tx["tx-000001"][5] == Decimal("55.55")
    assert tx["tx-000001"][12] == 6  # the line of the latest row (the quoted newline counts)
    assert tx["tx-000003"][2] == 'acc "quoted",\nmultiline'
    assert tx["tx-000001"][10] == uri
    invalid = database.rows("SELECT line_number, raw_text, reasons FROM invalid_rows ORDER BY 1")
    lines = text.split("\n")
    assert [(i[0], i[1]) for i in invalid] == [(3, lines[2]), (7, lines[6])]
    assert sorted(r["column"] for r in invalid[0][2]) == ["amount", "currency"]
    assert invalid[1][2] == [
        {
            "column": "event_time",
            "message": "is not a valid calendar date",
            "value": "2026-02-30T00:00:00Z",
        }
    ]
    assert database.value("SELECT count(*) FROM predictions") == 2
    assert database.rows(
        "SELECT rows_read, rows_valid, rows_invalid, rows_scored, rows_failed FROM pipeline_runs"
    ) == [(5, 3, 2, 3, 0)]
    assert "Pipeline complete: 3 processed, 0 failed, 2 invalid" in result.stderr


@pytest.mark.parametrize(("setting", "expected"), [(None, 3), ("0", 0), ("3", 3)])
def test_completed_with_errors_exit_code_is_a_setting(
    bucket: Bucket,
    cli_env: dict[str, str],
    database: Database,
    tmp_path: Path,
    setting: str | None,
    expected: int,
) -> None:
    """A night with a few invalid rows exits 3 by default; with the setting at 0 (for
    Kubernetes, where any other code is a failed pod and a retry) it exits 0, and the
    status stays completed_with_errors in the ledger, the summary and the metrics."""
    bucket.put("in/a.csv", to_csv([row(1), row(2, amount="-4.00"), row(3)]))
    metrics = tmp_path / "batch.prom"
    env = {**cli_env, "MAX_INVALID_RATIO": "0.5", "METRICS_TEXTFILE": str(metrics)}
    if setting is not None:
        env["COMPLETED_WITH_ERRORS_EXIT_CODE"] = setting
    result = run(env, "--source", bucket.uri("in/"))
    assert result.code == expected, result.output
    assert f"status:        completed_with_errors (exit {expected})" in result.stdout
    assert database.rows(
        "SELECT status, rows_invalid, summary->>'status', (summary->>'exit_code')::int"
        " FROM pipeline_runs"
    ) == [("completed_with_errors", 1, "completed_with_errors", expected)]
    assert 'batch_pipeline_run_status{status="completed_with_errors"} 1.0' in metrics.read_text()
    assert database.value("SELECT count(*) FROM invalid_rows") == 1


def test_completed_with_errors_exit_code_leaves_the_other_codes(
    bucket: Bucket, cli_env: dict[str, str], database: Database
) -> None:
    env = {**cli_env, "COMPLETED_WITH_ERRORS_EXIT_CODE": "0", "MAX_INVALID_RATIO": "0.1"}
    bucket.put("in/a.csv", to_csv([row(1), row(2, amount="-4.00"), row(3)]))
    crossed = run(env, "--source", bucket.uri("in/"))
    assert crossed.code == 4, crossed.output  # a threshold still fails the Job at once
    assert database.value("SELECT status FROM pipeline_runs") == "failed"
    bad = run({**env, "COMPLETED_WITH_ERRORS_EXIT_CODE": "1"}, "--source", bucket.uri("in/"))
    assert bad.code == 2, bad.output
    assert "COMPLETED_WITH_ERRORS_EXIT_CODE: must be 0 or 3 (got '1')" in bad.stderr


def test_gzip_and_zstd_objects(bucket: Bucket, cli_env: dict[str, str], database: Database) -> None:
    bucket.put("in/1.csv.gz", gz(to_csv(rows(30))))
    bucket.put("in/2.csv.zst", zst(to_csv(rows(20, start=30))))
    result = run(cli_env, "--source", bucket.uri("in/"))
    assert result.code == 0, result.output
    assert database.value("SELECT count(*) FROM transactions") == 50
    assert [r[2] for r in database.rows(TABLES["source_objects"])] == ["completed", "completed"]


def test_object_missing_a_column_is_refused_and_the_run_goes_on(
    bucket: Bucket, cli_env: dict[str, str], database: Database
) -> None:
    bucket.put("in/a.csv", to_csv(rows(5), header=[c for c in HEADER if c != "merchant_id"]))
    bucket.put("in/b.csv", to_csv(rows(7)))
    result = run(cli_env, "--source", bucket.uri("in/"))
    assert result.code == 3, result.output
    assert f"{bucket.uri('in/a.csv')}: missing required column: merchant_id" in result.stderr
    assert database.value("SELECT count(*) FROM transactions") == 7
    statuses = {r[0]: (r[2], r[4]) for r in database.rows(TABLES["source_objects"])}
    assert statuses == {
        bucket.uri("in/a.csv"): ("failed", 0),
        bucket.uri("in/b.csv"): ("completed", 7),
    }
    assert "missing required column: merchant_id" in database.value(
        "SELECT error FROM source_objects WHERE rows_read = 0"
    )


def test_poison_transaction_in_a_batch_of_100(
    bucket: Bucket, cli_env: dict[str, str], database: Database, fake_model: FakeModel
) -> None:
    fake_model.knobs.poison_ids = {"tx-000057"}
    bucket.put("in/a.csv", to_csv(rows(100)))
    result = run(
        {**cli_env, "ML_API_URL": fake_model.url, "MAX_FAILED_RATIO": "0.05"},
        "--source",
        bucket.uri("in/"),
    )
    assert result.code == 3, result.output
    assert database.value("SELECT count(*) FROM predictions") == 99
    assert (
        database.value("SELECT count(*) FROM transactions") == 100
    )  # stored whether scored or not
    [failed] = database.rows(TABLES["failed_transactions"])
    assert failed[0] == "tx-000057" and failed[2] == 422 and failed[3] == 1 and failed[4] is True
    assert (
        database.value("SELECT count(*) FROM predictions WHERE transaction_id = 'tx-000057'") == 0
    )
    assert "Pipeline complete: 99 processed, 1 failed, 0 invalid" in result.stderr


def test_transient_api_failures_recover(
    bucket: Bucket, cli_env: dict[str, str], database: Database, fake_model: FakeModel
) -> None:
    fake_model.knobs.fail_times, fake_model.knobs.fail_status, fake_model.knobs.retry_after = (
        3,
        503,
        "0",
    )
    bucket.put("in/a.csv", to_csv(rows(300)))
    env = {**cli_env, "ML_API_URL": fake_model.url, "API_MAX_WORKERS": "1"}
    result = run(env, "--source", bucket.uri("in/"))
    assert result.code == 0, result.output
    assert database.value("SELECT count(*) FROM predictions") == 300
    assert database.value("SELECT count(*) FROM failed_transactions") == 0
    assert result.stderr.count("ML API request failed") == 3


def test_a_repeated_run_leaves_the_database_identical(
    bucket: Bucket, cli_env: dict[str, str], database: Database
) -> None:
    bucket.put("in/a.csv", to_csv([*rows(40), row(3, amount="9.99"), row(7, channel="bad")]))
    bucket.put("in/b.csv.gz", gz(to_csv(rows(30, start=35))))
    first = run(cli_env, "--source", bucket.uri("in/"), "--max-invalid-ratio", "1")
    assert first.code == 3, first.output
    before = dump(database)
    again = run(cli_env, "--source", bucket.uri("in/"), "--max-invalid-ratio", "1", "--reprocess")
    assert again.code == 3, again.output
    assert dump(database) == before
    assert database.value("SELECT count(*) FROM pipeline_runs") == 2


def test_api_down_fails_the_run_with_exit_1(
    bucket: Bucket, cli_env: dict[str, str], database: Database
) -> None:
    bucket.put("in/a.csv", to_csv(rows(5)))
    result = run({**cli_env, "ML_API_URL": "http://127.0.0.1:9"}, "--source", bucket.uri("in/"))
    assert result.code == 1, result.output
    assert (
        "cannot reach the ML API at http://127.0.0.1:9/health: connection refused" in result.stderr
    )
    assert database.rows("SELECT status FROM pipeline_runs") == [("failed",)]


def test_api_down_mid_run_stops_without_writing_unscored_rows(
    bucket: Bucket, cli_env: dict[str, str], database: Database, fake_model: FakeModel
) -> None:
    bucket.put("in/a.csv", to_csv(rows(50)))
    fake_model.knobs.always_status = 503
    env = {**cli_env, "ML_API_URL": fake_model.url, "API_MAX_RETRIES": "2", "API_DOWN_TIMEOUT": "1"}
    result = run(env, "--source", bucket.uri("in/"))
    assert result.code == 1, result.output
    assert f"the ML API at {fake_model.url}/predict has failed every request for" in result.stderr
    assert "last: HTTP 503" in result.stderr
    assert database.value("SELECT count(*) FROM transactions") == 0
    assert database.rows("SELECT status, checkpoint_line FROM source_objects") == [
        ("processing", 1)
    ]


def test_unmigrated_database_is_refused_then_migrated(
    bucket: Bucket, cli_env: dict[str, str], empty_database_url: str
) -> None:
    bucket.put("in/a.csv", to_csv(rows(3)))
    env = {**cli_env, "DATABASE_URL": empty_database_url}
    refused = run(env, "--source", bucket.uri("in/"))
    assert refused.code == 2, refused.output
    assert "the database is not migrated (pending: V1__create_tables.sql, V2__" in refused.stderr
    assert "batch-pipeline migrate" in refused.stderr
    migrated = run(env, "--source", bucket.uri("in/"), "--migrate")
    assert migrated.code == 0, migrated.output
    assert Database(empty_database_url).value("SELECT count(*) FROM transactions") == 3


def test_migrate_command_is_idempotent(cli_env: dict[str, str], empty_database_url: str) -> None:
    env = {**cli_env, "DATABASE_URL": empty_database_url}
    assert run_cli(["migrate"], env).code == 0
    second = run_cli(["migrate"], env)
    assert second.code == 0 and "up to date" in second.stderr
    assert Database(empty_database_url).rows(
        "SELECT version, script, success FROM flyway_schema_history ORDER BY installed_rank"
    )[0] == ("1", "V1__create_tables.sql", True)


def test_local_folder_source(tmp_path: Path, cli_env: dict[str, str], database: Database) -> None:
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.csv").write_text(to_csv(rows(12)))
    result = run(cli_env, "--source", str(tmp_path / "in"))
    assert result.code == 0, result.output
    assert database.value("SELECT count(*) FROM predictions") == 12
    assert database.value("SELECT source_uri FROM transactions LIMIT 1") == str(
        (tmp_path / "in" / "a.csv").resolve()
    )


def test_dry_run_reads_and_validates_without_api_or_writes(
    bucket: Bucket, cli_env: dict[str, str], database: Database
) -> None:
    bucket.put("in/a.csv", to_csv([*rows(9), row(99, amount="x")]))
    env = {**cli_env, "ML_API_URL": "http://127.0.0.1:9"}
    result = run(env, "--source", bucket.uri("in/"), "--dry-run", "--max-invalid-ratio", "1")
    assert result.code == 3, result.output
    assert "10 read, 9 valid, 1 invalid" in result.stdout
    assert database.value("SELECT count(*) FROM pipeline_runs") == 0


def test_invalid_ratio_over_the_threshold_fails_with_exit_4(
    bucket: Bucket, cli_env: dict[str, str], database: Database
) -> None:
    bucket.put("in/a.csv", to_csv([*rows(8), row(50, amount="0"), row(51, amount="0")]))
    result = run(cli_env, "--source", bucket.uri("in/"))
    assert result.code == 4, result.output
    assert "MAX_INVALID_RATIO crossed: 2 of 10 rows read are invalid" in result.stderr
    assert database.rows("SELECT status FROM pipeline_runs") == [("failed",)]


@pytest.mark.parametrize(
    ("variable", "value", "message"),
    [
        (
            "API_MAX_WORKERS",
            "0",
            "API_MAX_WORKERS: Input should be greater than or equal to 1 (got '0')",
        ),
        ("ROW_BATCH_SIZE", "abc", "ROW_BATCH_SIZE: Input should be a valid integer"),
        ("ML_API_URL", "not a url", "ML_API_URL: must be an http:// or https:// URL with a host"),
        ("DATABASE_URL", "mysql://u:hunter2@h/db", "DATABASE_URL: must be a postgresql:// URL"),
        ("MAX_FAILED_RATIO", "2", "MAX_FAILED_RATIO: Input should be less than or equal to 1"),
    ],
)
def test_bad_configuration_exits_2_naming_the_variable(
    cli_env: dict[str, str], variable: str, value: str, message: str
) -> None:
    result = run({**cli_env, variable: value, "SOURCE_URI": "s3://bucket/in/"})
    assert result.code == 2
    assert message in result.stderr
    assert "hunter2" not in result.output


def test_secrets_never_appear_in_output(
    bucket: Bucket, cli_env: dict[str, str], database: Database
) -> None:
    password = "pw-Secret-7731"
    database.execute(f"CREATE ROLE runner LOGIN SUPERUSER PASSWORD '{password}'")
    url = database.url.replace("postgresql://postgres", f"postgresql://runner:{password}", 1)
    assert password in url
    bucket.put("in/a.csv", to_csv([*rows(3), row(9, amount="bad")]))
    ok = run(
        {**cli_env, "DATABASE_URL": url}, "--source", bucket.uri("in/"), "--max-invalid-ratio", "1"
    )
    assert ok.code == 3, ok.output
    denied = run({**cli_env, "DATABASE_URL": url}, "--source", "s3://no-such-bucket-0/in/")
    assert denied.code == 1 and "NoSuchBucket" in denied.stderr
    down = run(
        {**cli_env, "DATABASE_URL": with_database(url, "no_such_database")},
        "--source",
        bucket.uri("in/"),
    )
    assert down.code == 1 and "cannot connect to the database" in down.stderr
    for result in (ok, denied, down):
        assert password not in result.output
        assert S3_SECRET not in result.output
    stored = database.rows("SELECT settings::text, coalesce(error, '') FROM pipeline_runs")
    assert stored and all(password not in s and S3_SECRET not in s for row_ in stored for s in row_)


def test_demo_runs_the_real_job_on_the_embedded_database(
    tmp_path: Path, cli_env: dict[str, str]
) -> None:
    import subprocess
    import sys

    env = {
        k: v
        for k, v in cli_env.items()
        if k not in ("DATABASE_URL", "EMBEDDED_DB_DIR", "XDG_DATA_HOME")
    }
    env["HOME"] = str(tmp_path / "home")  # the per-user database, never the real home's
    env["UV"] = "/usr/local/bin/uv"  # as `python3 -m uv run` sets it
    demo = subprocess.run(
        [sys.executable, "-m", "pipeline.batch.main", "demo", "--rows", "600"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert demo.returncode == 0, demo.stdout + demo.stderr
    assert "completed_with_errors" in demo.stdout or "completed (exit 0)" in demo.stdout
    assert "600 read" in demo.stdout
    # The command the user can paste: --no-dev, like the README's, installs no dev tools.
    assert 'python3 -m uv run --no-dev batch-pipeline query "SELECT prediction, COUNT(*)' in (
        demo.stdout
    )
    assert (
        str(tmp_path / "home" / ".local" / "share" / "batch-pipeline" / "postgres") in demo.stdout
    )
    query = subprocess.run(
        [
            sys.executable,
            "-m",
            "pipeline.batch.main",
            "query",
            "SELECT count(*) AS n FROM pipeline_runs",
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert query.returncode == 0, query.stderr
    assert query.stdout.splitlines()[2].strip() == "1"


def test_adaptive_concurrency_finds_the_capacity_of_the_service(
    bucket: Bucket, cli_env: dict[str, str], database: Database, fake_model: FakeModel
) -> None:
    # The service answers 429 whenever more than 2 requests are in flight; the ceiling is 4 times that.
    fake_model.knobs.max_in_flight, fake_model.knobs.delay_seconds = 2, 0.01
    bucket.put("in/a.csv", to_csv(rows(3000)))
    env = {
        **cli_env,
        "ML_API_URL": fake_model.url,
        "SOURCE_URI": bucket.uri("in/"),
        "API_BATCH_SIZE": "20",
        "API_MAX_WORKERS": "8",
        "API_MAX_RETRIES": "3",
    }
    adaptive = run(env)
    assert adaptive.code == 0, adaptive.output
    assert database.value("SELECT count(*) FROM failed_transactions") == 0
    assert "concurrency:   adaptive, settled at" in adaptive.stdout
    settled = int(adaptive.stdout.split("settled at ")[1].split()[0])
    assert 1 <= settled <= 3
    fixed = run({**env, "API_CONCURRENCY": "fixed", "MAX_FAILED_RATIO": "1"}, "--reprocess")
    assert fixed.code in (0, 3), fixed.output
    assert "concurrency:   fixed at 8" in fixed.stdout
    # At 4x the capacity a fixed pool keeps hitting 429: it retries far more, or fails rows.
    retries = [
        int(re.search(r"api requests: +\d+ \((\d+) retries\)", r.stdout)[1])
        for r in (adaptive, fixed)
    ]  # type: ignore[index]
    assert (
        retries[1] > 2 * retries[0]
        or database.value("SELECT count(*) FROM failed_transactions") > 0
    )


# -- quotes: text inside a quoted field never becomes a row ---------------------------


def test_a_csv_line_inside_a_long_quoted_field_is_never_stored_as_a_transaction(
    bucket: Bucket, cli_env: dict[str, str], database: Database
) -> None:
    smuggled = to_csv([row(99, transaction_id="tx-SMUGGLED", amount="9999.00")]).splitlines()[1]
    filler = ("y" * 999 + "\n") * 70
    field = filler + smuggled + "\n" + filler  # 140 KB, a whole CSV row among its lines
    uri = bucket.put("in/a.csv", to_csv([row(1), row(2, account_id=field), row(3)]))
    result = run(cli_env, "--source", uri, "--max-invalid-ratio", "1")
    assert result.code == 3, result.output
    assert database.rows("SELECT transaction_id, source_line FROM transactions ORDER BY 1") == [
        ("tx-000001", 2),
        ("tx-000003", 145),
    ]
    [(line, raw, reasons)] = database.rows(
        "SELECT line_number, raw_text, reasons FROM invalid_rows"
    )
    assert line == 3 and raw.startswith("tx-000002,") and "SMUGGLED" not in raw
    assert reasons[0]["message"].endswith("over lines 3-144 is longer than the limit of 131072")
    assert database.rows(
        "SELECT status, rows_read, rows_valid, rows_invalid, rows_scored FROM pipeline_runs"
    ) == [("completed_with_errors", 3, 2, 1, 2)]
    assert database.rows("SELECT status, rows_read FROM source_objects") == [("completed", 3)]


def test_an_unclosed_quote_fails_its_object_keeps_the_rows_before_and_the_run_goes_on(
    bucket: Bucket, cli_env: dict[str, str], database: Database
) -> None:
    lines = to_csv(rows(3000)).splitlines(keepends=True)
    lines[10] = lines[10].replace(",acc-", ',"acc-', 1)  # row 10 of 3,000, line 11: a stray quote
    bad = bucket.put("in/a.csv", "".join(lines))
    good = bucket.put("in/b.csv", to_csv(rows(5, start=5000)))
    message = (
        f"{bad}: line 11: unterminated quoted field: the quote opened there is still open"
        " at the end of the object (an unmatched quote?); nothing from line 11 on is read"
    )
    for _ in ("first run", "rerun: resumes the failed object and fails it again"):
        result = run(cli_env, "--source", bucket.uri("in/"))
        assert result.code == 1, result.output
        assert message in result.stderr
        assert database.rows(
            "SELECT source_uri, status, checkpoint_line, rows_read, rows_valid, rows_invalid,"
            " rows_scored, error FROM source_objects ORDER BY 1"
        ) == [(bad, "failed", 10, 9, 9, 0, 9, message), (good, "completed", 6, 5, 5, 0, 5, None)]
    assert database.rows(
        "SELECT transaction_id FROM transactions WHERE source_uri = %s ORDER BY 1", (bad,)
    ) == [(f"tx-{i:06d}",) for i in range(9)]
    runs = database.rows("SELECT status, rows_read, error FROM pipeline_runs ORDER BY started_at")
    assert [r[:2] for r in runs] == [("failed", 14), ("failed", 0)]
    assert all(r[2] == f"1 object(s) could not be read: {message}" for r in runs)


def test_a_10mb_quoted_field_fails_its_object_past_the_limit_and_is_one_row_within(
    bucket: Bucket, cli_env: dict[str, str], database: Database
) -> None:
    field = ("z" * 99 + "\n") * 100_000  # 10 MB over 100,000 lines
    uri = bucket.put("in/a.csv", to_csv([row(1), row(2, account_id=field), row(3)]))
    failed = run(cli_env, "--source", uri)
    assert failed.code == 1, failed.output
    assert (
        f"{uri}: line 3: unterminated quoted field: the quote opened there is still open after"
        " 8388608 characters (MAX_QUOTED_FIELD_CHARS)"
    ) in failed.stderr
    assert database.rows("SELECT status, checkpoint_line, rows_read FROM source_objects") == [
        ("failed", 2, 1)
    ]
    raised = run(
        cli_env, "--source", uri, "--max-quoted-field-chars", "16777216", "--max-invalid-ratio", "1"
    )
    assert raised.code == 3, raised.output
    assert database.rows("SELECT transaction_id, source_line FROM transactions ORDER BY 1") == [
        ("tx-000001", 2),
        ("tx-000003", 100_004),
    ]
    assert database.rows("SELECT line_number FROM invalid_rows") == [(3,)]
    assert database.rows(
        "SELECT status, checkpoint_line, rows_read, rows_valid, rows_invalid FROM source_objects"
    ) == [("completed", 100_004, 3, 2, 1)]
