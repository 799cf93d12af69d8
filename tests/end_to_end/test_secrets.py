"""A DATABASE_URL password never shows: not in any command's output (text or JSON
logs, DEBUG included), not in the stored run settings, not in a report, not in a
connection error; whatever characters it holds, raw or percent-encoded.

The roles get real passwords on a PostgreSQL of this module's own, whose pg_hba
asks every role but the admin for its password (scram-sha-256): the session's
embedded server trusts every local connection, where a wrong password would get
in as well as the right one. So a run that succeeds here proves the password was
read whole, and a wrong one is refused.
"""

from __future__ import annotations

import json
import os
import re
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote, quote_plus

import psycopg
import pytest
from psycopg import sql

from tests.conftest import Result, free_port, run_cli
from tests.helpers.data import row, rows, to_csv
from tests.helpers.postgres import PrivatePostgres

# Every piece is a word found nowhere else, so a piece leaking alone (libpq taking it
# for a host or a port) is caught too, not only the whole password.
PIECES = ["alfa1", "bravo2", "charl3", "delta4", "echo5", "foxt6", "golf7", "hotel8"]
EVERY_SPECIAL = "alfa1#bravo2/charl3@delta4:echo5?foxt6%golf7 hotel8"  # # / @ : ? % and a space
RAW_ACCEPTED = "alfa1#bravo2:charl3?delta4"  # libpq reads # : ? as part of a raw password
RAW_REFUSED = {  # libpq would misread these, or refuse them quoting the password
    "a raw /": "alfa1/bravo2",
    "a raw @": "alfa1@bravo2",
    "a raw % not followed by two hex digits": "alfa1%golf7",
    "a raw space": "alfa1 bravo2",
}
ENCODE_ADVICE = (
    "DATABASE_URL: percent-encode special characters in the password (/ as %2F, @ as %40)"
)


def forms(password: str) -> list[str]:
    """The password as written raw, percent-encoded every usual way, and its pieces."""
    shown = {password, quote(password, safe=""), quote(password), quote_plus(password)}
    return sorted(shown | {p for p in PIECES if p in password})


def assert_hidden(password: str, *texts: str) -> None:
    for text in texts:
        for form in forms(password):
            assert form not in text, f"{form!r} appears in:\n{text}"


@dataclass
class Server:
    admin_url: str  # the postgres superuser, trusted on the socket
    socket_dir: str

    def url(self, user: str, password_in_url: str, dbname: str) -> str:
        return f"postgresql://{user}:{password_in_url}@/{dbname}?host={self.socket_dir}"

    def role_with_database(self, password: str) -> tuple[str, str]:
        """A new role with this password, owning a new database (so it can migrate it)."""
        name = f"bp_pw_{uuid.uuid4().hex[:10]}"
        with psycopg.connect(self.admin_url, autocommit=True) as conn:
            conn.execute(
                sql.SQL("CREATE ROLE {} LOGIN PASSWORD {}").format(
                    sql.Identifier(name), sql.Literal(password)
                )
            )
            conn.execute(
                sql.SQL("CREATE DATABASE {} OWNER {}").format(
                    sql.Identifier(name), sql.Identifier(name)
                )
            )
        return name, name


@pytest.fixture(scope="module")
def password_server() -> Iterator[Server]:
    server = PrivatePostgres("batch-pipeline-test-pw-")
    try:
        server.require_passwords()
        yield Server(server.admin_url, server.socket_dir)
    finally:
        server.close()


@pytest.fixture
def base_env(model_url: str, tmp_path: Path) -> dict[str, str]:
    folder = tmp_path / "in"
    folder.mkdir()
    (folder / "a.csv").write_text(to_csv([*rows(20), row(99, amount="-1")]))
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("DATABASE_URL", "ML_API_URL", "SOURCE_URI", "KEY", "SECRET", "ENDPOINT_URL")
    }
    env.update(
        ML_API_URL=model_url,
        SOURCE_URI=str(folder),
        MAX_INVALID_RATIO="1",
        LOG_LEVEL="DEBUG",
        PYTHONUNBUFFERED="1",
    )
    return env


def stored_runs(server: Server, dbname: str) -> str:
    """Every stored run, settings, summary and error included, as text."""
    with psycopg.connect(server.url("postgres", "", dbname)) as conn:
        return str(conn.execute("SELECT to_jsonb(r)::text FROM pipeline_runs r").fetchall())


def run_every_command(env: dict[str, str], tmp_path: Path) -> tuple[list[Result], str]:
    """migrate, run (text and JSON logs), status, report in every format, query."""
    results = [run_cli(["migrate"], env), run_cli(["run"], env)]
    assert [r.code for r in results] == [0, 3], results[-1].output
    run_id = re.search(r"run_id:\s+(\S+)", results[1].stdout).group(1)  # type: ignore[union-attr]
    results.append(run_cli(["run", "--reprocess"], {**env, "LOG_FORMAT": "json"}))
    results.append(run_cli(["status"], env))
    for fmt in ("json", "markdown", "csv"):
        results.append(run_cli(["report", run_id, "--format", fmt], env))
    results.append(run_cli(["report", run_id, "--output", str(tmp_path / "report.md")], env))
    results.append(run_cli(["query", "SELECT run_id, settings FROM pipeline_runs"], env))
    assert all(r.code in (0, 3) for r in results), [r.output for r in results if r.code > 3]
    return results, (tmp_path / "report.md").read_text()


def test_a_percent_encoded_password_with_every_special_character(
    password_server: Server, base_env: dict[str, str], tmp_path: Path
) -> None:
    user, dbname = password_server.role_with_database(EVERY_SPECIAL)
    url = password_server.url(user, quote(EVERY_SPECIAL, safe=""), dbname)
    env = {**base_env, "DATABASE_URL": url}
    results, report_file = run_every_command(env, tmp_path)
    shown = f"postgresql://{user}:***@/{dbname}?host={password_server.socket_dir}"
    assert f"database:      {shown}\n" in results[1].stdout
    assert json.loads(results[2].stderr.splitlines()[-1])["level"]  # the JSON logs were read
    stored = stored_runs(password_server, dbname)
    assert shown in stored  # the settings of each run, redacted
    assert_hidden(EVERY_SPECIAL, *(r.output for r in results), report_file, stored)


def test_a_raw_password_with_hash_colon_and_question_mark(
    password_server: Server, base_env: dict[str, str], tmp_path: Path
) -> None:
    # urllib reads "#" as the start of a fragment and would leave this password in the text.
    user, dbname = password_server.role_with_database(RAW_ACCEPTED)
    env = {**base_env, "DATABASE_URL": password_server.url(user, RAW_ACCEPTED, dbname)}
    results, report_file = run_every_command(env, tmp_path)
    assert f"database:      postgresql://{user}:***@/{dbname}?host=" in results[1].stdout
    stored = stored_runs(password_server, dbname)
    assert_hidden(RAW_ACCEPTED, *(r.output for r in results), report_file, stored)


@pytest.mark.parametrize("password", RAW_REFUSED.values(), ids=RAW_REFUSED.keys())
def test_a_raw_character_libpq_would_misread_is_refused_before_any_work(
    password_server: Server, base_env: dict[str, str], password: str
) -> None:
    user, dbname = password_server.role_with_database(password)
    env = {**base_env, "DATABASE_URL": password_server.url(user, password, dbname)}
    for command in (["migrate"], ["run"], ["status"], ["query", "SELECT 1"]):
        result = run_cli(command, env)
        assert result.code == 2, result.output
        assert "DATABASE_URL: " in result.stderr and "percent-encode" in result.stderr
        assert_hidden(password, result.output)
    refused = run_cli(["run"], env)
    if "/" in password or "@" in password:
        assert ENCODE_ADVICE in refused.stderr
    # The same password percent-encoded is read whole: the run goes through.
    encoded = {**env, "DATABASE_URL": password_server.url(user, quote(password, safe=""), dbname)}
    works = run_cli(["run", "--migrate"], encoded)
    assert works.code == 3, works.output
    assert_hidden(password, works.output, stored_runs(password_server, dbname))


def test_a_failing_connection_names_the_database_without_the_password(
    password_server: Server, base_env: dict[str, str]
) -> None:
    user, dbname = password_server.role_with_database("another-password")
    wrong = password_server.url(user, quote(EVERY_SPECIAL, safe=""), dbname)
    refused = [
        run_cli(command, {**base_env, "DATABASE_URL": wrong, "LOG_FORMAT": fmt})
        for command in (["migrate"], ["run"], ["status"], ["query", "SELECT 1"])
        for fmt in ("text", "json")
    ]
    for result in refused:
        assert result.code == 1, result.output
        assert "password authentication failed" in result.output
        assert f"cannot connect to the database at postgresql://{user}:***@/" in result.output
    # Nothing listens there: libpq's message names the host and port, never the password.
    closed = f"postgresql://{user}:{quote(EVERY_SPECIAL, safe='')}@127.0.0.1:{free_port()}/db"
    unreachable = run_cli(["run"], {**base_env, "DATABASE_URL": closed})
    assert unreachable.code == 1
    assert f"postgresql://{user}:***@127.0.0.1:" in unreachable.stderr
    assert_hidden(EVERY_SPECIAL, *(r.output for r in [*refused, unreachable]))
