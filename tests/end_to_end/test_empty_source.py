"""A source that holds nothing to read: a nightly job that finds no input usually
means a broken upstream. The run says so, naming the URI, counts it in the
metrics, and with FAIL_ON_EMPTY_SOURCE it fails (exit 1)."""

from __future__ import annotations

import json
from pathlib import Path

from tests.conftest import Bucket, Database, run_cli
from tests.helpers.data import rows, to_csv
from tests.observability.test_observability import metric, parse


def warnings_of(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if " - WARNING - " in line]


def test_an_empty_s3_prefix_warns_and_sets_the_metric(
    bucket: Bucket, cli_env: dict[str, str], database: Database, tmp_path: Path
) -> None:
    bucket.put("elsewhere/a.csv", to_csv(rows(3)))  # the bucket is not empty, the prefix is
    bucket.put("noprefix/notes.txt", "not a CSV")
    textfile = tmp_path / "metrics.prom"
    uri = bucket.uri("noprefix/")
    env = {**cli_env, "SOURCE_URI": uri, "METRICS_TEXTFILE": str(textfile)}
    result = run_cli(["run"], env)
    assert result.code == 0, result.output
    [warning] = warnings_of(result.stderr)
    assert f"no objects found under {uri}: " in warning
    assert "check SOURCE_URI and the upstream export" in warning
    assert "status:        completed (exit 0)" in result.stdout
    assert f"objects:       none found under {uri}\n" in result.stdout
    got = parse(textfile.read_text())
    assert metric(got, "batch_pipeline_objects_found") == 0
    assert metric(got, "batch_pipeline_run_status", status="completed") == 1
    [(status, summary)] = database.rows("SELECT status, summary FROM pipeline_runs")
    assert status == "completed" and summary["objects_found"] == 0

    # The same job over a prefix with input: no warning, and the metric counts it.
    full = run_cli(["run"], {**env, "SOURCE_URI": bucket.uri("elsewhere/")})
    assert full.code == 0 and not warnings_of(full.stderr)
    assert metric(parse(textfile.read_text()), "batch_pipeline_objects_found") == 1


def test_fail_on_empty_source_fails_the_run_and_says_why(
    bucket: Bucket, cli_env: dict[str, str], database: Database, tmp_path: Path
) -> None:
    textfile = tmp_path / "metrics.prom"
    uri = bucket.uri("noprefix/")
    env = {**cli_env, "SOURCE_URI": uri, "METRICS_TEXTFILE": str(textfile)}
    by_env = run_cli(["run"], {**env, "FAIL_ON_EMPTY_SOURCE": "true", "LOG_FORMAT": "json"})
    by_flag = run_cli(["run", "--fail-on-empty-source", "true"], env)
    assert by_flag.code == 1, by_flag.output
    # The summary says the run failed and points at the error, logged once on stderr.
    assert "status:        failed (exit 1): the error is logged above" in by_flag.stdout
    assert f"objects:       none found under {uri}\n" in by_flag.stdout
    assert f"no objects found under {uri}: " in by_flag.stderr
    assert "(FAIL_ON_EMPTY_SOURCE is set)" in by_flag.stderr
    # With JSON logs, the summary is one JSON event on stdout.
    assert by_env.code == 1, by_env.output
    [summary] = [json.loads(line) for line in by_env.stdout.splitlines()]
    assert summary["summary"]["status"] == "failed" and summary["summary"]["exit_code"] == 1
    errors = [json.loads(line) for line in by_env.stderr.splitlines() if '"ERROR"' in line]
    assert any(uri in e["message"] and e["run_id"].startswith("batch_") for e in errors)
    stored = database.rows("SELECT status, error FROM pipeline_runs ORDER BY started_at")
    assert [s for s, _ in stored] == ["failed", "failed"]
    assert all(
        f"no objects found under {uri}" in e and "FAIL_ON_EMPTY_SOURCE" in e for _, e in stored
    )
    got = parse(textfile.read_text())
    assert metric(got, "batch_pipeline_objects_found") == 0
    assert metric(got, "batch_pipeline_run_status", status="failed") == 1
    assert metric(got, "batch_pipeline_last_success_timestamp_seconds") is None


def test_an_empty_local_folder_in_a_run_and_a_dry_run(
    cli_env: dict[str, str], tmp_path: Path
) -> None:
    folder = tmp_path / "incoming"
    (folder / "2026-12-04").mkdir(parents=True)
    (folder / "2026-12-04" / "_SUCCESS").write_text("")  # a marker, not a CSV
    env = {**cli_env, "SOURCE_URI": str(folder)}
    for command in (["run"], ["run", "--dry-run"]):
        result = run_cli(command, env)
        assert result.code == 0, result.output
        [warning] = warnings_of(result.stderr)
        assert f"no objects found under {folder}: " in warning
        assert f"objects:       none found under {folder}\n" in result.stdout
        failed = run_cli(command, {**env, "FAIL_ON_EMPTY_SOURCE": "1"})
        assert failed.code == 1, failed.output
        assert f"no objects found under {folder}: " in failed.stderr
