"""Helpers for migrate tests: generated revision files, schema snapshots and audited runs."""

from __future__ import annotations

import textwrap
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg import sql

from dbsync.pipeline.audit import (
    AuditContext,
    AuditTrail,
    Operation,
    OperationStatus,
    OperationType,
    Requester,
    fetch_sync_operations,
)
from dbsync.pipeline.audit_schema import ensure_own_schema
from dbsync.pipeline.dsn import describe
from dbsync.pipeline.lock import SyncLock
from dbsync.pipeline.migrate import MigrateOptions, MigrateResult, migrate
from dbsync.testing.servers import TestServer

# A revision on top of the example application's head that fails after its first
# statement, to prove that a failed sync leaves the target as it was.
FAILING_REVISION = '''"""Add a column, then fail half-way.

Revision ID: 0007_fails
Revises: 0006_txn_status
"""

import sqlalchemy as sa
from alembic import op

revision = "0007_fails"
down_revision = "0006_txn_status"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("accounts", sa.Column("iban", sa.String(34)))
    op.execute("SELECT 1 / 0")


def downgrade() -> None:
    op.drop_column("accounts", "iban")
'''

# The cookbook env.py ("Sharing a Connection"): it runs on dbsync's connection when given.
PROJECT_ENV_PY = '''
from alembic import context
from sqlalchemy import engine_from_config, pool

config = context.config


def run_on(connection):
    context.configure(connection=connection, target_metadata=None)
    with context.begin_transaction():
        context.run_migrations()


if context.is_offline_mode():
    context.configure(url=config.get_main_option("sqlalchemy.url"), literal_binds=True)
    with context.begin_transaction():
        context.run_migrations()
else:
    connectable = config.attributes.get("connection", None)
    if connectable is None:
        engine = engine_from_config(config.get_section(config.config_ini_section),
                                    prefix="sqlalchemy.", poolclass=pool.NullPool)
        with engine.connect() as connection:
            run_on(connection)
    else:
        run_on(connectable)
'''

# An env.py that ignores dbsync's connection: dbsync must replace it with its own.
SELF_CONNECTING_ENV_PY = '''
from alembic import context
from sqlalchemy import engine_from_config, pool

config = context.config
engine = engine_from_config(config.get_section(config.config_ini_section),
                            prefix="sqlalchemy.", poolclass=pool.NullPool)
with engine.connect() as connection:
    context.configure(connection=connection)
    with context.begin_transaction():
        context.run_migrations()
'''


def revision_source(revision: str, down_revision: str | None, upgrade: Sequence[str] | str,
                    downgrade: Sequence[str] | str = (), *, description: str = "") -> str:
    """Return the text of a revision file whose upgrade/downgrade run the given statements.

    A string is used as the function body verbatim (Python); a sequence is a list of SQL
    statements, each passed to ``op.execute``.
    """
    def body(statements: Sequence[str] | str) -> str:
        if isinstance(statements, str):
            return textwrap.indent(textwrap.dedent(statements).strip(), "    ")
        if not statements:
            return "    pass"
        return "\n".join(f"    op.execute({statement!r})" for statement in statements)

    return (
        f'"""{description or "Revision " + revision}\n\nRevision ID: {revision}\n"""\n'
        "import sqlalchemy as sa\n"
        "from alembic import op\n\n"
        f"revision = {revision!r}\n"
        f"down_revision = {down_revision!r}\n"
        "branch_labels = None\n"
        "depends_on = None\n\n\n"
        f"def upgrade():\n{body(upgrade)}\n\n\n"
        f"def downgrade():\n{body(downgrade)}\n"
    )


def write_revision(directory: Path, revision: str, down_revision: str | None,
                   upgrade: Sequence[str] | str, downgrade: Sequence[str] | str = (), *,
                   description: str = "") -> Path:
    """Write ``<revision>.py`` into ``directory`` and return its path."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{revision}.py"
    path.write_text(revision_source(revision, down_revision, upgrade, downgrade,
                                    description=description))
    return path


def write_table_chain(directory: Path, count: int, *, prefix: str = "r") -> list[str]:
    """Write ``count`` linear revisions, each creating table ``t_<n>``; return their ids."""
    ids = [f"{prefix}{index:03d}" for index in range(1, count + 1)]
    for index, revision in enumerate(ids):
        write_revision(
            directory, revision, ids[index - 1] if index else None,
            [f"CREATE TABLE t_{index + 1} (id bigint PRIMARY KEY, name text NOT NULL)"],
            [f"DROP TABLE t_{index + 1}"])
    return ids


def make_project_dir(root: Path, *, env_py: str = PROJECT_ENV_PY) -> tuple[Path, Path]:
    """Create an Alembic project directory (env.py and versions/); return (dir, versions)."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "env.py").write_text(env_py)
    versions = root / "versions"
    versions.mkdir()
    return root, versions


def alembic_version(dsn: str) -> list[str]:
    """Return the rows of the database's alembic_version ([] when the table is absent)."""
    with psycopg.connect(dsn, autocommit=True) as connection:
        exists = connection.execute("SELECT to_regclass('alembic_version')").fetchone()
        if exists is None or exists[0] is None:
            return []
        return sorted(str(row[0]) for row in
                      connection.execute("SELECT version_num FROM alembic_version"))


def row_count(dsn: str, query: str) -> int:
    with psycopg.connect(dsn, autocommit=True) as connection:
        row = connection.execute(query).fetchone()
    assert row is not None
    return int(str(row[0]))


@dataclass
class AuditedRun:
    """An open audit trail and MIGRATION operation for calling ``migrate`` in a test."""

    audit: AuditTrail
    operation: Operation
    sync_id: uuid.UUID
    dsn: str


@contextmanager
def audited(dsn: str) -> Iterator[AuditedRun]:
    """Open an audit trail on ``dsn`` with a MIGRATION operation, finished on exit."""
    sync_id = uuid.uuid4()
    context = AuditContext(sync_id=sync_id, requester=Requester.from_cli(),
                           database=describe(dsn))
    with AuditTrail(dsn=dsn, context=context) as audit:
        operation = audit.start(OperationType.MIGRATION, name="migrate")
        try:
            yield AuditedRun(audit=audit, operation=operation, sync_id=sync_id, dsn=dsn)
        finally:
            audit.finish(operation, OperationStatus.SUCCESS)


def run_migrate(dsn: str, *, source_dsn: str | None = None, lock: bool = True,
                **options: Any) -> tuple[MigrateResult, uuid.UUID]:
    """Run ``migrate`` under the sync lock with a fresh audit trail; return result and sync id."""
    with audited(dsn) as run:
        if lock:
            with SyncLock(dsn=dsn, lock_wait_seconds=30):
                result = migrate(target_dsn=dsn, source_dsn=source_dsn,
                                 options=MigrateOptions(**options), audit=run.audit,
                                 parent=run.operation, sync_id=run.sync_id)
        else:
            result = migrate(target_dsn=dsn, source_dsn=source_dsn,
                             options=MigrateOptions(**options), audit=run.audit,
                             parent=run.operation, sync_id=run.sync_id)
    return result, run.sync_id


def revision_operations(dsn: str, sync_id: uuid.UUID) -> list[dict[str, Any]]:
    """Return the sync's REVISION operations from the audit view, in start order."""
    return [row for row in fetch_sync_operations(dsn, sync_id)
            if row["operation_type"] == OperationType.REVISION]


def create_template(server: TestServer) -> str:
    """Create a database with dbsync's own tables at head, for :class:`TargetFactory`."""
    name = server.create_database("migtpl")
    ensure_own_schema(server.dsn(name))
    return name


@dataclass
class TargetFactory:
    """Factory of target databases, each a copy of a template with dbsync's own tables.

    Copying skips creating the audit schema in every test, which is most of a short
    test's run time.
    """

    server: TestServer
    template: str
    created: list[str] = field(default_factory=list)

    def create(self, prefix: str = "mig") -> str:
        name = f"{prefix}_{uuid.uuid4().hex[:12]}"
        with psycopg.connect(self.server.admin_dsn, autocommit=True) as connection:
            connection.execute(sql.SQL("CREATE DATABASE {} TEMPLATE {}").format(
                sql.Identifier(name), sql.Identifier(self.template)))
        self.created.append(name)
        return self.server.dsn(name)

    def drop_all(self) -> None:
        for name in self.created:
            self.server.drop_database(name)
        self.created.clear()


@pytest.fixture(scope="module")
def targets(pg: TestServer) -> Iterator[TargetFactory]:
    """Factory for fresh targets; the template is shared by one test module's tests."""
    factory = TargetFactory(server=pg, template=create_template(pg))
    yield factory
    factory.drop_all()
    pg.drop_database(factory.template)


@pytest.fixture
def target(targets: TargetFactory) -> Iterator[str]:
    """A fresh target database made from the module's template."""
    yield targets.create("mig")
    targets.drop_all()
