"""Condition bookkeeping for DatabaseSync status, following the Kubernetes API conventions.

``Ready`` is the summary (normal-true); ``Reconciling`` and ``Stalled`` are abnormal-true
(kstatus); one condition per pipeline step lets ``kubectl wait`` or an alert target a step.
A condition's ``lastTransitionTime`` changes only when its status changes, and every
condition carries the ``observedGeneration`` it describes.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any


class ConditionType(StrEnum):
    """Condition types the operator writes, in the order they appear in status."""

    READY = "Ready"
    RECONCILING = "Reconciling"
    STALLED = "Stalled"
    MIGRATIONS_APPLIED = "MigrationsApplied"
    SCHEMA_IN_SYNC = "SchemaInSync"
    LEDGER_BALANCED = "LedgerBalanced"
    AUDIT_RECORDED = "AuditRecorded"


class Reason(StrEnum):
    """Stable CamelCase reasons; tools match on these, never on messages."""

    # Ready=True and per-step successes.
    SUCCEEDED = "Succeeded"
    UP_TO_DATE = "UpToDate"
    APPLIED = "Applied"
    IN_SYNC = "InSync"
    BALANCED = "Balanced"
    RECORDED = "Recorded"

    # Work in progress (Reconciling=True).
    SYNCING = "Syncing"
    RECHECKING = "Rechecking"
    RETRYING = "Retrying"

    # Findings that make the resource not Ready without stalling it.
    DRIFT_DETECTED = "DriftDetected"
    LEDGER_UNBALANCED = "LedgerUnbalanced"
    MIGRATIONS_PENDING = "MigrationsPending"
    CRITERIA_FAILED = "CriteriaFailed"
    DRY_RUN = "DryRun"
    NOT_CONFIGURED = "NotConfigured"
    NOT_RUN = "NotRun"
    SUSPENDED = "Suspended"

    # A plan waits for approval (approval.mode Manual): not Ready, nothing in progress.
    APPROVAL_PENDING = "ApprovalPending"
    PLAN_CHANGED = "PlanChanged"
    PLAN_EXPIRED = "PlanExpired"

    # Transient errors, retried with backoff.
    DATABASE_UNREACHABLE = "DatabaseUnreachable"
    LOCK_TIMEOUT = "LockTimeout"
    AUDIT_UNAVAILABLE = "AuditUnavailable"
    SYNC_TIMED_OUT = "SyncTimedOut"
    SYNC_INTERRUPTED = "SyncInterrupted"
    JOB_FAILED = "JobFailed"
    DEADLINE_EXCEEDED = "DeadlineExceeded"
    JOB_DELETED = "JobDeleted"

    # Permanent errors (Stalled=True): a person must act.
    MIGRATION_FAILED = "MigrationFailed"
    INVALID_SPEC = "InvalidSpec"
    CREDENTIALS_NOT_FOUND = "CredentialsNotFound"
    CONFIG_MAP_NOT_FOUND = "ConfigMapNotFound"
    BACKOFF_LIMIT_EXCEEDED = "BackoffLimitExceeded"
    IMAGE_PULL_FAILED = "ImagePullFailed"
    SYNC_FAILED = "SyncFailed"


_ORDER = {condition_type.value: index for index, condition_type in enumerate(ConditionType)}

# Kubernetes limits a condition message to 32768 characters.
MAX_MESSAGE_CHARACTERS = 32768


@dataclass(frozen=True, kw_only=True)
class ConditionUpdate:
    """The new status, reason and message for one condition."""

    type: ConditionType
    status: bool | None
    reason: str
    message: str


def format_time(moment: datetime) -> str:
    """Return ``moment`` as an RFC 3339 UTC timestamp with second precision."""
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def now_utc() -> datetime:
    """Return the current time in UTC."""
    return datetime.now(UTC)


def _status_text(status: bool | None) -> str:
    if status is None:
        return "Unknown"
    return "True" if status else "False"


def apply_updates(
    conditions: Sequence[Mapping[str, Any]] | None,
    updates: Sequence[ConditionUpdate],
    *,
    generation: int | None,
    now: datetime,
) -> list[dict[str, Any]]:
    """Return ``conditions`` with ``updates`` applied, sorted in the standard order.

    A condition whose status stays the same keeps its ``lastTransitionTime``; its reason,
    message and ``observedGeneration`` are still refreshed.  Conditions of types not in
    ``updates`` are kept as they are.
    """
    by_type: dict[str, dict[str, Any]] = {
        str(condition["type"]): dict(condition) for condition in conditions or ()
        if "type" in condition
    }
    timestamp = format_time(now)
    for update in updates:
        status = _status_text(update.status)
        previous = by_type.get(update.type.value)
        unchanged = previous is not None and previous.get("status") == status
        transition_time = (previous.get("lastTransitionTime", timestamp)
                           if unchanged and previous is not None else timestamp)
        condition: dict[str, Any] = {
            "type": update.type.value,
            "status": status,
            "reason": update.reason,
            "message": update.message[:MAX_MESSAGE_CHARACTERS],
            "lastTransitionTime": transition_time,
        }
        if generation is not None:
            condition["observedGeneration"] = generation
        by_type[update.type.value] = condition
    return sorted(by_type.values(), key=lambda item: (_ORDER.get(item["type"], len(_ORDER)),
                                                      item["type"]))


def find_condition(conditions: Sequence[Mapping[str, Any]] | None,
                   condition_type: ConditionType) -> Mapping[str, Any] | None:
    """Return the condition of ``condition_type``, or None."""
    for condition in conditions or ():
        if condition.get("type") == condition_type.value:
            return condition
    return None


def progressing(*, reason: str, message: str) -> list[ConditionUpdate]:
    """Return the updates that mark work in progress: Reconciling, not Ready, not Stalled."""
    return [
        ConditionUpdate(type=ConditionType.READY, status=False, reason=reason, message=message),
        ConditionUpdate(type=ConditionType.RECONCILING, status=True, reason=reason,
                        message=message),
        ConditionUpdate(type=ConditionType.STALLED, status=False, reason=reason,
                        message=message),
    ]


def stalled(*, reason: str, message: str) -> list[ConditionUpdate]:
    """Return the updates for a failure that needs a person: Stalled, not Ready."""
    return [
        ConditionUpdate(type=ConditionType.READY, status=False, reason=reason, message=message),
        ConditionUpdate(type=ConditionType.RECONCILING, status=False, reason=reason,
                        message=message),
        ConditionUpdate(type=ConditionType.STALLED, status=True, reason=reason, message=message),
    ]


def settled(*, ready: bool, reason: str, message: str) -> list[ConditionUpdate]:
    """Return the updates for a finished sync: neither Reconciling nor Stalled."""
    return [
        ConditionUpdate(type=ConditionType.READY, status=ready, reason=reason, message=message),
        ConditionUpdate(type=ConditionType.RECONCILING, status=False, reason=reason,
                        message=message),
        ConditionUpdate(type=ConditionType.STALLED, status=False, reason=reason,
                        message=message),
    ]
