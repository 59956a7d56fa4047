"""The approval gate end to end: a real operator process, the API emulator, the real kubectl
with the ``kubectl dbsync`` plugin, and real PostgreSQL.

Each test applies a DatabaseSync with ``approval.mode: Manual`` against its own target and
its own copy of the example revisions, waits for the published plan and approves it.  One
emulator and one operator serve the whole module (the fixture of ``test_operator_e2e``).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import psycopg
import yaml

from dbsync.k8s.demo import EXAMPLES_K8S, condition_of
from tests import test_operator_e2e
from tests.dbtools import alembic_versions, execute
from tests.test_operator_e2e import NAMESPACE, Cluster

# The operator module's fixtures and marks, served by a separate operator for this module.
pytestmark = test_operator_e2e.pytestmark
cluster = test_operator_e2e.cluster
no_dropped_status_fields = test_operator_e2e.no_dropped_status_fields

EXAMPLE_REVISIONS = ["0001_accounts", "0002_transactions", "0003_postings",
                     "0004_currency", "0005_checks_index", "0006_txn_status"]

EXTRA_REVISION = '''"""Add a column after the plan was computed.

Revision ID: 0007_late
Revises: 0006_txn_status
"""

import sqlalchemy as sa
from alembic import op

revision = "0007_late"
down_revision = "0006_txn_status"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("accounts", sa.Column("nickname", sa.String(40)))


def downgrade() -> None:
    op.drop_column("accounts", "nickname")
'''


def _config_map(name: str, extra: dict[str, str] | None = None) -> str:
    """Return the example revisions ConfigMap under ``name``, with ``extra`` keys added."""
    manifest = yaml.safe_load((EXAMPLES_K8S / "migrations-configmap.yaml").read_text("utf-8"))
    manifest["metadata"] = {"name": name}
    manifest["data"].update(extra or {})
    return yaml.safe_dump(manifest)


def _apply_manual(cluster: Cluster, name: str, **approval: str) -> str:
    """Apply a Manual DatabaseSync ``name`` with its own target and ConfigMap; return the DSN."""
    target = cluster.new_target()
    cluster.apply_secret(f"{name}-db", {"uri": target})
    cluster.kubectl.apply_text(_config_map(f"{name}-revisions"))
    cluster.apply_sync(name, target_secret=f"{name}-db", changes={
        "approval": {"mode": "Manual", **approval},
        "migrations": {"configMaps": [{"name": f"{name}-revisions"}]},
    })
    return target


def _wait_for_plan(cluster: Cluster, name: str, reason: str = "ApprovalPending", *,
                   other_than: str | None = None,
                   created_after: str | None = None) -> dict[str, Any]:
    """Wait until Ready=False with ``reason`` and a published plan, and return the resource."""
    def waiting(resource: dict[str, Any]) -> bool:
        ready = condition_of(resource, "Ready") or {}
        plan = (resource.get("status") or {}).get("plan") or {}
        return (ready.get("status") == "False" and ready.get("reason") == reason
                and bool(plan.get("hash")) and plan.get("hash") != other_than
                and (created_after is None or str(plan.get("createdAt")) > created_after))

    return cluster.wait(name, waiting, description=f"a plan waiting with reason {reason}")


def _kubectl_dbsync(cluster: Cluster, *arguments: str) -> subprocess.CompletedProcess[str]:
    """Run ``kubectl dbsync ARGUMENTS``; kubectl finds the plugin on PATH."""
    scripts = str(Path(sys.executable).parent)
    environment = {**os.environ, "PATH": f"{scripts}{os.pathsep}{os.environ.get('PATH', '')}",
                   "USER": "reviewer-alice"}
    return subprocess.run(
        ["kubectl", "dbsync", *arguments, "--kubeconfig", str(cluster.kubectl.kubeconfig),
         "-n", NAMESPACE],
        capture_output=True, text=True, timeout=60, check=False, env=environment)


def _audit_rows(dsn: str, sync_id: str) -> list[dict[str, Any]]:
    with psycopg.connect(dsn) as connection:
        cursor = connection.execute(
            "SELECT operation_type, operation_name, plan_hash, approver, metadata "
            "FROM sync_audit_operations WHERE sync_id = %s ORDER BY started_at", (sync_id,))
        columns = [column.name for column in cursor.description or ()]
        return [dict(zip(columns, row, strict=True)) for row in cursor.fetchall()]


def _annotations(resource: dict[str, Any]) -> dict[str, str]:
    return dict((resource.get("metadata") or {}).get("annotations") or {})


def test_manual_sync_waits_then_applies_approved_plan(cluster: Cluster) -> None:
    """A Manual resource waits with its plan; kubectl dbsync approve applies exactly that plan."""
    target = _apply_manual(cluster, "approve-plan")
    pending = _wait_for_plan(cluster, "approve-plan")
    plan = pending["status"]["plan"]

    assert len(plan["hash"]) == 64
    assert plan["revisions"] == EXAMPLE_REVISIONS
    assert alembic_versions(target) == []
    assert _kubectl_dbsync(cluster, "plan", "approve-plan").returncode == 0

    approved = _kubectl_dbsync(cluster, "approve", "approve-plan", "--hash", plan["hash"])
    assert approved.returncode == 0, approved.stderr
    ready = cluster.wait_condition("approve-plan", "Ready", "True", "Succeeded")
    status = ready["status"]
    rows = _audit_rows(target, status["lastSync"]["syncId"])
    migrated = [row["operation_name"] for row in rows if row["operation_type"] == "REVISION"]
    plan_checks = [row["metadata"] for row in rows if row["operation_type"] == "PLAN"]

    assert alembic_versions(target) == ["0006_txn_status"]
    assert migrated == plan["revisions"]
    assert {row["plan_hash"] for row in rows} == {plan["hash"]}
    assert {row["approver"] for row in rows} == {
        "reviewer-alice (from the dbsync.io/approved-by annotation)"}
    assert [check.get("plan_matches") for check in plan_checks if check] == [True]
    assert status["lastApproval"]["result"] == "Applied"
    assert status["lastApproval"]["source"] == "Annotation"
    assert "plan" not in status
    assert "dbsync.io/approved-plan" not in _annotations(ready)


def test_schema_change_after_plan_fails_git_approval(cluster: Cluster) -> None:
    """A manual target change after planning: the spec approval fails with PlanChanged."""
    target = _apply_manual(cluster, "schema-change")
    plan = _wait_for_plan(cluster, "schema-change")["status"]["plan"]
    execute(target, "CREATE TABLE manual_fix (id integer)")

    cluster.patch_spec("schema-change", {"approval": {"approvedPlan": plan["hash"]}})
    changed = _wait_for_plan(cluster, "schema-change", "PlanChanged", other_than=plan["hash"])
    status = changed["status"]
    rows = _audit_rows(target, status["lastSync"]["syncId"])

    assert alembic_versions(target) == []
    assert "schema changed" in (condition_of(changed, "Ready") or {})["message"]
    assert status["plan"]["revisions"] == EXAMPLE_REVISIONS
    assert status["lastApproval"]["result"] == "PlanChanged"
    assert status["lastApproval"]["source"] == "Spec"
    assert {row["plan_hash"] for row in rows} == {plan["hash"]}
    assert {row["approver"] for row in rows} == {"unknown"}
    assert not [row for row in rows if row["operation_type"] == "REVISION"]


def test_new_revision_after_plan_fails_approval(cluster: Cluster) -> None:
    """A revision added to the ConfigMap after planning makes the approval fail, nothing applied."""
    target = _apply_manual(cluster, "new-revision")
    plan = _wait_for_plan(cluster, "new-revision")["status"]["plan"]
    cluster.kubectl.apply_text(_config_map("new-revision-revisions",
                                           {"0007_late.py": EXTRA_REVISION}))

    # The published plan stays until it is acted on, so the reviewer approves the old hash.
    time.sleep(1.0)
    approved = _kubectl_dbsync(cluster, "approve", "new-revision", "--hash", plan["hash"])
    assert approved.returncode == 0, approved.stderr
    changed = _wait_for_plan(cluster, "new-revision", "PlanChanged", other_than=plan["hash"])
    message = (condition_of(changed, "Ready") or {})["message"]

    assert alembic_versions(target) == []
    assert "new revision 0007_late" in message
    assert changed["status"]["plan"]["revisions"] == [*EXAMPLE_REVISIONS, "0007_late"]
    assert "dbsync.io/approved-plan" not in _annotations(changed)


def test_expired_plan_is_not_applied(cluster: Cluster) -> None:
    """An approval that arrives after approval.maxAge applies nothing and publishes a new plan."""
    target = _apply_manual(cluster, "expired-plan", maxAge="2s")
    plan = _wait_for_plan(cluster, "expired-plan")["status"]["plan"]
    time.sleep(3.0)

    approved = _kubectl_dbsync(cluster, "approve", "expired-plan")
    assert approved.returncode == 0, approved.stderr
    expired = _wait_for_plan(cluster, "expired-plan", "PlanExpired",
                             created_after=plan["createdAt"])
    status = expired["status"]

    assert alembic_versions(target) == []
    assert status["lastApproval"]["result"] == "PlanExpired"
    assert status["plan"]["expiresAt"] > status["plan"]["createdAt"]
    assert "dbsync.io/approved-plan" not in _annotations(expired)
