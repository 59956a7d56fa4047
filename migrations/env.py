"""Alembic environment for dbsync's own tables, versioned in ``dbsync_alembic_version``.

dbsync runs this history through Alembic's Python API and hands over a live SQLAlchemy
connection in ``config.attributes["connection"]``; see ``dbsync.pipeline.audit_schema``. The
``alembic`` command line works too, with ``sqlalchemy.url`` set to a ``postgresql+psycopg://``
URL, and ``--sql`` renders the DDL without a database.
"""

from __future__ import annotations

from alembic import context
from sqlalchemy import Connection, create_engine, pool

# A separate version table, so an application's own alembic_version is never read or written.
VERSION_TABLE = "dbsync_alembic_version"

config = context.config


def run_migrations_offline() -> None:
    """Render the pending revisions as SQL text (``alembic upgrade --sql``)."""
    url = config.get_main_option("sqlalchemy.url") or "postgresql+psycopg://"
    context.configure(
        url=url,
        literal_binds=True,
        dialect_opts={"paramstyle": "named"},
        version_table=VERSION_TABLE,
    )
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_on(connection: Connection) -> None:
    """Apply the pending revisions on ``connection`` in one transaction."""
    context.configure(
        connection=connection,
        version_table=VERSION_TABLE,
        transactional_ddl=True,
    )
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    """Use the caller's connection when there is one, else connect to ``sqlalchemy.url``."""
    shared = config.attributes.get("connection")
    if shared is not None:
        run_migrations_on(shared)
        return

    url = config.get_main_option("sqlalchemy.url")
    if not url:
        raise RuntimeError(
            "no database for dbsync's own migrations: pass a connection in "
            "config.attributes['connection'] or set sqlalchemy.url to a "
            "postgresql+psycopg:// URL")
    engine = create_engine(url, poolclass=pool.NullPool)
    try:
        with engine.connect() as connection:
            run_migrations_on(connection)
    finally:
        engine.dispose()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
