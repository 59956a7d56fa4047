"""Shared fixtures and helpers of the audit tests (this module contains no tests).

Each test gets its own schema in one database per test module: the audit tables live in the
first schema of the connection's search_path, so a fresh schema is as isolated as a fresh
database and much cheaper to create. Each test module defines its fixtures from these.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

import psycopg
from psycopg import sql
from psycopg.conninfo import make_conninfo

from dbsync.pipeline.audit import AuditContext, Requester
from dbsync.pipeline.dsn import describe
from dbsync.testing.servers import TestServer


def make_context(dsn: str, **overrides: Any) -> AuditContext:
    """Return an AuditContext for a new sync on ``dsn``, with a Kubernetes requester."""
    fields: dict[str, Any] = {
        "sync_id": uuid.uuid4(),
        "requester": Requester(kind="kubernetes", namespace="payments", name="uat-sync",
                               uid="0d1c7d1e-5b8e-4a44-9a38-0c9f6a1b2c3d", generation=7),
        "database": describe(dsn),
    }
    fields.update(overrides)
    return AuditContext(**fields)


def schema_of(dsn: str) -> str:
    """Return the schema that ``dsn`` creates and finds the audit tables in."""
    with psycopg.connect(dsn) as connection:
        row = connection.execute("SELECT current_schema()").fetchone()
    assert row is not None
    return str(row[0])


def new_schema_dsn(database_dsn: str) -> str:
    """Create an empty schema in ``database_dsn`` and return a DSN whose search_path is it."""
    schema = f"audit_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(database_dsn, autocommit=True) as connection:
        connection.execute(sql.SQL("CREATE SCHEMA {}").format(sql.Identifier(schema)))
    return make_conninfo(database_dsn, options=f"-c search_path={schema}")


def module_database(server: TestServer) -> Iterator[str]:
    """Yield the DSN of a new database and drop it afterwards (for module fixtures)."""
    name = server.create_database("audit")
    yield server.dsn(name)
    server.drop_database(name)
