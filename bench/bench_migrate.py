"""Benchmark: dbsync's migrate step against bare ``alembic upgrade head`` on 50 revisions.

Both run in the same process run, on one throwaway local PostgreSQL, each on fresh
databases, for several rounds (median reported):

- alembic CLI: ``/work/venv/bin/alembic upgrade head`` as a subprocess, with a generated
  alembic.ini and the stock online env.py (one transaction for all revisions).
- alembic API: ``alembic.command.upgrade`` in this process (no interpreter start-up).
- dbsync: SyncLock + migrate() in this process, audit trail already open (per-revision
  audit events, checksums, lock, timeouts, one transaction).
- dbsync + audit setup: the same plus opening the AuditTrail, which creates dbsync's own
  tables on a fresh database.

Goal: dbsync + audit setup <= 1.2 x alembic CLI + 0.3 s.

Run: /work/venv/bin/python bench/bench_migrate.py [--revisions 50] [--rounds 3]
"""

from __future__ import annotations

import argparse
import logging
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import psycopg
import structlog
from alembic import command
from alembic.config import Config
from sqlalchemy import create_engine
from sqlalchemy.pool import NullPool

from dbsync.pipeline.audit import (
    AuditContext,
    AuditTrail,
    OperationStatus,
    OperationType,
    Requester,
)
from dbsync.pipeline.dsn import describe
from dbsync.pipeline.lock import SyncLock
from dbsync.pipeline.migrate import MigrateOptions, migrate
from dbsync.testing.postgres import LocalPostgres

ALEMBIC_CLI = Path(sys.executable).with_name("alembic")

ENV_PY = '''
from alembic import context
from sqlalchemy import engine_from_config, pool

config = context.config
connectable = config.attributes.get("connection")
if connectable is None:
    engine = engine_from_config(config.get_section(config.config_ini_section),
                                prefix="sqlalchemy.", poolclass=pool.NullPool)
    with engine.connect() as connection:
        context.configure(connection=connection)
        with context.begin_transaction():
            context.run_migrations()
else:
    context.configure(connection=connectable)
    with context.begin_transaction():
        context.run_migrations()
'''

REVISION = '''"""Create table bench_{n}."""
from alembic import op

revision = "b{n:03d}"
down_revision = {down!r}
branch_labels = None
depends_on = None


def upgrade():
    op.execute("CREATE TABLE bench_{n} (id bigint PRIMARY KEY, account text NOT NULL, "
               "amount numeric(18, 2) NOT NULL DEFAULT 0, created_at timestamptz DEFAULT now())")
    op.execute("CREATE INDEX bench_{n}_account ON bench_{n} (account)")


def downgrade():
    op.execute("DROP TABLE bench_{n}")
'''


def write_revisions(directory: Path, count: int) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    for n in range(1, count + 1):
        down = f"b{n - 1:03d}" if n > 1 else None
        (directory / f"b{n:03d}.py").write_text(REVISION.format(n=n, down=down))


def write_project(root: Path, count: int, url: str) -> Path:
    """Write alembic.ini, env.py and versions/ for the CLI; return the ini path."""
    write_revisions(root / "versions", count)
    (root / "env.py").write_text(ENV_PY)
    ini = root / "alembic.ini"
    ini.write_text(f"[alembic]\nscript_location = {root}\nsqlalchemy.url = "
                   f"{url.replace('%', '%%')}\n")
    return ini


def create_database(server: LocalPostgres, prefix: str) -> str:
    name = f"{prefix}_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(server.dsn(), autocommit=True) as connection:
        connection.execute(f'CREATE DATABASE "{name}"')
    return name


def time_alembic_cli(ini: Path) -> float:
    started = time.perf_counter()
    subprocess.run([str(ALEMBIC_CLI), "-c", str(ini), "upgrade", "head"], check=True,
                   capture_output=True)
    return time.perf_counter() - started


def time_alembic_api(project: Path, url: str) -> float:
    config = Config()
    config.set_main_option("script_location", str(project))
    engine = create_engine(url, poolclass=NullPool)
    started = time.perf_counter()
    with engine.connect() as connection:
        config.attributes["connection"] = connection
        command.upgrade(config, "head")
        connection.commit()
    elapsed = time.perf_counter() - started
    engine.dispose()
    return elapsed


def time_dbsync(dsn: str, flat_dir: Path) -> tuple[float, float]:
    """Return (seconds with the audit trail open already, seconds including its setup)."""
    sync_id = uuid.uuid4()
    context = AuditContext(sync_id=sync_id, requester=Requester.from_cli(),
                           database=describe(dsn))
    started = time.perf_counter()
    with AuditTrail(dsn=dsn, context=context) as audit:
        operation = audit.start(OperationType.MIGRATION, name="migrate")
        migrate_started = time.perf_counter()
        with SyncLock(dsn=dsn):
            result = migrate(target_dsn=dsn, source_dsn=None,
                             options=MigrateOptions(migrations_dir=flat_dir), audit=audit,
                             parent=operation, sync_id=sync_id)
        migrate_elapsed = time.perf_counter() - migrate_started
        audit.finish(operation, OperationStatus.SUCCESS)
    total = time.perf_counter() - started
    assert len(result.applied) > 0
    return migrate_elapsed, total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--revisions", type=int, default=50)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    # Why: the audit trail logs every event through structlog; keep the output to results.
    logging.disable(logging.INFO)
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))

    timings: dict[str, list[float]] = {"alembic CLI": [], "alembic API": [], "dbsync": [],
                                       "dbsync + audit setup": []}
    with LocalPostgres() as server, tempfile.TemporaryDirectory() as scratch:
        work = Path(scratch)
        flat_dir = work / "flat"
        write_revisions(flat_dir, args.revisions)
        for round_number in range(args.rounds):
            cli_db = create_database(server, "cli")
            cli_url = server.dsn(cli_db).replace("postgresql://", "postgresql+psycopg://", 1)
            project = work / f"project_{round_number}"
            timings["alembic CLI"].append(time_alembic_cli(
                write_project(project, args.revisions, cli_url)))

            api_db = create_database(server, "api")
            api_url = server.dsn(api_db).replace("postgresql://", "postgresql+psycopg://", 1)
            timings["alembic API"].append(time_alembic_api(project, api_url))

            dbsync_db = create_database(server, "dbsync")
            migrate_seconds, total_seconds = time_dbsync(server.dsn(dbsync_db), flat_dir)
            timings["dbsync"].append(migrate_seconds)
            timings["dbsync + audit setup"].append(total_seconds)

    medians = {name: statistics.median(values) for name, values in timings.items()}
    print(f"{args.revisions} revisions, {args.rounds} rounds, median seconds:")
    for name, value in medians.items():
        print(f"  {name:<22} {value:7.3f}")
    cli = medians["alembic CLI"]
    total = medians["dbsync + audit setup"]
    print(f"ratio dbsync / alembic API: {medians['dbsync'] / medians['alembic API']:.2f}")
    print(f"ratio dbsync + audit setup / alembic CLI: {total / cli:.2f}")
    goal = 1.2 * cli + 0.3
    verdict = "met" if total <= goal else "missed"
    print(f"goal dbsync + audit setup <= 1.2 x CLI + 0.3 s = {goal:.3f} s: {verdict}")


if __name__ == "__main__":
    main()
