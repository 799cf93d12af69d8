"""The services the benchmark measures against, all on 127.0.0.1: PostgreSQL (embedded,
or BENCH_DATABASE_URL), moto's S3 server and the reference model server, each in its
own process so that none shares the pipeline's interpreter."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
import warnings
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import psycopg

from library.state import db

PYTHON = sys.executable
S3_KEY, S3_SECRET = "bench-key", "bench-secret"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_http(url: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise RuntimeError(f"{url} not ready after {timeout}s") from None
            time.sleep(0.1)


@contextmanager
def process(
    args: list[str], ready_url: str, env: dict[str, str] | None = None
) -> Iterator[subprocess.Popen[bytes]]:
    proc = subprocess.Popen(
        args,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
        env={**os.environ, **(env or {})},
    )
    try:
        wait_http(ready_url)
        yield proc
    finally:
        with_group(proc, signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            with_group(proc, signal.SIGKILL)
            proc.wait(10)


def with_group(proc: subprocess.Popen[bytes], sig: int) -> None:
    with suppress(ProcessLookupError):
        os.killpg(proc.pid, sig)


@contextmanager
def model_server(latency_ms: float = 0.0, capacity: int | None = None) -> Iterator[str]:
    with model_server_process(latency_ms, capacity) as (url, _):
        yield url


@contextmanager
def model_server_process(
    latency_ms: float = 0.0, capacity: int | None = None
) -> Iterator[tuple[str, int]]:
    port = free_port()
    args = [PYTHON, "-m", "pipeline.batch.main", "model-server", "--port", str(port)]
    args += ["--latency-ms", str(latency_ms)]
    if capacity:
        args += ["--capacity", str(capacity)]
    url = f"http://127.0.0.1:{port}"
    with process(args, url + "/health") as proc:
        yield url, proc.pid


@dataclass
class Services:
    admin_url: str
    template: str
    s3_endpoint: str
    model_url: str
    s3: Any
    pids: list[int] = field(default_factory=list)  # the services' own processes, to pin
    pycache: str = ""  # where the measured processes keep their bytecode

    def _new_database(self, prefix: str, clause: str = "") -> str:
        name = f"{prefix}_{uuid.uuid4().hex[:10]}"
        with psycopg.connect(self.admin_url, autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"{clause}')
        parts = urlsplit(self.admin_url)
        return urlunsplit((parts.scheme, parts.netloc, "/" + name, parts.query, parts.fragment))

    def empty_database(self) -> str:
        """A new database without the schema, for the peer (it creates its own tables)."""
        return self._new_database("bench_peer")

    def fresh_database(self) -> str:
        """A new, migrated database: each measured run starts from the same empty state."""
        return self._new_database("bench", f' TEMPLATE "{self.template}"')

    def drop_database(self, url: str) -> None:
        name = urlsplit(url).path.lstrip("/")
        with psycopg.connect(self.admin_url, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')

    def env(self, database_url: str, **extra: str) -> dict[str, str]:
        env = {
            k: v
            for k, v in os.environ.items()
            if not k.startswith(
                ("API_", "DB_", "ROW_", "MAX_", "PROGRESS", "LOG_", "METRICS", "PUSHGATEWAY")
            )
        }
        env.update(
            DATABASE_URL=database_url,
            ML_API_URL=self.model_url,
            KEY=S3_KEY,
            SECRET=S3_SECRET,
            ENDPOINT_URL=self.s3_endpoint,
            PROGRESS="off",
        )
        if self.pycache:
            # As in the image (uv compiles the venv's bytecode at build time): without
            # it every run would compile polars, boto3 and the rest again, about 2 s of
            # CPU that a user's runs never spend.
            env.pop("PYTHONDONTWRITEBYTECODE", None)
            env["PYTHONPYCACHEPREFIX"] = self.pycache
        env.update(extra)
        return env

    @contextmanager
    def pinned(self, cpus: str) -> Iterator[None]:
        """The services (every thread of PostgreSQL's processes, moto's and the model
        server's) on `cpus` only, then back on every CPU."""
        every = f"0-{(os.cpu_count() or 1) - 1}"
        try:
            for pid in self.service_processes():
                set_affinity(pid, cpus)
            yield
        finally:
            for pid in self.service_processes():
                set_affinity(pid, every)

    def service_processes(self) -> list[int]:
        """The services' processes and their descendants (PostgreSQL's backends)."""
        parents: dict[int, int] = {}
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit():
                with suppress(OSError, IndexError, ValueError):
                    stat = (entry / "stat").read_text()
                    parents[int(entry.name)] = int(stat.rsplit(")", 1)[1].split()[1])
        found = set(self.pids)
        grew = True
        while grew:
            more = {pid for pid, parent in parents.items() if parent in found} - found
            grew = bool(more)
            found |= more
        return sorted(found)


def set_affinity(pid: int, cpus: str) -> None:
    """Every thread of `pid` on `cpus` (taskset -a: threads started later inherit it)."""
    subprocess.run(
        ["taskset", "-a", "-p", "-c", cpus, str(pid)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        check=False,
    )


@contextmanager
def services(workdir: Path) -> Iterator[Services]:
    with ExitStack() as stack:
        admin = os.environ.get("BENCH_DATABASE_URL")
        pids: list[int] = []
        if not admin:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                import pgserver
            folder = workdir / "postgres"
            folder.parent.mkdir(parents=True, exist_ok=True)
            server = pgserver.get_server(folder, cleanup_mode="stop")
            stack.callback(server.cleanup)
            admin = server.get_uri()
            with suppress(OSError, ValueError):  # PostgreSQL's postmaster: pinned with its backends
                pids.append(int((folder / "postmaster.pid").read_text().split()[0]))
        template = f"bench_template_{uuid.uuid4().hex[:6]}"
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{template}"')
        parts = urlsplit(admin)
        conn = db.connect(
            urlunsplit((parts.scheme, parts.netloc, "/" + template, parts.query, parts.fragment))
        )
        db.migrate(conn)
        conn.close()

        def drop_template() -> None:
            with psycopg.connect(admin, autocommit=True) as c:
                c.execute(f'DROP DATABASE IF EXISTS "{template}" WITH (FORCE)')

        stack.callback(drop_template)

        s3_port = free_port()
        moto = [PYTHON, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(s3_port)]
        moto_proc = stack.enter_context(process(moto, f"http://127.0.0.1:{s3_port}/moto-api/"))
        pids.append(moto_proc.pid)
        endpoint = f"http://127.0.0.1:{s3_port}"
        import boto3

        s3 = boto3.client(
            "s3",
            endpoint_url=endpoint,
            aws_access_key_id=S3_KEY,
            aws_secret_access_key=S3_SECRET,
            region_name="us-east-1",
        )
        model, model_pid = stack.enter_context(model_server_process())
        pids.append(model_pid)
        yield Services(admin, template, endpoint, model, s3, pids, str(workdir / "pycache"))
