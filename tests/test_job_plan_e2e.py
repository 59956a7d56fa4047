"""Plans in job mode end to end: a Manual DatabaseSync whose plan is computed in a Job.

A real `dbsync operator --executor job`, the API emulator with its kubelet (each Job's pod
runs as a local process), the real kubectl with the ``kubectl dbsync`` plugin and real
PostgreSQL.  Computing a plan imports the revision files, so in job mode the operator's
pod must never run ``dbsync plan`` itself.
"""

from __future__ import annotations

from typing import Any

from dbsync.k8s.job_manifest import SYNC_ID_LABEL
from dbsync.pipeline.termination import (
    MAX_TERMINATION_MESSAGE_BYTES,
    plan_termination_message,
    report_from_termination_message,
)
from tests import test_job_executor_e2e
from tests.dbtools import alembic_versions
from tests.test_job_executor_e2e import JobCluster
from tests.test_k8s_approval_e2e import (
    EXAMPLE_REVISIONS,
    _audit_rows,
    _config_map,
    _kubectl_dbsync,
    _wait_for_plan,
)

# The Job module's fixtures and marks, served by a separate operator for this module.
pytestmark = test_job_executor_e2e.pytestmark
cluster = test_job_executor_e2e.cluster
no_dropped_status_fields = test_job_executor_e2e.no_dropped_status_fields

# What the operator logs when it computes a plan in a child process of its own.
CHILD_PLAN_LOG = "in a child process"


def _jobs_by_command(cluster: JobCluster, name: str) -> dict[str, list[dict[str, Any]]]:
    """Return the resource's Jobs grouped by their container's subcommand (run or plan)."""
    grouped: dict[str, list[dict[str, Any]]] = {}
    for job in cluster.jobs_of(name):
        container = job["spec"]["template"]["spec"]["containers"][0]
        grouped.setdefault(container["args"][0], []).append(job)
    return grouped


def test_manual_plan_runs_in_job_then_applies(cluster: JobCluster) -> None:
    """A Manual resource in job mode plans in a Job, and its approval applies in a Job."""
    name = "job-plan"
    target = cluster.new_target()
    cluster.apply_secret(f"{name}-db", {"uri": target})
    cluster.kubectl.apply_text(_config_map(f"{name}-revisions"))
    cluster.apply_sync(name, target_secret=f"{name}-db", changes={
        "executor": "job",
        "approval": {"mode": "Manual"},
        "migrations": {"configMaps": [{"name": f"{name}-revisions"}]},
    })

    pending = _wait_for_plan(cluster, name)
    plan = pending["status"]["plan"]
    plan_jobs = _jobs_by_command(cluster, name).get("plan", [])
    plan_rows = [row for row in _audit_rows(target, plan["syncId"])
                 if row["operation_type"] == "PLAN"]

    assert len(plan["hash"]) == 64
    assert plan["revisions"] == EXAMPLE_REVISIONS
    assert alembic_versions(target) == []
    assert len(plan_jobs) == 1
    assert plan_jobs[0]["metadata"]["name"].startswith(f"{name}-plan-")
    assert plan_jobs[0]["metadata"]["labels"][SYNC_ID_LABEL] == plan["syncId"]
    assert plan_jobs[0]["status"]["succeeded"] == 1
    assert [row["plan_hash"] for row in plan_rows] == [plan["hash"]]
    assert CHILD_PLAN_LOG not in cluster.operator.log_text()
    assert "activeJob" not in pending["status"]

    approved = _kubectl_dbsync(cluster, "approve", name, "--hash", plan["hash"])
    assert approved.returncode == 0, approved.stderr
    ready = cluster.wait_condition(name, "Ready", "True", "Succeeded")
    status = ready["status"]
    jobs = _jobs_by_command(cluster, name)
    sync_rows = _audit_rows(target, status["lastSync"]["syncId"])

    assert alembic_versions(target) == [EXAMPLE_REVISIONS[-1]]
    assert len(jobs.get("plan", [])) == 1
    assert [job["metadata"]["labels"][SYNC_ID_LABEL] for job in jobs.get("run", [])] == [
        status["lastSync"]["syncId"]]
    assert {row["plan_hash"] for row in sync_rows} == {plan["hash"]}
    assert status["lastApproval"]["result"] == "Applied"
    assert CHILD_PLAN_LOG not in cluster.operator.log_text()


def test_plan_message_trims_long_revision_lists() -> None:
    """A plan with 500 revisions fits a termination message, with a count of the rest."""
    revisions = [f"{number:04d}_revision_with_a_long_name" for number in range(500)]
    summary = {"hash": "a" * 64, "created_at": "2026-01-01T00:00:00Z",
               "current_revision": None, "target_revision": revisions[-1], "downgrade": False,
               "revisions": revisions, "non_transactional": revisions[:3],
               "schema_fingerprint": "b" * 64, "ledger_checks": ["balanced"]}
    message = plan_termination_message(sync_id="00000000-0000-0000-0000-000000000001",
                                       summary=summary)
    report = report_from_termination_message(message) or {}
    kept_revisions = report["summary"]["revisions"]

    assert len(message.encode("utf-8")) <= MAX_TERMINATION_MESSAGE_BYTES
    assert report["summary"]["hash"] == summary["hash"]
    assert report["sync_id"] == "00000000-0000-0000-0000-000000000001"
    assert kept_revisions[:-1] == revisions[:len(kept_revisions) - 1]
    assert kept_revisions[-1] == f"... and {len(revisions) - len(kept_revisions) + 1} more"
    assert report["summary"]["non_transactional"] == revisions[:3]
