"""The migrate step: bring the target to an Alembic revision, or plan or rehearse doing so.

Revisions run through Alembic's Python API on a connection dbsync opens, so dbsync owns the
transaction: by default every pending revision shares one, and any error rolls all of them
back. The caller holds :class:`dbsync.pipeline.lock.SyncLock` for the whole sync, and this
module reads the target's revision only after that, so a sync that waited for the lock
reads what the previous one committed. The audit trail gets one REVISION operation per
revision (see :mod:`dbsync.pipeline.migrate_apply` for what each FINISH status means).
"""

from __future__ import annotations

import logging
import uuid

from alembic.script.revision import ResolutionError, RevisionError
from sqlalchemy import Engine

from dbsync.pipeline import dsn as dsn_module
from dbsync.pipeline.audit import AuditTrail, Operation, OperationStatus, OperationType
from dbsync.pipeline.audit_schema import ensure_own_schema
from dbsync.pipeline.errors import ConfigurationError, DbsyncError
from dbsync.pipeline.migrate_alembic import (
    AlembicDriver,
    current_heads,
    invalid_indexes,
    make_engine,
    public_url,
    set_timeouts,
    single_head,
)
from dbsync.pipeline.migrate_apply import (
    RunContext,
    choose_mode,
    reject_merge_downgrade,
    reject_non_transactional,
)
from dbsync.pipeline.migrate_checksums import (
    RecordedChecksum,
    check_applied,
    read_checksums,
    record,
    table_exists,
)
from dbsync.pipeline.migrate_model import (
    DEFAULT_LOCK_TIMEOUT_MS,
    DEFAULT_STATEMENT_TIMEOUT_MS,
    DryRunMode,
    MigrateOptions,
    MigrateResult,
    MigrationLockTimeoutError,
    NonTransactionalRevisionError,
    OutcomeStatus,
    RevisionChecksumMismatchError,
    RevisionFailedError,
    RevisionOutcome,
    TargetAheadError,
    TransactionMode,
)
from dbsync.pipeline.migrate_scripts import RevisionFile, ScriptSet, load_scripts

__all__ = [
    "DEFAULT_LOCK_TIMEOUT_MS",
    "DEFAULT_STATEMENT_TIMEOUT_MS",
    "DryRunMode",
    "MigrateOptions",
    "MigrateResult",
    "MigrationLockTimeoutError",
    "NonTransactionalRevisionError",
    "OutcomeStatus",
    "RevisionChecksumMismatchError",
    "RevisionFailedError",
    "RevisionOutcome",
    "ScriptSet",
    "TargetAheadError",
    "TransactionMode",
    "load_scripts",
    "migrate",
    "read_current_revision",
    "resolve_target",
]

logger = logging.getLogger("dbsync.migrate")


def read_current_revision(dsn: str, *, role: str = "target") -> str | None:
    """Return the revision in the database's ``alembic_version``, or None when there is none.

    Raises ConfigurationError when the table has several rows (unmerged branches).
    """
    address = dsn_module.describe(dsn, role=role)
    with dsn_module.connect(dsn, role=role, autocommit=True) as connection:
        exists = connection.execute("SELECT to_regclass('alembic_version')").fetchone()
        if exists is None or exists[0] is None:
            return None
        rows = connection.execute("SELECT version_num FROM alembic_version").fetchall()
    heads = tuple(sorted(str(row[0]) for row in rows))
    return single_head(heads, where=f"the {role} database {address}")


def resolve_target(scripts: ScriptSet, revision: str, *, source_dsn: str | None) -> str:
    """Turn ``head``, ``source`` or a (possibly abbreviated) revision id into a revision id."""
    requested = revision.strip()
    directory = scripts.migrations_dir
    if requested == "head":
        heads = scripts.heads()
        if len(heads) > 1:
            raise ConfigurationError(
                f"the migrations directory {directory} has several heads ({', '.join(heads)}): "
                "merge them with 'alembic merge' or pass one of them as the revision")
        return heads[0]

    if requested == "source":
        if source_dsn is None:
            raise ConfigurationError(
                "revision 'source' needs a source database: pass a source DSN or a revision id")
        current = read_current_revision(source_dsn, role="source")
        address = dsn_module.describe(source_dsn, role="source")
        if current is None:
            raise ConfigurationError(
                f"the source database {address} has no revision in alembic_version: migrate "
                "the source first, or pass 'head' or a revision id")
        if current not in scripts.revisions:
            raise ConfigurationError(
                f"the source database {address} is at revision {current}, which is not in "
                f"{directory}: the directory is older than the source; ship the newer "
                "revision files")
        return current

    known = ", ".join(sorted(scripts.revisions)[:10])
    try:
        found = scripts.script_directory.revision_map.get_revision(requested)
    except ResolutionError:
        found = None
    except RevisionError as error:
        raise ConfigurationError(
            f"revision {requested!r} is invalid for {directory}: {error}; pass 'head', 'source' "
            "or a full revision id from the directory") from None
    if found is None:
        raise ConfigurationError(
            f"revision {requested!r} is not in {directory}: pass 'head', 'source' or one of "
            f"{known}")
    return str(found.revision)


def pending_steps(scripts: ScriptSet, before: str | None, target: str, *,
                  allow_downgrade: bool,
                  address: dsn_module.DatabaseAddress) -> tuple[list[RevisionFile], bool]:
    """Return the revisions to run, oldest first (newest first for a downgrade)."""
    directory = scripts.migrations_dir
    if before == target:
        return [], False
    if before is not None and before not in scripts.revisions:
        raise TargetAheadError(
            f"the target database {address} is at revision {before}, which is not in "
            f"{directory}: the target is ahead of the directory or on another branch; ship "
            "the newer revision files, or point dbsync at the right directory")

    target_ancestors = scripts.ancestors(target)
    if before is None or before in target_ancestors:
        ids = scripts.revisions_between(target, before)
        return [scripts.revisions[item] for item in ids], False

    before_ancestors = scripts.ancestors(before)
    if target in before_ancestors:
        newer = before_ancestors[:before_ancestors.index(target)]
        if not allow_downgrade:
            raise TargetAheadError(
                f"the target database {address} is at revision {before}, ahead of the "
                f"requested revision {target} by {len(newer)} revision(s) "
                f"({', '.join(newer)}); dbsync never downgrades implicitly: migrate the "
                "source first, or allow downgrades to run their downgrade() functions")
        return [scripts.revisions[item] for item in newer], True

    raise ConfigurationError(
        f"the target database {address} is at revision {before}, which is on a different "
        f"branch from the requested revision {target}: merge the branches first")


def migrate(*, target_dsn: str, source_dsn: str | None, options: MigrateOptions,
            audit: AuditTrail, parent: Operation, sync_id: uuid.UUID) -> MigrateResult:
    """Plan, rehearse or apply the pending revisions on the target, auditing each one.

    ``parent`` is the MIGRATION operation; with any other operation type, migrate opens
    and finishes its own MIGRATION operation under it. Raises MigrationFailedError (with
    the partial MigrateResult as ``error.result``), LockTimeoutError or ConfigurationError.
    """
    scripts = load_scripts(options.migrations_dir)
    target = resolve_target(scripts, options.revision, source_dsn=source_dsn)

    own_operation: Operation | None = None
    if parent.operation_type is not OperationType.MIGRATION:
        own_operation = audit.start(OperationType.MIGRATION, name="migrate", parent=parent)
        parent = own_operation

    engine = make_engine(target_dsn)
    try:
        result = _migrate(scripts, target, target_dsn=target_dsn, options=options,
                          audit=audit, parent=parent, sync_id=sync_id, engine=engine)
    except DbsyncError as error:
        if own_operation is not None:
            partial = getattr(error, "result", None)
            status = (OperationStatus.FAILED
                      if isinstance(partial, MigrateResult) and partial.applied
                      else OperationStatus.ROLLED_BACK)
            audit.finish(own_operation, status, error=dsn_module.redact_text(str(error)))
        raise
    finally:
        engine.dispose()
    if own_operation is not None:
        audit.finish(own_operation, OperationStatus.SUCCESS, metadata=result.to_dict())
    return result


def _migrate(scripts: ScriptSet, target: str, *, target_dsn: str, options: MigrateOptions,
             audit: AuditTrail, parent: Operation, sync_id: uuid.UUID,
             engine: Engine) -> MigrateResult:
    address = dsn_module.describe(target_dsn, role="target")

    # Why: read under the sync lock, so a sync that waited reads the previous one's commit.
    connection = engine.connect()
    try:
        set_timeouts(connection, lock_timeout_ms=options.lock_timeout_ms,
                     statement_timeout_ms=options.statement_timeout_ms)
        before = single_head(current_heads(connection), where=f"the target database {address}")
        has_table = table_exists(connection)
        recorded = read_checksums(connection)
        invalid_before = invalid_indexes(connection)
        connection.rollback()
    except BaseException:
        connection.close()
        raise

    context = RunContext(
        scripts=scripts, options=options, audit=audit, parent=parent, sync_id=sync_id,
        engine=engine, driver=AlembicDriver(scripts, offline_url=public_url(target_dsn)),
        before=before, target=target, steps=[], downgrade=False,
        invalid_before=invalid_before, main_connection=connection,
        server_major=int((connection.dialect.server_version_info or (0,))[0]))
    try:
        return _run(context, target_dsn=target_dsn, address=address, has_table=has_table,
                    recorded=recorded)
    finally:
        context.close()


def _run(context: RunContext, *, target_dsn: str, address: dsn_module.DatabaseAddress,
         has_table: bool, recorded: dict[str, RecordedChecksum]) -> MigrateResult:
    scripts, options, before = context.scripts, context.options, context.before
    assert context.target is not None
    context.steps, context.downgrade = pending_steps(
        scripts, before, context.target, allow_downgrade=options.allow_downgrade,
        address=address)
    context.warnings.extend(scripts.notes)
    reject_merge_downgrade(context)

    # Why: an edited, already-applied revision must stop the run before anything changes.
    applied_files = [scripts.revisions[item] for item in reversed(scripts.ancestors(before))]
    check = check_applied(applied_files, recorded)
    writes = options.dry_run is DryRunMode.OFF
    if writes and not has_table:
        ensure_own_schema(target_dsn)
    if check.untracked:
        ids = ", ".join(item.revision for item in check.untracked)
        if writes:
            with context.connection().begin() as transaction:
                record(transaction.connection, check.untracked, sync_id=context.sync_id,
                       applied_now=False)
            message = (f"recorded the current checksum of {len(check.untracked)} revision(s) "
                       f"applied before dbsync tracked checksums on this target: {ids}")
        else:
            message = (f"{len(check.untracked)} applied revision(s) have no recorded checksum "
                       f"yet ({ids}); the first real run records them")
        logger.info("%s", message)
        context.warnings.append(message)

    if not context.steps:
        logger.info("the target %s is already at revision %s: nothing to migrate",
                    address, before)
        return MigrateResult(
            revision_before=before, revision_after=before, target_revision=context.target,
            outcomes=(), dry_run=options.dry_run, invalid_indexes=context.invalid_before,
            transaction_mode=options.transaction_mode, warnings=tuple(context.warnings))

    if writes and options.transaction_mode is TransactionMode.ALL:
        reject_non_transactional(context)

    logger.info("migrate %s: %s -> %s, %d revision(s), mode %s, dry run %s", address,
                before or "base", context.target, len(context.steps), options.transaction_mode,
                options.dry_run)
    return choose_mode(options)(context)
