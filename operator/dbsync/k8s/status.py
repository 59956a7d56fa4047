"""Turn a sync's outcome into a verdict and a DatabaseSync status.

The verdict decides what the operator does next.  After a success, or a finding such as
drift that makes the resource not Ready, it does nothing.  After a transient error it retries
with backoff.  After a permanent error, or ``backoffLimit`` failures in a row, it stops until
a person acts.  The status
carries summaries only: counts, names, revisions and ids.  Amounts, SQL and the full diff
stay in the audit trail, found by the sync id.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum
from typing import Any

from dbsync.k8s.conditions import (
    ConditionType,
    ConditionUpdate,
    Reason,
    apply_updates,
    format_time,
    progressing,
    settled,
    stalled,
)
from dbsync.k8s.executor import ChildOutcome

# Kubernetes events and condition messages are read by people: keep them to a few lines.
MAX_MESSAGE_CHARACTERS = 1000


class VerdictKind(StrEnum):
    """Meaning of a finished sync for the resource."""

    SUCCEEDED = "Succeeded"
    NOT_READY = "NotReady"
    TRANSIENT = "Transient"
    PERMANENT = "Permanent"


class Trigger(StrEnum):
    """Cause of a sync, shown in status.lastSync.trigger."""

    CREATE = "Create"
    RESUME = "Resume"
    UPDATE = "Update"
    RUN_AT = "RunAt"
    INTERVAL = "Interval"
    REFERENCE = "Reference"
    RETRY = "Retry"
    APPROVAL = "Approval"


@dataclass(frozen=True, kw_only=True)
class Verdict:
    """The meaning of one sync's outcome, with a condition reason and a message."""

    kind: VerdictKind
    reason: str
    message: str

    @property
    def event_type(self) -> str:
        """``Normal`` for a success, ``Warning`` for everything else."""
        return "Normal" if self.kind is VerdictKind.SUCCEEDED else "Warning"


@dataclass(frozen=True, kw_only=True)
class SyncContext:
    """Facts about one sync that the report does not carry."""

    sync_id: str
    trigger: Trigger
    started_at: datetime
    finished_at: datetime
    generation: int | None
    dry_run: str
    run_migrations: bool
    fail_on_drift: bool
    backoff_limit: int
    run_at: str | None = None


def _shorten(text: str) -> str:
    text = " ".join(text.split())
    if len(text) <= MAX_MESSAGE_CHARACTERS:
        return text
    return text[:MAX_MESSAGE_CHARACTERS - 3] + "..."


def _last_error_line(stderr_tail: str) -> str:
    for line in reversed(stderr_tail.strip().splitlines()):
        if line.strip():
            return line.strip()
    return "no output"


def judge(outcome: ChildOutcome, *, sync_id: str, fail_on_drift: bool,
          timeout_seconds: float) -> Verdict:
    """Return the verdict on a finished child process."""
    if outcome.timed_out:
        return Verdict(
            kind=VerdictKind.TRANSIENT, reason=Reason.SYNC_TIMED_OUT,
            message=(f"sync {sync_id} timed out after {timeout_seconds:.0f} s and was stopped; "
                     "the next sync closes its open audit operations as ABANDONED"))
    report = outcome.report
    if report is None:
        signal_number = outcome.killed_by_signal
        if signal_number is not None:
            return Verdict(
                kind=VerdictKind.TRANSIENT, reason=Reason.SYNC_INTERRUPTED,
                message=(f"sync {sync_id} was killed by signal {signal_number}; the next sync "
                         "closes its open audit operations as ABANDONED"))
        return Verdict(
            kind=VerdictKind.TRANSIENT, reason=Reason.SYNC_FAILED,
            message=_shorten(f"sync {sync_id} exited with code {outcome.exit_code} and no "
                             f"report: {_last_error_line(outcome.stderr_tail)}"))

    error = report.get("error")
    if error:
        kind = VerdictKind.TRANSIENT if error.get("transient") else VerdictKind.PERMANENT
        return Verdict(kind=kind, reason=str(error.get("reason") or Reason.SYNC_FAILED),
                       message=_shorten(f"sync {sync_id}: {error.get('message', '')}"))
    return _judge_criteria(report, sync_id=sync_id, fail_on_drift=fail_on_drift)


_DRIFT_CRITERIA = frozenset({"no_schema_differences", "table_and_column_counts_match"})


def _judge_criteria(report: Mapping[str, Any], *, sync_id: str,
                    fail_on_drift: bool) -> Verdict:
    failed = [criterion for criterion in report.get("criteria", [])
              if criterion.get("counted", True) and not criterion.get("ok")]
    if not fail_on_drift:
        failed = [criterion for criterion in failed if criterion.get("name") not in _DRIFT_CRITERIA]
    if not failed:
        return Verdict(kind=VerdictKind.SUCCEEDED, reason=Reason.SUCCEEDED,
                       message=f"sync {sync_id} succeeded: {_summary(report)}")

    names = {str(criterion.get("name")) for criterion in failed}
    if "migrations_applied" in names:
        reason = Reason.MIGRATIONS_PENDING
    elif "ledger_balanced" in names:
        reason = Reason.LEDGER_UNBALANCED
    elif names & _DRIFT_CRITERIA:
        reason = Reason.DRIFT_DETECTED
    else:
        reason = Reason.CRITERIA_FAILED
    details = "; ".join(f"{criterion.get('name')}: {criterion.get('detail')}"
                        for criterion in failed)
    return Verdict(kind=VerdictKind.NOT_READY, reason=reason,
                   message=_shorten(f"sync {sync_id} finished with failed criteria: {details}"))


def _summary(report: Mapping[str, Any]) -> str:
    parts = []
    migration = report.get("migration")
    if migration:
        parts.append(f"revision {migration.get('revision_after') or 'base'}")
    drift = report.get("drift")
    if drift is not None:
        parts.append(f"{len(drift.get('differences', []))} schema differences")
    ledger = report.get("ledger")
    if ledger is not None:
        parts.append("ledger balanced" if ledger.get("balanced") else "ledger not balanced")
    return ", ".join(parts) or "nothing to check"


def _step_conditions(report: Mapping[str, Any] | None,
                     context: SyncContext) -> list[ConditionUpdate]:
    updates: list[ConditionUpdate] = []
    if report is None:
        return updates
    error = report.get("error") or {}
    steps = {str(step.get("name")): step for step in report.get("steps", [])}

    # MigrationsApplied is left alone by re-checks, which do not run migrations.
    migration = report.get("migration")
    migrate_step = steps.get("migrate")
    if error.get("reason") == Reason.MIGRATION_FAILED:
        updates.append(ConditionUpdate(type=ConditionType.MIGRATIONS_APPLIED, status=False,
                                       reason=Reason.MIGRATION_FAILED,
                                       message=_shorten(str(error.get("message", "")))))
    elif migration and context.dry_run != "off":
        pending = len(migration.get("outcomes", []))
        updates.append(ConditionUpdate(
            type=ConditionType.MIGRATIONS_APPLIED, status=pending == 0, reason=Reason.DRY_RUN,
            message=f"dry run ({context.dry_run}): {pending} revision(s) pending"))
    elif migration:
        reached = migration.get("revision_after") == migration.get("target_revision")
        applied = len(migration.get("applied", []))
        updates.append(ConditionUpdate(
            type=ConditionType.MIGRATIONS_APPLIED, status=reached,
            reason=(Reason.APPLIED if applied else Reason.UP_TO_DATE) if reached
            else Reason.MIGRATIONS_PENDING,
            message=(f"target at {migration.get('revision_after') or 'base'}, requested "
                     f"{migration.get('target_revision') or 'base'}; {applied} applied")))
    elif context.run_migrations and migrate_step is not None and \
            migrate_step.get("result") == "Skipped" and not error:
        updates.append(ConditionUpdate(type=ConditionType.MIGRATIONS_APPLIED, status=None,
                                       reason=Reason.NOT_CONFIGURED,
                                       message="no migrations configured"))

    drift = report.get("drift")
    if drift is not None:
        count = len(drift.get("differences", []))
        updates.append(ConditionUpdate(
            type=ConditionType.SCHEMA_IN_SYNC, status=count == 0,
            reason=Reason.IN_SYNC if count == 0 else Reason.DRIFT_DETECTED,
            message=f"{count} schema differences between source and target"))

    ledger = report.get("ledger")
    ledger_step = steps.get("ledger")
    if ledger is not None:
        balanced = bool(ledger.get("balanced"))
        failed = _failed_checks(ledger)
        updates.append(ConditionUpdate(
            type=ConditionType.LEDGER_BALANCED, status=balanced,
            reason=Reason.BALANCED if balanced else Reason.LEDGER_UNBALANCED,
            message=("every ledger check passed" if balanced
                     else "failed checks: " + ", ".join(failed))))
    elif ledger_step is not None and ledger_step.get("result") == "Skipped" and not error:
        updates.append(ConditionUpdate(type=ConditionType.LEDGER_BALANCED, status=None,
                                       reason=Reason.NOT_CONFIGURED,
                                       message="no ledger configured"))

    audited = {str(criterion.get("name")): criterion for criterion in report.get("criteria", [])}
    if error.get("reason") == Reason.AUDIT_UNAVAILABLE:
        updates.append(ConditionUpdate(type=ConditionType.AUDIT_RECORDED, status=False,
                                       reason=Reason.AUDIT_UNAVAILABLE,
                                       message=_shorten(str(error.get("message", "")))))
    elif "every_step_audited" in audited:
        criterion = audited["every_step_audited"]
        updates.append(ConditionUpdate(
            type=ConditionType.AUDIT_RECORDED, status=bool(criterion.get("ok")),
            reason=Reason.RECORDED if criterion.get("ok") else Reason.CRITERIA_FAILED,
            message=f"sync {context.sync_id}: {criterion.get('detail', '')}"))
    return updates


def _failed_checks(ledger: Mapping[str, Any]) -> list[str]:
    if "failed_checks" in ledger:
        return [str(name) for name in ledger["failed_checks"]]
    return [str(check.get("name")) for check in ledger.get("checks", [])
            if str(check.get("status", "")).upper() not in ("PASS", "PASSED", "SKIPPED")]


def _summary_fields(report: Mapping[str, Any], previous: Mapping[str, Any]) -> dict[str, Any]:
    fields: dict[str, Any] = {}
    migration = report.get("migration")
    if migration:
        fields["migration"] = {
            "currentRevision": migration.get("revision_after"),
            "targetRevision": migration.get("target_revision"),
            "applied": len(migration.get("applied", [])),
        }
    drift = report.get("drift")
    if drift is not None:
        differences = drift.get("differences", [])
        by_kind = Counter(str(difference.get("kind", "unknown")) for difference in differences)
        fields["drift"] = {"inSync": not differences, "differences": len(differences),
                           "byKind": dict(sorted(by_kind.items()))}
    ledger = report.get("ledger")
    if ledger is not None:
        fields["ledger"] = {"balanced": bool(ledger.get("balanced")),
                            "failedChecks": _failed_checks(ledger)}
    elif "ledger" in previous and report.get("error") is None:
        # The ledger configuration was removed: an old verdict would mislead.
        fields["ledger"] = None
    return fields


def _last_sync(report: Mapping[str, Any] | None, verdict: Verdict,
               context: SyncContext) -> dict[str, Any]:
    duration_ms = max(0, int((context.finished_at - context.started_at).total_seconds() * 1000))
    if report is None or report.get("error"):
        result = "Error"
    else:
        result = "Succeeded" if verdict.kind is VerdictKind.SUCCEEDED else "Failed"
    steps = [
        {"name": str(step.get("name")), "operationId": step.get("operation_id"),
         "result": str(step.get("result")), "durationMs": int(step.get("duration_ms") or 0)}
        for step in (report or {}).get("steps", [])
    ]
    return {
        "syncId": context.sync_id,
        "startedAt": format_time(context.started_at),
        "finishedAt": format_time(context.finished_at),
        "durationMs": duration_ms,
        "dryRun": context.dry_run,
        "result": result,
        "trigger": context.trigger.value,
        "steps": steps,
    }


def escalate(verdict: Verdict, *, failures: int, backoff_limit: int) -> Verdict:
    """Turn a transient verdict into BackoffLimitExceeded once ``failures`` reach the limit."""
    if verdict.kind is not VerdictKind.TRANSIENT or failures < backoff_limit:
        return verdict
    return Verdict(
        kind=VerdictKind.PERMANENT, reason=Reason.BACKOFF_LIMIT_EXCEEDED,
        message=_shorten(f"{failures} consecutive failed syncs reached backoffLimit "
                         f"{backoff_limit}; last: {verdict.reason}: {verdict.message}"))


def finished_status(previous: Mapping[str, Any], *, report: Mapping[str, Any] | None,
                    verdict: Verdict, context: SyncContext) -> dict[str, Any]:
    """Return the status to write after a sync: conditions, summaries, failures and echoes."""
    if verdict.kind is VerdictKind.TRANSIENT:
        updates = progressing(reason=verdict.reason, message=verdict.message)
    elif verdict.kind is VerdictKind.PERMANENT:
        updates = stalled(reason=verdict.reason, message=verdict.message)
    else:
        updates = settled(ready=verdict.kind is VerdictKind.SUCCEEDED, reason=verdict.reason,
                          message=verdict.message)
    updates.extend(_step_conditions(report, context))

    errored = verdict.kind in (VerdictKind.TRANSIENT, VerdictKind.PERMANENT)
    status: dict[str, Any] = {
        "observedGeneration": context.generation,
        "conditions": apply_updates(previous.get("conditions"), updates,
                                    generation=context.generation, now=context.finished_at),
        "lastSync": _last_sync(report, verdict, context),
        "failures": int(previous.get("failures") or 0) + 1 if errored else 0,
    }
    if report is not None:
        status.update(_summary_fields(report, previous))
    if context.run_at is not None:
        status["lastHandledRunAt"] = context.run_at
    return status


def problem_status(previous: Mapping[str, Any], *, verdict: Verdict, generation: int | None,
                   now: datetime, run_at: str | None = None) -> dict[str, Any]:
    """Return the status for a sync that could not start (invalid spec, missing Secret)."""
    if verdict.kind is VerdictKind.TRANSIENT:
        updates = progressing(reason=verdict.reason, message=verdict.message)
    else:
        updates = stalled(reason=verdict.reason, message=verdict.message)
    status: dict[str, Any] = {
        "observedGeneration": generation,
        "conditions": apply_updates(previous.get("conditions"), updates, generation=generation,
                                    now=now),
        "failures": int(previous.get("failures") or 0) + 1,
    }
    if run_at is not None:
        status["lastHandledRunAt"] = run_at
    return status


def starting_status(previous: Mapping[str, Any], *, reason: str, message: str,
                    generation: int | None, now: datetime) -> dict[str, Any]:
    """Return the status written before long work: Reconciling=True, Ready=False.

    A new generation starts a new count of failures, so ``backoffLimit`` counts the
    consecutive failures of the current spec only.
    """
    status: dict[str, Any] = {
        "observedGeneration": generation,
        "conditions": apply_updates(previous.get("conditions"),
                                    progressing(reason=reason, message=message),
                                    generation=generation, now=now),
    }
    if previous.get("observedGeneration") != generation:
        status["failures"] = 0
    return status


def suspended_status(previous: Mapping[str, Any], *, generation: int | None,
                     now: datetime) -> dict[str, Any]:
    """Return the status of a suspended resource: not Ready, nothing in progress."""
    message = "spec.suspend is true: no syncs run until it is false"
    return {
        "observedGeneration": generation,
        "conditions": apply_updates(
            previous.get("conditions"),
            settled(ready=False, reason=Reason.SUSPENDED, message=message),
            generation=generation, now=now),
    }
