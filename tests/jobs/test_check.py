"""`batch-pipeline check`: one line per dependency, exit 0 only if every one passes."""

from __future__ import annotations

import json
from pathlib import Path

from tests.conftest import S3_SECRET, Bucket, free_port, run_cli
from tests.helpers.data import rows, to_csv
from tests.helpers.fake_model import FakeModel
from tests.observability.test_observability import pushgateway  # the fixture

__all__ = ["pushgateway"]


def lines_by_name(stdout: str) -> dict[str, str]:
    """{'source': 'ok    source      s3://...', ...}"""
    return {line.split()[1]: line for line in stdout.splitlines()}


def test_check_passes_against_reachable_services(
    bucket: Bucket,
    cli_env: dict[str, str],
    pushgateway: str,
) -> None:
    text = to_csv(rows(10))
    bucket.put("in/a.csv", text)
    bucket.put("in/b.csv.gz", b"x" * 2048)
    kb = (len(text.encode()) + 2048) / 1024
    env = {**cli_env, "SOURCE_URI": bucket.uri("in/"), "PUSHGATEWAY_URL": pushgateway}
    result = run_cli(["check"], env)
    assert result.code == 0, result.output
    got = lines_by_name(result.stdout)
    assert list(got) == ["source", "database", "model", "pushgateway"]
    assert got["source"].startswith("ok    source      s3://")
    assert f"in/: 2 objects, {kb:.1f} KB" in got["source"]
    assert got["database"].startswith("ok    database    postgresql://")
    assert (
        "connected (PostgreSQL 1" in got["database"] and "migrations up to date" in got["database"]
    )
    assert "(native): ready; test prediction fraud_score 0." in got["model"]
    assert got["model"].endswith("model_version reference-2026.01")
    assert got["pushgateway"] == f"ok    pushgateway {pushgateway}: ready"
    assert S3_SECRET not in result.output


def test_check_fails_naming_each_broken_dependency(
    bucket: Bucket, cli_env: dict[str, str], empty_database_url: str
) -> None:
    dead = f"http://127.0.0.1:{free_port()}"
    env = {
        **cli_env,
        "SOURCE_URI": f"s3://{bucket.name}-missing/in/",
        "DATABASE_URL": empty_database_url,
        "ML_API_URL": dead,
        "PUSHGATEWAY_URL": dead,
    }
    result = run_cli(["check"], env)
    assert result.code == 1, result.output
    got = lines_by_name(result.stdout)
    assert all(line.startswith("FAIL") for line in got.values()), result.stdout
    assert "NoSuchBucket" in got["source"] and "check SOURCE_URI" in got["source"]
    assert "not migrated: pending V1__create_tables.sql" in got["database"]
    assert "run `batch-pipeline migrate`" in got["database"]
    assert f"cannot reach the ML API at {dead}/health: connection refused" in got["model"]
    assert got["pushgateway"].endswith(f"cannot reach {dead}: connection refused")
    assert "check failed: source, database, model, pushgateway" in result.stderr
    password = empty_database_url.split(":")[2].split("@")[0]
    if password:
        assert password not in result.output


def test_check_fails_when_the_model_refuses_the_test_row(
    bucket: Bucket, cli_env: dict[str, str], fake_model: FakeModel
) -> None:
    fake_model.knobs.poison_ids = {"batch-pipeline-check"}
    bucket.put("in/a.csv", to_csv(rows(1)))
    env = {**cli_env, "SOURCE_URI": bucket.uri("in/"), "ML_API_URL": fake_model.url}
    result = run_cli(["check"], env)
    assert result.code == 1, result.output
    model = lines_by_name(result.stdout)["model"]
    assert model.startswith("FAIL  model       ")
    assert "ready, but the test prediction failed: rejected by the ML API (HTTP 422)" in model
    assert [r.ids for r in fake_model.predict_requests()] == [["batch-pipeline-check"]]
    fake_model.knobs.poison_ids, fake_model.knobs.always_status = set(), 503
    busy = lines_by_name(run_cli(["check"], env).stdout)["model"]
    assert busy.endswith(
        'ready, but the test prediction failed: HTTP 503 {"error":"configured to fail"}'
    )
    assert len(fake_model.predict_requests()) == 2  # one request each time: a check never retries


def test_check_names_the_embedded_database_folder(cli_env: dict[str, str]) -> None:
    env = {k: v for k, v in cli_env.items() if k != "DATABASE_URL"}
    result = run_cli(["check"], env)
    database = lines_by_name(result.stdout)["database"]
    assert database.startswith(
        f"ok    database    embedded PostgreSQL in {env['EMBEDDED_DB_DIR']}:"
    )
    assert "source" in result.stdout and "SOURCE_URI is not set" in result.stdout
    assert result.code == 1


def test_check_speaks_json_with_json_logs(cli_env: dict[str, str], tmp_path: Path) -> None:
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.csv").write_text(to_csv(rows(3)))
    env = {**cli_env, "SOURCE_URI": str(tmp_path / "in"), "LOG_FORMAT": "json"}
    result = run_cli(["check"], env)
    assert result.code == 0, result.output
    events = [json.loads(line) for line in result.stdout.splitlines()]
    assert [(e["check"], e["ok"], e["level"]) for e in events] == [
        ("source", True, "INFO"),
        ("database", True, "INFO"),
        ("model", True, "INFO"),
    ]
    assert events[0]["detail"] == f"{tmp_path / 'in'}: 1 object, {len(to_csv(rows(3)))} bytes"
    assert all(json.loads(line) for line in result.stderr.splitlines())
