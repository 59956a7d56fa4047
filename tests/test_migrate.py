"""The migrate step on real PostgreSQL: apply, fail, plan, rehearse, revisions and checksums."""

from __future__ import annotations

import hashlib
import threading
from pathlib import Path

import psycopg
import pytest

from dbsync.pipeline.errors import ConfigurationError, MigrationFailedError
from dbsync.pipeline.migrate import (
    DryRunMode,
    OutcomeStatus,
    RevisionChecksumMismatchError,
    TargetAheadError,
    read_current_revision,
)
from tests.dbtools import schema_dump
from tests.migration_fixtures import (
    SELF_CONNECTING_ENV_PY,
    TargetFactory,
    alembic_version,
    make_project_dir,
    revision_operations,
    row_count,
    run_migrate,
    write_revision,
    write_table_chain,
)


def table_exists(dsn: str, name: str) -> bool:
    return row_count(dsn, f"SELECT count(*) FROM pg_class WHERE relname = '{name}'") == 1


def test_all_pending_revisions_applied(target: str, tmp_path: Path) -> None:
    ids = write_table_chain(tmp_path, 3)
    result, _sync_id = run_migrate(target, migrations_dir=tmp_path)
    assert result.applied == tuple(ids)
    assert alembic_version(target) == ["r003"]
    assert table_exists(target, "t_3")


def test_each_revision_audited_as_child(target: str, tmp_path: Path) -> None:
    write_table_chain(tmp_path, 3)
    result, sync_id = run_migrate(target, migrations_dir=tmp_path)
    operations = revision_operations(target, sync_id)
    assert [row["name"] for row in operations] == ["r001", "r002", "r003"]
    assert {row["status"] for row in operations} == {"SUCCESS"}
    assert [str(outcome.operation_id) for outcome in result.outcomes] == [
        row["operation_id"] for row in operations]


def test_nothing_pending_is_a_no_op(target: str, tmp_path: Path) -> None:
    write_table_chain(tmp_path, 2)
    run_migrate(target, migrations_dir=tmp_path)
    result, _sync_id = run_migrate(target, migrations_dir=tmp_path)
    assert result.outcomes == ()
    assert result.revision_after == "r002"


def test_failure_half_way_leaves_target_unchanged(target: str, tmp_path: Path) -> None:
    write_table_chain(tmp_path, 1)
    run_migrate(target, migrations_dir=tmp_path)
    before_dump = schema_dump(target, without_dbsync_tables=True)
    write_revision(tmp_path, "r002", "r001", ["CREATE TABLE t_2 (id int)"])
    write_revision(tmp_path, "r003", "r002", ["ALTER TABLE t_1 ADD COLUMN extra int",
                                              "ALTER TABLE missing_table ADD COLUMN x int"])
    write_revision(tmp_path, "r004", "r003", ["CREATE TABLE t_4 (id int)"])

    with pytest.raises(MigrationFailedError) as caught:
        run_migrate(target, migrations_dir=tmp_path)

    assert alembic_version(target) == ["r001"]
    assert schema_dump(target, without_dbsync_tables=True) == before_dump
    assert "revision r003 (r003.py)" in str(caught.value)
    assert "rolled back" in str(caught.value)


def test_failure_half_way_audited_per_revision(target: str, tmp_path: Path) -> None:
    write_table_chain(tmp_path, 2)
    write_revision(tmp_path, "r003", "r002", ["SELECT 1 / 0"])
    write_revision(tmp_path, "r004", "r003", ["CREATE TABLE t_4 (id int)"])
    with pytest.raises(MigrationFailedError) as caught:
        run_migrate(target, migrations_dir=tmp_path)

    result = caught.value.result  # type: ignore[attr-defined]
    statuses = {outcome.revision: outcome.status for outcome in result.outcomes}
    assert statuses == {"r001": OutcomeStatus.ROLLED_BACK, "r002": OutcomeStatus.ROLLED_BACK,
                        "r003": OutcomeStatus.FAILED, "r004": OutcomeStatus.NOT_RUN}
    with psycopg.connect(target, autocommit=True) as connection:
        rows = connection.execute(
            "SELECT operation_name, status FROM sync_audit_operations "
            "WHERE operation_type = 'REVISION' ORDER BY start_sequence").fetchall()
    assert rows == [("r001", "ROLLED_BACK"), ("r002", "ROLLED_BACK"), ("r003", "FAILED"),
                    ("r004", "SKIPPED")]


def test_per_revision_failure_keeps_earlier_commits(target: str, tmp_path: Path) -> None:
    write_table_chain(tmp_path, 2)
    write_revision(tmp_path, "r003", "r002", ["SELECT 1 / 0"])
    with pytest.raises(MigrationFailedError) as caught:
        run_migrate(target, migrations_dir=tmp_path, transaction_mode="per-revision")
    result = caught.value.result  # type: ignore[attr-defined]
    assert result.applied == ("r001", "r002")
    assert alembic_version(target) == ["r002"]
    assert "Committed before the failure: r001, r002" in str(caught.value)


def test_plan_renders_sql_without_changes(target: str, tmp_path: Path) -> None:
    write_table_chain(tmp_path, 2)
    result, sync_id = run_migrate(target, migrations_dir=tmp_path, dry_run="plan")
    assert [outcome.status for outcome in result.outcomes] == [OutcomeStatus.PLANNED] * 2
    assert "CREATE TABLE t_2" in (result.outcomes[1].sql or "")
    assert alembic_version(target) == []
    assert not table_exists(target, "t_1")
    operations = revision_operations(target, sync_id)
    assert "CREATE TABLE t_1" in operations[0]["metadata"]["sql"]


def test_plan_with_project_env(target: str, tmp_path: Path) -> None:
    root, versions = make_project_dir(tmp_path / "project")
    write_table_chain(versions, 2)
    result, _sync_id = run_migrate(target, migrations_dir=root, dry_run="plan")
    assert "CREATE TABLE t_1" in (result.outcomes[0].sql or "")
    assert alembic_version(target) == []


def test_rehearse_leaves_schema_and_version_identical(target: str, tmp_path: Path) -> None:
    write_table_chain(tmp_path, 1)
    run_migrate(target, migrations_dir=tmp_path)
    write_revision(tmp_path, "r002", "r001", ["CREATE TABLE t_2 (id int)",
                                              "SELECT pg_sleep(0.05)"])
    write_revision(tmp_path, "r003", "r002", ["ALTER TABLE t_1 ADD COLUMN note text"])
    before_dump = schema_dump(target, without_dbsync_tables=True)

    result, sync_id = run_migrate(target, migrations_dir=tmp_path, dry_run="rehearse")

    assert schema_dump(target, without_dbsync_tables=True) == before_dump
    assert alembic_version(target) == ["r001"]
    assert [outcome.status for outcome in result.outcomes] == [OutcomeStatus.REHEARSED] * 2
    assert result.outcomes[0].duration_ms >= 50
    operations = revision_operations(target, sync_id)
    assert [row["status"] for row in operations] == ["ROLLED_BACK", "ROLLED_BACK"]
    assert operations[0]["metadata"]["duration_ms"] >= 50


def test_rehearse_detects_hidden_commit(target: str, tmp_path: Path) -> None:
    """A COMMIT built at run time escapes the static scan; the rehearsal check catches it."""
    write_table_chain(tmp_path, 1)
    write_revision(tmp_path, "r002", "r001",
                   "op.execute('CREATE TABLE t_2 (id int)')\nop.execute('COM' + 'MIT')")
    with pytest.raises(MigrationFailedError, match="committed on its own"):
        run_migrate(target, migrations_dir=tmp_path, dry_run="rehearse")


def test_rehearse_reports_failure(target: str, tmp_path: Path) -> None:
    write_table_chain(tmp_path, 1)
    write_revision(tmp_path, "r002", "r001", ["SELECT 1 / 0"])
    with pytest.raises(MigrationFailedError, match="r002"):
        run_migrate(target, migrations_dir=tmp_path, dry_run=DryRunMode.REHEARSE)
    assert alembic_version(target) == []


def test_source_revision_is_the_target(db_pair: object, tmp_path: Path) -> None:
    write_table_chain(tmp_path, 3)
    source, target_dsn = db_pair.source, db_pair.target  # type: ignore[attr-defined]
    run_migrate(source, migrations_dir=tmp_path, revision="r002")
    result, _sync_id = run_migrate(target_dsn, source_dsn=source, migrations_dir=tmp_path,
                                   revision="source")
    assert result.target_revision == "r002"
    assert alembic_version(target_dsn) == ["r002"]


def test_target_ahead_of_source_rejected(db_pair: object, tmp_path: Path) -> None:
    write_table_chain(tmp_path, 3)
    source, target_dsn = db_pair.source, db_pair.target  # type: ignore[attr-defined]
    run_migrate(source, migrations_dir=tmp_path, revision="r001")
    run_migrate(target_dsn, migrations_dir=tmp_path)
    before_dump = schema_dump(target_dsn, without_dbsync_tables=True)

    with pytest.raises(TargetAheadError, match="never downgrades implicitly"):
        run_migrate(target_dsn, source_dsn=source, migrations_dir=tmp_path, revision="source")

    assert alembic_version(target_dsn) == ["r003"]
    assert schema_dump(target_dsn, without_dbsync_tables=True) == before_dump


def test_allow_downgrade_runs_downgrades(target: str, tmp_path: Path) -> None:
    write_table_chain(tmp_path, 3)
    run_migrate(target, migrations_dir=tmp_path)
    result, _sync_id = run_migrate(target, migrations_dir=tmp_path, revision="r001",
                                   allow_downgrade=True)
    assert [outcome.status for outcome in result.outcomes] == [OutcomeStatus.DOWNGRADED] * 2
    assert alembic_version(target) == ["r001"]
    assert not table_exists(target, "t_2")
    assert row_count(target, "SELECT count(*) FROM dbsync_revision_checksums") == 1


def test_source_revision_missing_from_directory(db_pair: object, tmp_path: Path) -> None:
    newer = tmp_path / "newer"
    older = tmp_path / "older"
    write_table_chain(newer, 3)
    write_table_chain(older, 2)
    source, target_dsn = db_pair.source, db_pair.target  # type: ignore[attr-defined]
    run_migrate(source, migrations_dir=newer)
    with pytest.raises(ConfigurationError, match="r003, which is not in"):
        run_migrate(target_dsn, source_dsn=source, migrations_dir=older, revision="source")


def test_read_current_revision_absent_is_none(target: str) -> None:
    assert read_current_revision(target) is None


def test_edited_applied_revision_rejected(target: str, tmp_path: Path) -> None:
    write_table_chain(tmp_path, 2)
    run_migrate(target, migrations_dir=tmp_path)
    edited = tmp_path / "r001.py"
    with psycopg.connect(target, autocommit=True) as connection:
        row = connection.execute(
            "SELECT sha256 FROM dbsync_revision_checksums WHERE revision = 'r001'").fetchone()
    assert row is not None
    old_checksum = row[0]
    edited.write_text(edited.read_text() + "\n# edited after it was applied\n")
    write_revision(tmp_path, "r003", "r002", ["CREATE TABLE t_3 (id int)"])

    with pytest.raises(RevisionChecksumMismatchError) as caught:
        run_migrate(target, migrations_dir=tmp_path)

    message = str(caught.value)
    assert "r001.py" in message
    assert old_checksum in message
    assert hashlib.sha256(edited.read_bytes()).hexdigest() in message
    assert alembic_version(target) == ["r002"]


def test_untracked_applied_revisions_recorded_once(target: str, tmp_path: Path) -> None:
    write_table_chain(tmp_path, 2)
    run_migrate(target, migrations_dir=tmp_path)
    with psycopg.connect(target, autocommit=True) as connection:
        connection.execute("DELETE FROM dbsync_revision_checksums")
    write_revision(tmp_path, "r003", "r002", ["CREATE TABLE t_3 (id int)"])

    result, _sync_id = run_migrate(target, migrations_dir=tmp_path)

    assert any("applied before dbsync tracked checksums" in warning
               for warning in result.warnings)
    assert row_count(target, "SELECT count(*) FROM dbsync_revision_checksums "
                             "WHERE applied_at IS NULL") == 2
    assert row_count(target, "SELECT count(*) FROM dbsync_revision_checksums "
                             "WHERE applied_at IS NOT NULL") == 1


def test_flat_directory_without_env_migrates(target: str, tmp_path: Path) -> None:
    write_table_chain(tmp_path, 2)
    assert not (tmp_path / "env.py").exists()
    assert not (tmp_path / "alembic.ini").exists()
    run_migrate(target, migrations_dir=tmp_path)
    assert alembic_version(target) == ["r002"]


def test_project_directory_env_migrates(target: str, tmp_path: Path) -> None:
    root, versions = make_project_dir(tmp_path / "project")
    write_table_chain(versions, 2)
    run_migrate(target, migrations_dir=root)
    assert alembic_version(target) == ["r002"]


def test_self_connecting_env_still_in_transaction(target: str, tmp_path: Path) -> None:
    """An env.py that ignores dbsync's connection is replaced, so a failure still rolls back."""
    root, versions = make_project_dir(tmp_path / "project", env_py=SELF_CONNECTING_ENV_PY)
    write_table_chain(versions, 1)
    write_revision(versions, "r002", "r001", ["SELECT 1 / 0"])
    with pytest.raises(MigrationFailedError):
        run_migrate(target, migrations_dir=root)
    assert alembic_version(target) == []


def test_parallel_threads_do_not_interleave(
        targets: TargetFactory, tmp_path: Path) -> None:
    """Two syncs in one process, on two databases, each get exactly their own revisions."""
    first, second = targets.create("par"), targets.create("par")
    write_table_chain(tmp_path / "a", 8, prefix="a")
    write_table_chain(tmp_path / "b", 8, prefix="b")
    errors: list[BaseException] = []

    def run(dsn: str, directory: Path) -> None:
        try:
            run_migrate(dsn, migrations_dir=directory)
        except BaseException as error:
            errors.append(error)

    threads = [threading.Thread(target=run, args=(first, tmp_path / "a")),
               threading.Thread(target=run, args=(second, tmp_path / "b"))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert errors == []
    assert alembic_version(first) == ["a008"]
    assert alembic_version(second) == ["b008"]
