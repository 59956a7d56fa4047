"""AuditTrail on real PostgreSQL: events, the operations view, spans, fail-closed and redaction."""

from __future__ import annotations

import io
import json
import logging
import re
import uuid
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
import structlog
from psycopg import sql

from dbsync.pipeline import logs
from dbsync.pipeline.audit import (
    AuditTrail,
    Operation,
    OperationStatus,
    OperationType,
    Requester,
    ensure_own_schema,
    fetch_sync_operations,
    parse_traceparent,
)
from dbsync.pipeline.dsn import describe
from dbsync.pipeline.errors import AuditUnavailableError, ConfigurationError, ConnectionFailedError
from dbsync.testing.servers import TestServer
from tests.test_audit_helpers import (
    make_context,
    module_database,
    new_schema_dsn,
    schema_of,
)

TRACEPARENT = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
TRACE_ID = re.compile(r"^[0-9a-f]{32}$")
SPAN_ID = re.compile(r"^[0-9a-f]{16}$")


@pytest.fixture(scope="module")
def audit_database(pg: TestServer) -> Iterator[str]:
    """One database for this module's tests."""
    yield from module_database(pg)


@pytest.fixture
def audit_dsn(audit_database: str) -> str:
    """A DSN whose search_path is a new, empty schema."""
    return new_schema_dsn(audit_database)


def log_rows(dsn: str) -> list[dict[str, Any]]:
    with psycopg.connect(dsn) as connection, connection.cursor(
            row_factory=psycopg.rows.dict_row) as cursor:
        cursor.execute("SELECT * FROM sync_audit_logs ORDER BY sequence")
        return cursor.fetchall()


@pytest.fixture
def json_log() -> Iterator[io.StringIO]:
    """JSON log lines of the process, captured for the test and restored afterwards."""
    saved_config = structlog.get_config()
    root = logging.getLogger()
    saved_handlers, saved_level = root.handlers[:], root.level
    buffer = io.StringIO()
    logs.configure(json_output=True, stream=buffer)
    yield buffer
    structlog.configure(**saved_config)
    root.handlers[:] = saved_handlers
    root.setLevel(saved_level)


def test_start_and_finish_write_two_events_per_operation(audit_dsn: str) -> None:
    """Each operation has one START and one FINISH row; nothing is updated."""
    with AuditTrail(dsn=audit_dsn, context=make_context(audit_dsn)) as trail:
        root = trail.start(OperationType.SYNC, name="sync")
        step = trail.start(OperationType.PREFLIGHT, name="preflight", parent=root)
        trail.finish(step, OperationStatus.SUCCESS)
        trail.finish(root, OperationStatus.SUCCESS)

    rows = log_rows(audit_dsn)
    assert [(row["event_kind"], row["operation_type"]) for row in rows] == [
        ("START", "SYNC"), ("START", "PREFLIGHT"), ("FINISH", "PREFLIGHT"), ("FINISH", "SYNC")]
    assert [row["sequence"] for row in rows] == [1, 2, 3, 4]
    assert [row["status"] for row in rows] == ["STARTED", "STARTED", "SUCCESS", "SUCCESS"]


def test_view_shows_final_status_and_duration(audit_dsn: str) -> None:
    """The view pairs START and FINISH: status, start, finish and duration in ms."""
    context = make_context(audit_dsn)
    with AuditTrail(dsn=audit_dsn, context=context) as trail:
        root = trail.start(OperationType.SYNC, name="sync")
        revision = trail.start(OperationType.REVISION, name="0001", parent=root,
                               migration_name="0001_create_accounts")
        duration_ms = trail.finish(revision, OperationStatus.ROLLED_BACK,
                                   error="division by zero",
                                   schema_changes={"tables_added": ["accounts"]})
        operations = fetch_sync_operations(audit_dsn, context.sync_id)
        by_type = {row["operation_type"]: row for row in operations}

        assert by_type["SYNC"]["status"] == "IN_PROGRESS"
        assert by_type["SYNC"]["completed_at"] is None
        assert by_type["REVISION"]["status"] == "ROLLED_BACK"
        assert by_type["REVISION"]["duration_ms"] == duration_ms
        assert by_type["REVISION"]["migration_name"] == "0001_create_accounts"
        assert by_type["REVISION"]["error"] == "division by zero"
        assert by_type["REVISION"]["schema_changes"] == {"tables_added": ["accounts"]}
        assert by_type["REVISION"]["completed_at"] >= by_type["REVISION"]["started_at"]
        trail.finish(root, OperationStatus.FAILED)


def test_recent_syncs_and_failed_operations_queries(audit_dsn: str) -> None:
    """The documented one-line queries return the newest syncs and the failures."""
    contexts = [make_context(audit_dsn) for _ in range(3)]
    for index, context in enumerate(contexts):
        with AuditTrail(dsn=audit_dsn, context=context) as trail:
            root = trail.start(OperationType.SYNC, name="sync")
            step = trail.start(OperationType.SCHEMA_CHECK, name="diff", parent=root)
            failed = index == 1
            trail.finish(step, OperationStatus.FAILED if failed else OperationStatus.SUCCESS)
            trail.finish(root, OperationStatus.FAILED if failed else OperationStatus.SUCCESS)

    with psycopg.connect(audit_dsn) as connection:
        recent = connection.execute(
            "SELECT sync_id, status FROM sync_audit_operations WHERE operation_type = 'SYNC' "
            "ORDER BY started_at DESC LIMIT 2").fetchall()
        failures = connection.execute(
            "SELECT sync_id, operation_type FROM sync_audit_operations "
            "WHERE status IN ('FAILED', 'ROLLED_BACK', 'TIMEOUT', 'ABANDONED') "
            "ORDER BY completed_at DESC").fetchall()

    assert recent == [(contexts[2].sync_id, "SUCCESS"), (contexts[1].sync_id, "FAILED")]
    assert failures == [(contexts[1].sync_id, "SYNC"), (contexts[1].sync_id, "SCHEMA_CHECK")]


def test_events_survive_a_rolled_back_transaction(audit_dsn: str) -> None:
    """Events written while another transaction rolls back stay committed."""
    context = make_context(audit_dsn)
    with AuditTrail(dsn=audit_dsn, context=context) as trail, psycopg.connect(
            audit_dsn) as migration:
        revision = trail.start(OperationType.REVISION, name="0002")
        migration.execute("CREATE TABLE doomed (id int)")
        migration.rollback()
        trail.finish(revision, OperationStatus.ROLLED_BACK, error="rolled back")

    statuses = [row["status"] for row in fetch_sync_operations(audit_dsn, context.sync_id)]
    assert statuses == ["ROLLED_BACK"]


def test_trace_and_span_ids_are_lowercase_hex(audit_dsn: str) -> None:
    """Trace ids are the sync id's 32 hex digits, span ids 16 hex digits, parents linked."""
    context = make_context(audit_dsn)
    with AuditTrail(dsn=audit_dsn, context=context) as trail:
        root = trail.start(OperationType.SYNC)
        child = trail.start(OperationType.MIGRATION, parent=root)
        grandchild = trail.start(OperationType.REVISION, parent=child)
        for operation in (grandchild, child, root):
            trail.finish(operation, OperationStatus.SUCCESS)
        assert trail.trace_id == context.sync_id.hex

    rows = log_rows(audit_dsn)
    for row in rows:
        assert TRACE_ID.match(row["trace_id"]), row["trace_id"]
        assert SPAN_ID.match(row["span_id"]), row["span_id"]
        assert row["parent_span_id"] is None or SPAN_ID.match(row["parent_span_id"])
    assert {row["trace_id"] for row in rows} == {context.sync_id.hex}
    assert child.parent_span_id == root.span_id
    assert grandchild.parent_span_id == child.span_id
    assert root.parent_span_id is None


def test_traceparent_links_root_spans_and_is_stored(audit_dsn: str) -> None:
    """With a traceparent, top-level spans have its parent id and every row stores it."""
    context = make_context(audit_dsn, traceparent=TRACEPARENT)
    with AuditTrail(dsn=audit_dsn, context=context) as trail:
        root = trail.start(OperationType.SYNC)
        child = trail.start(OperationType.PLAN, parent=root)
        trail.finish(child, OperationStatus.SUCCESS)
        trail.finish(root, OperationStatus.SUCCESS)

    rows = log_rows(audit_dsn)
    assert root.parent_span_id == "00f067aa0ba902b7"
    assert child.parent_span_id == root.span_id
    assert {row["traceparent"] for row in rows} == {TRACEPARENT}
    assert {row["trace_id"] for row in rows} == {context.sync_id.hex}


@pytest.mark.parametrize("value", [
    "",
    "00-4BF92F3577B34DA6A3CE929D0E0E4736-00F067AA0BA902B7-01",
    "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
    "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
    "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
    "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
    "00-4bf92f3577b34da6a3ce929d0e0e473-00f067aa0ba902b7-01",
    "00_4bf92f3577b34da6a3ce929d0e0e4736_00f067aa0ba902b7_01",
])
def test_invalid_traceparent_is_rejected(value: str) -> None:
    """Malformed, upper-case, all-zero and version ff traceparents raise ConfigurationError."""
    with pytest.raises(ConfigurationError, match="invalid traceparent"):
        parse_traceparent(value)


def test_context_and_requester_columns_are_stored(audit_dsn: str) -> None:
    """Requester, approver, database, service and plan hash reach every row."""
    plan_hash = "a" * 64
    context = make_context(audit_dsn, approver="jane.approver", plan_hash=plan_hash)
    with AuditTrail(dsn=audit_dsn, context=context) as trail:
        trail.finish(trail.start(OperationType.PLAN, name="plan"), OperationStatus.SUCCESS)

    address = describe(audit_dsn)
    for row in log_rows(audit_dsn):
        assert row["requester_kind"] == "kubernetes"
        assert row["requester_namespace"] == "payments"
        assert row["requester_name"] == "uat-sync"
        assert row["requester_generation"] == 7
        assert row["approver"] == "jane.approver"
        assert row["plan_hash"] == plan_hash
        assert row["database_host"] == address.host
        assert row["database_name"] == address.database
        assert row["service_name"] == "dbsync"
        assert row["service_version"]


def test_cli_requester_has_user_and_host() -> None:
    """Requester.from_cli() names the OS user and host."""
    requester = Requester.from_cli()
    assert requester.kind == "cli"
    assert requester.host


def test_timestamps_come_from_the_server_clock_in_order(audit_dsn: str) -> None:
    """recorded_at is clock_timestamp(): strictly increasing with the sequence in one writer."""
    with AuditTrail(dsn=audit_dsn, context=make_context(audit_dsn)) as trail:
        operations = [trail.start(OperationType.REPORT) for _ in range(5)]
        for operation in operations:
            trail.finish(operation, OperationStatus.SUCCESS)

    times = [row["recorded_at"] for row in log_rows(audit_dsn)]
    assert times == sorted(times)
    assert len(set(times)) == len(times)


def test_close_finishes_open_operations_as_abandoned(audit_dsn: str) -> None:
    """Operations still open at close() get an ABANDONED FINISH event, children first."""
    context = make_context(audit_dsn)
    with AuditTrail(dsn=audit_dsn, context=context) as trail:
        root = trail.start(OperationType.SYNC)
        trail.start(OperationType.LEDGER_INTEGRITY, parent=root)

    rows = log_rows(audit_dsn)
    finishes = [(row["operation_type"], row["status"]) for row in rows
                if row["event_kind"] == "FINISH"]
    assert finishes == [("LEDGER_INTEGRITY", "ABANDONED"), ("SYNC", "ABANDONED")]


def test_finish_twice_raises(audit_dsn: str) -> None:
    """A second FINISH for one operation is a programming error, not a second row."""
    with AuditTrail(dsn=audit_dsn, context=make_context(audit_dsn)) as trail:
        operation = trail.start(OperationType.REPORT)
        trail.finish(operation, OperationStatus.SUCCESS)
        with pytest.raises(ValueError, match="not open"):
            trail.finish(operation, OperationStatus.FAILED)

    assert len(log_rows(audit_dsn)) == 2


def test_finish_of_unknown_operation_raises(audit_dsn: str) -> None:
    """An Operation from another trail cannot be finished here."""
    stranger = Operation(operation_id=uuid.uuid4(), span_id="1" * 16, parent_span_id=None,
                         operation_type=OperationType.SYNC, name=None, started_monotonic=0.0)
    with AuditTrail(dsn=audit_dsn, context=make_context(audit_dsn)) as trail, pytest.raises(
            ValueError, match="not open"):
        trail.finish(stranger, OperationStatus.SUCCESS)


def test_unreachable_audit_database_raises_connection_failed(pg: TestServer) -> None:
    """A closed port raises ConnectionFailedError before anything runs."""
    host, _port = pg.host_and_port
    dsn = f"postgresql://postgres:secret@{host or '127.0.0.1'}:1/postgres"
    with pytest.raises(ConnectionFailedError):
        AuditTrail(dsn=dsn, context=make_context(dsn), connect_timeout_seconds=2)


def test_role_that_cannot_create_tables_fails_closed(pg: TestServer, audit_dsn: str) -> None:
    """Without the audit table and without CREATE rights, AuditTrail raises AuditUnavailable."""
    role = f"reader_{uuid.uuid4().hex[:8]}"
    schema = schema_of(audit_dsn)
    with psycopg.connect(pg.admin_dsn, autocommit=True) as admin:
        admin.execute(sql.SQL("CREATE ROLE {} LOGIN PASSWORD 'reader-pass'").format(
            sql.Identifier(role)))
    with psycopg.connect(audit_dsn, autocommit=True) as owner:
        owner.execute(sql.SQL("GRANT USAGE ON SCHEMA {} TO {}").format(
            sql.Identifier(schema), sql.Identifier(role)))
    reader_dsn = psycopg.conninfo.make_conninfo(audit_dsn, user=role, password="reader-pass")
    try:
        with pytest.raises(AuditUnavailableError, match="own tables") as raised:
            AuditTrail(dsn=reader_dsn, context=make_context(reader_dsn))
        assert "reader-pass" not in str(raised.value)
    finally:
        with psycopg.connect(audit_dsn, autocommit=True) as owner:
            owner.execute(sql.SQL("DROP OWNED BY {}").format(sql.Identifier(role)))
        with psycopg.connect(pg.admin_dsn, autocommit=True) as admin:
            admin.execute(sql.SQL("DROP ROLE {}").format(sql.Identifier(role)))


def test_audit_write_failure_raises_audit_unavailable(audit_dsn: str) -> None:
    """When the connection is gone, start() raises AuditUnavailableError (fail closed)."""
    trail = AuditTrail(dsn=audit_dsn, context=make_context(audit_dsn))
    backend_pid = trail._connection.info.backend_pid
    with psycopg.connect(audit_dsn, autocommit=True) as admin:
        admin.execute("SELECT pg_terminate_backend(%s)", (backend_pid,))
    try:
        with pytest.raises(AuditUnavailableError, match="cannot write the START event"):
            trail.start(OperationType.SYNC)
    finally:
        trail.close()


def test_canary_password_never_stored_or_logged(
        pg: TestServer, audit_dsn: str, json_log: io.StringIO) -> None:
    """A password in the DSN, the error text and the metadata is masked everywhere."""
    canary = f"canary-{uuid.uuid4().hex}"
    role = f"writer_{uuid.uuid4().hex[:8]}"
    dsn = audit_dsn
    ensure_own_schema(dsn)
    with psycopg.connect(pg.admin_dsn, autocommit=True) as admin:
        admin.execute(sql.SQL("CREATE ROLE {} LOGIN SUPERUSER PASSWORD {}").format(
            sql.Identifier(role), sql.Literal(canary)))
    canary_dsn = psycopg.conninfo.make_conninfo(dsn, user=role, password=canary)
    uri_with_password = f"postgresql://{role}:{canary}@127.0.0.1:5432/app"
    try:
        context = make_context(canary_dsn)
        with AuditTrail(dsn=canary_dsn, context=context) as trail:
            root = trail.start(OperationType.SYNC, name="sync",
                               metadata={"target": uri_with_password, "note": canary})
            step = trail.start(OperationType.MIGRATION, name="migrate", parent=root)
            trail.finish(step, OperationStatus.FAILED,
                         error=f"connection to {uri_with_password} failed; password={canary}")
            trail.finish(root, OperationStatus.FAILED, error=f"see {canary_dsn}")

        with psycopg.connect(dsn) as connection:
            stored = connection.execute(
                "SELECT string_agg(to_jsonb(l)::text, E'\\n') FROM sync_audit_logs AS l"
            ).fetchone()
        assert stored is not None
        assert stored[0]
        assert canary not in stored[0]
        assert "***" in stored[0]
        log_text = json_log.getvalue()
        assert "audit finish" in log_text
        assert canary not in log_text
    finally:
        with psycopg.connect(pg.admin_dsn, autocommit=True) as admin:
            admin.execute(sql.SQL("DROP ROLE {}").format(sql.Identifier(role)))


def test_log_lines_use_the_mojaloop_envelope(audit_dsn: str, json_log: io.StringIO) -> None:
    """Each event is one JSON line with metadata.trace and metadata.event and the sync id."""
    context = make_context(audit_dsn, traceparent=TRACEPARENT)
    with AuditTrail(dsn=audit_dsn, context=context) as trail:
        root = trail.start(OperationType.SYNC, name="sync")
        trail.finish(root, OperationStatus.FAILED, error="amount 1234.56 does not balance",
                     metadata={"debit_total": "1234.56"})

    lines = [json.loads(line) for line in json_log.getvalue().splitlines() if line.strip()]
    events = [line for line in lines if line.get("logger") == "dbsync.audit"]
    assert [line["metadata"]["event"]["action"] for line in events] == ["start", "finish"]
    for line in events:
        assert line["sync_id"] == str(context.sync_id)
        assert line["metadata"]["event"]["type"] == "audit"
        assert line["metadata"]["trace"]["traceId"] == context.sync_id.hex
        assert line["metadata"]["trace"]["spanId"] == root.span_id
        assert line["metadata"]["trace"]["parentSpanId"] == "00f067aa0ba902b7"
        assert line["metadata"]["trace"]["service"] == "dbsync"
    assert events[1]["metadata"]["event"]["state"]["status"] == "failed"
    assert events[1]["metadata"]["event"]["state"]["code"] == "FAILED"
    assert isinstance(events[1]["duration_ms"], int)
    assert "1234.56" not in json_log.getvalue()
