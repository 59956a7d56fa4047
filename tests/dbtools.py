"""Small helpers for tests that compare database states before and after a sync."""

from __future__ import annotations

import subprocess
from pathlib import Path

import psycopg
from psycopg.conninfo import conninfo_to_dict

from dbsync.testing.postgres import embedded_bin_dir


def schema_dump(dsn: str, *, without_dbsync_tables: bool = False) -> str:
    """Return ``pg_dump --schema-only`` of ``dsn``, without lines that differ between runs.

    ``without_dbsync_tables`` leaves out dbsync's own tables and all privileges, for tests
    that compare the application's schema across a sync that creates them.
    """
    params = conninfo_to_dict(dsn)
    environment = {"PGPASSWORD": str(params.pop("password", "") or ""), "PATH": "/usr/bin:/bin"}
    conninfo = " ".join(f"{key}={value}" for key, value in params.items() if value is not None)
    options = ["--schema-only", "--no-owner"]
    if without_dbsync_tables:
        options += ["--no-privileges", "--exclude-table=sync_audit*", "--exclude-table=dbsync_*"]
    completed = subprocess.run(
        [str(Path(embedded_bin_dir()) / "pg_dump"), *options, "--dbname", conninfo],
        capture_output=True, text=True, check=True, env=environment, timeout=120)
    # pg_dump 17.6+ writes a random \restrict key per run.
    return "\n".join(line for line in completed.stdout.splitlines()
                     if not line.startswith(("\\restrict", "\\unrestrict")))


def alembic_versions(dsn: str) -> list[str]:
    """Return the rows of the application's ``alembic_version`` table (empty if absent)."""
    with psycopg.connect(dsn) as connection:
        exists = connection.execute("SELECT to_regclass('public.alembic_version')").fetchone()
        if exists is None or exists[0] is None:
            return []
        rows = connection.execute("SELECT version_num FROM alembic_version").fetchall()
    return sorted(str(row[0]) for row in rows)


def execute(dsn: str, statement: str) -> None:
    """Run ``statement`` in autocommit mode."""
    with psycopg.connect(dsn, autocommit=True) as connection:
        connection.execute(statement)  # type: ignore[arg-type]
