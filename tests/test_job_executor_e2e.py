"""Job mode end to end: a real `dbsync operator --executor job`, the API emulator with its
kubelet (each Job's pod runs as a local process), the real kubectl and real PostgreSQL.

One emulator and one operator serve the module; each test uses its own resources and its
own target database.
"""

from __future__ import annotations

import asyncio
import json
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
import pytest
import yaml
from psycopg.conninfo import conninfo_to_dict

from dbsync.k8s.demo import (
    CRD_PATH,
    EXAMPLES_K8S,
    INCONSISTENT_PATCH_WARNING,
    Kubectl,
    OperatorProcess,
    condition_of,
    wait_for,
)
from dbsync.k8s.job_manifest import RESOURCE_UID_LABEL
from dbsync.testing.kubeapi import running_apiserver
from dbsync.testing.kubeapi.kubelet import Kubelet, enable_kubelet
from dbsync.testing.servers import TestServer
from tests.dbtools import alembic_versions
from tests.migration_fixtures import FAILING_REVISION
from tests.test_operator_e2e import Cluster, _sync_source_to_head

pytestmark = [
    pytest.mark.kubectl,
    pytest.mark.skipif(shutil.which("kubectl") is None, reason="needs the kubectl binary"),
]

NAMESPACE = "default"
EXAMPLE_HEAD = "0006_txn_status"
OPERATOR_ARGUMENTS = ("--executor", "job", "--retry-base-seconds", "0.5",
                      "--retry-max-seconds", "2", "--no-prestart")


def revision(revision_id: str, *, sleep_seconds: float, table: str) -> str:
    """Return a first revision that sleeps in short statements, then creates ``table``."""
    return f'''"""Sleep, then create {table}."""

import sqlalchemy as sa
from alembic import op

revision = "{revision_id}"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    for _ in range({int(sleep_seconds * 4)}):
        op.execute("SELECT pg_sleep(0.25)")
    op.create_table("{table}", sa.Column("id", sa.BigInteger, primary_key=True))


def downgrade() -> None:
    op.drop_table("{table}")
'''


@dataclass
class JobCluster(Cluster):
    """The e2e cluster with the emulator's kubelet running Jobs."""

    kubelet: Kubelet | None = None
    workdir: Path | None = None

    def jobs_of(self, name: str) -> list[dict[str, Any]]:
        resource = self.get(name) or {}
        uid = resource.get("metadata", {}).get("uid")
        jobs = self.kubectl.get_json("jobs", "-l", f"{RESOURCE_UID_LABEL}={uid}")
        items: list[dict[str, Any]] = jobs["items"]
        return items

    def apply_config_map(self, name: str, data: dict[str, str]) -> None:
        self.kubectl.apply_text(yaml.safe_dump({
            "apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": name},
            "data": data}))


@pytest.fixture(scope="module")
def cluster(pg: TestServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[JobCluster]:
    """The emulator with a kubelet, the CRD and example ConfigMap, and an operator in job mode."""
    workdir = tmp_path_factory.mktemp("job-e2e")
    source_dsn = pg.dsn(pg.create_database("src"))
    empty_source_dsn = pg.dsn(pg.create_database("empty"))
    _sync_source_to_head(source_dsn)
    with running_apiserver(kubeconfig_path=workdir / "kubeconfig") as api:
        kubelet = enable_kubelet(api, workdir=workdir / "kubelet")
        kubectl = Kubectl(kubeconfig=workdir / "kubeconfig")
        kubectl.apply(CRD_PATH)
        kubectl.apply(EXAMPLES_K8S / "migrations-configmap.yaml")
        for name, dsn in (("payments-source-db", source_dsn), ("empty-source-db",
                                                                 empty_source_dsn)):
            kubectl.apply_text(yaml.safe_dump({
                "apiVersion": "v1", "kind": "Secret", "metadata": {"name": name},
                "type": "Opaque", "stringData": {"uri": dsn}}))
        operator = OperatorProcess(kubeconfig=workdir / "kubeconfig",
                                   log_path=workdir / "operator.log",
                                   extra_arguments=OPERATOR_ARGUMENTS)
        job_cluster = JobCluster(api=api, kubectl=kubectl, operator=operator, server=pg,
                                 source_dsn=source_dsn, empty_source_dsn=empty_source_dsn,
                                 kubelet=kubelet, workdir=workdir)
        operator.start()
        try:
            wait_for(lambda: "Initial authentication has finished" in operator.log_text(),
                     timeout_seconds=30, description="the operator to log in")
            yield job_cluster
        finally:
            # A test may replace the operator (the restart test), so stop the current one.
            job_cluster.operator.stop()
            if job_cluster.operator is not operator:
                operator.stop()
            assert api.loop is not None
            asyncio.run_coroutine_threadsafe(kubelet.close(), api.loop).result(timeout=30)


@pytest.fixture(autouse=True)
def no_dropped_status_fields(cluster: JobCluster) -> Iterator[None]:
    """Fail a test if kopf saw the API server drop fields of its patch (undeclared status)."""
    yield
    assert INCONSISTENT_PATCH_WARNING not in cluster.operator.log_text()


@dataclass(frozen=True)
class ReadyPair:
    job_resource: dict[str, Any]
    process_resource: dict[str, Any]
    job: dict[str, Any]


@pytest.fixture(scope="module")
def ready_pair(cluster: JobCluster) -> ReadyPair:
    """The example resource synced once in job mode and once in process mode."""
    job_target, process_target = cluster.new_target(), cluster.new_target()
    cluster.apply_secret("job-target-db", {"uri": job_target})
    cluster.apply_secret("process-target-db", {"uri": process_target})

    # The job-mode source uses the host form with passwordFrom, so both Secret forms run.
    source = conninfo_to_dict(cluster.source_dsn)
    cluster.apply_secret("source-password", {"password": str(source.get("password") or "")})
    source_reference = {"host": source["host"], "port": int(source.get("port") or 5432),
                        "database": source["dbname"], "userFrom": {"value": source["user"]},
                        "passwordFrom": {"secretKeyRef": {"name": "source-password",
                                                          "key": "password"}}}
    cluster.apply_sync("in-job", target_secret="job-target-db",
                       changes={"source": source_reference})
    cluster.apply_sync("in-process", target_secret="process-target-db",
                       changes={"executor": "process"})

    job_resource = cluster.wait_condition("in-job", "Ready", "True", timeout_seconds=90)
    process_resource = cluster.wait_condition("in-process", "Ready", "True",
                                              timeout_seconds=90)
    jobs = cluster.jobs_of("in-job")
    assert len(jobs) == 1, [job["metadata"]["name"] for job in jobs]
    return ReadyPair(job_resource=job_resource, process_resource=process_resource,
                     job=jobs[0])


def _comparable(resource: dict[str, Any]) -> dict[str, Any]:
    status = resource["status"]
    return {
        "conditions": {condition["type"]: (condition["status"], condition["reason"])
                       for condition in status["conditions"]},
        "migration": status.get("migration"),
        "drift": status.get("drift"),
        "ledger": status.get("ledger"),
        "steps": [(step["name"], step["result"]) for step in status["lastSync"]["steps"]],
        "result": status["lastSync"]["result"],
        "failures": status.get("failures"),
    }


def test_job_status_matches_process_status(ready_pair: ReadyPair) -> None:
    """A sync in a Job fills the status exactly as a sync in a child process does."""
    job_status = ready_pair.job_resource["status"]

    assert _comparable(ready_pair.job_resource) == _comparable(ready_pair.process_resource)
    assert job_status["migration"]["currentRevision"] == EXAMPLE_HEAD
    assert "activeJob" not in job_status
    assert all(step["operationId"] for step in job_status["lastSync"]["steps"]
               if step["result"] != "Skipped")


def test_job_labels_name_owner_and_limits(ready_pair: ReadyPair) -> None:
    job = ready_pair.job
    resource = ready_pair.job_resource
    sync_id = resource["status"]["lastSync"]["syncId"]
    owner = job["metadata"]["ownerReferences"][0]

    assert job["metadata"]["labels"]["dbsync.io/sync-id"] == sync_id
    assert len(job["metadata"]["name"]) <= 63
    assert owner["uid"] == resource["metadata"]["uid"]
    assert owner["controller"] is True
    assert job["spec"]["backoffLimit"] == 0
    assert job["spec"]["activeDeadlineSeconds"] == resource["spec"]["syncTimeoutSeconds"]
    assert job["spec"]["ttlSecondsAfterFinished"] > 0
    assert job["status"]["succeeded"] == 1


def test_job_carries_no_secret_and_runs_restricted(cluster: JobCluster,
                                                   ready_pair: ReadyPair) -> None:
    """The stored Job contains no password or URI, runs as non-root and mounts no token."""
    source_password = str(conninfo_to_dict(cluster.source_dsn).get("password") or "")
    job_text = json.dumps(ready_pair.job)
    pod = ready_pair.job["spec"]["template"]["spec"]
    container = pod["containers"][0]
    secret_env = {item["name"] for item in container["env"]
                  if "secretKeyRef" in item.get("valueFrom", {})}

    assert source_password != ""
    assert source_password not in job_text
    assert "postgresql://" not in job_text
    assert secret_env == {"DBSYNC_SOURCE_PASSWORD", "DBSYNC_TARGET_URI"}
    assert pod["automountServiceAccountToken"] is False
    assert pod["serviceAccountName"] == "dbsync-sync-runner"
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert container["securityContext"]["runAsUser"] == 65532
    assert container["securityContext"]["allowPrivilegeEscalation"] is False
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert container["securityContext"]["capabilities"]["drop"] == ["ALL"]
    assert container["resources"]["limits"]["memory"]


def test_failing_migration_in_job_stalls(cluster: JobCluster) -> None:
    target = cluster.new_target()
    cluster.apply_secret("job-failing-target-db", {"uri": target})
    configmap = yaml.safe_load((EXAMPLES_K8S / "migrations-configmap.yaml").read_text("utf-8"))
    configmap["metadata"]["name"] = "job-failing-migrations"
    configmap["data"]["0007_fails.py"] = FAILING_REVISION
    cluster.kubectl.apply_text(yaml.safe_dump(configmap))
    cluster.apply_sync("job-failing", target_secret="job-failing-target-db", changes={
        "migrations": {"configMaps": [{"name": "job-failing-migrations"}]},
        "transactionMode": "all"})

    resource = cluster.wait_condition("job-failing", "Stalled", "True", "MigrationFailed",
                                      timeout_seconds=90)
    ready = condition_of(resource, "Ready") or {}

    assert ready["reason"] == "MigrationFailed"
    assert (condition_of(resource, "MigrationsApplied") or {})["status"] == "False"
    assert alembic_versions(target) == []


def test_job_past_deadline_leaves_target_unchanged(cluster: JobCluster) -> None:
    """A Job killed at activeDeadlineSeconds gives DeadlineExceeded; nothing is committed."""
    target = cluster.new_target()
    cluster.apply_secret("slow-target-db", {"uri": target})
    cluster.apply_config_map("slow-migrations", {
        "0001_slow.py": revision("0001_slow", sleep_seconds=60, table="slow_table")})
    cluster.apply_noop_sync("job-slow", target_secret="slow-target-db", changes={
        "migrations": {"configMaps": [{"name": "slow-migrations"}]},
        "syncTimeoutSeconds": 10, "backoffLimit": 5})

    resource = cluster.wait_condition("job-slow", "Reconciling", "True", "DeadlineExceeded",
                                      timeout_seconds=60)
    cluster.kubectl.run("delete", "dbsync", "job-slow")

    assert (condition_of(resource, "Ready") or {})["reason"] == "DeadlineExceeded"
    assert alembic_versions(target) == []
    with psycopg.connect(target) as connection:
        table = connection.execute("SELECT to_regclass('public.slow_table')").fetchone()
    assert table is not None
    assert table[0] is None


def test_missing_image_stalls_with_image_pull_failed(cluster: JobCluster) -> None:
    target = cluster.new_target()
    cluster.apply_secret("image-target-db", {"uri": target})
    cluster.apply_noop_sync("job-image", target_secret="image-target-db", changes={
        "migrations": {"image": "registry.example.com/does-not-exist:1.0",
                       "path": "/app/migrations", "runInImage": True}})

    resource = cluster.wait_condition("job-image", "Stalled", "True", "ImagePullFailed",
                                      timeout_seconds=60)
    message = (condition_of(resource, "Ready") or {}).get("message", "")

    assert "ErrImagePull" in message
    assert wait_for(lambda: cluster.jobs_of("job-image") == [] or None, timeout_seconds=10,
                    description="the Job to be deleted")


def _revision_runs(dsn: str, revision_id: str) -> int:
    with psycopg.connect(dsn) as connection:
        row = connection.execute(
            "SELECT count(*) FROM sync_audit_operations WHERE operation_type = 'REVISION' "
            "AND operation_name = %s AND status = 'SUCCESS'", (revision_id,)).fetchone()
    return int(row[0]) if row else 0


def test_restarted_operator_adopts_running_job(cluster: JobCluster) -> None:
    """An operator restarted mid-Job waits for that Job: one Job, one applied revision."""
    target = cluster.new_target()
    cluster.apply_secret("restart-target-db", {"uri": target})
    cluster.apply_config_map("restart-migrations", {
        "0001_pause.py": revision("0001_pause", sleep_seconds=6, table="paused_table")})
    cluster.apply_noop_sync("job-restart", target_secret="restart-target-db", changes={
        "migrations": {"configMaps": [{"name": "restart-migrations"}]},
        "diff": {"failOnDrift": False}})

    running = cluster.wait(
        "job-restart", lambda resource: "activeJob" in (resource.get("status") or {}),
        description="status.activeJob", timeout_seconds=30)
    active = running["status"]["activeJob"]
    wait_for(lambda: cluster.jobs_of("job-restart") or None, timeout_seconds=10,
             description="the Job")
    cluster.operator.stop()

    assert cluster.workdir is not None
    cluster.operator = OperatorProcess(kubeconfig=cluster.operator.kubeconfig,
                                       log_path=cluster.workdir / "operator-restarted.log",
                                       extra_arguments=OPERATOR_ARGUMENTS)
    cluster.operator.start()
    resource = cluster.wait_condition("job-restart", "Ready", "True", timeout_seconds=60)

    assert [job["metadata"]["name"] for job in cluster.jobs_of("job-restart")] == [
        active["name"]]
    assert resource["status"]["lastSync"]["syncId"] == active["syncId"]
    assert alembic_versions(target) == ["0001_pause"]
    assert _revision_runs(target, "0001_pause") == 1


def test_revisions_copied_from_application_image(cluster: JobCluster,
                                                 tmp_path: Path) -> None:
    """An init container copies the revision directory out of migrations.image."""
    # The kubelet runs containers on this machine, so a local directory is the image's path.
    image_path = tmp_path / "app" / "migrations"
    image_path.mkdir(parents=True)
    (image_path / "0001_copied.py").write_text(
        revision("0001_copied", sleep_seconds=0, table="copied_table"), encoding="utf-8")
    target = cluster.new_target()
    cluster.apply_secret("copy-target-db", {"uri": target})
    cluster.apply_noop_sync("job-copy", target_secret="copy-target-db", changes={
        "migrations": {"image": "registry.example.com/payments-app:1.0",
                       "path": str(image_path)},
        "diff": {"failOnDrift": False}})

    cluster.wait_condition("job-copy", "Ready", "True", timeout_seconds=60)
    pod = cluster.jobs_of("job-copy")[0]["spec"]["template"]["spec"]

    assert alembic_versions(target) == ["0001_copied"]
    assert pod["initContainers"][0]["image"] == "registry.example.com/payments-app:1.0"
    assert pod["containers"][0]["image"] != "registry.example.com/payments-app:1.0"
