"""Settings: typed, validated before any work, secrets never shown."""

from __future__ import annotations

import pytest

from library.config import (
    ENV_FIELDS,
    Settings,
    load_settings,
    misspelt_variables,
    redact_url,
    url_secrets,
)
from library.errors import ConfigError


def test_defaults_are_the_contracts() -> None:
    s = load_settings(environ={})
    assert (
        s.source.row_batch_size,
        s.scoring.batch_size,
        s.scoring.max_workers,
        s.sink.row_batch_size,
    ) == (
        5000,
        100,
        5,
        1000,
    )
    assert (
        s.scoring.timeout,
        s.scoring.max_retries,
        s.thresholds.max_invalid_ratio,
        s.thresholds.max_failed_ratio,
    ) == (
        30,
        5,
        0.05,
        0.01,
    )
    assert s.sink.url is None


def test_flags_override_the_environment() -> None:
    s = load_settings(
        {"API_MAX_WORKERS": "9"}, environ={"API_MAX_WORKERS": "2", "ROW_BATCH_SIZE": "10"}
    )
    assert (s.scoring.max_workers, s.source.row_batch_size) == (9, 10)


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        (
            {"API_MAX_WORKERS": "0"},
            "API_MAX_WORKERS: Input should be greater than or equal to 1 (got '0')",
        ),
        ({"ROW_BATCH_SIZE": "abc"}, "ROW_BATCH_SIZE: Input should be a valid integer"),
        ({"API_TIMEOUT": "-1"}, "API_TIMEOUT: Input should be greater than 0"),
        ({"ML_API_URL": "ftp://x"}, "ML_API_URL: must be an http:// or https:// URL with a host"),
        ({"ML_API_URL": "http://host:99999"}, "ML_API_URL: has an invalid port"),
        (
            {"ENDPOINT_URL": "minio:9000"},
            "ENDPOINT_URL: must be an http:// or https:// URL with a host",
        ),
        ({"SOURCE_URI": "gs://bucket/x"}, "SOURCE_URI: must be s3://bucket/... or a local path"),
        ({"SOURCE_URI": "s3:///x"}, "SOURCE_URI: an s3:// URI needs a bucket"),
        ({"LOG_LEVEL": "loud"}, "LOG_LEVEL: Input should be 'DEBUG', 'INFO', 'WARNING' or 'ERROR'"),
        (
            {"COMPLETED_WITH_ERRORS_EXIT_CODE": "1"},
            "COMPLETED_WITH_ERRORS_EXIT_CODE: must be 0 or 3 (got '1')",
        ),
    ],
)
def test_a_bad_value_names_the_variable(env: dict[str, str], expected: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_settings(environ=env)
    assert expected in str(err.value)


def test_secret_values_are_never_echoed() -> None:
    with pytest.raises(ConfigError) as err:
        load_settings(
            environ={"DATABASE_URL": "mysql://u:hunter2@db/x", "ML_API_URL": "http://u:tok3n@h:bad"}
        )
    assert "hunter2" not in str(err.value) and "tok3n" not in str(err.value)
    s = load_settings(
        environ={
            "SECRET": "s3cr3t",
            "DATABASE_URL": "postgresql://u:pw1234@db/x",
            "ML_API_URL": "http://t:tok999@h",
        }
    )
    shown = str(s.redacted()) + repr(s) + str(s)
    for secret in ("s3cr3t", "pw1234", "tok999"):
        assert secret not in shown
        assert secret in s.secret_values()


def test_redact_url() -> None:
    assert (
        redact_url("postgresql://u:p@h:5/db?sslmode=require")
        == "postgresql://u:***@h:5/db?sslmode=require"
    )
    assert (
        redact_url("postgresql://h/db?user=u&password=p") == "postgresql://h/db?user=u&password=***"
    )
    assert redact_url("http://h:8000") == "http://h:8000"


@pytest.mark.parametrize(
    ("url", "shown", "password"),
    [
        # libpq reads a raw # or ? as part of the password; urllib would not.
        ("postgresql://u:pa#ss@h/db", "postgresql://u:***@h/db", "pa#ss"),
        ("postgres://u:a?b:c#d@h:5/db", "postgres://u:***@h:5/db", "a?b:c#d"),
        (
            "postgresql://u:a%2Fb%40c%23d%3Ae%3Ff%25g%20h@h/db?sslmode=require",
            "postgresql://u:***@h/db?sslmode=require",
            "a/b@c#d:e?f%g h",
        ),
        (
            "postgresql://h/db?user=u&password=x%23y%20z&sslmode=require",
            "postgresql://h/db?user=u&password=***&sslmode=require",
            "x#y z",
        ),
        ("postgresql+psycopg://u:secret1@h/db", "postgresql://u:***@h/db", "secret1"),
    ],
)
def test_database_url_is_redacted_as_libpq_reads_it(url: str, shown: str, password: str) -> None:
    s = load_settings(environ={"DATABASE_URL": url})
    assert s.redacted()["DATABASE_URL"] == shown
    written = url.split("://", 1)[1].rsplit("@", 1)[0].split(":", 1)[-1]
    if "password=" in url:
        written = url.split("password=", 1)[1].split("&", 1)[0]
    for form in (password, written):
        assert form in s.secret_values()
        assert form not in str(s.redacted()) + repr(s)


@pytest.mark.parametrize(
    ("url", "pieces"),
    [
        ("postgresql://u:pw1/pw2@h/db", ["pw1", "pw2"]),  # libpq: host u, port pw1
        ("postgresql://u:pw1@pw2@h/db", ["pw1", "pw2"]),  # libpq: host pw2@h
        ("postgresql://u:pw1?pw2/pw3@h/db?sslmode=require", ["pw1", "pw2", "pw3"]),
        ("postgresql://me@srv:pw1@h/db", ["pw1"]),  # an Azure-style user name, unencoded
        ("postgresql://u:pw1%zzpw2@h/db", ["pw1", "zzpw2"]),  # libpq quotes the bad token
        ("postgresql://u:pw1 pw2@h/db", ["pw1", "pw2"]),
    ],
)
def test_database_url_libpq_would_misread_is_refused_without_echo(
    url: str, pieces: list[str]
) -> None:
    with pytest.raises(ConfigError) as err:
        load_settings(environ={"DATABASE_URL": url})
    message = str(err.value)
    assert message.startswith("invalid configuration: DATABASE_URL: ")
    assert "percent-encode special characters in the password" in message
    if "%" not in url and " " not in url:
        assert "(/ as %2F, @ as %40)" in message
    shown = redact_url(url)
    secrets = url_secrets(url)
    for piece in pieces:
        assert piece not in message and piece not in shown
        assert any(piece in secret for secret in secrets)


def test_ml_api_url_credentials_stay_redacted() -> None:
    s = load_settings(environ={"ML_API_URL": "http://svc:p%40ss%3Aword@h:8000/base"})
    assert s.scoring.url and redact_url(s.scoring.url) == "http://svc:***@h:8000/base"
    assert {"p%40ss%3Aword", "p@ss:word"} <= set(s.secret_values())


def test_every_setting_is_documented() -> None:
    for name, field in ENV_FIELDS.items():
        assert field.info.description, name


def test_each_stage_reads_its_group_by_the_contracts_names() -> None:
    """Every variable keeps its name (the alias) and lands in one group, as a pythonic field."""
    s = load_settings(
        environ={
            "SOURCE_URI": "s3://b/p/",
            "API_TIMEOUT": "7",
            "DB_ROW_BATCH_SIZE": "50",
            "MAX_FAILED_RATIO": "0.2",
            "LOG_FORMAT": "JSON",
            "RUN_GROUP": "g1",
            "JOB_COMPLETION_INDEX": "3",
        }
    )
    assert s.source.uri == "s3://b/p/" and s.scoring.timeout == 7
    assert s.sink.row_batch_size == 50 and s.thresholds.max_failed_ratio == 0.2
    assert s.observability.log_format == "json"
    assert (s.worker.run_group, s.worker.index) == ("g1", 3)
    assert [ENV_FIELDS[n].path for n in ("API_TIMEOUT", "EMBEDDED_DB_DIR")] == [
        "scoring.timeout",
        "sink.embedded_dir",
    ]
    assert s.redacted()["API_TIMEOUT"] == 7 and set(s.redacted()) == set(ENV_FIELDS)
    assert s.value("DB_ROW_BATCH_SIZE") == 50


def test_the_root_is_pydantic_settings_reading_the_flat_names(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """`Settings()` reads the process environment by the flat names (not pydantic-settings'
    SCORING__TIMEOUT); keyword arguments win over it."""
    monkeypatch.setenv("API_TIMEOUT", "9")
    monkeypatch.setenv("SCORING", "not json")  # a group's name is not a variable of ours
    monkeypatch.setenv("MAX_FAILED_RATIO", "0.3")
    s = Settings(MAX_FAILED_RATIO=0.4)  # type: ignore[call-arg]
    assert s.scoring.timeout == 9 and s.thresholds.max_failed_ratio == 0.4


def test_a_rule_across_settings_names_them() -> None:
    with pytest.raises(ConfigError) as err:
        load_settings(environ={"API_RETRY_BACKOFF": "5", "API_RETRY_BACKOFF_MAX": "1"})
    assert str(err.value) == (
        "invalid configuration: API_RETRY_BACKOFF_MAX must be >= API_RETRY_BACKOFF"
    )
    with pytest.raises(ConfigError, match="MODEL_NAME is required with ML_API_PROTOCOL=v2"):
        load_settings(environ={"ML_API_PROTOCOL": "v2"})


def test_updated_validates_again_and_keeps_secrets() -> None:
    s = load_settings(environ={"DATABASE_URL": "postgresql://u:pw1234@db/x", "SECRET": "s3cr3t"})
    demo = s.updated({"SOURCE_URI": "/tmp/demo", "ML_API_URL": "http://127.0.0.1:1/"})
    assert demo.source.uri == "/tmp/demo" and demo.scoring.url == "http://127.0.0.1:1"
    assert demo.database_url == "postgresql://u:pw1234@db/x"
    assert demo.source.secret_value == "s3cr3t"
    with pytest.raises(ConfigError, match="API_MAX_WORKERS"):
        s.updated({"API_MAX_WORKERS": 0})


def test_misspelt_variables_are_named_with_the_likely_one() -> None:
    env = {
        "API_MAX_WORKER": "9",
        "DB_ROW_BATCH": "10",
        "ML_API_ULR": "http://h",
        "LOG_LEVL": "DEBUG",
        "API_MAX_WORKERS": "5",  # ours, spelt right
        # Not ours, even when alike: other prefixes, and Kubernetes' service variables.
        "AWS_SECRET_ACCESS_KEY": "x",
        "PGPASSWORD": "x",
        "PATH": "/bin",
        "SECRETS": "x",
        "ML_API_PORT": "tcp://10.0.0.1:8000",
        "PUSHGATEWAY_PORT": "tcp://10.0.0.2:9091",
        "PUSHGATEWAY_SERVICE_HOST": "10.0.0.2",
        "PUSHGATEWAY_PORT_9091_TCP_ADDR": "10.0.0.2",
        "API_KEY_FILE": "/run/key",  # our prefix, but like none of ours
    }
    assert misspelt_variables(env) == [
        ("API_MAX_WORKER", "API_MAX_WORKERS"),
        ("DB_ROW_BATCH", "DB_ROW_BATCH_SIZE"),
        ("LOG_LEVL", "LOG_LEVEL"),
        ("ML_API_ULR", "ML_API_URL"),
    ]


def test_the_cli_warns_of_a_misspelt_variable_at_start(
    monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str]
) -> None:
    from pipeline.batch.main import main

    monkeypatch.setenv("API_MAX_WORKER", "9")
    monkeypatch.setenv("PGPASSWORD", "not-a-typo")
    assert main(["runs", "--limit", "0"]) == 2  # stops before any database work
    err = capfd.readouterr().err
    assert "API_MAX_WORKER is set but is not a setting: did you mean API_MAX_WORKERS?" in err
    assert "PGPASSWORD" not in err
