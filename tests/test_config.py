"""Settings: typed, validated before any work, secrets never shown."""

from __future__ import annotations

import pytest

from library.config import Settings, load_settings, redact_url, url_secrets
from library.errors import ConfigError


def test_defaults_are_the_contracts() -> None:
    s = load_settings(environ={})
    assert (s.ROW_BATCH_SIZE, s.API_BATCH_SIZE, s.API_MAX_WORKERS, s.DB_ROW_BATCH_SIZE) == (
        5000,
        100,
        5,
        1000,
    )
    assert (s.API_TIMEOUT, s.API_MAX_RETRIES, s.MAX_INVALID_RATIO, s.MAX_FAILED_RATIO) == (
        30,
        5,
        0.05,
        0.01,
    )
    assert s.DATABASE_URL is None


def test_flags_override_the_environment() -> None:
    s = load_settings(
        {"API_MAX_WORKERS": "9"}, environ={"API_MAX_WORKERS": "2", "ROW_BATCH_SIZE": "10"}
    )
    assert (s.API_MAX_WORKERS, s.ROW_BATCH_SIZE) == (9, 10)


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
    assert s.ML_API_URL and redact_url(s.ML_API_URL) == "http://svc:***@h:8000/base"
    assert {"p%40ss%3Aword", "p@ss:word"} <= set(s.secret_values())


def test_every_setting_is_documented() -> None:
    for name, info in Settings.model_fields.items():
        assert info.description, name
