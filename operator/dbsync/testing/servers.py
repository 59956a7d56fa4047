"""Where the test suite gets its PostgreSQL: a local throwaway server or ``DBSYNC_TEST_DSN``.

``DBSYNC_TEST_DSN`` names a superuser connection to an existing server (for example the
PostgreSQL 15 cluster that ``.ci/run`` starts on a Unix socket); every test then creates
its own databases there.  Without it, one :class:`LocalPostgres` serves the whole session.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import psycopg
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from dbsync.testing.postgres import LocalPostgres

TEST_DSN_VARIABLE = "DBSYNC_TEST_DSN"


@dataclass(frozen=True)
class TestServer:
    """A PostgreSQL server the tests may create and drop databases on."""

    __test__ = False  # not a pytest test class

    admin_dsn: str
    local: LocalPostgres | None = None

    def dsn(self, database: str) -> str:
        """Return a connection string for ``database`` with the admin credentials."""
        return make_conninfo(self.admin_dsn, dbname=database)

    @property
    def can_restart(self) -> bool:
        """Whether fault tests may stop and start this server."""
        return self.local is not None

    @property
    def host_and_port(self) -> tuple[str, int]:
        params = conninfo_to_dict(self.admin_dsn)
        return str(params.get("host", "")), int(params.get("port", 5432) or 5432)

    def create_database(self, prefix: str = "t") -> str:
        """Create an empty database with a unique name and return its name."""
        name = f"{prefix}_{uuid.uuid4().hex[:12]}"
        with psycopg.connect(self.admin_dsn, autocommit=True) as connection:
            connection.execute(sql.SQL("CREATE DATABASE {} TEMPLATE template0").format(
                sql.Identifier(name)))
        return name

    def drop_database(self, name: str) -> None:
        """Drop ``name``, ending any session still connected to it."""
        with psycopg.connect(self.admin_dsn, autocommit=True) as connection:
            connection.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(
                sql.Identifier(name)))


@contextmanager
def test_server() -> Iterator[TestServer]:
    """Yield the suite's server: ``DBSYNC_TEST_DSN`` if set, else a local throwaway one."""
    external = os.environ.get(TEST_DSN_VARIABLE)
    if external:
        yield TestServer(admin_dsn=external)
        return
    with LocalPostgres() as local:
        yield TestServer(admin_dsn=local.dsn("postgres"), local=local)
