"""Ordinary faults of a night, made for real, each compared table by table with an
uninterrupted run: PostgreSQL stopped and started mid-run, every backend of a run
terminated while a second run starts, the model killed and restarted, a model
that stalls, an S3 body cut by a loopback proxy, a claim lost to another run."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from datetime import datetime
from typing import Any

import psycopg
import pytest

from library.models import SourceObject
from library.stages.sink import Sink
from library.state import db
from library.state.ledger import Ledger
from tests.conftest import (
    CLI,
    ROOT,
    Bucket,
    Database,
    free_port,
    run_cli,
    scratch_database,
    wait_http,
)
from tests.end_to_end.test_resume import TOTALS, dump
from tests.helpers.data import gz, row, rows, to_csv, zst
from tests.helpers.postgres import PrivatePostgres

# Objects that share no transaction_id, so that two runs working on different
# objects at once give the same tables as one run (see the concurrency guarantee).
SOLO = ("a.csv", "b.csv.gz", "c.csv", "d.csv.zst")
PER_OBJECT_ROWS = 1500


def fill_solo(bucket: Bucket, prefix: str = "solo/", n: int = PER_OBJECT_ROWS) -> None:
    for i, name in enumerate(SOLO):
        base = 10_000 * i
        records = [
            *rows(n, start=base),
            row(base + 7, amount="7.77"),  # a duplicate within the object: the latest wins
            row(base + 3, amount="x"),  # invalid
            row(base + 11, account_id='a,"b"\nc'),  # a quoted newline
        ]
        body = to_csv(records)
        data: str | bytes = body
        if name.endswith(".gz"):
            data = gz(body)
        elif name.endswith(".zst"):
            data = zst(body)
        bucket.put(prefix + name, data)


@pytest.fixture
def solo_env(cli_env: dict[str, str], bucket: Bucket) -> dict[str, str]:
    fill_solo(bucket)
    return {
        **cli_env,
        "SOURCE_URI": bucket.uri("solo/"),
        "ROW_BATCH_SIZE": "300",
        "API_BATCH_SIZE": "50",
        "DB_ROW_BATCH_SIZE": "200",
        "API_MAX_WORKERS": "3",
    }


@pytest.fixture
def clean_db(pg_admin_url: str, template_db: str) -> Iterator[str]:
    with scratch_database(pg_admin_url, template_db) as url:
        yield url


def clean_run(env: dict[str, str], url: str) -> tuple[dict[str, Any], tuple[Any, ...]]:
    result = run_cli(["run"], {**env, "DATABASE_URL": url})
    assert result.code == 3, result.output
    return dump(url), Database(url).rows(TOTALS)[0]


def start(env: dict[str, str], *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [*CLI, "run", *args],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def wait_for(
    condition: Any, timeout: float = 60, proc: subprocess.Popen[str] | None = None
) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if proc is not None and proc.poll() is not None:
            out, err = proc.communicate()
            raise AssertionError(f"the run ended early ({proc.returncode}):\n{out}\n{err}")
        assert time.monotonic() < deadline, "timed out waiting"
        time.sleep(0.05)


def stored(url: str) -> int:
    try:
        return int(Database(url).value("SELECT count(*) FROM transactions"))
    except psycopg.OperationalError:
        return 0


# -- PostgreSQL stopped and started mid-run ---------------------------------------


@pytest.fixture
def own_pg() -> Iterator[PrivatePostgres]:
    server = PrivatePostgres()
    try:
        yield server
    finally:
        server.close()


def migrated(admin_url: str) -> str:
    with psycopg.connect(admin_url, autocommit=True) as conn:
        conn.execute("CREATE DATABASE faults")
    url = admin_url.replace("/postgres?", "/faults?")
    conn = db.connect(url)
    try:
        db.migrate(conn)
    finally:
        conn.close()
    return url


def test_a_postgresql_restart_mid_run_is_ridden_out(
    solo_env: dict[str, str], clean_db: str, own_pg: PrivatePostgres, fake_model: Any
) -> None:
    expected, totals = clean_run({**solo_env, "ML_API_URL": fake_model.url}, clean_db)
    url = migrated(own_pg.admin_url)
    fake_model.knobs.delay_seconds = 0.03
    env = {**solo_env, "ML_API_URL": fake_model.url, "DATABASE_URL": url}
    proc = start(env)
    wait_for(lambda: stored(url) > 0, proc=proc)
    own_pg.stop()
    time.sleep(2)
    own_pg.start()
    out, err = proc.communicate(timeout=180)
    assert proc.returncode == 3, out + err
    assert "retrying in" in err and "DB_RETRY_TIMEOUT" in err
    assert dump(url) == expected
    assert Database(url).rows(TOTALS)[0] == totals
    assert Database(url).rows("SELECT status FROM pipeline_runs") == [("completed_with_errors",)]


def test_a_database_gone_for_longer_than_the_window_fails_the_run_clearly(
    solo_env: dict[str, str], own_pg: PrivatePostgres, fake_model: Any
) -> None:
    url = migrated(own_pg.admin_url)
    fake_model.knobs.delay_seconds = 0.03
    env = {**solo_env, "ML_API_URL": fake_model.url, "DATABASE_URL": url, "DB_RETRY_TIMEOUT": "3"}
    proc = start(env)
    wait_for(lambda: stored(url) > 0, proc=proc)
    own_pg.stop()
    try:
        out, err = proc.communicate(timeout=120)
    finally:
        own_pg.start()
    assert proc.returncode == 1, out + err
    assert "database error while writing a flush" in err
    assert "Traceback" not in err
    # Resumable: a second run finishes the work from the checkpoints.
    assert run_cli(["run"], env).code == 3
    assert Database(url).value("SELECT sum(rows_read) FROM source_objects") == 4 * (
        PER_OBJECT_ROWS + 3
    )


# -- every backend of a run terminated while a second run starts --------------------


def terminate_backends(url: str) -> int:
    with psycopg.connect(url, autocommit=True) as conn:
        return len(
            conn.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                " WHERE application_name LIKE 'batch-pipeline%%' AND pid <> pg_backend_pid()"
            ).fetchall()
        )


def test_backends_terminated_mid_run_with_a_second_run_started_at_once(
    solo_env: dict[str, str], clean_db: str, database: Database, fake_model: Any
) -> None:
    env = {**solo_env, "ML_API_URL": fake_model.url}
    expected, totals = clean_run(env, clean_db)
    fake_model.knobs.delay_seconds = 0.02
    first = start(env)
    wait_for(lambda: stored(database.url) > 0, proc=first)
    assert terminate_backends(database.url) >= 2
    second = start(env)
    out1, err1 = first.communicate(timeout=180)
    out2, err2 = second.communicate(timeout=180)
    said = out1 + err1 + out2 + err2
    assert first.returncode in (0, 3) and second.returncode in (0, 3), said
    assert "internal error" not in said and "Traceback" not in said
    assert "its process is gone" not in said  # the first run was alive all along
    assert dump(database.url) == expected
    assert database.rows(TOTALS)[0] == totals
    statuses = database.rows("SELECT status FROM pipeline_runs")
    assert {s for (s,) in statuses} <= {"completed_with_errors", "completed"}, statuses
    # Every row of every object counted once over both runs.
    per_object = database.rows(
        "SELECT source_uri, sum(rows_read) FROM run_objects GROUP BY 1 ORDER BY 1"
    )
    assert [n for _, n in per_object] == [PER_OBJECT_ROWS + 3] * 4


def test_a_flush_for_an_object_claimed_since_by_another_run_is_refused(
    database_url: str, database: Database
) -> None:
    """The fence: a worker whose lock went with its connection, and whose object was
    claimed meanwhile by another run, never commits rows or a checkpoint for it."""
    from tests.stages.test_sink import OBJ as obj
    from tests.stages.test_sink import scored, unit

    zombie = Ledger(database_url, retry_window=5)
    zombie_run = zombie.start_run(datetime(2026, 1, 1), "s3://b/", {})
    claim = zombie.claim(zombie_run, obj)
    lost: list[SourceObject] = []
    zombie_sink = Sink(database_url, zombie_run, 1000, 5, on_claim_lost=lost.append)
    zombie_sink.begin_object(obj, 1, None, claim.fence)
    zombie_sink.add(unit([row(1)], line=2), scored("tx-000001"))
    zombie_sink.flush()

    # The zombie's connections are terminated; another run claims the object.
    terminate_backends(database_url)
    other = Ledger(database_url, retry_window=5)
    other_run = other.start_run(datetime(2026, 1, 2), "s3://b/", {})
    taken = other.claim(other_run, obj)
    assert taken.status == "resume" and taken.fence == claim.fence + 1

    # The zombie comes back: its flush is refused whole, and it says so.
    zombie_sink.add(unit([row(2), row(3)], seq=1, line=4), scored("tx-000002", "tx-000003"))
    zombie_sink.flush()
    assert lost == [obj]
    assert database.value("SELECT count(*) FROM transactions") == 1
    assert database.rows("SELECT run_id, checkpoint_line FROM source_objects") == [(other_run, 2)]
    # Its later rows for that object are dropped, not written unfenced.
    zombie_sink.add(unit([row(4)], seq=2, line=5), scored("tx-000004"))
    zombie_sink.end_object(obj)
    assert database.value("SELECT count(*) FROM transactions") == 1
    assert database.value("SELECT status FROM source_objects") == "processing"
    for closable in (zombie_sink, zombie, other):
        closable.close()


def test_a_claim_found_lost_by_the_objects_last_flush_ends_the_object_quietly(
    database_url: str, database: Database
) -> None:
    """The loss can first show in the flush that ends the object (the reader had
    already read it all): the sink drops the object there, and ending it is not an
    error (it was a KeyError in the writer: "internal error in the writer")."""
    from tests.stages.test_sink import OBJ as obj
    from tests.stages.test_sink import scored, unit

    zombie = Ledger(database_url, retry_window=5)
    zombie_run = zombie.start_run(datetime(2026, 1, 1), "s3://b/", {})
    claim = zombie.claim(zombie_run, obj)
    lost: list[SourceObject] = []
    zombie_sink = Sink(database_url, zombie_run, 1000, 5, on_claim_lost=lost.append)
    zombie_sink.begin_object(obj, 1, None, claim.fence)
    zombie_sink.add(unit([row(1)], line=2), scored("tx-000001"))
    terminate_backends(database_url)
    other = Ledger(database_url, retry_window=5)
    other_run = other.start_run(datetime(2026, 1, 2), "s3://b/", {})
    other.claim(other_run, obj)

    zombie_sink.end_object(obj)
    assert lost == [obj]
    assert database.value("SELECT count(*) FROM transactions") == 0
    assert database.rows("SELECT run_id, status FROM source_objects") == [(other_run, "processing")]
    zombie_sink.flush()  # nothing of the object is left to write
    assert database.value("SELECT count(*) FROM transactions") == 0
    for closable in (zombie_sink, zombie, other):
        closable.close()


# -- the model killed and restarted within the outage window ------------------------


@contextlib.contextmanager
def model_server(port: int, latency_ms: int = 0) -> Iterator[subprocess.Popen[bytes]]:
    proc = subprocess.Popen(
        [*CLI, "model-server", "--port", str(port), "--latency-ms", str(latency_ms)],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        wait_http(f"http://127.0.0.1:{port}/health")
        yield proc
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)


def test_a_model_restart_within_the_outage_window_fails_no_row(
    solo_env: dict[str, str], clean_db: str, database: Database
) -> None:
    port = free_port()
    env = {**solo_env, "ML_API_URL": f"http://127.0.0.1:{port}", "API_RETRY_BACKOFF_MAX": "30"}
    with model_server(port):
        expected, totals = clean_run(env, clean_db)
    with model_server(port, latency_ms=20) as model:
        proc = start(env)
        wait_for(lambda: stored(database.url) > 0, proc=proc)
        os.killpg(model.pid, signal.SIGKILL)
        time.sleep(5)
    with model_server(port, latency_ms=20):
        out, err = proc.communicate(timeout=180)
    assert proc.returncode == 3, out + err
    assert "connection refused" in err  # the outage was met, and waited out
    assert database.value("SELECT count(*) FROM failed_transactions") == 0
    assert dump(database.url) == expected
    assert database.rows(TOTALS)[0] == totals


# -- a model that stalls --------------------------------------------------------------


class StallingModel:
    """Answers /health at once; answers /predict with headers, then one byte a second."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.closed = threading.Event()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self.closed.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        with conn:
            try:
                request = b""
                while b"\r\n\r\n" not in request:  # the whole head: closing with unread
                    chunk = conn.recv(65536)  # bytes would reset the connection
                    if not chunk:
                        return
                    request += chunk
                if request.startswith(b"GET"):
                    conn.sendall(
                        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok"
                    )
                    conn.shutdown(socket.SHUT_WR)
                    conn.recv(1)  # let the client close first
                    return
                conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n")
                conn.sendall(b"Content-Length: 100000\r\n\r\n")
                while not self.closed.wait(1.0):
                    conn.sendall(b" ")
            except OSError:
                return

    def close(self) -> None:
        self.closed.set()
        self.sock.close()


@pytest.fixture
def stalling_model() -> Iterator[StallingModel]:
    model = StallingModel()
    try:
        yield model
    finally:
        model.close()


def test_a_stalling_model_is_cut_by_the_whole_request_deadline(
    solo_env: dict[str, str], stalling_model: StallingModel, database: Database
) -> None:
    env = {
        **solo_env,
        "ML_API_URL": stalling_model.url,
        "API_TIMEOUT": "2",
        "API_DOWN_TIMEOUT": "6",
    }
    began = time.monotonic()
    result = run_cli(["run"], env, timeout=90)
    elapsed = time.monotonic() - began
    assert result.code == 1, result.output
    assert "timed out: no whole answer within API_TIMEOUT=2s" in result.stderr
    assert "has failed every request for" in result.output
    assert elapsed < 45, elapsed
    assert database.value("SELECT count(*) FROM predictions") == 0
    assert database.value("SELECT count(*) FROM failed_transactions") == 0  # unscored, not failed


def test_sigterm_ends_a_run_stuck_on_a_stalling_model_within_the_timeout(
    solo_env: dict[str, str], stalling_model: StallingModel, database: Database
) -> None:
    env = {**solo_env, "ML_API_URL": stalling_model.url, "API_TIMEOUT": "3"}
    proc = start(env)
    wait_for(
        lambda: database.value("SELECT count(*) FROM pipeline_runs") == 1, proc=proc, timeout=60
    )
    time.sleep(1.5)  # requests are in flight, stalled
    began = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    _out, err = proc.communicate(timeout=60)
    assert proc.returncode == 143, err
    assert time.monotonic() - began < 3 + 10  # API_TIMEOUT plus the final flush, with room
    assert database.value("SELECT status FROM pipeline_runs") == "interrupted"


# -- an S3 body cut by a loopback proxy -------------------------------------------------


class CuttingProxy:
    """A TCP proxy to the S3 server that cuts the first large response after `cut_after`
    bytes, once: what a load balancer dropping a long download does."""

    def __init__(self, upstream: str, cut_after: int) -> None:
        host, port = upstream.removeprefix("http://").split(":")
        self.upstream = (host, int(port))
        self.cut_after = cut_after
        self.cuts = 0
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(32)
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.sock.accept()
            except OSError:
                return
            server = socket.create_connection(self.upstream)
            threading.Thread(target=self._pipe, args=(client, server, False), daemon=True).start()
            threading.Thread(target=self._pipe, args=(server, client, True), daemon=True).start()

    def _pipe(self, src: socket.socket, dst: socket.socket, downstream: bool) -> None:
        sent = 0
        try:
            while data := src.recv(65536):
                if downstream and self.cuts == 0 and sent + len(data) > self.cut_after:
                    self.cuts += 1
                    dst.sendall(data[: self.cut_after - sent])
                    break
                dst.sendall(data)
                sent += len(data)
        except OSError:
            pass
        for s in (src, dst):
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
            s.close()

    def close(self) -> None:
        self.sock.close()


def test_an_s3_body_cut_mid_object_is_read_again_from_where_it_stopped(
    solo_env: dict[str, str], s3_endpoint: str, bucket: Bucket, clean_db: str, database: Database
) -> None:
    big = to_csv(rows(20_000, start=500_000))
    bucket.put("cut/big.csv", big)
    env = {**solo_env, "SOURCE_URI": bucket.uri("cut/")}
    expected, totals = (lambda r: (dump(clean_db), r))(
        run_cli(["run"], {**env, "DATABASE_URL": clean_db})
    )
    assert totals.code == 0, totals.output
    proxy = CuttingProxy(s3_endpoint, cut_after=len(big) // 2)
    try:
        result = run_cli(["run"], {**env, "ENDPOINT_URL": proxy.url})
    finally:
        proxy.close()
    assert proxy.cuts == 1
    assert result.code == 0, result.output
    assert dump(database.url) == expected
