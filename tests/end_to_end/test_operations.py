"""Operating the job: lineage and skipping, --limit, retry-failed, status, report,
monitoring views, and the error thresholds."""

from __future__ import annotations

import csv
import io
import json
import re
import subprocess
import time
from pathlib import Path

from tests.conftest import CLI, ROOT, Bucket, Database, free_port, run_cli
from tests.helpers.data import row, rows, to_csv
from tests.helpers.fake_model import FakeModel


def test_completed_objects_are_skipped_and_a_changed_object_is_read_again(
    bucket: Bucket, cli_env: dict[str, str], database: Database
) -> None:
    bucket.put("in/a.csv", to_csv(rows(10)))
    bucket.put("in/b.csv", to_csv(rows(10, start=10)))
    env = {**cli_env, "SOURCE_URI": bucket.uri("in/")}
    assert run_cli(["run"], env).code == 0
    again = run_cli(["run"], env)
    assert again.code == 0
    assert again.stderr.count("already completed at version") == 2
    assert "objects:       2 skipped" in again.stdout
    bucket.put("in/b.csv", to_csv([*rows(10, start=10), row(99)]))  # a new version (ETag)
    third = run_cli(["run"], env)
    assert third.code == 0
    assert "11 read" in third.stdout and "1 completed, 1 skipped" in third.stdout
    assert database.rows(
        "SELECT count(*), count(DISTINCT source_version) FROM source_objects WHERE source_uri LIKE '%b.csv'"
    ) == [(2, 2)]
    runs = database.rows(
        "SELECT objects_done, objects_skipped FROM pipeline_runs ORDER BY started_at, run_id"
    )
    assert runs == [(2, 0), (0, 2), (1, 1)]


def test_limit_processes_at_most_n_objects(
    bucket: Bucket, cli_env: dict[str, str], database: Database
) -> None:
    for name in ("a", "b", "c"):
        bucket.put(f"in/{name}.csv", to_csv(rows(5, start=ord(name) * 100)))
    env = {**cli_env, "SOURCE_URI": bucket.uri("in/")}
    first = run_cli(["run", "--limit", "2"], env)
    assert first.code == 0 and "objects:       2 completed" in first.stdout
    assert database.value("SELECT count(*) FROM transactions") == 10
    second = run_cli(["run"], env)
    assert "1 completed, 2 skipped" in second.stdout
    assert database.value("SELECT count(*) FROM transactions") == 15


def test_retry_failed_scores_failures_again_and_resolves_them(
    bucket: Bucket, cli_env: dict[str, str], database: Database, fake_model: FakeModel
) -> None:
    fake_model.knobs.poison_ids = {"tx-000004", "tx-000017"}
    bucket.put("in/a.csv", to_csv(rows(40)))
    env = {
        **cli_env,
        "ML_API_URL": fake_model.url,
        "SOURCE_URI": bucket.uri("in/"),
        "MAX_FAILED_RATIO": "0.1",
    }
    first = run_cli(["run"], env)
    assert first.code == 3
    assert database.value("SELECT count(*) FROM failed_transactions WHERE resolved_at IS NULL") == 2
    fake_model.knobs.poison_ids = {"tx-000017"}  # the model was fixed for one of them
    retry = run_cli(["retry-failed"], env)
    assert retry.code == 3, retry.output
    assert "Retry complete: 1 scored, 1 still failing" in retry.stderr
    assert database.rows(
        "SELECT transaction_id, resolved_at IS NULL, attempts FROM failed_transactions ORDER BY 1"
    ) == [("tx-000004", False, 1), ("tx-000017", True, 2)]
    assert database.value("SELECT count(*) FROM predictions") == 39
    fake_model.knobs.poison_ids = set()
    first_run = database.value(
        "SELECT run_id FROM pipeline_runs ORDER BY started_at, run_id LIMIT 1"
    )
    nothing = run_cli(["retry-failed", "--run", "batch_19990101_000000"], env)
    assert nothing.code == 0  # nothing of that run
    assert "note:          nothing to score again: no unresolved failure" in nothing.stdout
    assert "limited by" not in nothing.stdout
    assert database.value("SELECT count(*) FROM failed_transactions WHERE resolved_at IS NULL") == 1
    last = run_cli(["retry-failed"], env)
    assert last.code == 0, last.output
    assert database.value("SELECT count(*) FROM failed_transactions WHERE resolved_at IS NULL") == 0
    assert database.value("SELECT count(*) FROM predictions") == 40
    assert (
        database.value("SELECT count(*) FROM pipeline_runs WHERE source_uri LIKE 'retry-failed%%'")
        == 3
    )
    assert first_run.startswith("batch_")


def run_with_errors(
    bucket: Bucket, env: dict[str, str], fake_model: FakeModel
) -> tuple[dict[str, str], str]:
    fake_model.knobs.poison_ids = {"tx-000002"}
    bucket.put("in/a.csv", to_csv([*rows(20), row(90, amount="-1"), row(91, amount="0")]))
    bucket.put("in/b.csv", to_csv([*rows(10, start=20), row(92, currency="eur")]))
    env = {
        **env,
        "ML_API_URL": fake_model.url,
        "SOURCE_URI": bucket.uri("in/"),
        "MAX_INVALID_RATIO": "0.5",
        "MAX_FAILED_RATIO": "0.5",
    }
    result = run_cli(["run"], env)
    assert result.code == 3, result.output
    run_id = result.stdout.split()[1]
    return env, run_id


def test_status_shows_the_latest_run_or_a_given_one(
    bucket: Bucket, cli_env: dict[str, str], fake_model: FakeModel
) -> None:
    env, run_id = run_with_errors(bucket, cli_env, fake_model)
    latest = run_cli(["status"], env)
    assert latest.code == 0, latest.output
    assert f"run_id:      {run_id}" in latest.stdout
    assert "status:      completed_with_errors" in latest.stdout
    assert "rows:        33 read, 30 valid, 3 invalid, 29 scored, 1 failed" in latest.stdout
    assert "objects:     2 total: 2 done, 0 failed, 0 skipped, 0 left" in latest.stdout
    assert "throughput:" in latest.stdout
    assert run_cli(["status", run_id], env).stdout == latest.stdout
    missing = run_cli(["status", "batch_19990101_000000"], env)
    assert missing.code == 1 and "no run batch_19990101_000000" in missing.stderr


def test_report_in_json_markdown_and_csv(
    bucket: Bucket, cli_env: dict[str, str], fake_model: FakeModel, tmp_path: object
) -> None:
    env, run_id = run_with_errors(bucket, cli_env, fake_model)
    as_json = run_cli(["report", run_id, "--format", "json"], env)
    assert as_json.code == 0, as_json.output
    report = json.loads(as_json.stdout)
    assert report["run"]["rows_read"] == 33
    assert [
        (o["source_uri"].rsplit("/", 1)[1], o["rows_read"], o["rows_invalid"])
        for o in report["objects"]
    ] == [
        ("a.csv", 22, 2),
        ("b.csv", 11, 1),
    ]
    reasons = {(g["column_name"], g["reason"]): g for g in report["invalid_reasons"]}
    assert reasons[("amount", "must be greater than 0")]["rows"] == 2
    assert reasons[("amount", "must be greater than 0")]["examples"][0]["line_number"] == 22
    assert reasons[("currency", "must be an ISO 4217 code: 3 upper-case letters")]["rows"] == 1
    [failure] = report["failures"]
    assert failure["http_status"] == 422 and failure["examples"] == ["tx-000002"]
    assert report["timings"]["api_requests"] >= 4 and report["timings"]["flushes"] >= 1

    markdown = run_cli(["report", run_id, "--format", "markdown"], env).stdout
    assert f"# Run {run_id}" in markdown and "## Invalid rows by reason" in markdown
    assert "| amount | must be greater than 0 | 2 |" in markdown

    out = tmp_path / "report.csv"  # type: ignore[operator]
    assert run_cli(["report", run_id, "--format", "csv", "--output", str(out)], env).code == 0
    table = list(csv.DictReader(io.StringIO(out.read_text())))
    assert {
        "section": "run",
        "name": "rows_invalid",
        "detail": "completed_with_errors",
        "count": "3",
    } in table
    assert any(r["section"] == "failure_reason" and r["count"] == "1" for r in table)


def test_monitoring_views(
    bucket: Bucket, cli_env: dict[str, str], fake_model: FakeModel, database: Database
) -> None:
    run_with_errors(bucket, cli_env, fake_model)
    assert database.rows("SELECT status, objects_left, rows_read FROM run_progress") == [
        ("completed_with_errors", 0, 33)
    ]
    assert database.rows("SELECT column_name, rows FROM invalid_reasons ORDER BY 1") == [
        ("amount", 2),
        ("currency", 1),
    ]
    assert database.rows("SELECT http_status, transactions FROM failure_reasons") == [(422, 1)]
    assert database.rows("SELECT status, objects, rows_read FROM objects_by_status") == [
        ("completed", 2, 33)
    ]


def test_invalid_ratio_stops_the_run_early(
    bucket: Bucket, cli_env: dict[str, str], database: Database
) -> None:
    bad = [row(i, amount="-1") for i in range(1500)]
    bucket.put("in/a.csv", to_csv([*bad, *rows(6000, start=2000)]))
    env = {
        **cli_env,
        "SOURCE_URI": bucket.uri("in/"),
        "ROW_BATCH_SIZE": "500",
        "DB_ROW_BATCH_SIZE": "500",
    }
    result = run_cli(["run"], env)
    assert result.code == 4, result.output
    assert "MAX_INVALID_RATIO crossed" in result.stderr
    read = database.value("SELECT rows_read FROM pipeline_runs")
    assert 1000 <= read < 7500  # stopped before reading everything
    assert database.value("SELECT status FROM pipeline_runs") == "failed"


def test_failed_ratio_fails_the_run_with_exit_4(
    bucket: Bucket, cli_env: dict[str, str], database: Database, fake_model: FakeModel
) -> None:
    fake_model.knobs.poison_ids = {f"tx-{i:06d}" for i in range(0, 50, 7)}
    bucket.put("in/a.csv", to_csv(rows(50)))
    result = run_cli(
        ["run"], {**cli_env, "ML_API_URL": fake_model.url, "SOURCE_URI": bucket.uri("in/")}
    )
    assert result.code == 4, result.output
    assert (
        "MAX_FAILED_RATIO crossed: 8 of 50 valid transactions could not be scored" in result.stderr
    )


def test_a_run_waits_for_a_model_that_is_still_starting(
    bucket: Bucket, cli_env: dict[str, str], database: Database
) -> None:
    bucket.put("in/a.csv", to_csv(rows(20)))
    port = free_port()
    env = {
        **cli_env,
        "SOURCE_URI": bucket.uri("in/"),
        "ML_API_URL": f"http://127.0.0.1:{port}",
        "API_WAIT_READY": "60",
    }
    run = subprocess.Popen(
        [*CLI, "run"], cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    model: subprocess.Popen[bytes] | None = None
    try:
        assert run.stderr is not None
        seen = []
        for line in run.stderr:  # the model starts only once the run has found it missing
            seen.append(line)
            if "The ML API is not ready yet" in line:
                break
        assert "connection refused" in seen[-1] and "waiting up to 60s" in seen[-1], seen
        model = subprocess.Popen(
            [*CLI, "model-server", "--port", str(port)],
            cwd=ROOT,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        stdout, rest = run.communicate(timeout=60)
    finally:
        run.kill()
        if model is not None:
            model.terminate()
            model.wait(10)
    assert run.returncode == 0, "".join(seen) + rest
    assert re.search(r"The ML API is ready after \d+\.\ds", rest), rest
    assert "completed (exit 0)" in stdout
    assert database.value("SELECT count(*) FROM predictions") == 20


def test_the_wait_for_the_model_is_bounded_and_the_error_printed_once(
    bucket: Bucket, cli_env: dict[str, str], database: Database
) -> None:
    bucket.put("in/a.csv", to_csv(rows(20)))
    dead = f"http://127.0.0.1:{free_port()}"
    env = {**cli_env, "SOURCE_URI": bucket.uri("in/"), "ML_API_URL": dead, "API_WAIT_READY": "1.5"}
    began = time.monotonic()
    result = run_cli(["run"], env)
    assert time.monotonic() - began < 15
    assert result.code == 1, result.output
    message = f"cannot reach the ML API at {dead}/health: connection refused"
    assert result.output.count(message + "; check ML_API_URL") == 2  # the wait's notice, the error
    assert (
        f"{message}; check ML_API_URL and that the service is running (waited 2s: API_WAIT_READY=1.5)"
        in result.stderr
    )
    assert result.output.count("API_WAIT_READY=1.5)") == 1
    assert "status:        failed (exit 1): the error is logged above" in result.stdout
    # A run that did nothing gives no tuning advice and no concurrency figures.
    assert "limited by" not in result.stdout and "concurrency" not in result.stdout
    assert "stage times" not in result.stdout
    assert database.value("SELECT error FROM pipeline_runs").endswith("API_WAIT_READY=1.5)")


def test_runs_lists_recent_runs_and_status_speaks_json(
    bucket: Bucket, cli_env: dict[str, str], fake_model: FakeModel
) -> None:
    env, run_id = run_with_errors(bucket, cli_env, fake_model)
    second = run_cli(["run"], env)
    assert second.code == 0, second.output
    assert (
        "note:          every object was skipped: already completed at this version; use --reprocess to read them again"
        in second.stdout
    )
    assert "limited by" not in second.stdout and "stage times" not in second.stdout
    second_id = second.stdout.split()[1]

    listed = run_cli(["runs"], env)
    assert listed.code == 0, listed.output
    header, rule, newest, oldest = listed.stdout.splitlines()
    assert header.split(" | ")[0].strip() == "run_id" and set(rule) <= {"-", "+"}
    assert newest.startswith(second_id) and " completed " in newest and "2 skipped" in newest
    assert oldest.startswith(run_id) and "completed_with_errors" in oldest
    assert [c.strip() for c in oldest.split(" | ")[4:8]] == ["33", "3", "29", "1"]
    as_json = json.loads(run_cli(["runs", "--format", "json", "--limit", "1"], env).stdout)
    assert [r["run_id"] for r in as_json] == [second_id]
    assert as_json[0]["objects_skipped"] == 2

    status = json.loads(run_cli(["status", run_id, "--format", "json"], env).stdout)
    assert status["run_id"] == run_id and status["status"] == "completed_with_errors"
    assert (status["rows_read"], status["rows_invalid"], status["rows_failed"]) == (33, 3, 1)
    assert json.loads(run_cli(["status", "--format", "json"], env).stdout)["run_id"] == second_id


def run_in(folder: Path, args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    folder.mkdir(parents=True, exist_ok=True)
    return subprocess.run(
        [*CLI, *args], cwd=folder, env=env, capture_output=True, text=True, timeout=120
    )


def test_the_embedded_database_lives_in_one_per_user_place(
    cli_env: dict[str, str], tmp_path: Path
) -> None:
    home = tmp_path / "home"
    env = {
        k: v
        for k, v in cli_env.items()
        if k not in ("DATABASE_URL", "EMBEDDED_DB_DIR", "XDG_DATA_HOME")
    }
    env["HOME"] = str(home)
    folder = home / ".local" / "share" / "batch-pipeline" / "postgres"
    project = tmp_path / "project"
    (project / "in").mkdir(parents=True)
    (project / "in" / "a.csv").write_text(to_csv(rows(5)))
    first = run_in(project, ["run", "--source", "in"], env)
    assert first.returncode == 0, first.stderr
    assert f"using the embedded PostgreSQL in {folder}" in first.stderr
    # From another folder, status finds the same database and its run.
    elsewhere = run_in(tmp_path / "elsewhere", ["status"], env)
    assert elsewhere.returncode == 0, elsewhere.stderr
    assert "rows:        5 read" in elsewhere.stdout
    assert not (tmp_path / "elsewhere" / ".batch-pipeline").exists()
    assert not (project / ".batch-pipeline").exists()
    # XDG_DATA_HOME moves it; a new, empty database says so instead of asking for --migrate.
    xdg = run_in(
        tmp_path / "elsewhere", ["status"], {**env, "XDG_DATA_HOME": str(tmp_path / "xdg")}
    )
    assert xdg.returncode == 1
    assert "no run recorded yet" in xdg.stderr and "--migrate" not in xdg.stderr
    assert (tmp_path / "xdg" / "batch-pipeline" / "postgres").is_dir()
    checked = run_in(tmp_path, ["check"], env)
    assert f"ok    database    embedded PostgreSQL in {folder}:" in checked.stdout


def test_dry_run_is_a_plan_from_the_ledger(
    bucket: Bucket, cli_env: dict[str, str], database: Database
) -> None:
    bucket.put("in/a.csv", to_csv(rows(10)))
    env = {**cli_env, "SOURCE_URI": bucket.uri("in/"), "MAX_INVALID_RATIO": "1"}
    assert run_cli(["run"], env).code == 0
    bucket.put(
        "in/b.csv", to_csv([*rows(5, start=100), row(190, amount="-1"), row(191, amount="0")])
    )
    c_uri = bucket.put("in/c.csv", to_csv([*rows(8, start=200), row(290, currency="eur")]))
    etag = bucket.client.head_object(Bucket=bucket.name, Key="in/c.csv")["ETag"].strip('"')
    # A run died in c.csv after line 5 (rows of lines 2-5 are stored).
    database.execute(
        """INSERT INTO source_objects (source_uri, source_version, status, checkpoint_line, run_id)
           VALUES (%s, %s, 'processing', 5, (SELECT run_id FROM pipeline_runs))""",
        (c_uri, etag),
    )
    before = database.rows(
        "SELECT count(*) FROM pipeline_runs UNION ALL SELECT count(*) FROM transactions"
    )
    result = run_cli(["run", "--dry-run"], env)
    assert result.code == 3, result.output
    plan = [line[15:] for line in result.stdout.splitlines() if line.startswith(("plan:", "    "))]
    a_kb = len(to_csv(rows(10)).encode()) / 1024
    assert plan[0] == (
        f"skip   {bucket.uri('in/a.csv')} ({a_kb:.1f} KB): already completed at this version "
        "(use --reprocess to read it again)"
    )
    assert plan[1].startswith(f"read   {bucket.uri('in/b.csv')} (")
    assert plan[2].startswith(f"resume {c_uri} (") and plan[2].endswith(") after line 5")
    assert "rows:          12 read, 9 valid, 3 invalid, 0 scored, 0 failed" in result.stdout
    assert (
        "invalid:       amount: must be greater than 0 (2 rows, e.g. b.csv:7, b.csv:8)"
        in result.stdout
    )
    assert (
        "currency: must be an ISO 4217 code: 3 upper-case letters (1 row, e.g. c.csv:10)"
        in result.stdout
    )
    assert "objects:       2 completed, 1 skipped" in result.stdout
    assert (
        database.rows(
            "SELECT count(*) FROM pipeline_runs UNION ALL SELECT count(*) FROM transactions"
        )
        == before
    )
    again = run_cli(["run", "--dry-run", "--reprocess"], env)
    assert f"read   {bucket.uri('in/a.csv')}" in again.stdout and "22 read" in again.stdout


def test_dry_run_without_a_database_says_it_could_not_check_the_ledger(
    bucket: Bucket, cli_env: dict[str, str], tmp_path: Path
) -> None:
    bucket.put("in/a.csv", to_csv(rows(10)))
    folder = tmp_path / "no-database-here"
    env = {k: v for k, v in cli_env.items() if k != "DATABASE_URL"}
    env.update(SOURCE_URI=bucket.uri("in/"), EMBEDDED_DB_DIR=str(folder))
    result = run_cli(["run", "--dry-run"], env)
    assert result.code == 0, result.output
    assert (
        "plan:          no database (DATABASE_URL unset, no embedded database yet): ledger not checked"
        in result.stdout
    )
    assert f"read   {bucket.uri('in/a.csv')}" in result.stdout
    assert "rows:          10 read, 10 valid, 0 invalid" in result.stdout
    assert not folder.exists()


def test_status_on_an_unmigrated_database_asks_for_migrate_not_a_flag_it_lacks(
    cli_env: dict[str, str], empty_database_url: str
) -> None:
    env = {**cli_env, "DATABASE_URL": empty_database_url}
    for command in (["status"], ["runs"]):
        result = run_cli(command, env)
        assert result.code == 2, result.output
        assert "is not migrated (pending: V1__create_tables.sql" in result.stderr
        assert "run `batch-pipeline migrate` first" in result.stderr
        assert "--migrate" not in result.stderr
