"""dbsync's Alembic environment for directories that hold only revision files.

dbsync passes an open SQLAlchemy connection in ``config.attributes["connection"]`` and
owns the transaction around it, so this environment only configures Alembic on that
connection. Offline (plan) runs render PostgreSQL SQL without connecting.
"""

from __future__ import annotations

from alembic import context
from sqlalchemy import create_engine, pool

config = context.config


def run_migrations_offline() -> None:
    """Render the revisions as SQL text for PostgreSQL, without a database."""
    context.configure(
        url=config.get_main_option("sqlalchemy.url"),
        dialect_name="postgresql",
        literal_binds=True,
        dialect_opts={"paramstyle": "named"},
        transactional_ddl=True,
    )
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    """Run the revisions on dbsync's connection, or on ``sqlalchemy.url`` when run by hand."""
    connection = config.attributes.get("connection")
    if connection is not None:
        context.configure(connection=connection, transactional_ddl=True)
        with context.begin_transaction():
            context.run_migrations()
        return

    url = config.get_main_option("sqlalchemy.url")
    engine = create_engine(url or "", poolclass=pool.NullPool)
    with engine.connect() as own_connection:
        context.configure(connection=own_connection, transactional_ddl=True)
        with context.begin_transaction():
            context.run_migrations()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
