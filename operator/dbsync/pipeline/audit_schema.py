"""Brings dbsync's own tables (the audit log) to the head of their Alembic history.

The history lives in the top-level ``migrations/`` folder, installed as
``dbsync.own_migrations``, and is versioned in ``dbsync_alembic_version`` so an application's
``alembic_version`` is never touched. The upgrade runs through Alembic's Python API on the
caller's psycopg connection: a SQLAlchemy engine is built around that one connection, and no
subprocess is started.
"""

from __future__ import annotations

import importlib.resources
import logging
from typing import Any

import psycopg
import sqlalchemy
import sqlalchemy.exc
from alembic import command
from alembic.config import Config
from alembic.util.exc import CommandError
from psycopg import sql
from sqlalchemy.pool import StaticPool

from dbsync.pipeline.alembic_guard import ALEMBIC_PROCESS_LOCK
from dbsync.pipeline.audit_chain import (
    AUDIT_TABLE,
    CHAIN_LOCK_CLASS,
    COPY_TEXT_FUNCTION,
    OPERATIONS_VIEW,
    OWN_SCHEMA_LOCK_KEY,
)
from dbsync.pipeline.dsn import connect, describe, password_of, redact_text
from dbsync.pipeline.errors import AuditUnavailableError, ConfigurationError

logger = logging.getLogger("dbsync.audit")

OWN_VERSION_TABLE = "dbsync_alembic_version"
OWN_MIGRATIONS_PACKAGE = "dbsync.own_migrations"


def own_migrations_config() -> Config:
    """Return an Alembic config whose script location is dbsync's own history."""
    location = importlib.resources.files(OWN_MIGRATIONS_PACKAGE)
    config = Config()
    config.set_main_option("script_location", str(location))
    return config


def _describe_connection(connection: psycopg.Connection[Any]) -> str:
    info = connection.info
    return f"{info.host}:{info.port}/{info.dbname}"


def upgrade_own_schema(connection: psycopg.Connection[Any]) -> None:
    """Run dbsync's own Alembic history to head on ``connection``.

    ``connection`` must be idle (no open transaction). It is left open, idle and in its
    original autocommit mode. A session advisory lock serializes concurrent upgrades from
    several processes, and :data:`ALEMBIC_PROCESS_LOCK` serializes them between threads.
    Raises :class:`AuditUnavailableError` when the upgrade fails.
    """
    if connection.info.transaction_status != psycopg.pq.TransactionStatus.IDLE:
        raise AuditUnavailableError(
            "cannot upgrade dbsync's own tables on a connection inside a transaction: "
            "commit or roll back first")

    was_autocommit = connection.autocommit
    with ALEMBIC_PROCESS_LOCK:
        connection.autocommit = True
        connection.execute("SELECT pg_advisory_lock(%s, %s)",
                           (CHAIN_LOCK_CLASS, OWN_SCHEMA_LOCK_KEY))
        try:
            _run_alembic_upgrade(connection)
        except (CommandError, sqlalchemy.exc.SQLAlchemyError, psycopg.Error) as error:
            detail = redact_text(str(error).strip().splitlines()[0] if str(error).strip()
                                 else type(error).__name__, connection.info.password or "")
            raise AuditUnavailableError(
                f"cannot bring dbsync's own tables in {_describe_connection(connection)} to "
                f"the latest revision: {detail}; the role needs CREATE on the schema for the "
                "first run, or an administrator runs 'dbsync audit grant' after creating "
                "them") from None
        finally:
            if not connection.closed:
                if connection.info.transaction_status != psycopg.pq.TransactionStatus.IDLE:
                    connection.rollback()
                connection.autocommit = True
                connection.execute("SELECT pg_advisory_unlock(%s, %s)",
                                   (CHAIN_LOCK_CLASS, OWN_SCHEMA_LOCK_KEY))
                connection.autocommit = was_autocommit


def _run_alembic_upgrade(connection: psycopg.Connection[Any]) -> None:
    # Alembic runs all pending revisions in one transaction, which needs a connection
    # outside autocommit mode.
    connection.autocommit = False

    # StaticPool hands out this one connection. dispose(close=False) drops the pool without
    # closing it, so the caller keeps its session (and its advisory locks).
    engine = sqlalchemy.create_engine(
        "postgresql+psycopg://",
        creator=lambda: connection,
        poolclass=StaticPool,
        use_native_hstore=False,
    )
    try:
        with engine.connect() as sa_connection:
            config = own_migrations_config()
            config.attributes["connection"] = sa_connection
            command.upgrade(config, "head")
            sa_connection.commit()
    finally:
        engine.dispose(close=False)


def ensure_own_schema(dsn: str, *, connect_timeout_seconds: int = 10) -> None:
    """Connect to ``dsn`` and bring dbsync's own tables to head (see upgrade_own_schema)."""
    connection = connect(dsn, role="audit", autocommit=True,
                         connect_timeout_seconds=connect_timeout_seconds)
    try:
        upgrade_own_schema(connection)
    except AuditUnavailableError as error:
        raise AuditUnavailableError(redact_text(str(error), password_of(dsn))) from None
    finally:
        connection.close()
    logger.debug("dbsync's own tables in %s are at head", describe(dsn, role="audit"))


def grant_statements(role: str, *, schema: str | None = None, dsn: str | None = None,
                     connect_timeout_seconds: int = 10) -> list[sql.Composed]:
    """Return the statements that make ``role`` an INSERT-only writer of the audit trail.

    The role may append and read events, read the view and dbsync's version table (an
    AuditTrail checks that its tables are at head), and nothing else on these objects. With
    ``dsn``, the schema defaults to the one holding the audit table and a CONNECT grant on
    that database is included. Without it, the schema defaults to ``public``.
    """
    if not role or not role.strip():
        raise ConfigurationError("the role name is empty: pass the name of an existing role")

    database: str | None = None
    if dsn is not None:
        database = describe(dsn, role="audit").database
        if schema is None:
            schema = _audit_table_schema(dsn, connect_timeout_seconds=connect_timeout_seconds)
    schema = schema or "public"

    grantee = sql.Identifier(role)
    table = sql.Identifier(schema, AUDIT_TABLE)
    statements: list[sql.Composed] = []
    if database:
        statements.append(sql.SQL("GRANT CONNECT ON DATABASE {} TO {}").format(
            sql.Identifier(database), grantee))
    statements.extend([
        sql.SQL("GRANT USAGE ON SCHEMA {} TO {}").format(sql.Identifier(schema), grantee),
        # Start from nothing, so an earlier broader grant (UPDATE, DELETE, ...) is removed.
        sql.SQL("REVOKE ALL ON TABLE {} FROM {}").format(table, grantee),
        # SELECT is needed too: the chain trigger reads the previous row as the inserting role.
        sql.SQL("GRANT SELECT, INSERT ON TABLE {} TO {}").format(table, grantee),
        sql.SQL("REVOKE ALL ON TABLE {} FROM {}").format(
            sql.Identifier(schema, OPERATIONS_VIEW), grantee),
        sql.SQL("GRANT SELECT ON TABLE {} TO {}").format(
            sql.Identifier(schema, OPERATIONS_VIEW), grantee),
        sql.SQL("GRANT SELECT ON TABLE {} TO {}").format(
            sql.Identifier(schema, OWN_VERSION_TABLE), grantee),
        sql.SQL("GRANT EXECUTE ON FUNCTION {}(text) TO {}").format(
            sql.Identifier(schema, COPY_TEXT_FUNCTION), grantee),
    ])
    return statements


def _audit_table_schema(dsn: str, *, connect_timeout_seconds: int) -> str:
    with connect(dsn, role="audit", autocommit=True,
                 connect_timeout_seconds=connect_timeout_seconds) as connection:
        row = connection.execute(
            "SELECT n.nspname FROM pg_class AS c JOIN pg_namespace AS n ON n.oid = c.relnamespace "
            "WHERE c.oid = to_regclass(%s)", (AUDIT_TABLE,)).fetchone()
    if row is None:
        raise AuditUnavailableError(
            f"no audit table {AUDIT_TABLE} in {describe(dsn, role='audit')}: run a sync (or "
            "'dbsync audit verify') as a role that may create tables first, then grant")
    return str(row[0])


def apply_statements(dsn: str, statements: list[sql.Composed], *,
                     connect_timeout_seconds: int = 10) -> None:
    """Run ``statements`` on ``dsn`` in one transaction."""
    with connect(dsn, role="audit", connect_timeout_seconds=connect_timeout_seconds) as connection:
        try:
            with connection.transaction():
                for statement in statements:
                    connection.execute(statement)
        except psycopg.Error as error:
            detail = redact_text(str(error).strip().splitlines()[0], password_of(dsn))
            raise ConfigurationError(
                f"cannot apply the audit grants on {describe(dsn, role='audit')}: {detail}; "
                "run them as the owner of the audit tables or a superuser") from None
