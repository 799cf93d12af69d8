"""A PostgreSQL server of one test (or module) alone, from pgserver's binaries.

The suite's shared server trusts every local connection and must stay up. A test
that stops and starts the server (a restart mid-run), or that needs passwords
really checked, starts one of these instead.
"""

from __future__ import annotations

import shutil
import tempfile
import time
import warnings
from pathlib import Path

import psycopg
from psycopg import sql

PROBE_ROLE = "password_probe"


class PrivatePostgres:
    def __init__(self, prefix: str = "batch-pipeline-test-own-pg-") -> None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # platformdirs warns when XDG_RUNTIME_DIR is unset
            import pgserver

        self.folder = Path(tempfile.mkdtemp(prefix=prefix)) / "data"
        self.server = pgserver.get_server(self.folder, cleanup_mode="delete")
        self.admin_url: str = self.server.get_uri()
        self.socket_dir = str(self.server.get_postmaster_info().socket_dir)

    # -- a restart ------------------------------------------------------------------

    def _pg_ctl(self, *args: str) -> None:
        from pgserver import _commands

        _commands.pg_ctl(list(args), pgdata=self.folder, user=self.server.system_user, timeout=60)

    def stop(self) -> None:
        """A fast shutdown, as an operator's restart or a failover does: sessions cut."""
        self._pg_ctl("-w", "-m", "fast", "stop")

    def start(self) -> None:
        """Start again on the same socket folder (pgserver's own start options)."""
        self._pg_ctl(
            "-w", "-o", '-h ""', "-o", f"-k {self.socket_dir}", "-l", str(self.server.log), "start"
        )

    # -- passwords ----------------------------------------------------------------------

    def require_passwords(self) -> None:
        """Every role but the superuser must give its password (scram-sha-256); returns
        once the server really refuses a wrong one (pg_reload_conf only signals it)."""
        with psycopg.connect(self.admin_url, autocommit=True) as conn:
            conn.execute("SET password_encryption = 'scram-sha-256'")
            conn.execute(
                sql.SQL("CREATE ROLE {} LOGIN PASSWORD 'right'").format(sql.Identifier(PROBE_ROLE))
            )
            row = conn.execute("SHOW hba_file").fetchone()
            assert row is not None
            Path(row[0]).write_text(
                "local all postgres trust\nlocal all all scram-sha-256\n", encoding="utf-8"
            )
            conn.execute("SELECT pg_reload_conf()")
        deadline = time.monotonic() + 10
        while True:
            try:
                psycopg.connect(
                    f"postgresql://{PROBE_ROLE}:wrong@/postgres?host={self.socket_dir}"
                ).close()
            except psycopg.OperationalError as exc:
                assert "password authentication failed" in str(exc)
                return
            assert time.monotonic() < deadline, "pg_hba.conf was not reloaded"
            time.sleep(0.05)

    def close(self) -> None:
        self.server.cleanup()
        shutil.rmtree(self.folder.parent, ignore_errors=True)
