"""Create the append-only audit log, its hash chain and the per-operation view.

Revision ID: 0001_audit_log
Revises:
Create Date: 2026-12-04

Each row is one START or FINISH event. A BEFORE INSERT trigger assigns the sequence number,
the server timestamp and the SHA-256 hash chain under a transaction-scoped advisory lock, so
every writer (dbsync or plain SQL) extends one gap-free chain. Statement triggers reject
UPDATE, DELETE and TRUNCATE, and every trigger is ``ENABLE ALWAYS`` so that setting
``session_replication_role = replica`` does not skip them.

The canonical serialization hashed here is format 1 of ``dbsync.pipeline.audit_chain``: the
PostgreSQL COPY text encoding of the columns listed in ``_CANONICAL_FIELDS``, tab separated.
This file is frozen once released: a new format needs a new revision and a new format number.
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

revision: str = "0001_audit_log"
down_revision: str | Sequence[str] | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# Advisory lock (class, key) that serializes chain writers: the same two integers as
# CHAIN_LOCK_CLASS and CHAIN_LOCK_KEY in dbsync.pipeline.audit_chain.
_CHAIN_LOCK_CLASS = 1684173665
_CHAIN_LOCK_KEY = 1

# Columns of canonical format 1, in order. ``escaped`` columns may contain any text and go
# through dbsync_audit_copy_text(); the others are numbers, UUIDs, checked hex strings or the
# fixed-width timestamp, whose text form never contains a character that COPY escapes.
_CANONICAL_FIELDS: tuple[tuple[str, bool], ...] = (
    ("NEW.chain_format::text", False),
    ("NEW.sequence::text", False),
    ("NEW.prev_hash", False),
    ("""to_char(NEW.recorded_at AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US"Z"')""", False),
    ("NEW.event_id::text", False),
    ("NEW.event_kind", True),
    ("NEW.sync_id::text", False),
    ("NEW.operation_id::text", False),
    ("NEW.operation_type", True),
    ("NEW.operation_name", True),
    ("NEW.status", True),
    ("NEW.duration_ms::text", False),
    ("NEW.migration_name", True),
    ("NEW.trace_id", False),
    ("NEW.span_id", False),
    ("NEW.parent_span_id", False),
    ("NEW.traceparent", True),
    ("NEW.service_name", True),
    ("NEW.service_version", True),
    ("NEW.requester_kind", True),
    ("NEW.requester_user", True),
    ("NEW.requester_host", True),
    ("NEW.requester_namespace", True),
    ("NEW.requester_name", True),
    ("NEW.requester_uid", True),
    ("NEW.requester_generation::text", False),
    ("NEW.approver", True),
    ("NEW.database_host", True),
    ("NEW.database_port::text", False),
    ("NEW.database_name", True),
    ("NEW.plan_hash", True),
    ("NEW.writer_pid::text", False),
    ("NEW.schema_changes::text", True),
    ("NEW.error_details::text", True),
    ("NEW.metadata::text", True),
)


def _canonical_expression() -> str:
    parts = []
    for expression, escaped in _CANONICAL_FIELDS:
        if escaped:
            parts.append(f"dbsync_audit_copy_text({expression})")
        else:
            parts.append(f"coalesce({expression}, '\\N')")
    return "concat_ws(chr(9),\n            " + ",\n            ".join(parts) + ")"


_CREATE_TABLE = """
CREATE TABLE sync_audit_logs (
    sequence bigint PRIMARY KEY,
    chain_format smallint NOT NULL,
    prev_hash text NOT NULL CHECK (prev_hash ~ '^[0-9a-f]{64}$'),
    row_hash text NOT NULL CHECK (row_hash ~ '^[0-9a-f]{64}$'),
    recorded_at timestamptz NOT NULL,
    event_id uuid NOT NULL UNIQUE,
    event_kind text NOT NULL CHECK (event_kind IN ('START', 'FINISH')),
    sync_id uuid NOT NULL,
    operation_id uuid NOT NULL,
    operation_type text NOT NULL CHECK (operation_type ~ '^[A-Z][A-Z0-9_]*$'),
    operation_name text,
    status text NOT NULL,
    duration_ms bigint CHECK (duration_ms >= 0),
    migration_name text,
    trace_id text NOT NULL
        CHECK (trace_id ~ '^[0-9a-f]{32}$' AND trace_id <> repeat('0', 32)),
    span_id text NOT NULL
        CHECK (span_id ~ '^[0-9a-f]{16}$' AND span_id <> repeat('0', 16)),
    parent_span_id text
        CHECK (parent_span_id ~ '^[0-9a-f]{16}$' AND parent_span_id <> repeat('0', 16)),
    traceparent text
        CHECK (traceparent ~ '^[0-9a-f]{2}-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}$'),
    service_name text NOT NULL,
    service_version text NOT NULL,
    requester_kind text NOT NULL,
    requester_user text,
    requester_host text,
    requester_namespace text,
    requester_name text,
    requester_uid text,
    requester_generation bigint,
    approver text,
    database_host text,
    database_port integer,
    database_name text,
    plan_hash text,
    writer_pid integer NOT NULL,
    schema_changes jsonb,
    error_details jsonb,
    metadata jsonb,
    CONSTRAINT sync_audit_logs_event_status_check CHECK (
        (event_kind = 'START' AND status = 'STARTED' AND duration_ms IS NULL)
        OR (event_kind = 'FINISH' AND status IN
            ('SUCCESS', 'FAILED', 'ROLLED_BACK', 'SKIPPED', 'TIMEOUT', 'ABANDONED'))
    ),
    CONSTRAINT sync_audit_logs_operation_event_key UNIQUE (operation_id, event_kind)
)
"""

_INDEXES = (
    "CREATE INDEX sync_audit_logs_sync_idx ON sync_audit_logs (sync_id, sequence)",
    "CREATE INDEX sync_audit_logs_recorded_at_idx ON sync_audit_logs (recorded_at)",
    # "Recent syncs": the START events of SYNC operations, newest first.
    """CREATE INDEX sync_audit_logs_recent_syncs_idx ON sync_audit_logs (recorded_at DESC)
       WHERE event_kind = 'START' AND operation_type = 'SYNC'""",
    # "Failed operations": FINISH events with a failure status, newest first.
    """CREATE INDEX sync_audit_logs_failures_idx ON sync_audit_logs (recorded_at DESC)
       WHERE event_kind = 'FINISH'
         AND status IN ('FAILED', 'ROLLED_BACK', 'TIMEOUT', 'ABANDONED')""",
)

# COPY's text format escapes the backslash and six control characters, and writes NULL as \N.
# This function reproduces that encoding for one value, so the trigger hashes exactly the
# bytes that `COPY (SELECT ...) TO STDOUT` later streams to the verifier.
_CREATE_COPY_TEXT = r"""
CREATE FUNCTION dbsync_audit_copy_text(value text) RETURNS text
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT CASE WHEN value IS NULL THEN '\N' ELSE
        replace(replace(replace(replace(replace(replace(replace(value,
            '\', '\\'),
            chr(8), '\b'),
            chr(12), '\f'),
            chr(10), '\n'),
            chr(13), '\r'),
            chr(9), '\t'),
            chr(11), '\v')
    END
$$
"""


def _create_chain_function() -> str:
    return f"""
CREATE FUNCTION dbsync_audit_chain() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    last_sequence bigint;
    last_hash text;
BEGIN
    -- One writer at a time reads the chain head and appends. The lock is taken before the
    -- SELECT below, so under READ COMMITTED that SELECT's snapshot sees the previous
    -- holder's committed row. Under REPEATABLE READ the snapshot may be older: the insert
    -- then fails on the sequence primary key instead of forking the chain.
    PERFORM pg_advisory_xact_lock({_CHAIN_LOCK_CLASS}, {_CHAIN_LOCK_KEY});

    SELECT log.sequence, log.row_hash INTO last_sequence, last_hash
    FROM sync_audit_logs AS log
    ORDER BY log.sequence DESC
    LIMIT 1;

    IF NEW.event_kind = 'FINISH' AND NOT EXISTS (
        SELECT 1 FROM sync_audit_logs AS log
        WHERE log.operation_id = NEW.operation_id AND log.event_kind = 'START'
    ) THEN
        RAISE EXCEPTION 'sync_audit_logs: FINISH event for operation % without a START event',
            NEW.operation_id USING ERRCODE = 'foreign_key_violation';
    END IF;

    -- Values the chain depends on are always assigned here, whatever the client sent.
    NEW.chain_format := 1;
    NEW.sequence := coalesce(last_sequence, 0) + 1;
    NEW.prev_hash := coalesce(last_hash, repeat('0', 64));
    NEW.recorded_at := clock_timestamp();
    NEW.writer_pid := pg_backend_pid();
    NEW.row_hash := encode(sha256(convert_to(
        {_canonical_expression()},
        'UTF8')), 'hex');
    RETURN NEW;
END
$$
"""


# Pins the trigger function's search_path to pg_catalog and the schema the table is created
# in, so a writer's own search_path cannot substitute another sync_audit_logs or escaping
# function. A DO block, because the schema is only known on the database (and --sql works).
_PIN_CHAIN_SEARCH_PATH = """
DO $pin$
BEGIN
    EXECUTE format('ALTER FUNCTION dbsync_audit_chain() SET search_path = pg_catalog, %I',
                   current_schema());
END
$pin$
"""

_CREATE_REJECT_FUNCTION = """
CREATE FUNCTION dbsync_audit_reject_change() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'sync_audit_logs is append-only: % is not allowed', TG_OP
        USING ERRCODE = 'insufficient_privilege',
              HINT = 'audit events are corrected by appending a new event';
END
$$
"""

_TRIGGERS = (
    """CREATE TRIGGER sync_audit_logs_chain BEFORE INSERT ON sync_audit_logs
       FOR EACH ROW EXECUTE FUNCTION dbsync_audit_chain()""",
    # Statement-level, so that even an UPDATE or DELETE matching no row is rejected, and
    # because row triggers never fire on TRUNCATE.
    """CREATE TRIGGER sync_audit_logs_append_only BEFORE UPDATE OR DELETE OR TRUNCATE
       ON sync_audit_logs FOR EACH STATEMENT EXECUTE FUNCTION dbsync_audit_reject_change()""",
    "ALTER TABLE sync_audit_logs ENABLE ALWAYS TRIGGER sync_audit_logs_chain",
    "ALTER TABLE sync_audit_logs ENABLE ALWAYS TRIGGER sync_audit_logs_append_only",
)

_CREATE_VIEW = """
CREATE VIEW sync_audit_operations AS
SELECT
    s.sync_id,
    s.operation_id,
    s.operation_type,
    s.operation_name,
    coalesce(f.migration_name, s.migration_name) AS migration_name,
    coalesce(f.status, 'IN_PROGRESS') AS status,
    s.recorded_at AS started_at,
    f.recorded_at AS completed_at,
    f.duration_ms,
    s.trace_id,
    s.span_id,
    s.parent_span_id,
    s.traceparent,
    s.service_name,
    s.service_version,
    s.requester_kind,
    s.requester_user,
    s.requester_host,
    s.requester_namespace,
    s.requester_name,
    s.requester_uid,
    s.requester_generation,
    s.approver,
    s.database_host,
    s.database_port,
    s.database_name,
    s.plan_hash,
    coalesce(f.schema_changes, s.schema_changes) AS schema_changes,
    f.error_details,
    coalesce(s.metadata, '{}'::jsonb) || coalesce(f.metadata, '{}'::jsonb) AS metadata,
    s.sequence AS start_sequence,
    f.sequence AS finish_sequence
FROM sync_audit_logs AS s
LEFT JOIN sync_audit_logs AS f
    ON f.operation_id = s.operation_id AND f.event_kind = 'FINISH'
WHERE s.event_kind = 'START'
"""

_COMMENTS = (
    """COMMENT ON TABLE sync_audit_logs IS
       'dbsync audit events: one START and one FINISH row per operation, append-only, '
       'SHA-256 chained in sequence order'""",
    """COMMENT ON VIEW sync_audit_operations IS
       'dbsync audit operations: one row per operation with its final status '
       '(IN_PROGRESS while no FINISH event exists)'""",
)


def upgrade() -> None:
    op.execute(_CREATE_TABLE)
    for statement in _INDEXES:
        op.execute(statement)
    op.execute(_CREATE_COPY_TEXT)
    op.execute(_create_chain_function())
    op.execute(_PIN_CHAIN_SEARCH_PATH)
    op.execute(_CREATE_REJECT_FUNCTION)
    for statement in _TRIGGERS:
        op.execute(statement)
    op.execute(_CREATE_VIEW)
    for statement in _COMMENTS:
        op.execute(statement)


def downgrade() -> None:
    # Dropping the table destroys the audit trail: downgrade exists for development only.
    op.execute("DROP VIEW IF EXISTS sync_audit_operations")
    op.execute("DROP TABLE IF EXISTS sync_audit_logs")
    op.execute("DROP FUNCTION IF EXISTS dbsync_audit_reject_change()")
    op.execute("DROP FUNCTION IF EXISTS dbsync_audit_chain()")
    op.execute("DROP FUNCTION IF EXISTS dbsync_audit_copy_text(text)")
