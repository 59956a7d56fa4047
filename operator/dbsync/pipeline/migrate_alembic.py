"""The narrow layer between dbsync and Alembic: engines, observed runs and offline SQL.

A run observes each migration step as it starts, so dbsync can time and audit every
revision on its own while Alembic runs them all in one environment. Online runs share
dbsync's connection through ``config.attributes["connection"]``. When dbsync has already
begun a transaction on it, Alembic's ``begin_transaction()`` joins that transaction instead
of opening its own, which is how one transaction spans several revisions.
"""

from __future__ import annotations

import io
from collections.abc import Callable
from typing import Any

import psycopg
from alembic.runtime.environment import EnvironmentContext
from alembic.runtime.migration import MigrationContext
from sqlalchemy import Connection, Engine, create_engine, text
from sqlalchemy.engine import URL
from sqlalchemy.pool import NullPool

from dbsync.pipeline import dsn as dsn_module
from dbsync.pipeline.alembic_guard import ALEMBIC_PROCESS_LOCK
from dbsync.pipeline.errors import ConfigurationError
from dbsync.pipeline.migrate_scripts import ScriptSet

APPLICATION_NAME = "dbsync migrate"

_INVALID_INDEXES_SQL = """
SELECT format('%I.%I', n.nspname, c.relname)
FROM pg_index AS i
JOIN pg_class AS c ON c.oid = i.indexrelid
JOIN pg_namespace AS n ON n.oid = c.relnamespace
WHERE NOT i.indisvalid
ORDER BY 1
"""


# Relations, columns, constraints, indexes and enum labels outside the system schemas.
_FINGERPRINT_SQL = """
SELECT md5(coalesce(string_agg(item, E'\\n' ORDER BY item), ''))
FROM (
    SELECT format('%s.%s %s %s', n.nspname, c.relname, c.relkind,
                  coalesce(a.attname || ' ' || format_type(a.atttypid, a.atttypmod), ''))
    FROM pg_class AS c
    JOIN pg_namespace AS n ON n.oid = c.relnamespace
    LEFT JOIN pg_attribute AS a
        ON a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped
    WHERE n.nspname NOT IN ('pg_catalog', 'information_schema')
      AND n.nspname NOT LIKE 'pg\\_toast%%' AND n.nspname NOT LIKE 'pg\\_temp%%'
    UNION ALL
    SELECT format('constraint %s %s', conname, pg_get_constraintdef(oid))
    FROM pg_constraint WHERE connamespace NOT IN (
        SELECT oid FROM pg_namespace WHERE nspname IN ('pg_catalog', 'information_schema'))
    UNION ALL
    SELECT format('enum %s %s %s', enumtypid::regtype, enumsortorder, enumlabel)
    FROM pg_enum
) AS items(item)
"""


def public_url(dsn: str) -> URL:
    """Return a ``postgresql+psycopg://`` URL for ``dsn`` without its password."""
    address = dsn_module.describe(dsn, role="target")
    if address.host.startswith("/"):
        # A Unix-socket directory is not a URL host: libpq takes it as the host parameter.
        return URL.create("postgresql+psycopg", username=address.user or None,
                          database=address.database,
                          query={"host": address.host, "port": str(address.port)})
    return URL.create("postgresql+psycopg", username=address.user or None,
                      host=address.host, port=address.port, database=address.database)


def make_engine(dsn: str, *, connect_timeout_seconds: int = 10) -> Engine:
    """Create a NullPool engine whose connections come from :func:`dsn_module.connect`.

    The engine's URL carries no password: the connection string stays inside the
    ``creator``, so nothing that logs the engine or its URL can leak a credential.
    """
    def connect() -> psycopg.Connection[tuple[object, ...]]:
        return dsn_module.connect(dsn, role="target", autocommit=False,
                                  connect_timeout_seconds=connect_timeout_seconds,
                                  application_name=APPLICATION_NAME)

    return create_engine(public_url(dsn), poolclass=NullPool, creator=connect)


def set_timeouts(connection: Connection, *, lock_timeout_ms: int,
                 statement_timeout_ms: int) -> None:
    """Set the session's lock_timeout and statement_timeout, outside any transaction."""
    connection.exec_driver_sql(f"SET lock_timeout = {int(lock_timeout_ms)}")
    connection.exec_driver_sql(f"SET statement_timeout = {int(statement_timeout_ms)}")
    connection.commit()


def current_heads(connection: Connection) -> tuple[str, ...]:
    """Return the application's ``alembic_version`` rows, or () when the table is absent."""
    exists = connection.execute(text("SELECT to_regclass('alembic_version')")).scalar()
    if exists is None:
        return ()
    rows = connection.execute(text("SELECT version_num FROM alembic_version")).scalars()
    return tuple(sorted(str(row) for row in rows))


def single_head(heads: tuple[str, ...], *, where: str) -> str | None:
    """Return the only revision in ``heads``; several rows mean unmerged branches."""
    if len(heads) > 1:
        raise ConfigurationError(
            f"{where} has several rows in alembic_version ({', '.join(heads)}): dbsync "
            "migrates linear histories only; merge the branches with 'alembic merge' first")
    return heads[0] if heads else None


def invalid_indexes(connection: Connection) -> tuple[str, ...]:
    """Return the target's indexes that pg_index marks invalid (failed concurrent builds)."""
    return tuple(str(row) for row in connection.execute(text(_INVALID_INDEXES_SQL)).scalars())


def schema_fingerprint(connection: Connection) -> str:
    """Return an MD5 over the target's relations, columns, constraints and enum labels."""
    return str(connection.exec_driver_sql(_FINGERPRINT_SQL).scalar())


class AlembicDriver:
    """Runner and renderer of revisions with the directory's Alembic environment."""

    def __init__(self, scripts: ScriptSet, *, offline_url: URL) -> None:
        self._scripts = scripts
        # Why: env.py files read sqlalchemy.url in offline mode; ConfigParser needs % doubled.
        self._offline_url = offline_url.render_as_string(hide_password=True).replace("%", "%%")

    def run(self, connection: Connection, destination: str, *, downgrade: bool = False,
            on_step: Callable[[str], None] | None = None) -> None:
        """Move the target to ``destination`` on ``connection``, in one Alembic run.

        ``on_step`` is called with each revision id just before that revision's
        ``upgrade()`` or ``downgrade()`` runs, which is where dbsync starts its audit
        operation and timer.
        """
        script_directory = self._scripts.script_directory
        config = self._scripts.make_config()
        config.set_main_option("sqlalchemy.url", self._offline_url)
        config.attributes["connection"] = connection

        def steps(revision: Any, _context: MigrationContext) -> Any:
            if downgrade:
                found = script_directory._downgrade_revs(destination, revision)
            else:
                found = script_directory._upgrade_revs(destination, revision)
            if on_step is None:
                return found
            return [_ObservedStep(step, on_step) for step in found]

        # Why: alembic.context and alembic.op are process-global proxies.
        with ALEMBIC_PROCESS_LOCK, EnvironmentContext(
                config, script_directory, fn=steps, as_sql=False,
                destination_rev=destination):
            script_directory.run_env()

    def render(self, start: str | None, destination: str, *, downgrade: bool = False) -> str:
        """Return the SQL of the step from ``start`` to ``destination`` (offline mode)."""
        script_directory = self._scripts.script_directory
        buffer = io.StringIO()
        config = self._scripts.make_config(output_buffer=buffer)
        config.set_main_option("sqlalchemy.url", self._offline_url)

        def steps(revision: Any, _context: MigrationContext) -> Any:
            if downgrade:
                return script_directory._downgrade_revs(destination, revision)
            return script_directory._upgrade_revs(destination, revision)

        with ALEMBIC_PROCESS_LOCK, EnvironmentContext(
                config, script_directory, fn=steps, as_sql=True,
                starting_rev=start, destination_rev=destination):
            script_directory.run_env()
        return _strip_transaction_lines(buffer.getvalue())


class _ObservedStep:
    """An Alembic migration step that reports its revision id before it runs.

    MigrationContext.run_migrations() only calls ``migration_fn`` and reads attributes of
    a step, so every other attribute is delegated to the wrapped step unchanged.
    """

    def __init__(self, step: Any, on_step: Callable[[str], None]) -> None:
        self._step = step
        self._on_step = on_step

    def __getattr__(self, name: str) -> Any:
        return getattr(self._step, name)

    def __str__(self) -> str:
        return str(self._step)

    @property
    def migration_fn(self) -> Callable[..., None]:
        function: Callable[..., None] = self._step.migration_fn
        revision_id = str(self._step.revision.revision)

        def run(**kwargs: Any) -> None:
            self._on_step(revision_id)
            function(**kwargs)

        return run


def _strip_transaction_lines(sql: str) -> str:
    """Drop the BEGIN and COMMIT that offline mode wraps around each rendered step.

    Only the outer pair goes: a COMMIT inside, as an autocommit block renders, stays
    visible in the plan.
    """
    lines = sql.strip().splitlines()
    if lines and lines[0].strip().upper() == "BEGIN;":
        lines = lines[1:]
    if lines and lines[-1].strip().upper() == "COMMIT;":
        lines = lines[:-1]
    return "\n".join(lines).strip()
