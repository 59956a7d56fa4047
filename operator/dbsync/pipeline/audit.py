"""The audit trail: append-only START and FINISH events for every operation of a sync.

:class:`AuditTrail` writes on its own autocommit connection, so an event is committed the
moment it is written: a migration transaction that rolls back leaves its FAILED or
ROLLED_BACK events in place. Each operation (the whole sync, each step, each revision) is a
span of the sync's trace. Its START event is written when it begins and its FINISH event,
with the final status, when it ends. Nothing is ever updated; the ``sync_audit_operations``
view pairs the two events.

A writer holds a shared session advisory lock keyed by its sync id for as long as its
connection lives. An operation without a FINISH event whose sync has no such lock holder
belongs to a process that died, so the next AuditTrail writes an ABANDONED FINISH event for
it. Every event is also logged to the ``dbsync.audit`` structlog logger in the Mojaloop
event envelope shape, with ids, names, statuses and durations only.
"""

from __future__ import annotations

import getpass
import json
import re
import secrets
import socket
import threading
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from enum import Enum, StrEnum
from types import TracebackType
from typing import Any, Self

import psycopg
import structlog
from psycopg import sql
from psycopg.rows import dict_row
from psycopg.types.json import Jsonb

from dbsync import SERVICE_NAME, __version__
from dbsync.pipeline.audit_chain import (
    AUDIT_APPLICATION_NAME,
    AUDIT_TABLE,
    OPERATIONS_VIEW,
    WRITER_LOCK_CLASS,
    VerifyResult,
    require_audit_table,
    verify_chain,
)
from dbsync.pipeline.audit_schema import ensure_own_schema, upgrade_own_schema
from dbsync.pipeline.dsn import DatabaseAddress, connect, describe, password_of, redact_text
from dbsync.pipeline.errors import AuditUnavailableError, ConfigurationError
from dbsync.pipeline.logs import redact_processor, register_secret

__all__ = [
    "AuditContext",
    "AuditTrail",
    "Operation",
    "OperationStatus",
    "OperationType",
    "Requester",
    "VerifyResult",
    "ensure_own_schema",
    "fetch_sync_operations",
    "parse_traceparent",
    "upgrade_own_schema",
    "verify_chain",
]

audit_logger = structlog.get_logger("dbsync.audit")

# How long one audit write may wait for the chain lock held by another writer.
DEFAULT_LOCK_TIMEOUT_MS = 10_000

_TRACEPARENT = re.compile(
    r"^(?P<version>[0-9a-f]{2})-(?P<trace_id>[0-9a-f]{32})-(?P<parent_id>[0-9a-f]{16})"
    r"-(?P<flags>[0-9a-f]{2})$")


class OperationType(StrEnum):
    """Kind of audited operation: the whole sync, one step, or one migration revision."""

    SYNC = "SYNC"
    PREFLIGHT = "PREFLIGHT"
    MIGRATION = "MIGRATION"
    REVISION = "REVISION"
    SCHEMA_CHECK = "SCHEMA_CHECK"
    LEDGER_INTEGRITY = "LEDGER_INTEGRITY"
    REPORT = "REPORT"
    PLAN = "PLAN"


class OperationStatus(StrEnum):
    """Final status of an operation, written in its FINISH event."""

    SUCCESS = "SUCCESS"
    FAILED = "FAILED"
    ROLLED_BACK = "ROLLED_BACK"
    SKIPPED = "SKIPPED"
    TIMEOUT = "TIMEOUT"
    ABANDONED = "ABANDONED"


class EventKind(StrEnum):
    """The two events of an operation."""

    START = "START"
    FINISH = "FINISH"


# Status written in START events. The view shows IN_PROGRESS until a FINISH event exists.
STARTED_STATUS = "STARTED"
FAILURE_STATUSES = frozenset({
    OperationStatus.FAILED, OperationStatus.ROLLED_BACK, OperationStatus.TIMEOUT,
    OperationStatus.ABANDONED})


@dataclass(frozen=True, kw_only=True)
class Requester:
    """Requester of a sync: a CLI user on a host, a Kubernetes resource, or a job."""

    kind: str
    user: str | None = None
    host: str | None = None
    namespace: str | None = None
    name: str | None = None
    uid: str | None = None
    generation: int | None = None

    def __post_init__(self) -> None:
        if self.kind not in ("cli", "kubernetes", "job"):
            raise ConfigurationError(
                f"invalid requester kind {self.kind!r}: use 'cli', 'kubernetes' or 'job'")

    @classmethod
    def from_cli(cls) -> Requester:
        """Return the requester for a command run by the current OS user on this host."""
        try:
            user: str | None = getpass.getuser()
        except (KeyError, OSError):
            # No login name and no passwd entry, as in some containers.
            user = None
        return cls(kind="cli", user=user, host=socket.gethostname())


@dataclass(frozen=True, kw_only=True)
class AuditContext:
    """Context shared by every event of one sync: its id, requester, approver and target."""

    sync_id: uuid.UUID
    requester: Requester
    database: DatabaseAddress
    approver: str | None = None
    traceparent: str | None = None
    plan_hash: str | None = None

    def __post_init__(self) -> None:
        if self.traceparent is not None:
            parse_traceparent(self.traceparent)

    @property
    def trace_id(self) -> str:
        """The trace id of every event: the sync id's 32 lowercase hex digits."""
        return self.sync_id.hex

    @property
    def root_parent_span_id(self) -> str | None:
        """Parent span of top-level operations: the caller's span from ``traceparent``."""
        if self.traceparent is None:
            return None
        return parse_traceparent(self.traceparent).parent_id


@dataclass(frozen=True)
class TraceParent:
    """The fields of a W3C ``traceparent`` header."""

    version: str
    trace_id: str
    parent_id: str
    flags: str


def parse_traceparent(value: str) -> TraceParent:
    """Parse a W3C traceparent (version-traceid-parentid-flags), raising ConfigurationError.

    Only the four-field form is accepted; version ``ff`` and all-zero ids are invalid.
    """
    match = _TRACEPARENT.match(value)
    if match is None:
        raise ConfigurationError(
            f"invalid traceparent {value!r}: expected version-traceid-parentid-flags in "
            "lowercase hex, such as 00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01")
    parsed = TraceParent(**match.groupdict())
    if parsed.version == "ff":
        raise ConfigurationError(f"invalid traceparent {value!r}: version ff is reserved")
    if parsed.trace_id == "0" * 32 or parsed.parent_id == "0" * 16:
        raise ConfigurationError(
            f"invalid traceparent {value!r}: the trace id and parent id must not be all zeros")
    return parsed


def new_span_id() -> str:
    """Return a random, non-zero span id of 16 lowercase hex digits (8 bytes)."""
    while True:
        span_id = secrets.token_hex(8)
        if span_id != "0" * 16:
            return span_id


def writer_lock_key(sync_id: uuid.UUID) -> int:
    """Return the second key of a sync's writer lock: the sync id's low 31 bits."""
    return sync_id.int & 0x7FFFFFFF


@dataclass(frozen=True)
class Operation:
    """An operation whose START event is written: pass it to finish() or as a parent."""

    operation_id: uuid.UUID
    span_id: str
    parent_span_id: str | None
    operation_type: OperationType
    name: str | None
    started_monotonic: float


@dataclass(frozen=True)
class _OpenOperation:
    operation: Operation
    migration_name: str | None
    sequence: int


def _json_default(value: Any) -> Any:
    # Exact decimals (amounts) and ids become strings, so no precision is lost.
    if isinstance(value, uuid.UUID | Decimal | datetime):
        return value.isoformat() if isinstance(value, datetime) else str(value)
    if isinstance(value, Enum):
        return value.value
    if isinstance(value, set | frozenset | tuple):
        return list(value)
    raise TypeError(f"audit metadata value of type {type(value).__name__} is not JSON "
                    "serializable: pass str, int, float, bool, None, lists or mappings")


def _dumps(value: Any) -> str:
    return json.dumps(value, default=_json_default, sort_keys=True, ensure_ascii=False)


def _redact_value(value: Any, *secrets_to_mask: str) -> Any:
    """Mask DSN passwords and ``secrets_to_mask`` in every string inside ``value``."""
    if isinstance(value, str):
        # The logging processor also masks every password registered for this process.
        masked = redact_text(value, *secrets_to_mask)
        return redact_processor(None, "", {"value": masked})["value"]
    if isinstance(value, Mapping):
        return {_redact_value(str(key), *secrets_to_mask): _redact_value(item, *secrets_to_mask)
                for key, item in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        return [_redact_value(item, *secrets_to_mask) for item in value]
    return value


_INSERT_EVENT = sql.SQL("""
INSERT INTO {table} (
    event_id, event_kind, sync_id, operation_id, operation_type, operation_name, status,
    duration_ms, migration_name, trace_id, span_id, parent_span_id, traceparent,
    service_name, service_version, requester_kind, requester_user, requester_host,
    requester_namespace, requester_name, requester_uid, requester_generation, approver,
    database_host, database_port, database_name, plan_hash,
    schema_changes, error_details, metadata
) VALUES (
    %(event_id)s, %(event_kind)s, %(sync_id)s, %(operation_id)s, %(operation_type)s,
    %(operation_name)s, %(status)s, %(duration_ms)s, %(migration_name)s, %(trace_id)s,
    %(span_id)s, %(parent_span_id)s, %(traceparent)s, %(service_name)s, %(service_version)s,
    %(requester_kind)s, %(requester_user)s, %(requester_host)s, %(requester_namespace)s,
    %(requester_name)s, %(requester_uid)s, %(requester_generation)s, %(approver)s,
    %(database_host)s, %(database_port)s, %(database_name)s, %(plan_hash)s,
    %(schema_changes)s, %(error_details)s, %(metadata)s
)
RETURNING sequence, recorded_at
""").format(table=sql.Identifier(AUDIT_TABLE))

# Copies each open operation's START event into an ABANDONED FINISH event when no live
# session holds the writer lock of its sync. ON CONFLICT skips an operation that another
# new sync closed first.
_CLOSE_ABANDONED = sql.SQL("""
INSERT INTO {table} (
    event_id, event_kind, sync_id, operation_id, operation_type, operation_name, status,
    duration_ms, migration_name, trace_id, span_id, parent_span_id, traceparent,
    service_name, service_version, requester_kind, requester_user, requester_host,
    requester_namespace, requester_name, requester_uid, requester_generation, approver,
    database_host, database_port, database_name, plan_hash,
    schema_changes, error_details, metadata
)
SELECT
    gen_random_uuid(), 'FINISH', s.sync_id, s.operation_id, s.operation_type, s.operation_name,
    'ABANDONED', NULL, s.migration_name, s.trace_id, s.span_id, s.parent_span_id,
    s.traceparent, s.service_name, s.service_version, s.requester_kind, s.requester_user,
    s.requester_host, s.requester_namespace, s.requester_name, s.requester_uid,
    s.requester_generation, s.approver, s.database_host, s.database_port, s.database_name,
    s.plan_hash, NULL,
    jsonb_build_object('message', 'the writing process ended before this operation finished'),
    jsonb_build_object('closed_by_sync_id', %(closer)s::text, 'writer_pid', s.writer_pid)
FROM {table} AS s
WHERE s.event_kind = 'START'
  AND NOT EXISTS (
      SELECT 1 FROM {table} AS f
      WHERE f.operation_id = s.operation_id AND f.event_kind = 'FINISH')
  AND NOT EXISTS (
      SELECT 1 FROM pg_locks AS l
      WHERE l.locktype = 'advisory'
        AND l.granted
        AND l.pid <> pg_backend_pid()
        AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())
        AND l.classid = %(lock_class)s::oid
        AND l.objsubid = 2
        AND l.objid = (('x' || right(replace(s.sync_id::text, '-', ''), 8))::bit(32)::int
                       & 2147483647)::oid)
ORDER BY s.sequence DESC
ON CONFLICT (operation_id, event_kind) DO NOTHING
RETURNING sync_id, operation_id, operation_type, operation_name, span_id, parent_span_id,
          event_id, sequence, recorded_at
""").format(table=sql.Identifier(AUDIT_TABLE))


class AuditTrail:
    """Writes the START and FINISH events of one sync's operations (see the module doc)."""

    def __init__(self, *, dsn: str, context: AuditContext, connect_timeout_seconds: int = 10,
                 lock_timeout_ms: int = DEFAULT_LOCK_TIMEOUT_MS) -> None:
        self._context = context
        self._password = password_of(dsn)
        self._address = describe(dsn, role="audit")
        self._root_parent_span_id = context.root_parent_span_id
        self._open: dict[uuid.UUID, _OpenOperation] = {}
        self._lock = threading.Lock()
        self._abandoned_closed = 0
        self._log = audit_logger.bind(sync_id=str(context.sync_id))
        register_secret(self._password)

        # Raises ConnectionFailedError, already redacted, when the server cannot be reached.
        self._connection = connect(
            dsn, role="audit", autocommit=True, connect_timeout_seconds=connect_timeout_seconds,
            application_name=AUDIT_APPLICATION_NAME)
        try:
            self._prepare(lock_timeout_ms=lock_timeout_ms)
        except BaseException:
            self._connection.close()
            raise

    def _prepare(self, *, lock_timeout_ms: int) -> None:
        try:
            # The chain trigger relies on READ COMMITTED (see revision 0001_audit_log), and
            # a stuck writer must not block this one forever.
            self._connection.execute(
                "SET SESSION CHARACTERISTICS AS TRANSACTION ISOLATION LEVEL READ COMMITTED")
            self._connection.execute(
                sql.SQL("SET lock_timeout = {}").format(sql.Literal(f"{int(lock_timeout_ms)}ms")))
            upgrade_own_schema(self._connection)
            self._check_writable()

            # Held until the connection closes: it shows other writers that this sync is alive.
            self._connection.execute(
                "SELECT pg_advisory_lock_shared(%s, %s)",
                (WRITER_LOCK_CLASS, writer_lock_key(self._context.sync_id)))
            self._abandoned_closed = self._close_abandoned()
        except psycopg.Error as error:
            raise AuditUnavailableError(
                f"cannot open the audit trail in {self._address}: {self._redact(error)}; "
                "the sync does not run without it") from None

    def _check_writable(self) -> None:
        row = self._connection.execute(
            "SELECT pg_is_in_recovery(), has_table_privilege(%s, 'INSERT'), "
            "has_table_privilege(%s, 'SELECT')", (AUDIT_TABLE, AUDIT_TABLE)).fetchone()
        assert row is not None
        in_recovery, can_insert, can_select = row
        if in_recovery:
            raise AuditUnavailableError(
                f"the audit database {self._address} is a read-only standby: point the audit "
                "DSN at the primary; the sync does not run without an audit trail")
        if not (can_insert and can_select):
            raise AuditUnavailableError(
                f"the role {self._address.user!r} cannot write {AUDIT_TABLE} in "
                f"{self._address}: grant it INSERT and SELECT (see 'dbsync audit grant'); "
                "the sync does not run without an audit trail")

    def _redact(self, error: BaseException) -> str:
        text = str(error).strip()
        first_line = text.splitlines()[0] if text else type(error).__name__
        return str(_redact_value(first_line, self._password))

    @property
    def context(self) -> AuditContext:
        """The sync's shared audit context."""
        return self._context

    @property
    def trace_id(self) -> str:
        """The trace id of every event: the sync id's 32 lowercase hex digits."""
        return self._context.trace_id

    @property
    def abandoned_closed(self) -> int:
        """Number of operations of dead writers that this trail closed as ABANDONED."""
        return self._abandoned_closed

    def start(self, operation_type: OperationType, *, name: str | None = None,
              parent: Operation | None = None, migration_name: str | None = None,
              metadata: Mapping[str, Any] | None = None) -> Operation:
        """Write the START event of a new operation and return it.

        ``parent`` makes the new operation a child span; without it the operation is
        top-level, a child of the caller's ``traceparent`` span when one was given.
        """
        operation_type = OperationType(operation_type)
        if parent is not None and parent.operation_id not in self._open:
            raise ValueError(
                f"parent operation {parent.operation_id} is not open in this audit trail: "
                "start children before finishing their parent")
        operation = Operation(
            operation_id=uuid.uuid4(),
            span_id=new_span_id(),
            parent_span_id=parent.span_id if parent is not None else self._root_parent_span_id,
            operation_type=operation_type,
            name=name,
            started_monotonic=time.monotonic(),
        )
        event_id = uuid.uuid4()
        sequence, recorded_at = self._insert(
            event_id=event_id, kind=EventKind.START, operation=operation,
            status=STARTED_STATUS, duration_ms=None, migration_name=migration_name,
            schema_changes=None, error=None, metadata=metadata)

        with self._lock:
            self._open[operation.operation_id] = _OpenOperation(
                operation=operation, migration_name=migration_name, sequence=sequence)
        self._log_event(event_id=event_id, kind=EventKind.START, operation=operation,
                        status=STARTED_STATUS, recorded_at=recorded_at, sequence=sequence,
                        duration_ms=None, migration_name=migration_name)
        return operation

    def finish(self, operation: Operation, status: OperationStatus, *,
               error: str | None = None, schema_changes: Mapping[str, Any] | None = None,
               metadata: Mapping[str, Any] | None = None,
               migration_name: str | None = None) -> int:
        """Write the FINISH event of ``operation`` and return its duration in milliseconds.

        ``error`` is stored redacted in ``error_details``; it never reaches the log line.
        """
        status = OperationStatus(status)
        with self._lock:
            state = self._open.get(operation.operation_id)
        if state is None:
            raise ValueError(
                f"operation {operation.operation_id} ({operation.operation_type} "
                f"{operation.name!r}) is not open in this audit trail: it was finished "
                "already or started by another trail")

        duration_ms = max(0, round((time.monotonic() - operation.started_monotonic) * 1000))
        effective_migration = migration_name if migration_name is not None else (
            state.migration_name)
        event_id = uuid.uuid4()
        sequence, recorded_at = self._insert(
            event_id=event_id, kind=EventKind.FINISH, operation=operation, status=status,
            duration_ms=duration_ms, migration_name=effective_migration,
            schema_changes=schema_changes, error=error, metadata=metadata)

        with self._lock:
            self._open.pop(operation.operation_id, None)
        self._log_event(event_id=event_id, kind=EventKind.FINISH, operation=operation,
                        status=status, recorded_at=recorded_at, sequence=sequence,
                        duration_ms=duration_ms, migration_name=effective_migration)
        return duration_ms

    def _insert(self, *, event_id: uuid.UUID, kind: EventKind, operation: Operation,
                status: str, duration_ms: int | None, migration_name: str | None,
                schema_changes: Mapping[str, Any] | None, error: str | None,
                metadata: Mapping[str, Any] | None) -> tuple[int, datetime]:
        context = self._context
        requester = context.requester
        error_details = None
        if error is not None:
            error_details = {"message": error}
        params = {
            "event_id": event_id,
            "event_kind": kind.value,
            "sync_id": context.sync_id,
            "operation_id": operation.operation_id,
            "operation_type": operation.operation_type.value,
            "operation_name": operation.name,
            "status": status,
            "duration_ms": duration_ms,
            "migration_name": migration_name,
            "trace_id": context.trace_id,
            "span_id": operation.span_id,
            "parent_span_id": operation.parent_span_id,
            "traceparent": context.traceparent,
            "service_name": SERVICE_NAME,
            "service_version": __version__,
            "requester_kind": requester.kind,
            "requester_user": requester.user,
            "requester_host": requester.host,
            "requester_namespace": requester.namespace,
            "requester_name": requester.name,
            "requester_uid": requester.uid,
            "requester_generation": requester.generation,
            "approver": context.approver,
            "database_host": context.database.host,
            "database_port": context.database.port,
            "database_name": context.database.database,
            "plan_hash": context.plan_hash,
            "schema_changes": self._jsonb(schema_changes),
            "error_details": self._jsonb(error_details),
            "metadata": self._jsonb(metadata),
        }
        try:
            row = self._connection.execute(_INSERT_EVENT, params).fetchone()
        except psycopg.Error as error_raised:
            raise AuditUnavailableError(
                f"cannot write the {kind.value} event of {operation.operation_type.value} "
                f"{operation.name or ''} to the audit table in {self._address}: "
                f"{self._redact(error_raised)}; the sync stops because its audit trail would "
                "be incomplete") from None
        assert row is not None
        sequence, recorded_at = row
        assert isinstance(sequence, int)
        assert isinstance(recorded_at, datetime)
        return sequence, recorded_at

    def _jsonb(self, value: Mapping[str, Any] | None) -> Jsonb | None:
        if value is None:
            return None
        return Jsonb(_redact_value(dict(value), self._password), dumps=_dumps)

    def _close_abandoned(self) -> int:
        with self._connection.cursor(row_factory=dict_row) as cursor:
            cursor.execute(_CLOSE_ABANDONED, {
                "closer": str(self._context.sync_id),
                "lock_class": WRITER_LOCK_CLASS,
            })
            rows = cursor.fetchall()
        for row in rows:
            self._log.warning(
                "audit operation abandoned",
                abandoned_sync_id=str(row["sync_id"]),
                operation_id=str(row["operation_id"]),
                operation_type=row["operation_type"],
                name=row["operation_name"],
                metadata=self._envelope(
                    event_id=row["event_id"], action="finish",
                    status=OperationStatus.ABANDONED, recorded_at=row["recorded_at"],
                    trace_id=uuid.UUID(str(row["sync_id"])).hex, span_id=row["span_id"],
                    parent_span_id=row["parent_span_id"]),
            )
        return len(rows)

    def _envelope(self, *, event_id: uuid.UUID, action: str, status: str,
                  recorded_at: datetime, trace_id: str, span_id: str,
                  parent_span_id: str | None) -> dict[str, Any]:
        # Mojaloop's event envelope: metadata.event and metadata.trace.
        succeeded = status in (STARTED_STATUS, OperationStatus.SUCCESS, OperationStatus.SKIPPED)
        trace: dict[str, Any] = {
            "service": SERVICE_NAME,
            "traceId": trace_id,
            "spanId": span_id,
            "parentSpanId": parent_span_id,
            "tags": {"serviceVersion": __version__},
        }
        if self._context.traceparent is not None:
            trace["tags"]["traceparent"] = self._context.traceparent
        return {
            "event": {
                "id": str(event_id),
                "type": "audit",
                "action": action,
                "createdAt": recorded_at.isoformat(),
                "state": {
                    "status": "success" if succeeded else "failed",
                    "code": str(status),
                },
            },
            "trace": trace,
        }

    def _log_event(self, *, event_id: uuid.UUID, kind: EventKind, operation: Operation,
                   status: str, recorded_at: datetime, sequence: int, duration_ms: int | None,
                   migration_name: str | None) -> None:
        action = "start" if kind is EventKind.START else "finish"
        fields: dict[str, Any] = {
            "operation_id": str(operation.operation_id),
            "operation_type": operation.operation_type.value,
            "name": operation.name,
            "status": str(status),
            "sequence": sequence,
        }
        if migration_name is not None:
            fields["migration_name"] = migration_name
        if duration_ms is not None:
            fields["duration_ms"] = duration_ms
        envelope = self._envelope(
            event_id=event_id, action=action, status=status, recorded_at=recorded_at,
            trace_id=self.trace_id, span_id=operation.span_id,
            parent_span_id=operation.parent_span_id)
        if kind is EventKind.FINISH and status in FAILURE_STATUSES:
            self._log.warning(f"audit {action}", metadata=envelope, **fields)
        else:
            self._log.info(f"audit {action}", metadata=envelope, **fields)

    def open_operations(self) -> list[Operation]:
        """Return the operations started but not yet finished, oldest first."""
        with self._lock:
            states = sorted(self._open.values(), key=lambda state: state.sequence)
        return [state.operation for state in states]

    def close(self) -> None:
        """Finish still-open operations as ABANDONED (children first), then disconnect."""
        if self._connection.closed:
            return
        try:
            for operation in reversed(self.open_operations()):
                self.finish(operation, OperationStatus.ABANDONED,
                            error="the audit trail was closed before this operation finished")
        except AuditUnavailableError as error:
            # The connection is gone: the next trail closes these operations instead.
            self._log.warning("audit trail closed with open operations", error=str(error))
        finally:
            self._connection.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 traceback: TracebackType | None) -> None:
        self.close()


def _json_safe(value: Any) -> Any:
    if isinstance(value, uuid.UUID):
        return str(value)
    if isinstance(value, datetime):
        return value.isoformat()
    return value


def fetch_sync_operations(dsn: str, sync_id: uuid.UUID,
                          *, connect_timeout_seconds: int = 10) -> list[dict[str, Any]]:
    """Return the view's rows for one sync, in start order, with JSON-safe values.

    Each row also carries ``name`` (the operation name) and ``error`` (the stored error
    message, or None).
    """
    with connect(dsn, role="audit", autocommit=True,
                 connect_timeout_seconds=connect_timeout_seconds,
                 application_name=AUDIT_APPLICATION_NAME) as connection:
        require_audit_table(connection, dsn)
        with connection.cursor(row_factory=dict_row) as cursor:
            cursor.execute(
                sql.SQL("SELECT * FROM {} WHERE sync_id = %s ORDER BY start_sequence").format(
                    sql.Identifier(OPERATIONS_VIEW)), (sync_id,))
            rows = cursor.fetchall()
    result = []
    for row in rows:
        item = {key: _json_safe(value) for key, value in row.items()}
        item["name"] = item.get("operation_name")
        details = item.get("error_details")
        item["error"] = details.get("message") if isinstance(details, dict) else None
        result.append(item)
    return result


def fetch_recent_events(dsn: str, *, limit: int = 20,
                        connect_timeout_seconds: int = 10) -> list[dict[str, Any]]:
    """Return the newest ``limit`` events of the audit table, oldest first, JSON-safe."""
    with connect(dsn, role="audit", autocommit=True,
                 connect_timeout_seconds=connect_timeout_seconds,
                 application_name=AUDIT_APPLICATION_NAME) as connection:
        require_audit_table(connection, dsn)
        with connection.cursor(row_factory=dict_row) as cursor:
            cursor.execute(
                sql.SQL(
                    "SELECT sequence, recorded_at, event_kind, sync_id, operation_id, "
                    "operation_type, operation_name, migration_name, status, duration_ms, "
                    "trace_id, span_id, parent_span_id "
                    "FROM {} ORDER BY sequence DESC LIMIT %s").format(
                        sql.Identifier(AUDIT_TABLE)), (limit,))
            rows = cursor.fetchall()
    return [{key: _json_safe(value) for key, value in row.items()} for row in reversed(rows)]


def build_operation_tree(operations: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Nest rows of fetch_sync_operations() by span: each node gets a ``children`` list.

    A row whose parent span is not among the rows (a top-level operation, or one under the
    caller's traceparent span) is a root. Order within a level is start order.
    """
    nodes = {str(row["span_id"]): {**row, "children": []} for row in operations}
    roots: list[dict[str, Any]] = []
    for row in operations:
        node = nodes[str(row["span_id"])]
        parent = nodes.get(str(row.get("parent_span_id")))
        if parent is None or parent is node:
            roots.append(node)
        else:
            parent["children"].append(node)
    return roots
