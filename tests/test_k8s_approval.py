"""The approval gate's decisions: matching, the spec generation rule, expiry and approvers."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from lupa import lua51
from pydantic import ValidationError

from dbsync.k8s import approval
from dbsync.k8s.approval import ApprovalAction, ApprovalSource
from dbsync.k8s.models import DatabaseSyncSpec, DatabaseSyncStatus, parse_spec
from dbsync.k8s.status import Trigger

HEALTH_SCRIPT = Path(__file__).resolve().parents[1] / "deploy" / "argocd" / "health.lua"

PLAN_HASH = "a" * 64
OTHER_HASH = "b" * 64
NOW = datetime(2026, 12, 4, 12, 0, 0, tzinfo=UTC)


def _spec(**approval_fields: str) -> DatabaseSyncSpec:
    reference = {"uriFrom": {"secretKeyRef": {"name": "db", "key": "uri"}}}
    return parse_spec({"source": reference, "target": reference,
                       "approval": {"mode": "Manual", **approval_fields}})


def _plan(*, created_at: datetime = NOW, generation: int = 1,
          reason: str = "ApprovalPending") -> dict[str, Any]:
    return approval.plan_status(
        {"hash": PLAN_HASH, "created_at": created_at.isoformat(), "current_revision": None,
         "target_revision": "0002", "revisions": ["0001", "0002"],
         "non_transactional": ["0002"], "schema_fingerprint": "f" * 64,
         "ledger_checks": ["trial_balance"]},
        sync_id="5f1c2c59-9a57-4d43-9f0e-5b4f6f3b0b0c", generation=generation, reason=reason,
        max_age=None, now=NOW)


def _body(*, generation: int = 1, plan: dict[str, Any] | None = None,
          annotations: dict[str, str] | None = None,
          managed_fields: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    metadata: dict[str, Any] = {"name": "payments", "namespace": "default",
                                "generation": generation, "annotations": annotations or {}}
    if managed_fields is not None:
        metadata["managedFields"] = managed_fields
    return {"metadata": metadata, "status": {"plan": plan} if plan is not None else {}}


def test_first_sync_publishes_a_plan() -> None:
    decision = approval.decide(_body(), _spec(), trigger=Trigger.CREATE, now=NOW)

    assert decision.action is ApprovalAction.PUBLISH
    assert decision.reason == "ApprovalPending"


def test_unapproved_plan_waits() -> None:
    decision = approval.decide(_body(plan=_plan()), _spec(), trigger=Trigger.REFERENCE, now=NOW)

    assert decision.action is ApprovalAction.WAIT
    assert PLAN_HASH in decision.message


def test_plan_changed_reason_survives_a_wait() -> None:
    """A republished plan keeps its PlanChanged reason while it waits."""
    body = _body(plan=_plan(reason="PlanChanged"))

    decision = approval.decide(body, _spec(), trigger=Trigger.RESUME, now=NOW)

    assert decision.action is ApprovalAction.WAIT
    assert decision.reason == "PlanChanged"


def test_annotation_with_plan_hash_applies() -> None:
    body = _body(plan=_plan(), annotations={"dbsync.io/approved-plan": PLAN_HASH})

    decision = approval.decide(body, _spec(), trigger=Trigger.APPROVAL, now=NOW)

    assert decision.action is ApprovalAction.APPLY
    assert decision.approval is not None
    assert decision.approval.source is ApprovalSource.ANNOTATION
    assert decision.approval.plan_hash == PLAN_HASH


def test_annotation_with_other_hash_is_rejected() -> None:
    """An annotation naming another hash applies nothing and is removed."""
    body = _body(plan=_plan(), annotations={"dbsync.io/approved-plan": OTHER_HASH})

    decision = approval.decide(body, _spec(), trigger=Trigger.APPROVAL, now=NOW)

    assert approval.approval_due(body, _spec())
    assert decision.action is ApprovalAction.WAIT
    assert decision.reject_annotation
    assert OTHER_HASH in decision.message


def test_malformed_annotation_is_ignored() -> None:
    body = _body(plan=_plan(), annotations={"dbsync.io/approved-plan": PLAN_HASH.upper()})

    assert approval.annotation_hash(body) is None


def test_spec_approval_committed_after_plan_applies() -> None:
    """approvedPlan in a newer generation than the plan's approves it (the Git route)."""
    body = _body(generation=2, plan=_plan(generation=1))

    decision = approval.decide(body, _spec(approvedPlan=PLAN_HASH), trigger=Trigger.UPDATE,
                               now=NOW)

    assert decision.action is ApprovalAction.APPLY
    assert decision.approval is not None
    assert decision.approval.source is ApprovalSource.SPEC


def test_spec_approval_older_than_plan_does_not_count() -> None:
    """A fresh plan with the same hash is not approved by a value already in the spec."""
    body = _body(generation=2, plan=_plan(generation=2))

    decision = approval.decide(body, _spec(approvedPlan=PLAN_HASH), trigger=Trigger.RESUME,
                               now=NOW)

    assert decision.action is ApprovalAction.WAIT


def test_spec_change_without_approval_publishes_again() -> None:
    body = _body(generation=3, plan=_plan(generation=2))

    decision = approval.decide(body, _spec(), trigger=Trigger.UPDATE, now=NOW)

    assert decision.action is ApprovalAction.PUBLISH


def test_run_at_publishes_a_fresh_plan() -> None:
    decision = approval.decide(_body(plan=_plan()), _spec(), trigger=Trigger.RUN_AT, now=NOW)

    assert decision.action is ApprovalAction.PUBLISH


def test_expired_approved_plan_is_published_again() -> None:
    body = _body(plan=_plan(created_at=NOW - timedelta(hours=25)),
                 annotations={"dbsync.io/approved-plan": PLAN_HASH})

    decision = approval.decide(body, _spec(maxAge="24h"), trigger=Trigger.APPROVAL, now=NOW)

    assert decision.action is ApprovalAction.PUBLISH
    assert decision.reason == "PlanExpired"
    assert decision.approval is not None


def test_plan_within_max_age_applies() -> None:
    body = _body(plan=_plan(created_at=NOW - timedelta(hours=23)),
                 annotations={"dbsync.io/approved-plan": PLAN_HASH})

    decision = approval.decide(body, _spec(maxAge="24h"), trigger=Trigger.APPROVAL, now=NOW)

    assert decision.action is ApprovalAction.APPLY


def test_approver_from_approved_by_annotation() -> None:
    body = _body(annotations={"dbsync.io/approved-by": "alice\n"})

    assert approval.approver_of(body, ApprovalSource.ANNOTATION) == (
        "alice? (from the dbsync.io/approved-by annotation)")


def test_approver_from_newest_managed_fields_entry() -> None:
    """Without approved-by, the newest field manager of the approving field is the approver."""
    owned: dict[str, Any] = {"f:spec": {"f:approval": {"f:approvedPlan": {}}}}
    body = _body(managed_fields=[
        {"manager": "argocd-controller", "operation": "Apply", "time": "2026-12-04T10:00:00Z",
         "fieldsV1": owned},
        {"manager": "kubectl-edit", "operation": "Update", "time": "2026-12-04T11:00:00Z",
         "fieldsV1": owned},
        {"manager": "dbsync", "operation": "Update", "time": "2026-12-04T11:30:00Z",
         "fieldsV1": {"f:status": {}}},
    ])

    assert approval.approver_of(body, ApprovalSource.SPEC) == (
        "kubectl-edit (field manager, Update, from managedFields)")


def test_approver_unknown_without_evidence() -> None:
    assert approval.approver_of(_body(), ApprovalSource.ANNOTATION) == "unknown"


def test_plan_status_validates_against_the_status_model() -> None:
    """status.plan as built here is accepted by the CRD's status model."""
    plan = approval.plan_status(
        {"hash": PLAN_HASH, "created_at": "2026-12-04T12:00:00+00:00",
         "schema_fingerprint": "f" * 64}, sync_id=None, generation=1,
        reason="ApprovalPending", max_age="90m", now=NOW)

    parsed = DatabaseSyncStatus.model_validate({"plan": plan})

    assert parsed.plan is not None
    assert plan["expiresAt"] == "2026-12-04T13:30:00Z"


def test_gate_skips_dry_runs_and_rechecks() -> None:
    reference = {"uriFrom": {"secretKeyRef": {"name": "db", "key": "uri"}}}
    dry = parse_spec({"source": reference, "target": reference, "dryRun": "plan",
                      "approval": {"mode": "Manual"}})

    assert not approval.gate_applies(dry, run_migrations=True)
    assert not approval.gate_applies(_spec(), run_migrations=False)
    assert approval.gate_applies(_spec(), run_migrations=True)


def test_approved_plan_needs_manual_mode() -> None:
    reference = {"uriFrom": {"secretKeyRef": {"name": "db", "key": "uri"}}}

    with pytest.raises(ValidationError, match=r"need approval\.mode Manual"):
        parse_spec({"source": reference, "target": reference,
                    "approval": {"approvedPlan": PLAN_HASH}})


@pytest.mark.parametrize("reason", ["ApprovalPending", "PlanChanged", "PlanExpired"])
def test_argocd_shows_waiting_plans_as_suspended(reason: str) -> None:
    """Argo CD's health check reports every plan waiting for approval as Suspended."""
    runtime = lua51.LuaRuntime(unpack_returned_tuples=True)
    resource = {
        "metadata": {"generation": 2},
        "spec": {},
        "status": {"observedGeneration": 2, "conditions": [
            {"type": "Ready", "status": "False", "reason": reason, "message": "waiting"},
            {"type": "Reconciling", "status": "False", "reason": reason},
            {"type": "Stalled", "status": "False", "reason": reason}]},
    }
    runtime.globals().obj = _to_lua(runtime, resource)

    health = runtime.execute(HEALTH_SCRIPT.read_text(encoding="utf-8"))

    assert health["status"] == "Suspended"


def _to_lua(runtime: Any, value: Any) -> Any:
    if isinstance(value, dict):
        return runtime.table_from({key: _to_lua(runtime, item) for key, item in value.items()})
    if isinstance(value, list):
        return runtime.table_from([_to_lua(runtime, item) for item in value])
    return value
