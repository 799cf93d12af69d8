"""Migrations: recorded exactly as Flyway records them, so both tools agree."""

from __future__ import annotations

from pathlib import Path

from library.state.db import Migration, available_migrations

# Computed by Flyway 11.20.3 (flyway migrate on an empty PostgreSQL 15); they never
# change, since a migration is never edited once released.
FLYWAY_CHECKSUMS = {
    "V1__create_tables.sql": -1893667548,
    "V2__run_objects_and_monitoring_views.sql": -1932589145,
    "V3__predictions_without_foreign_key.sql": -2098709595,
}


def test_checksums_are_flyways() -> None:
    ours = {m.script: m.checksum() for m in available_migrations()}
    for script, checksum in FLYWAY_CHECKSUMS.items():
        assert ours[script] == checksum, script


def test_versions_and_descriptions_as_flyway_records_them() -> None:
    [v1, v2, *_] = available_migrations()
    assert (v1.version, v1.description) == ("1", "create tables")
    assert (v2.version, v2.description) == ("2", "run objects and monitoring views")


def test_only_newlines_split_lines(tmp_path: Path) -> None:
    """A form feed or a Unicode line separator is part of a line for Flyway."""
    plain = tmp_path / "V1__a.sql"
    plain.write_text("SELECT 1;\nSELECT 2;\n")
    odd = tmp_path / "V2__b.sql"
    odd.write_text("SELECT 1;\x0c\nSELECT 2;\n")
    crlf = tmp_path / "V3__c.sql"
    crlf.write_bytes(b"SELECT 1;\r\nSELECT 2;\r\n")
    a, b, c = (Migration(v, "x", p).checksum() for v, p in (("1", plain), ("2", odd), ("3", crlf)))
    assert a == c  # line ends are not part of the checksum
    assert a != b  # but a form feed is part of its line
