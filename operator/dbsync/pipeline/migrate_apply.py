"""Running pending revisions: planned, rehearsed, or applied in one or many transactions.

Each revision is one REVISION audit operation under the MIGRATION operation. Its FINISH
status records what finally happened to its changes:

- SUCCESS: committed (or, in plan mode, rendered).
- ROLLED_BACK: it ran without error, but the transaction holding it was rolled back
  (a later revision failed, a retry after lock_timeout, or a rehearsal).
- FAILED: it raised the error that ended the run. TIMEOUT: it hit lock_timeout.
- SKIPPED: it never started because an earlier revision failed.

A retry after lock_timeout starts new operations, so the trail shows every attempt.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import psycopg
from sqlalchemy import Connection, Engine, RootTransaction
from sqlalchemy.exc import SQLAlchemyError

from dbsync.pipeline.audit import AuditTrail, Operation, OperationStatus, OperationType
from dbsync.pipeline.dsn import redact_text
from dbsync.pipeline.errors import ConfigurationError, DbsyncError
from dbsync.pipeline.migrate_alembic import (
    AlembicDriver,
    current_heads,
    invalid_indexes,
    schema_fingerprint,
    set_timeouts,
    single_head,
)
from dbsync.pipeline.migrate_checksums import forget, record
from dbsync.pipeline.migrate_model import (
    DryRunMode,
    MigrateOptions,
    MigrateResult,
    MigrationLockTimeoutError,
    NonTransactionalRevisionError,
    OutcomeStatus,
    RevisionFailedError,
    RevisionOutcome,
    TransactionMode,
)
from dbsync.pipeline.migrate_scripts import (
    CodeAnalysis,
    HazardKind,
    RevisionFile,
    ScriptSet,
    enum_additions,
    find_enum_uses,
    scan_sql,
)

logger = logging.getLogger("dbsync.migrate")

LOCK_NOT_AVAILABLE = "55P03"
QUERY_CANCELED = "57014"
UNSAFE_NEW_ENUM_VALUE_USAGE = "55P04"
ACTIVE_SQL_TRANSACTION = "25001"

# First PostgreSQL major version seen to accept a label added in the same transaction as
# its enum type's CREATE TYPE.
NEW_ENUM_TYPE_EXEMPT_SINCE = 18


@dataclass
class RunContext:
    """Everything one migrate run needs, plus the warnings it collects on the way."""

    scripts: ScriptSet
    options: MigrateOptions
    audit: AuditTrail
    parent: Operation
    sync_id: uuid.UUID
    engine: Engine
    driver: AlembicDriver
    before: str | None
    target: str | None
    steps: list[RevisionFile]
    downgrade: bool
    invalid_before: tuple[str, ...]
    warnings: list[str] = field(default_factory=list)
    lock_retries_used: int = 0
    # Per revision id: lock_timeout retries it caused and other notes for its outcome.
    notes: dict[str, list[str]] = field(default_factory=dict)
    main_connection: Connection | None = None
    # Major version of the target's server, which decides some enum rules.
    server_major: int = 0

    def connection(self) -> Connection:
        """Return the run's connection (timeouts set), reconnecting after a lost one.

        One connection serves every read and transaction of a run, because a new
        connection costs a SCRAM handshake.
        """
        current = self.main_connection
        if current is not None and not current.closed and not current.invalidated:
            return current
        if current is not None:
            self.close()
        fresh = self.engine.connect()
        set_timeouts(fresh, lock_timeout_ms=self.options.lock_timeout_ms,
                     statement_timeout_ms=self.options.statement_timeout_ms)
        self.main_connection = fresh
        return fresh

    def close(self) -> None:
        connection, self.main_connection = self.main_connection, None
        if connection is None:
            return
        try:
            connection.close()
        except (SQLAlchemyError, psycopg.Error) as error:
            logger.warning("closing the migration connection failed: %s",
                           redact_text(str(error).splitlines()[0]))

    def analysis(self, revision_file: RevisionFile) -> CodeAnalysis:
        return revision_file.downgrade if self.downgrade else revision_file.upgrade

    def destination(self, index: int) -> str:
        """Return the revision that step ``index`` moves the target to."""
        if not self.downgrade:
            return self.steps[index].revision
        below = self.steps[index].down_revision
        if below is None:
            return "base"
        assert isinstance(below, str)
        return below

    def start_of(self, index: int) -> str | None:
        """Return the revision the target is at before step ``index``."""
        if self.downgrade:
            return self.steps[index].revision
        return self.steps[index - 1].revision if index > 0 else self.before

    def enum_uses(self, *, shared_transaction: bool) -> dict[str, list[str]]:
        """Return enum-label hazards, for one shared transaction or one per revision."""
        if self.downgrade:
            return {}
        # NOTE: verified on PostgreSQL 15 (rejects) and 18 (accepts); 16 and 17 are treated
        # as rejecting, which can only over-report.
        exempt = self.server_major >= NEW_ENUM_TYPE_EXEMPT_SINCE
        if shared_transaction:
            return find_enum_uses(self.steps, new_type_exempt=exempt)
        found: dict[str, list[str]] = {}
        for revision_file in self.steps:
            found.update(find_enum_uses([revision_file], new_type_exempt=exempt))
        return found

    def note(self, revision: str, message: str) -> None:
        self.notes.setdefault(revision, []).append(message)


@dataclass
class _Ran:
    """A revision that ran in the current attempt, with its open audit operation."""

    revision_file: RevisionFile
    operation: Operation
    duration_ms: int


class _Progress:
    """Progress of one Alembic run: the executing revision and its audit operation."""

    def __init__(self, ctx: RunContext, attempt: int) -> None:
        self._ctx = ctx
        self._attempt = attempt
        self._started = 0.0
        self.ran: list[_Ran] = []
        self.current: RevisionFile | None = None
        self.operation: Operation | None = None

    def begin(self, revision_id: str) -> None:
        """Close the previous revision's timer and start the audit operation of the next."""
        self.end()
        revision_file = self._ctx.scripts.revisions[revision_id]
        self.current = revision_file
        self.operation = start_operation(self._ctx, revision_file, attempt=self._attempt)
        self._started = time.monotonic()

    def end(self) -> None:
        # Why: a revision's time includes its alembic_version update, which Alembic runs
        # right after upgrade() and before the next revision starts.
        if self.current is not None and self.operation is not None:
            duration_ms = int((time.monotonic() - self._started) * 1000)
            self.ran.append(_Ran(self.current, self.operation, duration_ms))
        self.current, self.operation = None, None


class _TransactionFailed(Exception):
    """A transaction failed for good: what ran before the error, and the revision that raised."""

    def __init__(self, ran: list[_Ran], failed: RevisionFile | None,
                 failed_operation: Operation | None, error: BaseException) -> None:
        super().__init__(str(error))
        self.ran = ran
        self.failed = failed
        self.failed_operation = failed_operation
        self.error = error


def sqlstate(error: BaseException) -> str | None:
    """Return the PostgreSQL SQLSTATE behind ``error`` (SQLAlchemy wraps psycopg errors)."""
    candidates: list[object] = [error, getattr(error, "orig", None), error.__cause__]
    for candidate in candidates:
        state = getattr(candidate, "sqlstate", None)
        if isinstance(state, str) and state:
            return state
    return None


def error_detail(error: BaseException) -> str:
    """Return the server's primary message (or the exception text), redacted, on one line."""
    original = getattr(error, "orig", None) or error
    diag = getattr(original, "diag", None)
    primary = getattr(diag, "message_primary", None) if diag is not None else None
    if not primary:
        lines = str(original).strip().splitlines()
        primary = lines[0] if lines else type(original).__name__
    return redact_text(str(primary))


def describe_failure(revision_file: RevisionFile, error: BaseException,
                     options: MigrateOptions) -> str:
    """Explain why ``revision_file`` failed, with the fix for the known SQLSTATEs."""
    name = f"revision {revision_file.revision} ({revision_file.file_name})"
    state = sqlstate(error)
    detail = error_detail(error)
    if state == UNSAFE_NEW_ENUM_VALUE_USAGE:
        return (f"{name} uses an enum value that ALTER TYPE ... ADD VALUE added in the same "
                f"transaction, which PostgreSQL rejects until that transaction commits "
                f"(SQLSTATE 55P04: {detail}); put the ADD VALUE in its own, earlier revision "
                "and run with transaction mode per-revision")
    if state == QUERY_CANCELED:
        return (f"{name} was canceled after statement_timeout ({options.statement_timeout_ms} "
                f"ms): {detail}; raise statement_timeout_ms if the statement is expected to "
                "run this long")
    if state == LOCK_NOT_AVAILABLE:
        return (f"{name} could not get a table lock within lock_timeout "
                f"({options.lock_timeout_ms} ms) after {options.lock_retries + 1} attempt(s): "
                f"{detail}; find the blocking session in pg_locks / pg_stat_activity, or "
                "raise lock_timeout_ms or lock_retries")
    if state == ACTIVE_SQL_TRANSACTION:
        return (f"{name} runs a statement that cannot run inside a transaction block "
                f"({detail}) and that dbsync did not find in the file (SQL built at run "
                "time); wrap it in op.get_context().autocommit_block(), which dbsync "
                "detects, and run with transaction mode per-revision")
    if isinstance(error, DbsyncError):
        return f"{name} failed: {error}"
    return f"{name} failed: {detail}"


def _metadata(ctx: RunContext, revision_file: RevisionFile, attempt: int) -> dict[str, Any]:
    return {
        "revision": revision_file.revision,
        "file_name": revision_file.file_name,
        "sha256": revision_file.sha256,
        "direction": "downgrade" if ctx.downgrade else "upgrade",
        "transaction_mode": str(ctx.options.transaction_mode),
        "dry_run": str(ctx.options.dry_run),
        "transactional": ctx.analysis(revision_file).transactional,
        "attempt": attempt,
    }


def start_operation(ctx: RunContext, revision_file: RevisionFile, *,
                    attempt: int = 1) -> Operation:
    return ctx.audit.start(OperationType.REVISION, name=revision_file.revision,
                           parent=ctx.parent, migration_name=revision_file.file_name,
                           metadata=_metadata(ctx, revision_file, attempt))


def finish_operation(ctx: RunContext, operation: Operation, status: OperationStatus, *,
                     error: str | None = None, metadata: dict[str, Any] | None = None) -> None:
    ctx.audit.finish(operation, status, error=error, metadata=metadata)


def _safe_rollback(transaction: RootTransaction | None, connection: Connection) -> None:
    try:
        if transaction is not None and transaction.is_active:
            transaction.rollback()
        elif connection.in_transaction():
            connection.rollback()
    except (SQLAlchemyError, psycopg.Error) as error:
        # The connection is closed right after, which rolls back on the server anyway.
        logger.warning("rollback failed: %s", redact_text(str(error).splitlines()[0]))


def _backoff(ctx: RunContext, attempt: int) -> None:
    time.sleep(ctx.options.retry_backoff_seconds * (2 ** (attempt - 1)))


def run_in_transaction(ctx: RunContext, revisions: list[RevisionFile], *,
                       commit: bool) -> list[_Ran]:
    """Run ``revisions`` in one transaction, retrying the whole of it after lock_timeout.

    With ``commit`` False (rehearsal) the transaction is always rolled back. On success the
    returned operations are still open, because what they finish as depends on the caller.
    Raises _TransactionFailed after the failing and rolled-back operations are finished.
    """
    attempts = ctx.options.lock_retries + 1
    for attempt in range(1, attempts + 1):
        progress = _Progress(ctx, attempt)
        connection = ctx.connection()
        transaction = connection.begin()
        try:
            if revisions:
                last = ctx.steps.index(revisions[-1])
                ctx.driver.run(connection, ctx.destination(last), downgrade=ctx.downgrade,
                               on_step=progress.begin)
                progress.end()
            ran = progress.ran
            expected = [item.revision for item in revisions]
            if [item.revision_file.revision for item in ran] != expected:
                raise RuntimeError(
                    f"Alembic ran revisions {[item.revision_file.revision for item in ran]} "
                    f"instead of the planned {expected}")
            if commit:
                _record_history(ctx, connection, [item.revision_file for item in ran])
                transaction.commit()
            else:
                transaction.rollback()
            return ran
        except Exception as error:  # a revision may raise anything
            _safe_rollback(transaction, connection)
            ran, current, current_operation = (progress.ran, progress.current,
                                               progress.operation)
            retry = sqlstate(error) == LOCK_NOT_AVAILABLE and attempt < attempts
            _finish_failed_attempt(ctx, ran, current, current_operation, error,
                                   retrying=retry)
            if not retry:
                raise _TransactionFailed(ran, current, current_operation, error) from error
            blocked = current.revision if current is not None else "the commit"
            message = (f"attempt {attempt} of {attempts}: revision {blocked} hit "
                       f"lock_timeout ({ctx.options.lock_timeout_ms} ms); rolled back and "
                       "retried")
            logger.warning("%s (%s)", message, error_detail(error))
            ctx.lock_retries_used += 1
            if current is not None:
                ctx.note(current.revision, message)
            else:
                ctx.warnings.append(message)
            _backoff(ctx, attempt)
    raise AssertionError("unreachable: the last attempt returns or raises")


def _finish_failed_attempt(ctx: RunContext, ran: list[_Ran], current: RevisionFile | None,
                           current_operation: Operation | None, error: BaseException, *,
                           retrying: bool) -> None:
    state = sqlstate(error)
    culprit = (f"revision {current.revision} failed" if current is not None
               else "the commit failed")
    suffix = "; retrying" if retrying else ""
    for item in ran:
        finish_operation(ctx, item.operation, OperationStatus.ROLLED_BACK,
                         error=f"rolled back because {culprit}{suffix}",
                         metadata={"duration_ms": item.duration_ms})
    if current is not None and current_operation is not None:
        status = (OperationStatus.TIMEOUT if state in (LOCK_NOT_AVAILABLE, QUERY_CANCELED)
                  else OperationStatus.FAILED)
        finish_operation(ctx, current_operation, status,
                         error=describe_failure(current, error, ctx.options) + suffix,
                         metadata={"sqlstate": state})


def _record_history(ctx: RunContext, connection: Connection,
                    revisions: list[RevisionFile]) -> None:
    """Update the checksum table in the same transaction as the revisions."""
    if ctx.downgrade:
        forget(connection, [item.revision for item in revisions])
    else:
        record(connection, revisions, sync_id=ctx.sync_id, applied_now=True)


def run_outside_transaction(ctx: RunContext, revision_file: RevisionFile) -> _Ran:
    """Run a revision that cannot run in a transaction block, then record its checksum.

    Raises _TransactionFailed; statements that completed before the error stay committed.
    """
    analysis = ctx.analysis(revision_file)
    operation = start_operation(ctx, revision_file)
    with ctx.engine.connect() as connection:
        set_timeouts(connection, lock_timeout_ms=ctx.options.lock_timeout_ms,
                     statement_timeout_ms=ctx.options.statement_timeout_ms)
        # Why: a bare CREATE INDEX CONCURRENTLY needs autocommit, while autocommit_block()
        # manages its own transactions and works on an ordinary connection.
        if any(hazard.kind is HazardKind.NON_TRANSACTIONAL_STATEMENT
               for hazard in analysis.hazards):
            connection = connection.execution_options(isolation_level="AUTOCOMMIT")
        started = time.monotonic()
        try:
            ctx.driver.run(connection, ctx.destination(ctx.steps.index(revision_file)),
                           downgrade=ctx.downgrade)
            if connection.in_transaction():
                connection.commit()
            duration_ms = int((time.monotonic() - started) * 1000)
            _record_history(ctx, connection, [revision_file])
            if connection.in_transaction():
                connection.commit()
        except Exception as error:  # a revision may raise anything
            _safe_rollback(None, connection)
            timed_out = sqlstate(error) in (LOCK_NOT_AVAILABLE, QUERY_CANCELED)
            finish_operation(ctx, operation,
                             OperationStatus.TIMEOUT if timed_out else OperationStatus.FAILED,
                             error=describe_failure(revision_file, error, ctx.options) +
                             "; it ran outside a transaction, so statements that completed "
                             "before the error stay committed",
                             metadata={"sqlstate": sqlstate(error)})
            raise _TransactionFailed([], revision_file, operation, error) from error
    return _Ran(revision_file, operation, duration_ms)


def new_invalid_indexes(ctx: RunContext) -> tuple[str, ...]:
    """Return the target's invalid indexes that were not invalid when the run started."""
    return tuple(name for name in reread_invalid_indexes(ctx)
                 if name not in ctx.invalid_before)


def read_revision(ctx: RunContext) -> str | None:
    """Re-read the target's revision: after a failure, what Alembic printed is no proof."""
    connection = ctx.connection()
    try:
        return single_head(current_heads(connection), where="the target")
    finally:
        connection.rollback()


def reread_revision(ctx: RunContext, expected: str | None) -> str | None:
    """Re-read the target's revision; if the target is unreachable, report ``expected``.

    ``expected`` is what the server guarantees: a lost connection rolls back the open
    transaction, so the target stays at the last committed revision.
    """
    try:
        return read_revision(ctx)
    except (DbsyncError, SQLAlchemyError, psycopg.Error) as error:
        message = (f"could not re-read the target's revision ({error_detail(error)}); "
                   f"reporting {expected or 'base'}, the last committed revision")
        logger.warning("%s", message)
        ctx.warnings.append(message)
        return expected


def reread_invalid_indexes(ctx: RunContext) -> tuple[str, ...]:
    """Return the target's INVALID indexes, or () with a warning if it is unreachable."""
    try:
        return _all_invalid(ctx)
    except (DbsyncError, SQLAlchemyError, psycopg.Error) as error:
        message = (f"could not check for INVALID indexes ({error_detail(error)}); check "
                   "pg_index.indisvalid on the target")
        logger.warning("%s", message)
        ctx.warnings.append(message)
        return ()


def outcome(ctx: RunContext, revision_file: RevisionFile, status: OutcomeStatus, *,
            duration_ms: int = 0, sql: str | None = None, warnings: tuple[str, ...] = (),
            operation: Operation | None = None) -> RevisionOutcome:
    notes = tuple(ctx.notes.get(revision_file.revision, ()))
    return RevisionOutcome(
        revision=revision_file.revision, file_name=revision_file.file_name,
        description=revision_file.description, status=status, duration_ms=duration_ms,
        transactional=ctx.analysis(revision_file).transactional, sql=sql,
        warnings=notes + warnings,
        operation_id=operation.operation_id if operation is not None else None)


def static_warnings(ctx: RunContext, revision_file: RevisionFile,
                    enum_uses: dict[str, list[str]]) -> tuple[str, ...]:
    analysis = ctx.analysis(revision_file)
    found = [f"not transactional: {hazard}" for hazard in analysis.hazards]
    found.extend(enum_uses.get(revision_file.revision, ()))
    found.extend(
        f"adds enum value '{addition.value}' to {addition.type_name}: the value cannot be "
        "used until this revision's transaction commits"
        for addition in analysis.enum_additions)
    return tuple(found)


def _skip_remaining(ctx: RunContext, remaining: list[RevisionFile],
                    reason: str) -> list[RevisionOutcome]:
    results = []
    for revision_file in remaining:
        operation = start_operation(ctx, revision_file)
        finish_operation(ctx, operation, OperationStatus.SKIPPED, error=reason)
        results.append(outcome(ctx, revision_file, OutcomeStatus.NOT_RUN, warnings=(reason,),
                               operation=operation))
    return results


def _result(ctx: RunContext, outcomes: list[RevisionOutcome], *, revision_after: str | None,
            invalid: tuple[str, ...] = ()) -> MigrateResult:
    return MigrateResult(
        revision_before=ctx.before, revision_after=revision_after, target_revision=ctx.target,
        outcomes=tuple(outcomes), dry_run=ctx.options.dry_run, invalid_indexes=invalid,
        transaction_mode=ctx.options.transaction_mode, warnings=tuple(ctx.warnings),
        lock_retries_used=ctx.lock_retries_used)


# --- plan -------------------------------------------------------------------------------


def plan(ctx: RunContext) -> MigrateResult:
    """Render each pending revision's SQL offline and audit it; the target is not touched."""
    rendered: list[tuple[str, int]] = []
    for index in range(len(ctx.steps)):
        started = time.monotonic()
        sql = ctx.driver.render(ctx.start_of(index), ctx.destination(index),
                                downgrade=ctx.downgrade)
        rendered.append((sql, int((time.monotonic() - started) * 1000)))

    shared = ctx.options.transaction_mode is TransactionMode.ALL
    enum_uses = ctx.enum_uses(shared_transaction=shared)
    # Why: the rendered SQL also shows statements built at run time from variables.
    from_sql = [replace(revision_file, upgrade=CodeAnalysis(
        enum_additions=tuple(enum_additions(sql)), literals=(sql,)))
        for revision_file, (sql, _ms) in zip(ctx.steps, rendered, strict=True)]
    if not ctx.downgrade:
        exempt = ctx.server_major >= NEW_ENUM_TYPE_EXEMPT_SINCE
        sql_uses = (find_enum_uses(from_sql, new_type_exempt=exempt) if shared else
                    {key: value for item in from_sql
                     for key, value in find_enum_uses([item], new_type_exempt=exempt).items()})
        for revision, messages in sql_uses.items():
            known = enum_uses.setdefault(revision, [])
            known.extend(message for message in messages if message not in known)
    rehearsal_uses = ctx.enum_uses(shared_transaction=True)

    outcomes = []
    for revision_file, (sql, duration_ms) in zip(ctx.steps, rendered, strict=True):
        warnings = list(static_warnings(ctx, revision_file, enum_uses))
        static_labels = {hazard.detail for hazard in ctx.analysis(revision_file).hazards}
        warnings.extend(f"not transactional: {hazard}" for hazard in scan_sql(sql)
                        if hazard.detail not in static_labels)
        transactional = ctx.analysis(revision_file).transactional and not scan_sql(sql)
        if not transactional or revision_file.revision in rehearsal_uses:
            warnings.append("not atomic and not rehearsable")
        if shared and (not transactional or revision_file.revision in enum_uses):
            warnings.append("cannot run in transaction mode all: use per-revision")
        operation = start_operation(ctx, revision_file)
        finish_operation(ctx, operation, OperationStatus.SUCCESS, metadata={
            "sql": sql, "warnings": warnings, "render_ms": duration_ms})
        planned = outcome(ctx, revision_file, OutcomeStatus.PLANNED, duration_ms=duration_ms,
                          sql=sql, warnings=tuple(warnings), operation=operation)
        outcomes.append(replace(planned, transactional=transactional))
    return _result(ctx, outcomes, revision_after=ctx.before)


# --- rehearse ---------------------------------------------------------------------------


def rehearse(ctx: RunContext) -> MigrateResult:
    """Run the revisions in one transaction, time each, roll back and check nothing changed."""
    uses = ctx.enum_uses(shared_transaction=True)
    runnable: list[RevisionFile] = []
    for revision_file in ctx.steps:
        if not ctx.analysis(revision_file).transactional or revision_file.revision in uses:
            break
        runnable.append(revision_file)
    remaining = ctx.steps[len(runnable):]

    # Why: compared afterwards, so "unchanged" is checked on the catalog, not assumed.
    fingerprint_before = _fingerprint(ctx)
    try:
        ran = run_in_transaction(ctx, runnable, commit=False)
    except _TransactionFailed as failure:
        raise _failure_error(ctx, failure, rehearsal=True) from None

    outcomes = []
    for item in ran:
        finish_operation(ctx, item.operation, OperationStatus.ROLLED_BACK,
                         error="rehearsal: rolled back on purpose",
                         metadata={"duration_ms": item.duration_ms})
        outcomes.append(outcome(ctx, item.revision_file, OutcomeStatus.REHEARSED,
                                duration_ms=item.duration_ms, operation=item.operation))
    if remaining:
        first = remaining[0]
        reason = (f"not rehearsed: revision {first.revision} cannot run inside the "
                  "rehearsal's transaction (" +
                  "; ".join(static_warnings(ctx, first, uses)) + ")")
        outcomes.extend(_skip_remaining(ctx, remaining, reason))

    logger.info("rehearsed %d revision(s) and rolled back; %d not rehearsable",
                len(ran), len(remaining))
    after = read_revision(ctx)
    fingerprint_after = _fingerprint(ctx)
    if fingerprint_after != fingerprint_before:
        raise RevisionFailedError(
            "the rehearsal left the target's schema changed although its transaction was "
            "rolled back: a revision committed on its own (for example with COMMIT in its "
            "SQL); check the target", result=_result(ctx, outcomes, revision_after=after))
    if after != ctx.before:
        raise RevisionFailedError(
            f"the rehearsal changed the target's revision from {ctx.before} to {after}: a "
            "revision committed on its own (for example with COMMIT in its SQL); check the "
            "target", result=_result(ctx, outcomes, revision_after=after))
    return _result(ctx, outcomes, revision_after=after)


# --- apply ------------------------------------------------------------------------------


def apply_all(ctx: RunContext) -> MigrateResult:
    """Apply every pending revision in one transaction: all or none of them commit."""
    try:
        ran = run_in_transaction(ctx, ctx.steps, commit=True)
    except _TransactionFailed as failure:
        raise _failure_error(ctx, failure, rehearsal=False) from None

    done = OutcomeStatus.DOWNGRADED if ctx.downgrade else OutcomeStatus.APPLIED
    outcomes = []
    for item in ran:
        finish_operation(ctx, item.operation, OperationStatus.SUCCESS,
                         metadata={"duration_ms": item.duration_ms})
        outcomes.append(outcome(ctx, item.revision_file, done, duration_ms=item.duration_ms,
                                operation=item.operation))
    logger.info("committed %d revision(s) in one transaction (%d ms of revision time)",
                len(ran), sum(item.duration_ms for item in ran))
    return _result(ctx, outcomes, revision_after=reread_revision(ctx, ctx.target),
                   invalid=reread_invalid_indexes(ctx))


def apply_per_revision(ctx: RunContext) -> MigrateResult:
    """Commit each revision on its own; a failure leaves the earlier ones applied."""
    done = OutcomeStatus.DOWNGRADED if ctx.downgrade else OutcomeStatus.APPLIED
    outcomes: list[RevisionOutcome] = []
    for index, revision_file in enumerate(ctx.steps):
        transactional = ctx.analysis(revision_file).transactional
        try:
            if transactional:
                item = run_in_transaction(ctx, [revision_file], commit=True)[0]
            else:
                item = run_outside_transaction(ctx, revision_file)
        except _TransactionFailed as failure:
            raise _per_revision_failure(ctx, failure, outcomes, index) from None

        warnings: tuple[str, ...] = ()
        if not transactional:
            created = new_invalid_indexes(ctx)
            warnings = tuple(f"index {name} is INVALID after this revision: drop it and "
                             "build it again" for name in created)
        finish_operation(ctx, item.operation, OperationStatus.SUCCESS,
                         metadata={"duration_ms": item.duration_ms,
                                   "warnings": list(warnings)})
        outcomes.append(outcome(ctx, revision_file, done, duration_ms=item.duration_ms,
                                warnings=warnings, operation=item.operation))
        logger.info("revision %s committed (%d ms)", revision_file.revision, item.duration_ms)
    return _result(ctx, outcomes, revision_after=reread_revision(ctx, ctx.target),
                   invalid=reread_invalid_indexes(ctx))


def _fingerprint(ctx: RunContext) -> str:
    connection = ctx.connection()
    try:
        return schema_fingerprint(connection)
    finally:
        connection.rollback()


def _all_invalid(ctx: RunContext) -> tuple[str, ...]:
    connection = ctx.connection()
    try:
        return invalid_indexes(connection)
    finally:
        connection.rollback()


def _per_revision_failure(ctx: RunContext, failure: _TransactionFailed,
                          outcomes: list[RevisionOutcome], index: int) -> DbsyncError:
    failed = failure.failed
    assert failed is not None
    message = describe_failure(failed, failure.error, ctx.options)
    warnings: tuple[str, ...] = ()
    if not ctx.analysis(failed).transactional:
        warnings = ("ran outside a transaction: statements that completed before the error "
                    "stay committed",)
    invalid = reread_invalid_indexes(ctx)
    created = tuple(name for name in invalid if name not in ctx.invalid_before)
    warnings += tuple(f"index {name} is INVALID after this revision's failure: drop it "
                      "before running the revision again" for name in created)
    outcomes = [*outcomes, outcome(ctx, failed, OutcomeStatus.FAILED, warnings=warnings,
                                   operation=failure.failed_operation)]
    outcomes.extend(_skip_remaining(ctx, ctx.steps[index + 1:],
                                    f"not run because revision {failed.revision} failed"))
    committed = ctx.before if index == 0 else ctx.destination(index - 1)
    committed = None if committed == "base" else committed
    result = _result(ctx, outcomes, revision_after=reread_revision(ctx, committed),
                     invalid=invalid)
    applied = ", ".join(result.applied) or "none"
    summary = (f"{message}. Committed before the failure: {applied}; the target is now at "
               f"{result.revision_after or 'base'}")
    if created:
        summary += "; INVALID indexes left behind: " + ", ".join(created)
    return _error_for(failure.error, summary, result, failed.revision)


def _failure_error(ctx: RunContext, failure: _TransactionFailed, *,
                   rehearsal: bool) -> DbsyncError:
    outcomes = [outcome(ctx, item.revision_file, OutcomeStatus.ROLLED_BACK,
                        duration_ms=item.duration_ms, operation=item.operation)
                for item in failure.ran]
    failed = failure.failed
    if failed is None:
        message = f"the commit failed: {error_detail(failure.error)}"
        remaining: list[RevisionFile] = []
    else:
        message = describe_failure(failed, failure.error, ctx.options)
        outcomes.append(outcome(ctx, failed, OutcomeStatus.FAILED,
                                operation=failure.failed_operation))
        position = ctx.steps.index(failed)
        remaining = ctx.steps[position + 1:]
    outcomes.extend(_skip_remaining(
        ctx, remaining, f"not run because revision {failed.revision if failed else '?'} "
        "failed"))
    result = _result(ctx, outcomes, revision_after=reread_revision(ctx, ctx.before))
    rolled_back = ", ".join(item.revision_file.revision for item in failure.ran) or "none"
    scope = "rehearsal" if rehearsal else "transaction"
    summary = (f"{message}. The {scope} was rolled back, so the target is unchanged at "
               f"{result.revision_after or 'base'} (rolled back: {rolled_back})")
    return _error_for(failure.error, summary, result, failed.revision if failed else None)


def _error_for(error: BaseException, message: str, result: MigrateResult,
               revision: str | None) -> DbsyncError:
    if sqlstate(error) == LOCK_NOT_AVAILABLE:
        return MigrationLockTimeoutError(message, result=result, revision=revision)
    return RevisionFailedError(message, result=result, revision=revision)


Mode = Callable[[RunContext], MigrateResult]


def choose_mode(options: MigrateOptions) -> Mode:
    if options.dry_run is DryRunMode.PLAN:
        return plan
    if options.dry_run is DryRunMode.REHEARSE:
        return rehearse
    if options.transaction_mode is TransactionMode.PER_REVISION:
        return apply_per_revision
    return apply_all


def reject_non_transactional(ctx: RunContext) -> None:
    """Raise before anything runs when ``all`` mode meets a revision it cannot keep atomic."""
    uses = ctx.enum_uses(shared_transaction=True)
    problems = []
    for revision_file in ctx.steps:
        hazards = [str(hazard) for hazard in ctx.analysis(revision_file).hazards]
        hazards.extend(uses.get(revision_file.revision, ()))
        if hazards:
            problems.append(f"{revision_file.revision} ({revision_file.file_name}): " +
                            "; ".join(hazards))
    if problems:
        raise NonTransactionalRevisionError(
            "transaction mode 'all' runs every pending revision in one transaction, but these "
            "revisions cannot run atomically: " + " | ".join(problems) + ". Nothing was "
            "applied. Run with transaction mode 'per-revision', which runs them outside a "
            "transaction and commits each revision on its own (check the plan first with "
            "dry-run 'plan')")


def reject_merge_downgrade(ctx: RunContext) -> None:
    """Reject downgrades through a merge revision, whose destination is ambiguous."""
    if not ctx.downgrade:
        return
    for revision_file in ctx.steps:
        if isinstance(revision_file.down_revision, tuple):
            raise ConfigurationError(
                f"cannot downgrade through merge revision {revision_file.revision} "
                f"({revision_file.file_name}): downgrade each branch with alembic by hand")
