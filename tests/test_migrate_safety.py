"""What cannot roll back: concurrent index builds, new enum values, lock and statement timeouts."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from dbsync.pipeline.errors import LockTimeoutError, MigrationFailedError
from dbsync.pipeline.migrate import NonTransactionalRevisionError, OutcomeStatus
from dbsync.pipeline.migrate_apply import NEW_ENUM_TYPE_EXEMPT_SINCE
from tests.dbtools import schema_dump
from tests.migration_fixtures import (
    alembic_version,
    revision_operations,
    row_count,
    run_migrate,
    write_revision,
    write_table_chain,
)


@pytest.fixture
def migrated(target: str, tmp_path: Path) -> tuple[str, Path]:
    """A target at r001 (table t_1 with three rows, two of them with the same name)."""
    write_table_chain(tmp_path, 1)
    run_migrate(target, migrations_dir=tmp_path)
    with psycopg.connect(target, autocommit=True) as connection:
        connection.execute("INSERT INTO t_1 VALUES (1, 'a'), (2, 'b'), (3, 'b')")
    return target, tmp_path


def index_is_valid(dsn: str, name: str) -> bool | None:
    with psycopg.connect(dsn, autocommit=True) as connection:
        row = connection.execute(
            "SELECT i.indisvalid FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid "
            "WHERE c.relname = %s", (name,)).fetchone()
    return None if row is None else bool(row[0])


def add_concurrent_index(directory: Path, *, unique: bool = False) -> None:
    kind = "UNIQUE INDEX" if unique else "INDEX"
    write_revision(directory, "r002", "r001", ["CREATE TABLE t_2 (id int)"])
    write_revision(directory, "r003", "r002",
                   [f"CREATE {kind} CONCURRENTLY ix_t1_name ON t_1 (name)"],
                   ["DROP INDEX CONCURRENTLY ix_t1_name"])


def test_concurrent_index_flagged_in_plan(migrated: tuple[str, Path]) -> None:
    target, directory = migrated
    add_concurrent_index(directory)
    result, _sync_id = run_migrate(target, migrations_dir=directory, dry_run="plan")
    flagged = result.outcomes[1]
    assert not flagged.transactional
    assert any("not atomic and not rehearsable" in warning for warning in flagged.warnings)
    assert any("use per-revision" in warning for warning in flagged.warnings)
    assert result.outcomes[0].transactional


def test_concurrent_index_rejected_in_all_mode(migrated: tuple[str, Path]) -> None:
    target, directory = migrated
    add_concurrent_index(directory)
    with pytest.raises(NonTransactionalRevisionError) as caught:
        run_migrate(target, migrations_dir=directory)
    assert "r003 (r003.py)" in str(caught.value)
    assert "per-revision" in str(caught.value)
    assert alembic_version(target) == ["r001"]


def test_concurrent_index_runs_per_revision(migrated: tuple[str, Path]) -> None:
    target, directory = migrated
    add_concurrent_index(directory)
    result, sync_id = run_migrate(target, migrations_dir=directory,
                                  transaction_mode="per-revision")
    assert result.applied == ("r002", "r003")
    assert index_is_valid(target, "ix_t1_name") is True
    assert result.invalid_indexes == ()
    assert [row["status"] for row in revision_operations(target, sync_id)] == [
        "SUCCESS", "SUCCESS"]


def test_failed_concurrent_build_reports_invalid_index(migrated: tuple[str, Path]) -> None:
    target, directory = migrated
    add_concurrent_index(directory, unique=True)
    with pytest.raises(MigrationFailedError) as caught:
        run_migrate(target, migrations_dir=directory, transaction_mode="per-revision")
    result = caught.value.result  # type: ignore[attr-defined]
    assert result.invalid_indexes == ("public.ix_t1_name",)
    assert "INVALID indexes left behind: public.ix_t1_name" in str(caught.value)
    assert result.applied == ("r002",)
    assert index_is_valid(target, "ix_t1_name") is False


def test_autocommit_block_runs_per_revision(migrated: tuple[str, Path]) -> None:
    target, directory = migrated
    write_revision(directory, "r002", "r001", """
        op.execute("CREATE TABLE t_2 (id int, name text)")
        with op.get_context().autocommit_block():
            op.execute("CREATE INDEX CONCURRENTLY ix_t2_name ON t_2 (name)")
        op.execute("ALTER TABLE t_2 ADD COLUMN note text")
    """)
    result, _sync_id = run_migrate(target, migrations_dir=directory,
                                   transaction_mode="per-revision")
    assert result.applied == ("r002",)
    assert not result.outcomes[0].transactional
    assert index_is_valid(target, "ix_t2_name") is True
    assert alembic_version(target) == ["r002"]
    assert row_count(target, "SELECT count(*) FROM information_schema.columns "
                             "WHERE table_name = 't_2' AND column_name = 'note'") == 1


def test_rehearse_stops_before_concurrent_index(migrated: tuple[str, Path]) -> None:
    target, directory = migrated
    add_concurrent_index(directory)
    result, _sync_id = run_migrate(target, migrations_dir=directory, dry_run="rehearse")
    assert [outcome.status for outcome in result.outcomes] == [
        OutcomeStatus.REHEARSED, OutcomeStatus.NOT_RUN]
    assert index_is_valid(target, "ix_t1_name") is None


@pytest.fixture
def enum_target(target: str, tmp_path: Path) -> tuple[str, Path]:
    """A target at r001 with enum mood ('sad', 'ok') committed and table moods."""
    write_revision(tmp_path, "r001", None, ["CREATE TYPE mood AS ENUM ('sad', 'ok')",
                                            "CREATE TABLE moods (m mood)"])
    run_migrate(target, migrations_dir=tmp_path)
    return target, tmp_path


def test_enum_value_use_rejected_before_running(enum_target: tuple[str, Path]) -> None:
    target, directory = enum_target
    write_revision(directory, "r002", "r001", ["ALTER TYPE mood ADD VALUE 'happy'"])
    write_revision(directory, "r003", "r002", ["INSERT INTO moods VALUES ('happy')"])
    with pytest.raises(NonTransactionalRevisionError) as caught:
        run_migrate(target, migrations_dir=directory)
    assert "r003 (r003.py) uses mood value 'happy'" in str(caught.value)
    assert alembic_version(target) == ["r001"]


def test_enum_value_use_works_per_revision(enum_target: tuple[str, Path]) -> None:
    target, directory = enum_target
    write_revision(directory, "r002", "r001", ["ALTER TYPE mood ADD VALUE 'happy'"])
    write_revision(directory, "r003", "r002", ["INSERT INTO moods VALUES ('happy')"])
    result, _sync_id = run_migrate(target, migrations_dir=directory,
                                   transaction_mode="per-revision")
    assert result.applied == ("r002", "r003")


def test_enum_of_new_type_follows_server(target: str, tmp_path: Path) -> None:
    """A label of a type created in the same run: PostgreSQL 18 accepts it, 15 rejects it."""
    write_revision(tmp_path, "r001", None, ["CREATE TYPE mood AS ENUM ('sad')",
                                            "CREATE TABLE moods (m mood)"])
    write_revision(tmp_path, "r002", "r001", ["ALTER TYPE mood ADD VALUE 'happy'"])
    write_revision(tmp_path, "r003", "r002", ["INSERT INTO moods VALUES ('happy')"])
    with psycopg.connect(target) as connection:
        server_major = connection.info.server_version // 10000

    if server_major >= NEW_ENUM_TYPE_EXEMPT_SINCE:
        result, _sync_id = run_migrate(target, migrations_dir=tmp_path)
        assert result.applied == ("r001", "r002", "r003")
    else:
        with pytest.raises(NonTransactionalRevisionError, match="r003"):
            run_migrate(target, migrations_dir=tmp_path)


def test_hidden_enum_value_use_names_revision(enum_target: tuple[str, Path]) -> None:
    """A use that the static scan cannot see fails at run time with 55P04, explained."""
    target, directory = enum_target
    before_dump = schema_dump(target, without_dbsync_tables=True)
    write_revision(directory, "r002", "r001", ["ALTER TYPE mood ADD VALUE 'happy'"])
    write_revision(directory, "r003", "r002",
                   "label = 'hap' + 'py'\nop.execute(f\"INSERT INTO moods VALUES ('{label}')\")")

    with pytest.raises(MigrationFailedError) as caught:
        run_migrate(target, migrations_dir=directory)

    message = str(caught.value)
    assert "revision r003 (r003.py)" in message
    assert "55P04" in message
    assert "per-revision" in message
    assert alembic_version(target) == ["r001"]
    assert schema_dump(target, without_dbsync_tables=True) == before_dump
    assert row_count(target, "SELECT count(*) FROM pg_enum") == 2


@pytest.fixture
def dump_before_lock(migrated: tuple[str, Path]) -> str:
    """The target's schema dump, taken before the blocker locks t_1 (pg_dump would wait)."""
    return schema_dump(migrated[0], without_dbsync_tables=True)


@pytest.fixture
def blocker(migrated: tuple[str, Path],
            dump_before_lock: str) -> Iterator[psycopg.Connection[tuple[object, ...]]]:
    """Another session holding an ACCESS EXCLUSIVE lock on t_1 in an open transaction."""
    target, _directory = migrated
    connection = psycopg.connect(target)
    connection.execute("LOCK TABLE t_1 IN ACCESS EXCLUSIVE MODE")
    yield connection
    connection.close()


def test_lock_timeout_retried_then_reported(
        migrated: tuple[str, Path], dump_before_lock: str,
        blocker: psycopg.Connection[tuple[object, ...]]) -> None:
    target, directory = migrated
    write_revision(directory, "r002", "r001", ["CREATE TABLE t_2 (id int)"])
    write_revision(directory, "r003", "r002", ["ALTER TABLE t_1 ADD COLUMN note text"])

    with pytest.raises(LockTimeoutError) as caught:
        run_migrate(target, migrations_dir=directory, lock_timeout_ms=150, lock_retries=2,
                    retry_backoff_seconds=0.05)

    assert "revision r003 (r003.py)" in str(caught.value)
    assert "after 3 attempt(s)" in str(caught.value)
    result = caught.value.result  # type: ignore[attr-defined]
    assert result.lock_retries_used == 2
    blocker.rollback()
    assert alembic_version(target) == ["r001"]
    assert schema_dump(target, without_dbsync_tables=True) == dump_before_lock


def test_lock_timeout_audited_per_attempt(
        migrated: tuple[str, Path], blocker: psycopg.Connection[tuple[object, ...]]) -> None:
    target, directory = migrated
    write_revision(directory, "r002", "r001", ["CREATE TABLE t_2 (id int)"])
    write_revision(directory, "r003", "r002", ["ALTER TABLE t_1 ADD COLUMN note text"])
    with pytest.raises(LockTimeoutError):
        run_migrate(target, migrations_dir=directory, lock_timeout_ms=150, lock_retries=1,
                    retry_backoff_seconds=0.05)
    blocker.rollback()
    with psycopg.connect(target, autocommit=True) as connection:
        rows = connection.execute(
            "SELECT operation_name, status, metadata->>'attempt' FROM sync_audit_operations "
            "WHERE operation_type = 'REVISION' AND operation_name <> 'r001' "
            "ORDER BY start_sequence").fetchall()
    assert rows == [("r002", "ROLLED_BACK", "1"), ("r003", "TIMEOUT", "1"),
                    ("r002", "ROLLED_BACK", "2"), ("r003", "TIMEOUT", "2")]


def release_after_first_timeout(dsn: str,
                                blocker: psycopg.Connection[tuple[object, ...]]) -> None:
    """Wait until the migration queues behind the blocker, let it time out, then release."""
    with psycopg.connect(dsn, autocommit=True) as watcher:
        for _attempt in range(300):
            waiting = watcher.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' "
                "AND application_name = 'dbsync migrate'").fetchone()
            if waiting is not None and waiting[0]:
                break
            time.sleep(0.02)
    time.sleep(0.4)
    blocker.rollback()


def test_lock_released_during_retries_applies(
        migrated: tuple[str, Path], blocker: psycopg.Connection[tuple[object, ...]]) -> None:
    target, directory = migrated
    write_revision(directory, "r002", "r001", ["ALTER TABLE t_1 ADD COLUMN note text"])
    release = threading.Thread(target=release_after_first_timeout, args=(target, blocker))
    release.start()
    try:
        result, _sync_id = run_migrate(target, migrations_dir=directory, lock_timeout_ms=150,
                                       lock_retries=6, retry_backoff_seconds=0.1)
    finally:
        release.join()
    assert result.applied == ("r002",)
    assert result.lock_retries_used >= 1
    assert any("hit lock_timeout" in warning for warning in result.outcomes[0].warnings)


def terminate_when_sleeping(dsn: str) -> None:
    """End the migration's session once it runs pg_sleep, as a crashed connection would."""
    with psycopg.connect(dsn, autocommit=True) as admin:
        for _attempt in range(500):
            row = admin.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                "WHERE application_name = 'dbsync migrate' AND query LIKE '%pg_sleep%'"
            ).fetchone()
            if row is not None:
                return
            time.sleep(0.02)


def test_lost_session_rolls_back(migrated: tuple[str, Path]) -> None:
    target, directory = migrated
    write_revision(directory, "r002", "r001", ["CREATE TABLE t_2 (id int)"])
    write_revision(directory, "r003", "r002", ["SELECT pg_sleep(10)"])
    killer = threading.Thread(target=terminate_when_sleeping, args=(target,))
    killer.start()
    try:
        with pytest.raises(MigrationFailedError) as caught:
            run_migrate(target, migrations_dir=directory)
    finally:
        killer.join()
    assert "revision r003 (r003.py)" in str(caught.value)
    assert caught.value.result.revision_after == "r001"  # type: ignore[attr-defined]
    assert alembic_version(target) == ["r001"]
    assert row_count(target, "SELECT count(*) FROM pg_class WHERE relname = 't_2'") == 0


def test_statement_timeout_explained(migrated: tuple[str, Path]) -> None:
    target, directory = migrated
    write_revision(directory, "r002", "r001", ["SELECT pg_sleep(2)"])
    with pytest.raises(MigrationFailedError, match=r"statement_timeout \(200 ms\)"):
        run_migrate(target, migrations_dir=directory, statement_timeout_ms=200)
    assert alembic_version(target) == ["r001"]
