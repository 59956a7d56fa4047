"""Tamper evidence of the audit log on PostgreSQL: triggers, hash chain, concurrency, crashes."""

from __future__ import annotations

import itertools
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import psycopg
import pytest
from alembic.script import ScriptDirectory
from psycopg import sql

from dbsync.pipeline.audit import (
    AuditTrail,
    OperationStatus,
    OperationType,
    ensure_own_schema,
    fetch_sync_operations,
    verify_chain,
)
from dbsync.pipeline.audit_chain import (
    CANONICAL_COLUMN_NAMES,
    GENESIS_HASH,
    ChainVerifier,
    canonical_line,
    copy_text,
    format_timestamp,
    row_hash,
)
from dbsync.pipeline.audit_schema import own_migrations_config, upgrade_own_schema
from dbsync.pipeline.errors import AuditUnavailableError
from dbsync.testing.servers import TestServer
from tests.test_audit_helpers import (
    make_context,
    module_database,
    new_schema_dsn,
)

REPOSITORY = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def audit_database(pg: TestServer) -> Iterator[str]:
    """One database for this module's tests."""
    yield from module_database(pg)


@pytest.fixture
def audit_dsn(audit_database: str) -> str:
    """A DSN whose search_path is a new, empty schema."""
    return new_schema_dsn(audit_database)


def write_sync(dsn: str, *, operations: int = 3) -> uuid.UUID:
    """Write one small sync: a root and ``operations`` finished children."""
    context = make_context(dsn)
    with AuditTrail(dsn=dsn, context=context) as trail:
        root = trail.start(OperationType.SYNC, name="sync")
        for index in range(operations):
            child = trail.start(OperationType.REVISION, name=f"r{index}", parent=root,
                                migration_name=f"{index:04d}_step")
            trail.finish(child, OperationStatus.SUCCESS, metadata={"index": index})
        trail.finish(root, OperationStatus.SUCCESS)
    return context.sync_id


def tamper(dsn: str, statement: str) -> None:
    """Run ``statement`` as superuser with the table's triggers disabled, then re-enable them."""
    with psycopg.connect(dsn, autocommit=True) as connection:
        connection.execute("ALTER TABLE sync_audit_logs DISABLE TRIGGER ALL")
        try:
            connection.execute(statement)
        finally:
            connection.execute(
                "ALTER TABLE sync_audit_logs ENABLE ALWAYS TRIGGER sync_audit_logs_chain")
            connection.execute(
                "ALTER TABLE sync_audit_logs ENABLE ALWAYS TRIGGER sync_audit_logs_append_only")


@pytest.mark.parametrize("statement", [
    "UPDATE sync_audit_logs SET status = 'SUCCESS' WHERE sequence = 1",
    "UPDATE sync_audit_logs SET status = status WHERE false",
    "DELETE FROM sync_audit_logs WHERE sequence = 1",
    "TRUNCATE sync_audit_logs",
])
def test_update_delete_truncate_are_rejected(audit_dsn: str, statement: str) -> None:
    """Even the table owner cannot change or remove events."""
    write_sync(audit_dsn, operations=1)
    with psycopg.connect(audit_dsn) as connection, pytest.raises(
            psycopg.errors.InsufficientPrivilege, match="append-only"):
        connection.execute(statement)


def test_replica_session_cannot_bypass_the_triggers(audit_dsn: str) -> None:
    """session_replication_role = replica does not switch off ENABLE ALWAYS triggers."""
    write_sync(audit_dsn, operations=1)
    with psycopg.connect(audit_dsn) as connection:
        connection.execute("SET session_replication_role = replica")
        with pytest.raises(psycopg.errors.InsufficientPrivilege, match="append-only"):
            connection.execute("DELETE FROM sync_audit_logs")


def test_intact_chain_verifies(audit_dsn: str) -> None:
    """Several syncs leave one gap-free chain that verifies."""
    write_sync(audit_dsn)
    write_sync(audit_dsn)
    result = verify_chain(audit_dsn)
    assert result.ok, result.render_text()
    assert result.rows_checked == 16
    assert result.head_sequence == 16


def test_altered_row_is_named_by_verify(audit_dsn: str) -> None:
    """A row edited with triggers disabled breaks its own hash; verify names its sequence."""
    write_sync(audit_dsn)
    tamper(audit_dsn, "UPDATE sync_audit_logs SET metadata = '{\"index\": 99}' "
                      "WHERE sequence = 5")
    result = verify_chain(audit_dsn)
    assert not result.ok
    assert result.first_broken_sequence == 5
    assert result.first_broken_reason is not None
    assert "altered" in result.first_broken_reason
    assert result.rows_checked == 4


def test_rehashed_row_breaks_the_next_link(audit_dsn: str) -> None:
    """A tamperer who also rewrites row_hash is caught at the next row's prev_hash."""
    write_sync(audit_dsn)
    with psycopg.connect(audit_dsn) as connection:
        columns = ", ".join(
            f"{name}::text" if name in ("schema_changes", "error_details", "metadata")
            else name for name in CANONICAL_COLUMN_NAMES)
        row = connection.execute(
            f"SELECT {columns} FROM sync_audit_logs WHERE sequence = 3").fetchone()
    assert row is not None
    values = list(row)
    status_index = CANONICAL_COLUMN_NAMES.index("status")
    values[status_index] = "FAILED"
    forged_hash = row_hash(canonical_line(values))
    tamper(audit_dsn, f"UPDATE sync_audit_logs SET status = 'FAILED', row_hash = '{forged_hash}' "
                      "WHERE sequence = 3")

    result = verify_chain(audit_dsn)
    assert not result.ok
    assert result.first_broken_sequence == 4
    assert "prev_hash" in (result.first_broken_reason or "")


def test_deleted_row_is_reported_as_a_gap(audit_dsn: str) -> None:
    """Removing a row leaves a sequence gap that verify reports at the next row."""
    write_sync(audit_dsn)
    tamper(audit_dsn, "DELETE FROM sync_audit_logs WHERE sequence = 6")
    result = verify_chain(audit_dsn)
    assert not result.ok
    assert result.first_broken_sequence == 7
    assert "missing" in (result.first_broken_reason or "")


def test_verify_since_checks_later_rows(audit_dsn: str) -> None:
    """--since checks only later rows, linked to the stored hash of the row before."""
    write_sync(audit_dsn, operations=1)
    with psycopg.connect(audit_dsn) as connection:
        row = connection.execute("SELECT max(recorded_at) FROM sync_audit_logs").fetchone()
    assert row is not None
    boundary = row[0] + timedelta(microseconds=1)
    time.sleep(0.01)
    write_sync(audit_dsn, operations=1)

    later = verify_chain(audit_dsn, since=boundary)
    future = verify_chain(audit_dsn, since=datetime.now(UTC) + timedelta(days=1))
    assert later.ok, later.render_text()
    assert later.first_sequence == 5
    assert later.rows_checked == 4
    assert future.rows_checked == 0


def test_verify_since_checks_link_before(audit_dsn: str) -> None:
    """A replaced hash just before the --since range is caught at the range's first row."""
    write_sync(audit_dsn, operations=1)
    with psycopg.connect(audit_dsn) as connection:
        row = connection.execute("SELECT max(recorded_at) FROM sync_audit_logs").fetchone()
    assert row is not None
    write_sync(audit_dsn, operations=1)
    tamper(audit_dsn, f"UPDATE sync_audit_logs SET row_hash = '{'f' * 64}' WHERE sequence = 4")

    result = verify_chain(audit_dsn, since=row[0] + timedelta(microseconds=1))
    assert not result.ok
    assert result.first_broken_sequence == 5


def test_concurrent_writers_leave_one_valid_chain(audit_dsn: str) -> None:
    """Two trails writing at once from threads produce one gap-free chain that verifies."""
    ensure_own_schema(audit_dsn)
    errors: list[BaseException] = []
    barrier = threading.Barrier(2)

    def writer() -> None:
        try:
            context = make_context(audit_dsn)
            with AuditTrail(dsn=audit_dsn, context=context) as trail:
                barrier.wait(timeout=30)
                root = trail.start(OperationType.SYNC)
                for _ in range(40):
                    step = trail.start(OperationType.REVISION, parent=root)
                    trail.finish(step, OperationStatus.SUCCESS)
                trail.finish(root, OperationStatus.SUCCESS)
        except BaseException as error:
            errors.append(error)

    threads = [threading.Thread(target=writer) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)

    assert errors == []
    with psycopg.connect(audit_dsn) as connection:
        rows = connection.execute(
            "SELECT sequence, sync_id, recorded_at FROM sync_audit_logs ORDER BY sequence"
        ).fetchall()
    sync_ids_in_order = [row[1] for row in rows]
    interleavings = sum(
        1 for left, right in itertools.pairwise(sync_ids_in_order) if left != right)
    result = verify_chain(audit_dsn)
    assert [row[0] for row in rows] == list(range(1, 165))
    assert [row[2] for row in rows] == sorted(row[2] for row in rows)
    assert interleavings > 1, "the two writers never overlapped"
    assert result.ok, result.render_text()


WRITER_SCRIPT = textwrap.dedent("""
    import sys, time, uuid
    from dbsync.pipeline.audit import (
        AuditContext, AuditTrail, OperationType, Requester)
    from dbsync.pipeline import logs
    from dbsync.pipeline.dsn import describe

    logs.configure(json_output=True)
    dsn = sys.argv[1]
    context = AuditContext(sync_id=uuid.UUID(sys.argv[2]), requester=Requester(kind="job"),
                           database=describe(dsn))
    trail = AuditTrail(dsn=dsn, context=context)
    root = trail.start(OperationType.SYNC, name="sync")
    trail.start(OperationType.MIGRATION, name="migrate", parent=root)
    print(trail._connection.info.backend_pid, flush=True)
    time.sleep(600)
""")


def test_killed_writer_leaves_operations_closed_as_abandoned(audit_dsn: str) -> None:
    """START events of a SIGKILLed process are closed as ABANDONED by the next trail."""
    ensure_own_schema(audit_dsn)
    dead_sync = uuid.uuid4()
    process = subprocess.Popen(
        [sys.executable, "-c", WRITER_SCRIPT, audit_dsn, str(dead_sync)],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, cwd=REPOSITORY)
    try:
        assert process.stdout is not None
        backend_pid = int(process.stdout.readline())

        # While the writer lives, its open operations are left alone.
        with AuditTrail(dsn=audit_dsn, context=make_context(audit_dsn)) as bystander:
            assert bystander.abandoned_closed == 0
    finally:
        os.kill(process.pid, signal.SIGKILL)
        process.wait(timeout=30)
    _wait_for_backend_exit(audit_dsn, backend_pid)

    context = make_context(audit_dsn)
    with AuditTrail(dsn=audit_dsn, context=context) as closer:
        closed = closer.abandoned_closed
    operations = fetch_sync_operations(audit_dsn, dead_sync)
    again = AuditTrail(dsn=audit_dsn, context=make_context(audit_dsn))
    again.close()

    assert closed == 2
    assert [row["status"] for row in operations] == ["ABANDONED", "ABANDONED"]
    assert {row["metadata"]["closed_by_sync_id"] for row in operations} == {str(context.sync_id)}
    assert again.abandoned_closed == 0
    assert verify_chain(audit_dsn).ok


def _wait_for_backend_exit(dsn: str, backend_pid: int) -> None:
    deadline = time.monotonic() + 30
    with psycopg.connect(dsn, autocommit=True) as connection:
        while time.monotonic() < deadline:
            row = connection.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE pid = %s", (backend_pid,)
            ).fetchone()
            if row == (0,):
                return
            time.sleep(0.05)
    raise AssertionError(f"backend {backend_pid} of the killed writer did not exit")


@pytest.mark.parametrize("text", [
    "plain",
    "tab\there",
    "new\nline and carriage\rreturn",
    "back\\slash \\N and \\t literally",
    "controls \b \f \v \x01 \x1f",
    "unicode: naïve 東京 \U0001F4B8",
    "",
])
def test_python_serialization_matches_the_trigger(audit_dsn: str, text: str) -> None:
    """The Python canonical line of a stored row hashes to the trigger's row_hash."""
    context = make_context(audit_dsn, approver=text or None)
    with AuditTrail(dsn=audit_dsn, context=context) as trail:
        operation = trail.start(OperationType.REPORT, name=text,
                                metadata={"text": text, "nested": {"b": [1, 2.5, None], "a": text}})
        trail.finish(operation, OperationStatus.SKIPPED, error=text or None)

    columns = ", ".join(
        f"{name}::text" if name in ("schema_changes", "error_details", "metadata") else name
        for name in CANONICAL_COLUMN_NAMES)
    with psycopg.connect(audit_dsn) as connection:
        rows = connection.execute(
            f"SELECT row_hash, {columns} FROM sync_audit_logs ORDER BY sequence").fetchall()
    for stored_hash, *values in rows:
        assert row_hash(canonical_line(values)) == stored_hash
    assert verify_chain(audit_dsn).ok


def test_copy_text_escapes_like_postgresql(audit_dsn: str) -> None:
    """copy_text() gives the same bytes as the database's escaping function and COPY."""
    samples = ["a\tb", "a\\b", "line\nbreak", "\r\b\f\v", "\\N", "x" * 10]
    ensure_own_schema(audit_dsn)
    with psycopg.connect(audit_dsn) as connection:
        for sample in samples:
            row = connection.execute("SELECT dbsync_audit_copy_text(%s)", (sample,)).fetchone()
            assert row == (copy_text(sample),)
        null_row = connection.execute("SELECT dbsync_audit_copy_text(NULL)").fetchone()
    assert null_row == (copy_text(None),)


def test_timestamp_format_is_fixed_width_utc() -> None:
    """Timestamps render in UTC with six fractional digits, even when they are zero."""
    value = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
    offset = datetime(2026, 1, 2, 5, 4, 5, 120, tzinfo=UTC).astimezone(
        datetime.now().astimezone().tzinfo)
    assert format_timestamp(value) == "2026-01-02T03:04:05.000000Z"
    assert format_timestamp(offset) == "2026-01-02T05:04:05.000120Z"
    with pytest.raises(ValueError, match="time zone"):
        format_timestamp(datetime(2026, 1, 2))


def test_own_schema_reaches_the_head_revision(audit_dsn: str) -> None:
    """ensure_own_schema records the history's head in dbsync_alembic_version only."""
    ensure_own_schema(audit_dsn)
    ensure_own_schema(audit_dsn)
    head = ScriptDirectory.from_config(own_migrations_config()).get_current_head()
    with psycopg.connect(audit_dsn) as connection:
        version = connection.execute("SELECT version_num FROM dbsync_alembic_version").fetchall()
        app_version = connection.execute("SELECT to_regclass('alembic_version')").fetchone()
    assert version == [(head,)]
    assert app_version == (None,)


UPGRADE_SCRIPT = "import sys; from dbsync.pipeline.audit import ensure_own_schema; " \
                 "ensure_own_schema(sys.argv[1])"


def test_concurrent_upgrades_from_two_processes_succeed(audit_dsn: str) -> None:
    """Two processes creating the audit tables at once both succeed (advisory lock)."""
    processes = [subprocess.Popen([sys.executable, "-c", UPGRADE_SCRIPT, audit_dsn],
                                  cwd=REPOSITORY, stderr=subprocess.PIPE, text=True)
                 for _ in range(2)]
    outcomes = [(process.wait(timeout=120), process.communicate()[1]) for process in processes]
    assert [code for code, _stderr in outcomes] == [0, 0], outcomes
    with psycopg.connect(audit_dsn) as connection:
        row = connection.execute(
            sql.SQL("SELECT count(*) FROM {}").format(sql.Identifier("dbsync_alembic_version"))
        ).fetchone()
    assert row == (1,)


def test_upgrade_keeps_the_callers_connection(audit_dsn: str) -> None:
    """upgrade_own_schema leaves the connection open, idle and in its autocommit mode."""
    with psycopg.connect(audit_dsn, autocommit=False) as connection:
        upgrade_own_schema(connection)
        still_open = not connection.closed
        autocommit = connection.autocommit
        status = connection.info.transaction_status
        row = connection.execute("SELECT to_regclass('sync_audit_logs') IS NOT NULL").fetchone()
    assert still_open
    assert autocommit is False
    assert status == psycopg.pq.TransactionStatus.IDLE
    assert row == (True,)


def test_upgrade_inside_a_transaction_raises(audit_dsn: str) -> None:
    """A connection with an open transaction is rejected instead of committed behind its back."""
    with psycopg.connect(audit_dsn) as connection:
        connection.execute("SELECT 1")
        with pytest.raises(AuditUnavailableError, match="inside a transaction"):
            upgrade_own_schema(connection)


@pytest.mark.parametrize(("line", "reason"), [
    (b"f" * 64 + b"\t2\t1\t" + b"0" * 64 + b"\tx\n", "unknown chain format"),
    (b"f" * 64 + b"\t1\tone\t" + b"0" * 64 + b"\tx\n", "malformed sequence"),
    (b"short\n", "malformed row"),
])
def test_verifier_reports_malformed_rows(line: bytes, reason: str) -> None:
    """Rows that do not parse are reported as broken, not raised."""
    verifier = ChainVerifier(expected_sequence=1, expected_prev_hash=GENESIS_HASH)
    intact = verifier.check_lines([line])
    result = verifier.result()
    assert intact is False
    assert result.first_broken_sequence == 1
    assert reason in (result.first_broken_reason or "")
