"""The ``dbsync audit`` command on real PostgreSQL: tail, show, verify and grant."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator

import psycopg
import pytest
from psycopg import sql
from psycopg.conninfo import make_conninfo

from dbsync.cli.main import main
from dbsync.pipeline.audit import (
    AuditTrail,
    OperationStatus,
    OperationType,
    verify_chain,
)
from dbsync.testing.servers import TestServer
from tests.test_audit_helpers import make_context, module_database, new_schema_dsn, schema_of


@pytest.fixture(scope="module")
def audit_database(pg: TestServer) -> Iterator[str]:
    """One database for this module's tests."""
    yield from module_database(pg)


@pytest.fixture
def audit_dsn(audit_database: str) -> str:
    """A DSN whose search_path is a new, empty schema."""
    return new_schema_dsn(audit_database)


def write_failed_sync(dsn: str) -> uuid.UUID:
    """Write a sync whose migration failed and whose revision rolled back."""
    context = make_context(dsn)
    with AuditTrail(dsn=dsn, context=context) as trail:
        root = trail.start(OperationType.SYNC, name="sync")
        migration = trail.start(OperationType.MIGRATION, name="migrate", parent=root)
        revision = trail.start(OperationType.REVISION, name="0002", parent=migration,
                               migration_name="0002_add_iban")
        trail.finish(revision, OperationStatus.ROLLED_BACK, error="division by zero")
        trail.finish(migration, OperationStatus.FAILED)
        ledger = trail.start(OperationType.LEDGER_INTEGRITY, name="ledger", parent=root)
        trail.finish(ledger, OperationStatus.SKIPPED)
        trail.finish(root, OperationStatus.FAILED)
    return context.sync_id


def test_tail_lists_newest_events_as_json(
        audit_dsn: str, capsys: pytest.CaptureFixture[str]) -> None:
    """tail --limit N --output json returns the last N events, oldest first."""
    write_failed_sync(audit_dsn)
    capsys.readouterr()  # drop the log lines of the writes
    code = main(["audit", "tail", "--dsn", audit_dsn, "--limit", "3", "--output", "json"])
    events = json.loads(capsys.readouterr().out)
    assert code == 0
    assert [event["sequence"] for event in events] == [6, 7, 8]
    assert events[-1]["operation_type"] == "SYNC"
    assert events[-1]["status"] == "FAILED"


def test_tail_text_has_one_line_per_event(
        audit_dsn: str, capsys: pytest.CaptureFixture[str]) -> None:
    """The text table has a header and one line per event."""
    write_failed_sync(audit_dsn)
    capsys.readouterr()  # drop the log lines of the writes
    code = main(["audit", "tail", "--dsn", audit_dsn, "--limit", "4"])
    lines = capsys.readouterr().out.splitlines()
    assert code == 0
    assert lines[0].split()[:2] == ["SEQ", "RECORDED"]
    assert len(lines) == 5


def test_show_prints_the_operation_tree(
        audit_dsn: str, capsys: pytest.CaptureFixture[str]) -> None:
    """show nests revisions under the migration under the sync, with statuses."""
    sync_id = write_failed_sync(audit_dsn)
    capsys.readouterr()  # drop the log lines of the writes
    code = main(["audit", "show", str(sync_id), "--dsn", audit_dsn])
    output = capsys.readouterr().out
    lines = output.splitlines()
    assert code == 0
    assert lines[0] == f"sync {sync_id} (trace {sync_id.hex})"
    assert lines[1].startswith("└─ SYNC sync  FAILED")
    assert lines[2].startswith("   ├─ MIGRATION migrate  FAILED")
    assert lines[3].startswith("   │  └─ REVISION 0002 [0002_add_iban]  ROLLED_BACK")
    assert "error: division by zero" in lines[3]
    assert lines[4].startswith("   └─ LEDGER_INTEGRITY ledger  SKIPPED")


def test_show_json_nests_children(audit_dsn: str, capsys: pytest.CaptureFixture[str]) -> None:
    """show --output json returns the same tree with children lists."""
    sync_id = write_failed_sync(audit_dsn)
    capsys.readouterr()  # drop the log lines of the writes
    code = main(["audit", "show", str(sync_id), "--dsn", audit_dsn, "--output", "json"])
    tree = json.loads(capsys.readouterr().out)["operations"]
    assert code == 0
    assert len(tree) == 1
    assert [child["operation_type"] for child in tree[0]["children"]] == [
        "MIGRATION", "LEDGER_INTEGRITY"]
    assert tree[0]["children"][0]["children"][0]["status"] == "ROLLED_BACK"


def test_show_unknown_sync_exits_1(audit_dsn: str, capsys: pytest.CaptureFixture[str]) -> None:
    """A sync id with no events prints a message and exits 1."""
    write_failed_sync(audit_dsn)
    capsys.readouterr()  # drop the log lines of the writes
    unknown = uuid.uuid4()
    code = main(["audit", "show", str(unknown), "--dsn", audit_dsn])
    assert code == 1
    assert str(unknown) in capsys.readouterr().out


def test_verify_exits_0_on_an_intact_chain(
        audit_dsn: str, capsys: pytest.CaptureFixture[str]) -> None:
    """verify prints OK with the head hash and exits 0."""
    write_failed_sync(audit_dsn)
    capsys.readouterr()  # drop the log lines of the writes
    code = main(["audit", "verify", "--dsn", audit_dsn])
    output = capsys.readouterr().out
    assert code == 0
    assert output.startswith("audit chain OK: 8 rows checked")


def test_verify_names_the_altered_row_and_exits_1(
        audit_dsn: str, capsys: pytest.CaptureFixture[str]) -> None:
    """A row changed by a superuser with triggers disabled is named; exit code 1."""
    write_failed_sync(audit_dsn)
    capsys.readouterr()  # drop the log lines of the writes
    with psycopg.connect(audit_dsn, autocommit=True) as connection:
        connection.execute("ALTER TABLE sync_audit_logs DISABLE TRIGGER ALL")
        connection.execute("UPDATE sync_audit_logs SET status = 'SUCCESS' WHERE sequence = 4")
        connection.execute(
            "ALTER TABLE sync_audit_logs ENABLE ALWAYS TRIGGER sync_audit_logs_append_only")
    code = main(["audit", "verify", "--dsn", audit_dsn, "--output", "json"])
    result = json.loads(capsys.readouterr().out)
    assert code == 1
    assert result["ok"] is False
    assert result["first_broken_sequence"] == 4
    assert result["rows_checked"] == 3


def test_verify_without_audit_table_exits_2(
        audit_dsn: str, capsys: pytest.CaptureFixture[str]) -> None:
    """A database without the audit table is an error naming the table, not an OK."""
    code = main(["audit", "verify", "--dsn", audit_dsn])
    assert code == 2
    assert "no audit table sync_audit_logs" in capsys.readouterr().err


def test_missing_dsn_exits_2(capsys: pytest.CaptureFixture[str],
                             monkeypatch: pytest.MonkeyPatch) -> None:
    """Without --dsn or DBSYNC_AUDIT_DSN the error names the missing option."""
    monkeypatch.delenv("DBSYNC_AUDIT_DSN", raising=False)
    code = main(["audit", "tail"])
    assert code == 2
    assert "--dsn" in capsys.readouterr().err


def test_grant_prints_insert_only_statements(capsys: pytest.CaptureFixture[str]) -> None:
    """grant without --apply prints SELECT/INSERT grants and no UPDATE or DELETE."""
    code = main(["audit", "grant", "audit_writer"])
    output = capsys.readouterr().out
    assert code == 0
    assert 'GRANT SELECT, INSERT ON TABLE "public"."sync_audit_logs" TO "audit_writer";' in output
    assert "UPDATE" not in output
    assert "DELETE" not in output


def test_granted_writer_appends_but_cannot_change_events(
        pg: TestServer, audit_dsn: str, capsys: pytest.CaptureFixture[str]) -> None:
    """grant --apply creates the tables; the role then appends but cannot change events."""
    role = f"writer_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(pg.admin_dsn, autocommit=True) as admin:
        admin.execute(sql.SQL("CREATE ROLE {} LOGIN PASSWORD 'writer-pass'").format(
            sql.Identifier(role)))
    writer_dsn = make_conninfo(audit_dsn, user=role, password="writer-pass")
    try:
        code = main(["audit", "grant", role, "--dsn", audit_dsn, "--apply"])
        output = capsys.readouterr().out
        sync_id = write_failed_sync(writer_dsn)

        with psycopg.connect(writer_dsn) as writer:
            with pytest.raises(psycopg.errors.InsufficientPrivilege, match="permission denied"):
                writer.execute("UPDATE sync_audit_logs SET status = 'SUCCESS'")
            writer.rollback()
            with pytest.raises(psycopg.errors.InsufficientPrivilege, match="permission denied"):
                writer.execute("DELETE FROM sync_audit_logs")
            writer.rollback()
            with pytest.raises(psycopg.errors.InsufficientPrivilege, match="permission denied"):
                writer.execute("TRUNCATE sync_audit_logs")

        assert code == 0
        assert f'GRANT USAGE ON SCHEMA "{schema_of(audit_dsn)}"' in output
        assert "-- applied" in output
        assert isinstance(sync_id, uuid.UUID)
        assert verify_chain(audit_dsn).ok
    finally:
        with psycopg.connect(audit_dsn, autocommit=True) as owner:
            owner.execute(sql.SQL("DROP OWNED BY {}").format(sql.Identifier(role)))
        with psycopg.connect(pg.admin_dsn, autocommit=True) as admin:
            admin.execute(sql.SQL("DROP OWNED BY {}").format(sql.Identifier(role)))
            admin.execute(sql.SQL("DROP ROLE {}").format(sql.Identifier(role)))
