"""Canonical serialization and SHA-256 hash chain of the audit log, and its verification.

Canonical format 1 of a row is the PostgreSQL COPY text encoding of the columns in
:data:`CANONICAL_COLUMNS`, joined by tabs and encoded as UTF-8: NULL is ``\\N``, and a
backslash, backspace, form feed, newline, carriage return, tab or vertical tab inside a value
is written as a backslash sequence. The timestamp is rendered in UTC with exactly six
fractional digits, and JSONB values in PostgreSQL's own ``jsonb`` text output, which is a
deterministic function of the stored value. ``row_hash`` is the SHA-256 hex digest of those
bytes. The first column after the format number is the sequence and the next is
``prev_hash``, the previous row's ``row_hash`` (64 zeros for sequence 1), which makes the rows
one chain.

The database trigger created by the ``0001_audit_log`` revision computes the hash when a row
is inserted. Verification here is a separate implementation: it streams the same columns with
``COPY ... TO STDOUT``, whose text format is exactly the canonical encoding, and hashes each
line in Python, so it needs no parsing per value.
"""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import psycopg
from psycopg import sql

from dbsync.pipeline.dsn import connect, describe
from dbsync.pipeline.errors import AuditUnavailableError

CHAIN_FORMAT = 1
GENESIS_HASH = "0" * 64
# Bytes of a COPY row that hold row_hash, chain_format, sequence and prev_hash: 64 + 1 + 2 +
# at most 19 digits + 1 + 64.
_HEAD_BYTES = 160
_NEWLINE = ord("\n")

# Advisory lock (class, key) pairs. The chain pair is also written, as literals, into the
# trigger of revision 0001_audit_log. The class is the ASCII of "dbsa".
CHAIN_LOCK_CLASS = 1684173665
CHAIN_LOCK_KEY = 1
OWN_SCHEMA_LOCK_KEY = 2
# Session locks taken in shared mode by every live writer of one sync: the key is the low
# 31 bits of the sync id. The class is the ASCII of "dbsw".
WRITER_LOCK_CLASS = 1684173687

AUDIT_TABLE = "sync_audit_logs"
OPERATIONS_VIEW = "sync_audit_operations"
COPY_TEXT_FUNCTION = "dbsync_audit_copy_text"
# application_name of dbsync's audit connections, as pg_stat_activity shows them.
AUDIT_APPLICATION_NAME = "dbsync-audit"

# Column expressions of canonical format 1, in hash order, as SELECT list items.
CANONICAL_COLUMNS: tuple[str, ...] = (
    "chain_format",
    "sequence",
    "prev_hash",
    """to_char(recorded_at AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US"Z"')""",
    "event_id",
    "event_kind",
    "sync_id",
    "operation_id",
    "operation_type",
    "operation_name",
    "status",
    "duration_ms",
    "migration_name",
    "trace_id",
    "span_id",
    "parent_span_id",
    "traceparent",
    "service_name",
    "service_version",
    "requester_kind",
    "requester_user",
    "requester_host",
    "requester_namespace",
    "requester_name",
    "requester_uid",
    "requester_generation",
    "approver",
    "database_host",
    "database_port",
    "database_name",
    "plan_hash",
    "writer_pid",
    "schema_changes",
    "error_details",
    "metadata",
)

# Plain column names of CANONICAL_COLUMNS, for reading typed rows.
CANONICAL_COLUMN_NAMES: tuple[str, ...] = tuple(
    "recorded_at" if expression.startswith("to_char(") else expression
    for expression in CANONICAL_COLUMNS
)

_COPY_ESCAPES = str.maketrans({
    "\\": "\\\\",
    "\b": "\\b",
    "\f": "\\f",
    "\n": "\\n",
    "\r": "\\r",
    "\t": "\\t",
    "\v": "\\v",
})


def copy_text(value: str | None) -> str:
    """Encode one value as a field of COPY's text format (``\\N`` for NULL)."""
    if value is None:
        return "\\N"
    return value.translate(_COPY_ESCAPES)


def format_timestamp(value: datetime) -> str:
    """Render ``value`` in UTC with exactly six fractional digits, as the chain hashes it."""
    if value.tzinfo is None:
        raise ValueError(f"timestamp {value!r} has no time zone: audit timestamps are UTC")
    return value.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def canonical_text(value: Any) -> str | None:
    """Return the canonical text of one typed column value, before COPY encoding.

    JSONB values must already be PostgreSQL's text rendering (select ``column::text``):
    Python's json module orders keys and formats numbers differently.
    """
    if value is None:
        return None
    if isinstance(value, datetime):
        return format_timestamp(value)
    if isinstance(value, bool):
        raise TypeError("boolean values are not part of canonical format 1")
    return str(value)


def canonical_line(values: Sequence[Any]) -> bytes:
    """Serialize one row's values, in CANONICAL_COLUMNS order, to the bytes that are hashed."""
    return "\t".join(copy_text(canonical_text(value)) for value in values).encode("utf-8")


def row_hash(line: bytes) -> str:
    """Return the SHA-256 hex digest of one canonical line."""
    return hashlib.sha256(line).hexdigest()


@dataclass(frozen=True)
class VerifyResult:
    """Outcome of recomputing the hash chain over a range of the audit log."""

    ok: bool
    rows_checked: int
    first_sequence: int | None = None
    head_sequence: int | None = None
    head_hash: str | None = None
    first_broken_sequence: int | None = None
    first_broken_reason: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "rows_checked": self.rows_checked,
            "first_sequence": self.first_sequence,
            "head_sequence": self.head_sequence,
            "head_hash": self.head_hash,
            "first_broken_sequence": self.first_broken_sequence,
            "first_broken_reason": self.first_broken_reason,
        }

    def render_text(self) -> str:
        if not self.ok:
            return (f"audit chain BROKEN at sequence {self.first_broken_sequence}: "
                    f"{self.first_broken_reason} ({self.rows_checked} rows checked before it)")
        if self.rows_checked == 0:
            return "audit chain OK: no rows in range"
        return (f"audit chain OK: {self.rows_checked} rows checked, sequences "
                f"{self.first_sequence}..{self.head_sequence}, head hash {self.head_hash}")


class ChainVerifier:
    """Check COPY text lines of ``row_hash, <CANONICAL_COLUMNS>`` one after another.

    Feed lines in sequence order with :meth:`check_lines`; it stops at the first broken row.
    """

    def __init__(self, *, expected_sequence: int, expected_prev_hash: str) -> None:
        self.rows_checked = 0
        self.first_sequence: int | None = None
        self.head_sequence = expected_sequence - 1
        self.head_hash = expected_prev_hash
        self.broken_sequence: int | None = None
        self.broken_reason: str | None = None

    def check_lines(self, lines: Iterable[bytes | bytearray | memoryview]) -> bool:
        """Check each line; return False at the first broken row (and record why).

        A line may end with its newline, as COPY sends it.
        """
        # Hot loop: fixed offsets instead of splitting, because row_hash is always 64 hex
        # digits (a CHECK constraint) followed by a tab and the one-digit chain format. Only
        # the head of a row is copied: the hash reads the rest through a memoryview.
        sha256 = hashlib.sha256
        format_prefix = f"\t{CHAIN_FORMAT}\t".encode()
        head_sequence = self.head_sequence
        head_hash = self.head_hash.encode("ascii")
        checked = self.rows_checked
        try:
            for chunk in lines:
                view = memoryview(chunk)
                end = len(view)
                if end and view[end - 1] == _NEWLINE:
                    end -= 1
                head = bytes(view[:_HEAD_BYTES])
                expected_sequence = head_sequence + 1

                sequence_end = head.find(b"\t", 67)
                if head[64:67] != format_prefix or sequence_end < 0:
                    return self._broken(expected_sequence, "malformed row or unknown chain "
                                        f"format: {head[:80]!r}")
                try:
                    sequence = int(head[67:sequence_end])
                except ValueError:
                    return self._broken(expected_sequence,
                                        f"malformed sequence {head[67:sequence_end]!r}")

                if sequence != expected_sequence:
                    return self._broken(
                        sequence, f"sequence {expected_sequence} is missing before it "
                        "(a row was deleted)")
                if head[sequence_end + 1:sequence_end + 65] != head_hash:
                    return self._broken(
                        sequence, f"prev_hash does not match the row_hash of sequence "
                        f"{head_sequence} (that row or this one was replaced)")
                stored_hash = head[:64]
                if sha256(view[65:end]).hexdigest().encode("ascii") != stored_hash:
                    return self._broken(
                        sequence, "row_hash does not match the row's contents "
                        "(the row was altered after it was written)")

                head_sequence = sequence
                head_hash = stored_hash
                checked += 1
                if self.first_sequence is None:
                    self.first_sequence = sequence
            return True
        finally:
            self.head_sequence = head_sequence
            self.head_hash = head_hash.decode("ascii")
            self.rows_checked = checked

    def _broken(self, sequence: int, reason: str) -> bool:
        self.broken_sequence = sequence
        self.broken_reason = reason
        return False

    def result(self) -> VerifyResult:
        """Return the outcome so far."""
        ok = self.broken_sequence is None
        has_rows = self.rows_checked > 0
        return VerifyResult(
            ok=ok,
            rows_checked=self.rows_checked,
            first_sequence=self.first_sequence,
            head_sequence=self.head_sequence if has_rows else None,
            head_hash=self.head_hash if has_rows else None,
            first_broken_sequence=self.broken_sequence,
            first_broken_reason=self.broken_reason,
        )


def _table_exists(connection: psycopg.Connection[Any], name: str) -> bool:
    row = connection.execute("SELECT to_regclass(%s) IS NOT NULL", (name,)).fetchone()
    return bool(row and row[0])


def require_audit_table(connection: psycopg.Connection[Any], dsn: str) -> None:
    if not _table_exists(connection, AUDIT_TABLE):
        raise AuditUnavailableError(
            f"no audit table {AUDIT_TABLE} in {describe(dsn, role='audit')}: point --dsn at "
            "the database that holds the audit trail (the target, or the separate audit "
            "database)")


def verify_chain(dsn: str, *, since: datetime | None = None,
                 connect_timeout_seconds: int = 10) -> VerifyResult:
    """Recompute the hash chain of the audit log and return where it first breaks.

    With ``since``, checking starts at the first row recorded at or after it, and that row's
    ``prev_hash`` is checked against the stored ``row_hash`` of the row before it.
    """
    # TODO: compare the head with an anchor published outside the database. Without one, a
    # superuser who recomputes every hash after an edit, or removes the newest rows, passes.
    with connect(dsn, role="audit", autocommit=True,
                 connect_timeout_seconds=connect_timeout_seconds,
                 application_name=AUDIT_APPLICATION_NAME) as connection:
        require_audit_table(connection, dsn)
        table = sql.Identifier(AUDIT_TABLE)

        first_sequence = 1
        if since is not None:
            row = connection.execute(
                sql.SQL("SELECT min(sequence) FROM {} WHERE recorded_at >= %s").format(table),
                (since,)).fetchone()
            if row is None or row[0] is None:
                return VerifyResult(ok=True, rows_checked=0)
            first_sequence = int(str(row[0]))

        expected_prev_hash = GENESIS_HASH
        if first_sequence > 1:
            previous = connection.execute(
                sql.SQL("SELECT row_hash FROM {} WHERE sequence = %s").format(table),
                (first_sequence - 1,)).fetchone()
            if previous is None:
                return VerifyResult(
                    ok=False, rows_checked=0, first_broken_sequence=first_sequence,
                    first_broken_reason=f"sequence {first_sequence - 1} is missing before it "
                    "(a row was deleted)")
            expected_prev_hash = str(previous[0])

        verifier = ChainVerifier(expected_sequence=first_sequence,
                                 expected_prev_hash=expected_prev_hash)
        copy_sql = sql.SQL(
            "COPY (SELECT row_hash, {columns} FROM {table} WHERE sequence >= {first} "
            "ORDER BY sequence) TO STDOUT").format(
                columns=sql.SQL(", ".join(CANONICAL_COLUMNS)), table=table,
                first=sql.Literal(first_sequence))
        with connection.cursor() as cursor, cursor.copy(copy_sql) as copy:
            # PostgreSQL sends each row of a COPY TO as one CopyData message, newline included.
            intact = verifier.check_lines(copy)
            if not intact:
                # Stop the server from streaming the rest, then read what is in flight: the
                # connection must leave COPY mode before it can be closed cleanly.
                connection.cancel_safe()
                with contextlib.suppress(psycopg.errors.QueryCanceled):
                    for _chunk in copy:
                        pass
        return verifier.result()
