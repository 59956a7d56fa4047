"""The approval gate of ``spec.approval.mode: Manual``: which plan waits, and who approved it.

With Manual approval a full sync first computes its plan (``dbsync plan``), publishes the
plan's summary and hash in ``status.plan`` and waits with ``Ready=False`` and reason
``ApprovalPending``.  A plan is approved by its hash, in ``spec.approval.approvedPlan``
(committed through Git, so the pull request review is the approval) or in the
``dbsync.io/approved-plan`` annotation.  The sync then runs with that hash, and the pipeline
recomputes the plan under the target's advisory lock and applies nothing when it differs.

Two rules keep an approval from outliving the plan it was given for, because the plan hash
leaves out the creation time and a fresh plan of an unchanged target has the same hash:

- the operator removes the approval annotations whenever it acts on them or publishes a new
  plan, so an annotation approves at most one published plan;
- ``spec.approval.approvedPlan`` counts only when the spec generation that carries it is
  newer than the generation the plan was published for.

This module decides and builds status fields; :mod:`dbsync.k8s.reconcile` runs the
``dbsync plan`` and ``dbsync run`` children, and its callers write status and annotations.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from typing import Any
from urllib.parse import quote

from dbsync.k8s.conditions import Reason, apply_updates, format_time, settled
from dbsync.k8s.models import (
    APPROVED_BY_ANNOTATION,
    APPROVED_PLAN_ANNOTATION,
    GROUP,
    PLURAL,
    VERSION,
    ApprovalMode,
    DatabaseSyncSpec,
)
from dbsync.k8s.status import Trigger
from dbsync.pipeline.migrate_model import DryRunMode

_PLAN_HASH = re.compile(r"^[0-9a-f]{64}$")

# Approver names come from an annotation anyone with patch rights can write: keep them short
# and printable before they reach the audit trail.
MAX_APPROVER_CHARACTERS = 253

UNKNOWN_APPROVER = "unknown"

# The managedFields paths (fieldsV1) of the two places an approval can come from.
_ANNOTATION_FIELD_PATH = ("f:metadata", "f:annotations", f"f:{APPROVED_PLAN_ANNOTATION}")
_SPEC_FIELD_PATH = ("f:spec", "f:approval", "f:approvedPlan")

WAITING_REASONS = frozenset({Reason.APPROVAL_PENDING, Reason.PLAN_CHANGED,
                             Reason.PLAN_EXPIRED})


class ApprovalSource(StrEnum):
    """Origin of the approving hash."""

    SPEC = "Spec"
    ANNOTATION = "Annotation"


class ApprovalAction(StrEnum):
    """Next step of a full sync of a Manual resource."""

    PUBLISH = "Publish"
    WAIT = "Wait"
    APPLY = "Apply"


@dataclass(frozen=True, kw_only=True)
class Approval:
    """An approval that matches the published plan."""

    plan_hash: str
    source: ApprovalSource
    approver: str


@dataclass(frozen=True, kw_only=True)
class ApprovalDecision:
    """The gate's decision, with the Ready reason and message while the sync waits."""

    action: ApprovalAction
    reason: str
    message: str
    approval: Approval | None = None
    # Whether a waiting resource drops an approval annotation that does not match its plan.
    reject_annotation: bool = False


def gate_applies(spec: DatabaseSyncSpec, *, run_migrations: bool) -> bool:
    """Return whether a sync must pass the approval gate.

    Only runs that may change the target wait: re-checks without migrations and dry runs
    change nothing.
    """
    return (spec.approval.mode is ApprovalMode.MANUAL and run_migrations
            and spec.dry_run is DryRunMode.OFF)


def published_plan(status: Mapping[str, Any]) -> Mapping[str, Any] | None:
    """Return ``status.plan`` when it contains a plan hash, else None."""
    plan = status.get("plan")
    if isinstance(plan, Mapping) and isinstance(plan.get("hash"), str):
        return plan
    return None


def _annotations(body: Mapping[str, Any]) -> Mapping[str, Any]:
    return (body.get("metadata") or {}).get("annotations") or {}


def annotation_hash(body: Mapping[str, Any]) -> str | None:
    """Return the ``dbsync.io/approved-plan`` value when it is a well-formed hash."""
    value = _annotations(body).get(APPROVED_PLAN_ANNOTATION)
    if not isinstance(value, str):
        return None
    value = value.strip()
    return value if _PLAN_HASH.match(value) else None


def has_approval_annotations(body: Mapping[str, Any]) -> bool:
    """Return whether either approval annotation is set."""
    annotations = _annotations(body)
    return APPROVED_PLAN_ANNOTATION in annotations or APPROVED_BY_ANNOTATION in annotations


def _printable(text: str) -> str:
    cleaned = "".join(character if character.isprintable() else "?" for character in text)
    return cleaned.strip()[:MAX_APPROVER_CHARACTERS]


def _owns_path(fields: Any, path: Sequence[str]) -> bool:
    node = fields
    for key in path:
        if not isinstance(node, Mapping) or key not in node:
            return False
        node = node[key]
    return True


def approver_of(body: Mapping[str, Any], source: ApprovalSource) -> str:
    """Return who approved, as far as the resource shows it, for the audit trail.

    The first found of: the ``dbsync.io/approved-by`` annotation, the field manager and
    operation that last wrote the approving field (from ``managedFields``), or ``unknown``.
    The annotation is written by the client, so only an admission webhook that stamps the
    authenticated user makes it trustworthy.  The text names which source it came from.
    """
    named = _annotations(body).get(APPROVED_BY_ANNOTATION)
    if isinstance(named, str) and _printable(named):
        return f"{_printable(named)} (from the {APPROVED_BY_ANNOTATION} annotation)"

    path = _ANNOTATION_FIELD_PATH if source is ApprovalSource.ANNOTATION else _SPEC_FIELD_PATH
    entries = (body.get("metadata") or {}).get("managedFields") or []
    owners = [entry for entry in entries
              if isinstance(entry, Mapping) and _owns_path(entry.get("fieldsV1"), path)]
    if owners:
        # The newest writer is the one that set the value now in place.
        newest = max(owners, key=lambda entry: str(entry.get("time") or ""))
        manager = _printable(str(newest.get("manager") or UNKNOWN_APPROVER))
        operation = _printable(str(newest.get("operation") or "Update"))
        return f"{manager} (field manager, {operation}, from managedFields)"
    return UNKNOWN_APPROVER


def matching_approval(body: Mapping[str, Any], spec: DatabaseSyncSpec,
                      plan: Mapping[str, Any]) -> Approval | None:
    """Return the approval of the published ``plan``, or None when nothing approves it."""
    plan_hash = str(plan.get("hash"))
    if annotation_hash(body) == plan_hash:
        return Approval(plan_hash=plan_hash, source=ApprovalSource.ANNOTATION,
                        approver=approver_of(body, ApprovalSource.ANNOTATION))

    # A spec approval must have been committed after the plan was published: a value that
    # was already there when the plan was published approved an earlier plan.
    generation = (body.get("metadata") or {}).get("generation")
    plan_generation = plan.get("generation")
    newer = (isinstance(generation, int) and isinstance(plan_generation, int)
             and generation > plan_generation)
    if spec.approval.approved_plan == plan_hash and newer:
        return Approval(plan_hash=plan_hash, source=ApprovalSource.SPEC,
                        approver=approver_of(body, ApprovalSource.SPEC))
    return None


def parse_time(text: str) -> datetime | None:
    """Return an RFC 3339 timestamp as an aware datetime, or None when it is not one."""
    try:
        parsed = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        return None
    return parsed if parsed.tzinfo is not None else parsed.replace(tzinfo=UTC)


def expires_at(created_at: datetime, max_age: str | None) -> datetime | None:
    """Return when a plan created at ``created_at`` expires, or None without a maxAge."""
    if max_age is None:
        return None

    # Imported here because the scheduler imports this module through the reconciler.
    from dbsync.k8s.scheduler import parse_duration_seconds

    return created_at + timedelta(seconds=parse_duration_seconds(max_age))


def plan_expired(plan: Mapping[str, Any], *, max_age: str | None, now: datetime) -> bool:
    """Return whether ``plan`` is older than ``max_age`` (a plan without a time is expired)."""
    if max_age is None:
        return False
    created_at = parse_time(str(plan.get("createdAt") or ""))
    if created_at is None:
        return True
    deadline = expires_at(created_at, max_age)
    return deadline is not None and now > deadline


def decide(body: Mapping[str, Any], spec: DatabaseSyncSpec, *, trigger: Trigger,
           now: datetime) -> ApprovalDecision:
    """Decide whether a full sync of a Manual resource publishes a plan, waits or applies."""
    status = body.get("status") or {}
    metadata = body.get("metadata") or {}
    name = str(metadata.get("name"))
    plan = published_plan(status)
    if plan is None:
        return ApprovalDecision(action=ApprovalAction.PUBLISH, reason=Reason.APPROVAL_PENDING,
                                message="no plan published yet")
    plan_hash = str(plan["hash"])

    approval = matching_approval(body, spec, plan)
    if approval is not None:
        if plan_expired(plan, max_age=spec.approval.max_age, now=now):
            return ApprovalDecision(
                action=ApprovalAction.PUBLISH, reason=Reason.PLAN_EXPIRED, approval=approval,
                message=(f"plan {plan_hash} was computed at {plan.get('createdAt')} and "
                         f"expired after approval.maxAge {spec.approval.max_age}, so nothing "
                         "was applied"))
        return ApprovalDecision(action=ApprovalAction.APPLY, reason=Reason.SYNCING,
                                approval=approval,
                                message=f"plan {plan_hash} approved by {approval.approver}")

    if plan.get("generation") != metadata.get("generation"):
        return ApprovalDecision(action=ApprovalAction.PUBLISH, reason=Reason.APPROVAL_PENDING,
                                message="the spec changed since the plan was published")
    if trigger is Trigger.RUN_AT:
        return ApprovalDecision(action=ApprovalAction.PUBLISH, reason=Reason.APPROVAL_PENDING,
                                message="a dbsync.io/run-at annotation asked for a fresh plan")

    reason = str(plan.get("reason") or Reason.APPROVAL_PENDING)
    if reason not in WAITING_REASONS:
        reason = Reason.APPROVAL_PENDING
    message = waiting_message(name, plan_hash, plan)

    # An annotation naming another hash was meant for another plan, or mistyped.  Report
    # and remove it, so it can never approve a later plan that happens to have that hash.
    other = _annotations(body).get(APPROVED_PLAN_ANNOTATION)
    if other is not None:
        rejected_value = _printable(str(other))[:80]
        return ApprovalDecision(
            action=ApprovalAction.WAIT, reason=reason, reject_annotation=True,
            message=(f"the {APPROVED_PLAN_ANNOTATION} annotation {rejected_value!r} is not the "
                     f"hash of the published plan, so it was removed; {message}"))
    return ApprovalDecision(action=ApprovalAction.WAIT, reason=reason, message=message)


def approval_due(body: Mapping[str, Any], spec: DatabaseSyncSpec | None) -> bool:
    """Return whether an approval of the published plan, or a wrong one, waits to be handled."""
    if spec is None or spec.approval.mode is not ApprovalMode.MANUAL:
        return False
    plan = published_plan(body.get("status") or {})
    if plan is None:
        return False
    return (matching_approval(body, spec, plan) is not None
            or APPROVED_PLAN_ANNOTATION in _annotations(body))


def waiting_for_approval(body: Mapping[str, Any], spec: DatabaseSyncSpec | None) -> bool:
    """Return whether a Manual resource has a published plan (periodic re-checks pause)."""
    if spec is None or spec.approval.mode is not ApprovalMode.MANUAL:
        return False
    return published_plan(body.get("status") or {}) is not None


def waiting_message(name: str, plan_hash: str, plan: Mapping[str, Any]) -> str:
    """Return the Ready message of a plan that waits: what it does and how to approve it."""
    revisions = list(plan.get("revisions") or [])
    return (f"plan {plan_hash} waits for approval: {len(revisions)} revision(s) from "
            f"{plan.get('currentRevision') or 'base'} to {plan.get('targetRevision') or 'base'}"
            f"; review it with 'kubectl dbsync plan {name}', approve it with 'kubectl dbsync "
            f"approve {name}' or set spec.approval.approvedPlan to the hash")


def plan_status(summary: Mapping[str, Any], *, sync_id: str | None, generation: int | None,
                reason: str, max_age: str | None, now: datetime) -> dict[str, Any]:
    """Return ``status.plan`` (camelCase) from the ``summary`` that ``dbsync plan`` printed."""
    created_at = parse_time(str(summary.get("created_at") or "")) or now
    expiry = expires_at(created_at, max_age)
    return {
        "hash": str(summary["hash"]),
        "createdAt": format_time(created_at),
        "expiresAt": format_time(expiry) if expiry is not None else None,
        "generation": generation,
        "reason": reason,
        "syncId": sync_id,
        "currentRevision": summary.get("current_revision"),
        "targetRevision": summary.get("target_revision"),
        "downgrade": bool(summary.get("downgrade", False)),
        "revisions": [str(item) for item in summary.get("revisions") or []],
        "nonTransactional": [str(item) for item in summary.get("non_transactional") or []],
        "schemaFingerprint": str(summary.get("schema_fingerprint") or ""),
        "ledgerChecks": [str(item) for item in summary.get("ledger_checks") or []],
    }


def plan_summary(report: Mapping[str, Any] | None) -> Mapping[str, Any] | None:
    """Return the summary in ``dbsync plan --output json`` output, or None without one."""
    if report is None:
        return None
    summary = report.get("summary")
    if isinstance(summary, Mapping) and isinstance(summary.get("hash"), str) \
            and _PLAN_HASH.match(str(summary["hash"])):
        return summary
    return None


def waiting_status(previous: Mapping[str, Any], *, reason: str, message: str,
                   generation: int | None, now: datetime,
                   plan: Mapping[str, Any] | None = None,
                   run_at: str | None = None) -> dict[str, Any]:
    """Return the status of a resource whose plan waits: not Ready, nothing in progress."""
    status: dict[str, Any] = {
        "observedGeneration": generation,
        "conditions": apply_updates(previous.get("conditions"),
                                    settled(ready=False, reason=reason, message=message),
                                    generation=generation, now=now),
    }
    if plan is not None:
        status["plan"] = dict(plan)
        status["failures"] = 0
    if run_at is not None:
        status["lastHandledRunAt"] = run_at
    return status


def approval_record(approval: Approval, *, result: str, sync_id: str | None,
                    now: datetime) -> dict[str, Any]:
    """Return ``status.lastApproval`` for an approval the operator acted on."""
    return {"planHash": approval.plan_hash, "source": approval.source.value,
            "approver": approval.approver, "result": result, "syncId": sync_id,
            "handledAt": format_time(now)}


def cleared_annotations() -> dict[str, None]:
    """Return the annotations to remove (JSON merge patch nulls) once an approval is used."""
    return {APPROVED_PLAN_ANNOTATION: None, APPROVED_BY_ANNOTATION: None}


def resource_path(namespace: str, name: str) -> str:
    """Return the API path of the DatabaseSync ``namespace/name``."""
    return (f"/apis/{GROUP}/{VERSION}/namespaces/{quote(namespace, safe='')}/{PLURAL}/"
            f"{quote(name, safe='')}")
