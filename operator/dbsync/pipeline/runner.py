"""The runner: one sync as preflight, lock, migrate, diff, ledger and report, each audited.

Every step is timed and recorded as an audit operation under the sync's root operation.
The runner raises only for problems found before the audit trail is open, such as bad options
or an unreachable target. Everything after that ends in a :class:`SyncReport` whose ``error``
names what stopped the sync, so the caller always has the sync id to look up.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg
import structlog

from dbsync.pipeline import dsn as dsn_module
from dbsync.pipeline.audit import (
    AuditContext,
    AuditTrail,
    Operation,
    OperationStatus,
    OperationType,
    Requester,
    fetch_sync_operations,
)
from dbsync.pipeline.diff import DiffOptions, DiffResult, diff_databases
from dbsync.pipeline.errors import (
    EXIT_FAILED,
    ConfigurationError,
    ConnectionFailedError,
    DbsyncError,
)
from dbsync.pipeline.ledger import CheckStatus, LedgerResult, run_ledger_checks
from dbsync.pipeline.lock import SyncLock
from dbsync.pipeline.logs import register_secret
from dbsync.pipeline.migrate import (
    DryRunMode,
    MigrateOptions,
    MigrateResult,
    load_scripts,
    migrate,
)
from dbsync.pipeline.plan import (
    PlanChangedError,
    SyncPlan,
    compute_plan,
    describe_changes,
    find_recorded_plan,
)
from dbsync.pipeline.report import (
    Criterion,
    ErrorReport,
    StepReport,
    StepResult,
    SyncReport,
)
from dbsync.pipeline.request import SyncRequest

logger = structlog.get_logger("dbsync.runner")

# Oldest server version the pipeline supports (PostgreSQL 14).
MINIMUM_SERVER_VERSION_NUM = 140000


@dataclass
class _RunState:
    """Step outputs collected so far, turned into the report at the end."""

    steps: list[StepReport] = field(default_factory=list)
    migration: MigrateResult | None = None
    diff: DiffResult | None = None
    ledger: LedgerResult | None = None
    plan: SyncPlan | None = None
    error: ErrorReport | None = None


def _error_report(error: DbsyncError, *secrets: str) -> ErrorReport:
    exit_code = error.exit_code if error.exit_code != 0 else EXIT_FAILED
    return ErrorReport(
        reason=error.reason,
        message=dsn_module.redact_text(str(error), *secrets),
        transient=error.transient,
        exit_code=exit_code,
    )


def _requester(request: SyncRequest) -> Requester:
    if request.requester is None:
        return Requester.from_cli()
    return Requester(**request.requester.model_dump())


def _check_request(request: SyncRequest) -> None:
    """Validate local inputs (files, DSN syntax) before touching any database."""
    dsn_module.parse(request.source_dsn, role="source")
    dsn_module.parse(request.target_dsn, role="target")
    if request.audit_dsn is not None:
        dsn_module.parse(request.audit_dsn, role="audit")
    if request.run_migrations and request.migrations_dir is not None:
        load_scripts(Path(request.migrations_dir))


def _server_version(dsn: str, *, role: str, timeout_seconds: int) -> int:
    with dsn_module.connect(dsn, role=role, connect_timeout_seconds=timeout_seconds,
                            autocommit=True) as connection:
        version = int(connection.info.server_version)
    if version < MINIMUM_SERVER_VERSION_NUM:
        raise ConfigurationError(
            f"the {role} server runs PostgreSQL {version // 10000}, but dbsync needs 14 or "
            "newer: upgrade the server or point dbsync at another one")
    return version


class _Steps:
    """Runs steps as audited, timed operations under the sync's root operation."""

    def __init__(self, *, audit: AuditTrail, root: Operation, state: _RunState,
                 secrets: tuple[str, ...]) -> None:
        self.audit = audit
        self.root = root
        self.state = state
        self.secrets = secrets

    def _record_error(self, handle: _StepHandle, error: DbsyncError) -> None:
        handle.status = (OperationStatus.TIMEOUT if error.reason == "LockTimeout"
                         else OperationStatus.FAILED)
        handle.result = StepResult.ERROR
        handle.error = dsn_module.redact_text(str(error), *self.secrets)
        self.state.error = _error_report(error, *self.secrets)

    @contextmanager
    def step(self, name: str, operation_type: OperationType) -> Iterator[_StepHandle]:
        """Audit one step: START before, FINISH with the handle's status after."""
        operation = self.audit.start(operation_type, name=name, parent=self.root)
        handle = _StepHandle(operation=operation)
        started = time.monotonic()
        log = logger.bind(step=name, operation_id=str(operation.operation_id))
        log.info("step started")
        try:
            yield handle
        except DbsyncError as error:
            self._record_error(handle, error)
        except psycopg.OperationalError as error:
            # A connection lost mid-step is transient: the operator retries with backoff.
            lost = ConnectionFailedError(
                f"lost the database connection during the {name} step: "
                f"{str(error).strip() or type(error).__name__}")
            lost.exit_code = EXIT_FAILED
            self._record_error(handle, lost)
        except BaseException as error:
            handle.status = OperationStatus.FAILED
            handle.result = StepResult.ERROR
            handle.error = dsn_module.redact_text(
                f"{type(error).__name__}: {error}", *self.secrets)
            raise
        finally:
            duration_ms = self.audit.finish(
                operation, handle.status, error=handle.error,
                schema_changes=handle.schema_changes, metadata=handle.metadata)
            if duration_ms is None:
                duration_ms = int((time.monotonic() - started) * 1000)
            self.state.steps.append(StepReport(
                name=name, result=handle.result, duration_ms=duration_ms,
                operation_id=str(operation.operation_id), message=handle.message))
            log.info("step finished", result=handle.result.value, duration_ms=duration_ms,
                     status=handle.status.value)


@dataclass
class _StepHandle:
    """Mutable outcome of a step, filled in by the step's body."""

    operation: Operation
    status: OperationStatus = OperationStatus.SUCCESS
    result: StepResult = StepResult.SUCCEEDED
    error: str | None = None
    message: str = ""
    schema_changes: dict[str, Any] | None = None
    metadata: dict[str, Any] | None = None


def run_sync(request: SyncRequest, *,
             on_step: Callable[[str], None] | None = None) -> SyncReport:
    """Run one sync and return its report.

    Raises :class:`DbsyncError` only when nothing could be audited: invalid options, or a
    target (or audit database) that cannot be reached or written.
    """
    sync_id = request.sync_id or uuid.uuid4()
    secrets = tuple(secret for secret in (
        dsn_module.password_of(request.source_dsn),
        dsn_module.password_of(request.target_dsn),
        dsn_module.password_of(request.audit_dsn or ""),
    ) if secret)
    for secret in secrets:
        register_secret(secret)
    structlog.contextvars.bind_contextvars(sync_id=str(sync_id), trace_id=sync_id.hex)
    try:
        return _run(request, sync_id=sync_id, secrets=secrets, on_step=on_step)
    finally:
        structlog.contextvars.unbind_contextvars("sync_id", "trace_id")


def _run(request: SyncRequest, *, sync_id: uuid.UUID, secrets: tuple[str, ...],
         on_step: Callable[[str], None] | None) -> SyncReport:
    # Local checks first: a typo in a path or DSN must not leave a trace on any database.
    _check_request(request)
    timeout_seconds = request.connect_timeout_seconds

    # The target must be reachable before the audit trail can be opened on it.
    target_version = _server_version(request.target_dsn, role="target",
                                     timeout_seconds=timeout_seconds)
    audit_dsn = request.audit_dsn or request.target_dsn
    context = AuditContext(
        sync_id=sync_id,
        requester=_requester(request),
        database=dsn_module.describe(request.target_dsn, role="target"),
        approver=request.approver,
        traceparent=request.traceparent,
        plan_hash=request.approved_plan,
    )

    state = _RunState()
    with ExitStack() as stack:
        # Fail closed: if the audit table cannot be written, AuditTrail raises and nothing runs.
        audit = stack.enter_context(AuditTrail(
            dsn=audit_dsn, context=context, connect_timeout_seconds=timeout_seconds))
        root = audit.start(OperationType.SYNC, name="sync", metadata={
            "dry_run": request.dry_run.value,
            "revision_requested": request.revision,
            "run_migrations": request.run_migrations,
            "target": str(context.database),
            "source": str(dsn_module.describe(request.source_dsn, role="source")),
            "target_server_version": target_version,
        })
        steps = _Steps(audit=audit, root=root, state=state, secrets=secrets)

        def announce(name: str) -> None:
            if on_step is not None:
                on_step(name)

        # Preflight: the source must be reachable too, on a supported version.
        announce("preflight")
        with steps.step("preflight", OperationType.PREFLIGHT) as handle:
            source_version = _server_version(request.source_dsn, role="source",
                                             timeout_seconds=timeout_seconds)
            handle.metadata = {"source_server_version": source_version,
                               "target_server_version": target_version,
                               "abandoned_operations_closed": audit.abandoned_closed}

        try:
            if state.error is None:
                _run_locked_steps(request, steps=steps, state=state, sync_id=sync_id,
                                  announce=announce)
            report = _build_report(request, sync_id=sync_id, state=state, audit_dsn=audit_dsn)
        except BaseException as error:
            # An unexpected error still closes the sync's root operation before it propagates.
            audit.finish(root, OperationStatus.FAILED, error=dsn_module.redact_text(
                f"{type(error).__name__}: {error}", *secrets))
            raise

        root_status = OperationStatus.SUCCESS if report.exit_code == 0 else OperationStatus.FAILED
        audit.finish(root, root_status, error=report.error.message if report.error else None,
                     metadata={"result": report.result.value, "exit_code": report.exit_code,
                               "criteria": [criterion.to_dict() for criterion in report.criteria]})
        logger.info("sync finished", result=report.result.value, exit_code=report.exit_code,
                    steps={step.name: step.result.value for step in report.steps})
        return report


def _run_locked_steps(request: SyncRequest, *, steps: _Steps, state: _RunState,
                      sync_id: uuid.UUID, announce: Callable[[str], None]) -> None:
    """Take the target's advisory lock, then migrate, diff and check the ledger under it."""
    # The lock is held until the checks are done, so they see the state this sync produced.
    with ExitStack() as lock_stack:
        announce("lock")
        with steps.step("lock", OperationType.PREFLIGHT) as handle:
            lock = lock_stack.enter_context(SyncLock(
                dsn=request.target_dsn, lock_wait_seconds=request.lock_wait_seconds,
                connect_timeout_seconds=request.connect_timeout_seconds))
            handle.message = f"advisory lock {lock.key} held by backend {lock.backend_pid}"
        if state.error is not None:
            return

        # An approved plan must still be the plan now, with the lock held, or nothing runs.
        if request.approved_plan is not None:
            announce("plan")
            request = _plan_step(request, steps=steps, state=state)
            if state.error is not None:
                return

        announce("migrate")
        _migrate_step(request, steps=steps, state=state, sync_id=sync_id, lock=lock)
        announce("diff")
        _diff_step(request, steps=steps, state=state)
        announce("ledger")
        _ledger_step(request, steps=steps, state=state)


def _plan_step(request: SyncRequest, *, steps: _Steps, state: _RunState) -> SyncRequest:
    """Recompute the plan and compare its hash with the approved one.

    Returns the request pinned to the plan's resolved revision, so that a source moving on
    after the check cannot change what is applied.
    """
    approved_hash = request.approved_plan
    assert approved_hash is not None
    with steps.step("plan", OperationType.PLAN) as handle:
        current = compute_plan(
            target_dsn=request.target_dsn, source_dsn=request.source_dsn,
            migrations_dir=(Path(request.migrations_dir) if request.run_migrations
                            and request.migrations_dir is not None else None),
            revision=request.revision, allow_downgrade=request.allow_downgrade,
            ledger=request.ledger, diff_options=_diff_options(request))
        state.plan = current
        handle.metadata = {"approved_plan": approved_hash, "current_plan": current.hash,
                           "plan_matches": current.hash == approved_hash,
                           "plan": current.to_dict()}
        if current.hash != approved_hash:
            approved = find_recorded_plan(request.audit_dsn or request.target_dsn,
                                          approved_hash)
            changes = describe_changes(approved, current)
            advice = ("" if approved is None
                      else ". Review the new plan and approve its hash")
            raise PlanChangedError(
                f"the plan changed since it was approved, so nothing was applied: approved "
                f"{approved_hash}, now {current.hash}; changes: {'; '.join(changes)}{advice}",
                approved_hash=approved_hash, current_hash=current.hash, changes=changes)
        handle.message = f"plan {current.hash} matches the approved plan"
    if current.target_revision is None or current.target_revision == request.revision:
        return request
    return request.model_copy(update={"revision": current.target_revision})


def _diff_options(request: SyncRequest) -> DiffOptions:
    return DiffOptions(
        ignore_schemas=tuple(request.diff.ignore_schemas),
        ignore_patterns=tuple(request.diff.ignore_patterns),
        ignore_kinds=tuple(request.diff.ignore_kinds),
        connect_timeout_seconds=request.connect_timeout_seconds,
    )


def _migrate_step(request: SyncRequest, *, steps: _Steps, state: _RunState,
                  sync_id: uuid.UUID, lock: SyncLock) -> None:
    with steps.step("migrate", OperationType.MIGRATION) as handle:
        if not request.run_migrations or request.migrations_dir is None:
            handle.status = OperationStatus.SKIPPED
            handle.result = StepResult.SKIPPED
            handle.message = ("no migrations directory given" if request.migrations_dir is None
                              else "re-check only: migrations not requested")
            return

        # A lock session killed since the lock step would let another sync migrate too.
        lock.ensure_held()

        options_fields: dict[str, Any] = {
            "migrations_dir": Path(request.migrations_dir),
            "revision": request.revision,
            "transaction_mode": request.transaction_mode,
            "dry_run": request.dry_run,
            "allow_downgrade": request.allow_downgrade,
        }
        if request.lock_timeout_ms is not None:
            options_fields["lock_timeout_ms"] = request.lock_timeout_ms
        if request.statement_timeout_ms is not None:
            options_fields["statement_timeout_ms"] = request.statement_timeout_ms

        try:
            result = migrate(
                target_dsn=request.target_dsn, source_dsn=request.source_dsn,
                options=MigrateOptions(**options_fields), audit=steps.audit,
                parent=handle.operation, sync_id=sync_id)
        except DbsyncError as error:
            partial = getattr(error, "result", None)
            if isinstance(partial, MigrateResult):
                state.migration = partial
                handle.metadata = partial.to_dict()
                if not partial.applied:
                    handle.status = OperationStatus.ROLLED_BACK
            handle.result = StepResult.ERROR
            handle.error = dsn_module.redact_text(str(error), *steps.secrets)
            state.error = _error_report(error, *steps.secrets)
            if handle.status is OperationStatus.SUCCESS:
                handle.status = OperationStatus.FAILED
            return

        state.migration = result
        handle.metadata = result.to_dict()
        verb = "planned" if request.dry_run is not DryRunMode.OFF else "applied"
        count = len(result.outcomes) if request.dry_run is not DryRunMode.OFF else len(
            result.applied)
        handle.message = f"{count} revision(s) {verb}; now at {result.revision_after}"


def _diff_step(request: SyncRequest, *, steps: _Steps, state: _RunState) -> None:
    with steps.step("diff", OperationType.SCHEMA_CHECK) as handle:
        if state.error is not None:
            handle.status = OperationStatus.SKIPPED
            handle.result = StepResult.SKIPPED
            handle.message = "skipped after an earlier error"
            return
        result = diff_databases(source_dsn=request.source_dsn, target_dsn=request.target_dsn,
                                options=_diff_options(request))
        state.diff = result
        handle.schema_changes = result.to_dict()
        handle.message = f"{len(result.differences)} schema differences"
        if not result.in_sync:
            handle.status = OperationStatus.FAILED
            handle.result = StepResult.FAILED


def _ledger_step(request: SyncRequest, *, steps: _Steps, state: _RunState) -> None:
    with steps.step("ledger", OperationType.LEDGER_INTEGRITY) as handle:
        if request.ledger is None:
            handle.status = OperationStatus.SKIPPED
            handle.result = StepResult.SKIPPED
            handle.message = "no ledger configuration given"
            return
        if state.error is not None:
            handle.status = OperationStatus.SKIPPED
            handle.result = StepResult.SKIPPED
            handle.message = "skipped after an earlier error"
            return
        # The ledger model describes the migrated schema, which a dry run has not built yet.
        pending = state.migration is not None and request.dry_run is not DryRunMode.OFF and (
            state.migration.revision_before != state.migration.target_revision)
        if pending:
            handle.status = OperationStatus.SKIPPED
            handle.result = StepResult.SKIPPED
            handle.message = "dry run with pending revisions: the ledger is checked after them"
            return
        result = run_ledger_checks(target_dsn=request.target_dsn, config=request.ledger,
                                   source_dsn=request.source_dsn)
        state.ledger = result
        # Amounts go to the audit row only; the report and logs carry ids and counts.
        handle.metadata = result.to_dict(include_amounts=True)
        if result.balanced:
            handle.message = "ledger balanced"
            return
        handle.result = StepResult.FAILED
        handle.message = "failed checks: " + ", ".join(result.failed_checks)
        timed_out = any(check.status is CheckStatus.TIMEOUT for check in result.checks)
        handle.status = OperationStatus.TIMEOUT if timed_out else OperationStatus.FAILED


def _build_report(request: SyncRequest, *, sync_id: uuid.UUID, state: _RunState,
                  audit_dsn: str) -> SyncReport:
    """Judge the success criteria from what the steps produced."""
    dry_run = request.dry_run is not DryRunMode.OFF
    criteria: list[Criterion] = []

    migration = state.migration
    if not request.run_migrations or request.migrations_dir is None:
        criteria.append(Criterion(name="migrations_applied", ok=True,
                                  detail="migrations not requested", counted=False))
    elif migration is None:
        criteria.append(Criterion(name="migrations_applied", ok=False,
                                  detail="the migrate step did not complete"))
    elif dry_run:
        criteria.append(Criterion(
            name="migrations_applied", ok=True, counted=False,
            detail=f"dry run: {len(migration.outcomes)} revision(s) pending, none applied"))
    else:
        reached = migration.revision_after == migration.target_revision
        criteria.append(Criterion(
            name="migrations_applied", ok=reached,
            detail=f"target at {migration.revision_after}, wanted {migration.target_revision}"))

    diff = state.diff
    if diff is None:
        criteria.append(Criterion(name="table_and_column_counts_match", ok=False,
                                  detail="the diff step did not run", counted=not dry_run))
        criteria.append(Criterion(name="no_schema_differences", ok=False,
                                  detail="the diff step did not run", counted=not dry_run))
    else:
        tables = diff.summary.get("tables", {})
        columns = diff.summary.get("columns", {})
        counts_match = (tables.get("source") == tables.get("target")
                        and columns.get("source") == columns.get("target"))
        criteria.append(Criterion(
            name="table_and_column_counts_match", ok=counts_match, counted=not dry_run,
            detail=(f"tables {tables.get('source')}/{tables.get('target')}, columns "
                    f"{columns.get('source')}/{columns.get('target')} (source/target)")))
        criteria.append(Criterion(
            name="no_schema_differences", ok=diff.in_sync, counted=not dry_run,
            detail=f"{len(diff.differences)} schema differences"))

    if request.ledger is None:
        criteria.append(Criterion(name="ledger_balanced", ok=True,
                                  detail="no ledger configuration given", counted=False))
    elif state.ledger is None:
        skipped_by_dry_run = dry_run and state.error is None
        criteria.append(Criterion(
            name="ledger_balanced", ok=False, counted=not skipped_by_dry_run,
            detail=("dry run: checked once the pending revisions are applied"
                    if skipped_by_dry_run else "the ledger step did not run")))
    else:
        criteria.append(Criterion(
            name="ledger_balanced", ok=state.ledger.balanced,
            detail=("all checks passed" if state.ledger.balanced
                    else "failed: " + ", ".join(state.ledger.failed_checks))))

    # Every step must have both its START and its FINISH event in the trail.
    operations = fetch_sync_operations(audit_dsn, sync_id)
    finished_steps = {
        str(row.get("name")) for row in operations
        if row.get("parent_span_id") is not None and row.get("status") not in (
            None, "IN_PROGRESS")
    }
    missing = [step.name for step in state.steps if step.name not in finished_steps]
    criteria.append(Criterion(
        name="every_step_audited", ok=not missing,
        detail=("all steps have START and FINISH events" if not missing
                else "missing FINISH events for: " + ", ".join(missing))))

    criteria.append(Criterion(
        name="no_errors", ok=state.error is None,
        detail="no step raised an error" if state.error is None else state.error.reason))

    return SyncReport(
        sync_id=str(sync_id),
        trace_id=sync_id.hex,
        dry_run=request.dry_run.value,
        steps=tuple(state.steps),
        criteria=tuple(criteria),
        migration=migration.to_dict() if migration else None,
        drift=diff.to_dict() if diff else None,
        ledger=state.ledger.to_dict(include_amounts=False) if state.ledger else None,
        plan=state.plan.summary() if state.plan else None,
        error=state.error,
        audit_operations=tuple(operations),
    )
