"""The real services every test talks to, all on 127.0.0.1, started by the session:

* PostgreSQL: the embedded server (pgserver), or TEST_DATABASE_URL when set. Each
  test gets its own database, cloned from a migrated template.
* S3: moto's server, over real HTTP. Each test gets its own bucket.
* The reference model server, as a subprocess of the real CLI.
* A fake model server with failure knobs, per test (tests/helpers/fake_model.py).
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import uuid
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import psycopg
import pytest

from library.state import db
from tests.helpers.fake_model import FakeModel

ROOT = Path(__file__).resolve().parent.parent
CLI = [sys.executable, "-m", "pipeline.batch.main"]
S3_KEY = "test-access-key"
S3_SECRET = "test-secret-Zq9vX2"  # asserted absent from every output


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_http(url: str, timeout: float = 30.0) -> None:
    import urllib.request

    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"{url} did not become ready in {timeout}s")
        time.sleep(0.1)


def with_database(url: str, name: str) -> str:
    parts = urlsplit(url)
    return urlunsplit((parts.scheme, parts.netloc, "/" + name, parts.query, parts.fragment))


# -- PostgreSQL ------------------------------------------------------------------


@pytest.fixture(scope="session")
def pg_admin_url() -> Iterator[str]:
    given = os.environ.get("TEST_DATABASE_URL")
    if given:
        yield given
        return
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import pgserver
    # Not under pytest's basetemp: a second test session deletes all but the newest
    # three of those at its start, which would pull the data directory from under us.
    folder = Path(tempfile.mkdtemp(prefix="batch-pipeline-test-pg-")) / "data"
    server = pgserver.get_server(folder, cleanup_mode="delete")
    try:
        yield server.get_uri()
    finally:
        server.cleanup()
        shutil.rmtree(folder.parent, ignore_errors=True)


@pytest.fixture(scope="session")
def template_db(pg_admin_url: str) -> str:
    name = f"bp_template_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(pg_admin_url, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    conn = db.connect(with_database(pg_admin_url, name))
    try:
        db.migrate(conn)
    finally:
        conn.close()
    return name


@contextmanager
def scratch_database(admin_url: str, template: str | None) -> Iterator[str]:
    """A new database (a copy of `template`, or empty), dropped afterwards."""
    name = f"bp_{uuid.uuid4().hex[:12]}"
    clause = f' TEMPLATE "{template}"' if template else ""
    with psycopg.connect(admin_url, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"{clause}')
    try:
        yield with_database(admin_url, name)
    finally:
        with psycopg.connect(admin_url, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
def database_url(pg_admin_url: str, template_db: str) -> Iterator[str]:
    """A fresh, migrated database for one test."""
    with scratch_database(pg_admin_url, template_db) as url:
        yield url


@pytest.fixture
def empty_database_url(pg_admin_url: str) -> Iterator[str]:
    """A database with no schema at all."""
    with scratch_database(pg_admin_url, None) as url:
        yield url


class Database:
    def __init__(self, url: str) -> None:
        self.url = url

    def rows(self, sql: str, params: Any = None) -> list[tuple[Any, ...]]:
        with psycopg.connect(self.url) as conn:
            return conn.execute(sql, params).fetchall()

    def value(self, sql: str, params: Any = None) -> Any:
        result = self.rows(sql, params)
        return result[0][0] if result else None

    def execute(self, sql: str, params: Any = None) -> None:
        with psycopg.connect(self.url, autocommit=True) as conn:
            conn.execute(sql, params)


@pytest.fixture
def database(database_url: str) -> Database:
    return Database(database_url)


# -- S3 ---------------------------------------------------------------------------


@pytest.fixture(scope="session")
def s3_endpoint() -> Iterator[str]:
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=free_port(), verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    try:
        yield f"http://{host}:{port}"
    finally:
        server.stop()


@dataclass
class Bucket:
    client: Any
    name: str

    def put(self, key: str, body: str | bytes) -> str:
        self.client.put_object(
            Bucket=self.name, Key=key, Body=body.encode() if isinstance(body, str) else body
        )
        return f"s3://{self.name}/{key}"

    def uri(self, prefix: str = "") -> str:
        return f"s3://{self.name}/{prefix}"


@pytest.fixture
def bucket(s3_endpoint: str) -> Bucket:
    import boto3

    client = boto3.client(
        "s3",
        endpoint_url=s3_endpoint,
        aws_access_key_id=S3_KEY,
        aws_secret_access_key=S3_SECRET,
        region_name="us-east-1",
    )
    name = f"tx-{uuid.uuid4().hex[:12]}"
    client.create_bucket(Bucket=name)
    return Bucket(client, name)


# -- model servers ------------------------------------------------------------------


@pytest.fixture(scope="session")
def model_url() -> Iterator[str]:
    """The reference model server, started through the real CLI."""
    port = free_port()
    proc = subprocess.Popen(
        [*CLI, "model-server", "--port", str(port)],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_http(url + "/health")
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()


@pytest.fixture
def fake_model() -> Iterator[FakeModel]:
    fake = FakeModel()
    try:
        yield fake
    finally:
        fake.close()


# -- running the CLI ---------------------------------------------------------------


@dataclass
class Result:
    code: int
    stdout: str
    stderr: str

    @property
    def output(self) -> str:
        return self.stdout + self.stderr


@pytest.fixture
def cli_env(s3_endpoint: str, database_url: str, model_url: str, tmp_path: Path) -> dict[str, str]:
    """The environment of a run against this test's services; tests adjust it."""
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("DATABASE_URL", "ML_API_URL", "SOURCE_URI", "KEY", "SECRET", "ENDPOINT_URL")
    }
    env.update(
        DATABASE_URL=database_url,
        ML_API_URL=model_url,
        KEY=S3_KEY,
        SECRET=S3_SECRET,
        ENDPOINT_URL=s3_endpoint,
        API_RETRY_BACKOFF="0.05",
        API_RETRY_BACKOFF_MAX="0.5",
        EMBEDDED_DB_DIR=str(tmp_path / "embedded-pg"),
        # Tests point runs at dead ports on purpose: fail at once instead of waiting
        # API_WAIT_READY for a model that will never start (tests of the wait set it).
        API_WAIT_READY="0",
        PYTHONUNBUFFERED="1",
    )
    return env


def run_cli(args: list[str], env: dict[str, str], timeout: float = 120) -> Result:
    proc = subprocess.run(
        [*CLI, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout
    )
    return Result(proc.returncode, proc.stdout, proc.stderr)
