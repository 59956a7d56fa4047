"""The Job executor's parts: Job manifests, termination messages, DSNs from environment
variables (against real PostgreSQL), the emulator's kubelet, and a Job deleted mid-sync.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import kopf
import psycopg
import pytest
import yaml
from psycopg.conninfo import conninfo_to_dict

from dbsync.k8s import kubeclient
from dbsync.k8s.conditions import Reason
from dbsync.k8s.executor import ChildOutcome
from dbsync.k8s.job_executor import JobExecutor
from dbsync.k8s.job_manifest import (
    COPY_CONTAINER,
    MIGRATIONS_MOUNT,
    REQUEST_VARIABLE,
    JobSettings,
    build_job,
    job_name,
)
from dbsync.k8s.kubeclient import KubeClient
from dbsync.k8s.models import parse_spec
from dbsync.k8s.status import SyncContext, Trigger, finished_status, judge
from dbsync.pipeline.errors import ConfigurationError
from dbsync.pipeline.request import resolve_environment_dsns
from dbsync.pipeline.termination import (
    MAX_TERMINATION_MESSAGE_BYTES,
    TERMINATION_MESSAGE_PATH_VARIABLE,
    report_from_termination_message,
    termination_message,
)
from dbsync.testing.kubeapi import KubeApiServer, running_apiserver
from dbsync.testing.kubeapi.kubelet import Kubelet, enable_kubelet

ROOT = Path(__file__).resolve().parent.parent
CANARY = "canary-Pa55word-7f3e"
UID = "0f5e7a52-8d4b-4c39-9a41-2b0d6e3c1a77"
SYNC_ID = "6691dc58-6f0e-4bb4-a0a4-3f6a0d1c9e21"

SPEC: dict[str, Any] = {
    "source": {"uriFrom": {"secretKeyRef": {"name": "source-db", "key": "uri"}}},
    "target": {"host": "db.payments.svc", "database": "payments",
               "userFrom": {"configMapKeyRef": {"name": "db-users", "key": "target"}},
               "passwordFrom": {"secretKeyRef": {"name": "target-db", "key": "password"}},
               "sslMode": "verify-full",
               "caCertFrom": {"secretKeyRef": {"name": "target-db", "key": "ca.crt"}}},
    "migrations": {"configMaps": [{"name": "payments-migrations"}]},
    "syncTimeoutSeconds": 120,
}
BODY: dict[str, Any] = {"metadata": {"name": "payments-staging", "namespace": "payments",
                                     "uid": UID, "generation": 3}}
REQUEST: dict[str, Any] = {"source_dsn": f"postgresql://app:{CANARY}@src/db",
                           "target_dsn": f"host=db password={CANARY}", "audit_dsn": None,
                           "migrations_dir": "/tmp/dbsync-sync-x/migrations",
                           "revision": "head", "sync_id": SYNC_ID}


def manifest(spec_changes: dict[str, Any] | None = None) -> dict[str, Any]:
    spec = parse_spec({**SPEC, **(spec_changes or {})})
    return build_job(body=BODY, spec=spec, request=REQUEST, sync_id=SYNC_ID,
                     settings=JobSettings(),
                     revision_keys={"payments-migrations": ["0001_a.py", "0002_b.py"]})


def environment_of(job: dict[str, Any]) -> dict[str, dict[str, Any]]:
    container = job["spec"]["template"]["spec"]["containers"][0]
    return {item["name"]: item for item in container["env"]}


# Job names and manifests.


def test_job_name_fits_a_dns_label() -> None:
    name = job_name("payments." + "x" * 250, SYNC_ID)

    assert len(name) <= 63
    assert name.endswith("-sync-6691dc58")
    assert "." not in name


def test_job_name_differs_per_sync() -> None:
    assert job_name("uat", SYNC_ID) != job_name("uat", "7791dc58-0000-4000-8000-000000000000")


def test_job_request_names_variables_instead_of_dsns() -> None:
    job = manifest()
    request = json.loads(environment_of(job)[REQUEST_VARIABLE]["value"])

    assert CANARY not in json.dumps(job)
    assert "source_dsn" not in request
    assert request["source_env"] == {"uri_variable": "DBSYNC_SOURCE_URI"}
    assert request["target_env"]["password_variable"] == "DBSYNC_TARGET_PASSWORD"
    assert request["target_env"]["user_variable"] == "DBSYNC_TARGET_USER"
    assert request["target_env"]["ssl_root_cert"] == "/var/run/dbsync/ca/target/ca.crt"
    assert request["migrations_dir"] == MIGRATIONS_MOUNT


def test_job_reads_credentials_through_references() -> None:
    environment = environment_of(manifest())

    assert environment["DBSYNC_SOURCE_URI"]["valueFrom"] == {
        "secretKeyRef": {"name": "source-db", "key": "uri"}}
    assert environment["DBSYNC_TARGET_PASSWORD"]["valueFrom"] == {
        "secretKeyRef": {"name": "target-db", "key": "password"}}
    assert environment["DBSYNC_TARGET_USER"]["valueFrom"] == {
        "configMapKeyRef": {"name": "db-users", "key": "target"}}


def test_job_projects_revision_keys_and_ca_bundle() -> None:
    volumes = {volume["name"]: volume for volume in
               manifest()["spec"]["template"]["spec"]["volumes"]}
    sources = volumes["migrations"]["projected"]["sources"]

    assert sources == [{"configMap": {"name": "payments-migrations", "items": [
        {"key": "0001_a.py", "path": "0001_a.py"}, {"key": "0002_b.py", "path": "0002_b.py"}]}}]
    assert volumes["target-ca"]["secret"]["items"] == [{"key": "ca.crt", "path": "ca.crt"}]
    assert "emptyDir" in volumes["tmp"]


def test_job_copies_revisions_out_of_application_image() -> None:
    job = manifest({"migrations": {"image": "registry.example.com/payments:1.4",
                                   "path": "/app/migrations/"}})
    pod = job["spec"]["template"]["spec"]
    copy = pod["initContainers"][0]

    assert copy["name"] == COPY_CONTAINER
    assert copy["image"] == "registry.example.com/payments:1.4"
    assert copy["command"] == ["cp", "-R", "/app/migrations/.", MIGRATIONS_MOUNT]
    assert copy["securityContext"]["readOnlyRootFilesystem"] is True
    assert pod["containers"][0]["image"] == JobSettings().image


def test_job_runs_in_application_image_when_asked() -> None:
    job = manifest({"migrations": {"image": "registry.example.com/payments:1.4",
                                   "path": "/app/migrations", "runInImage": True}})
    pod = job["spec"]["template"]["spec"]
    request = json.loads(environment_of(job)[REQUEST_VARIABLE]["value"])

    assert "initContainers" not in pod
    assert pod["containers"][0]["image"] == "registry.example.com/payments:1.4"
    assert request["migrations_dir"] == "/app/migrations"


def test_migrations_image_needs_path() -> None:
    with pytest.raises(ValueError, match=r"migrations\.image needs migrations\.path"):
        parse_spec({**SPEC, "migrations": {"image": "registry.example.com/payments:1.4",
                                           "configMaps": [{"name": "m"}]}})


# Termination messages.


def full_report(*, differences: int, failed_checks: int) -> dict[str, Any]:
    return {
        "sync_id": SYNC_ID, "trace_id": SYNC_ID.replace("-", ""), "result": "Failed",
        "exit_code": 1, "dry_run": "off",
        "steps": [{"name": name, "result": "Succeeded", "duration_ms": 12,
                   "operation_id": f"op-{name}", "message": "x" * 500}
                  for name in ("preflight", "lock", "migrate", "diff", "ledger")],
        "criteria": [
            {"name": "migrations_applied", "ok": True, "detail": "at head", "counted": True},
            {"name": "no_schema_differences", "ok": differences == 0,
             "detail": "d" * 3000, "counted": True},
            {"name": "every_step_audited", "ok": True, "detail": "5 of 5", "counted": True}],
        "migration": {"revision_before": None, "revision_after": "0006_txn_status",
                      "target_revision": "0006_txn_status",
                      "applied": [f"000{index}" for index in range(1, 7)],
                      "outcomes": [{"sql": "y" * 2000}] * 6},
        "drift": {"differences": [{"kind": "index" if index % 2 else "column", "name": "n"}
                                  for index in range(differences)]},
        "ledger": {"balanced": failed_checks == 0, "checks": [
            {"name": f"check_{index}", "status": "FAIL"} for index in range(failed_checks)]},
        "error": None,
    }


def status_of(report: dict[str, Any] | None) -> dict[str, Any]:
    outcome = ChildOutcome(exit_code=1, report=report, stderr_tail="", timed_out=False,
                           duration_seconds=1.0)
    verdict = judge(outcome, sync_id=SYNC_ID, fail_on_drift=True, timeout_seconds=60)
    now = datetime(2026, 12, 4, 12, 0, tzinfo=UTC)
    context = SyncContext(sync_id=SYNC_ID, trigger=Trigger.CREATE, started_at=now,
                          finished_at=now, generation=3, dry_run="off", run_migrations=True,
                          fail_on_drift=True, backoff_limit=6)
    return finished_status({}, report=report, verdict=verdict, context=context)


def test_termination_message_gives_process_mode_status() -> None:
    """The status built from the expanded summary equals the one from the full report."""
    report = full_report(differences=7, failed_checks=2)

    expanded = report_from_termination_message(termination_message(report))

    assert status_of(expanded) == status_of(report)


def test_termination_message_fits_kubernetes_limit() -> None:
    report = full_report(differences=50_000, failed_checks=400)

    message = termination_message(report)

    assert len(message.encode("utf-8")) <= MAX_TERMINATION_MESSAGE_BYTES
    assert json.loads(message)["sync_id"] == SYNC_ID


def test_non_summary_message_is_no_report() -> None:
    assert report_from_termination_message("Traceback (most recent call last):") is None


# DSNs from environment variables.


def test_environment_dsn_connects(make_database: Callable[[str], str]) -> None:
    """A DSN assembled from variables reaches the real server, with no secret in the request."""
    parts = conninfo_to_dict(make_database("envdsn"))
    target_env: dict[str, object] = {
        "host": parts["host"], "port": int(parts.get("port") or 5432),
        "database": parts["dbname"], "user_variable": "TARGET_USER"}
    environ = {"TARGET_USER": str(parts["user"])}
    # A server with trust or peer authentication (such as CI's Unix socket cluster) has none.
    if parts.get("password"):
        target_env["password_variable"] = "TARGET_PASSWORD"
        environ["TARGET_PASSWORD"] = str(parts["password"])
    fields = {"target_env": target_env}

    resolved = resolve_environment_dsns(fields, environ)
    with psycopg.connect(resolved["target_dsn"]) as connection:
        row = connection.execute("SELECT current_database()").fetchone()

    assert row == (parts["dbname"],)
    assert "target_env" not in resolved


def test_environment_dsn_names_missing_variable() -> None:
    with pytest.raises(ConfigurationError, match="DBSYNC_SOURCE_URI"):
        resolve_environment_dsns({"source_env": {"uri_variable": "DBSYNC_SOURCE_URI"}}, {})


def test_environment_and_dsn_together_rejected() -> None:
    with pytest.raises(ConfigurationError, match="both source_dsn and source_env"):
        resolve_environment_dsns({"source_dsn": "host=x",
                                  "source_env": {"uri_variable": "URI"}}, {"URI": "host=y"})


# The pod side: dbsync run with --config-env and a termination message file.


def run_in_pod(request: dict[str, Any], environ: dict[str, str],
               tmp_path: Path) -> tuple[subprocess.CompletedProcess[str], Path]:
    message_file = tmp_path / "termination-log"
    completed = subprocess.run(
        [sys.executable, "-m", "dbsync.cli.main", "run", "--config-env", REQUEST_VARIABLE,
         "--output", "json"],
        env={**os.environ, **environ, REQUEST_VARIABLE: json.dumps(request),
             TERMINATION_MESSAGE_PATH_VARIABLE: str(message_file)},
        capture_output=True, text=True, timeout=120, check=False)
    return completed, message_file


def test_pod_run_writes_summary(make_database: Callable[[str], str], tmp_path: Path) -> None:
    """dbsync run builds DSNs from variables and writes its summary to the message file."""
    source, target = make_database("podsrc"), make_database("podtgt")
    request = {"source_env": {"uri_variable": "SOURCE"}, "target_env": {"uri_variable": "TARGET"},
               "sync_id": SYNC_ID}

    completed, message_file = run_in_pod(request, {"SOURCE": source, "TARGET": target},
                                         tmp_path)
    summary = json.loads(message_file.read_text(encoding="utf-8"))

    assert completed.returncode == 0, completed.stderr[-2000:]
    assert summary["sync_id"] == SYNC_ID
    assert summary["result"] == "Succeeded"
    assert [step["name"] for step in summary["steps"]] == [
        step["name"] for step in json.loads(completed.stdout)["steps"]]


def test_pod_run_reports_missing_variable(tmp_path: Path) -> None:
    request = {"source_env": {"uri_variable": "SOURCE"}, "target_env": {"uri_variable": "TARGET"}}

    completed, message_file = run_in_pod(request, {}, tmp_path)
    summary = json.loads(message_file.read_text(encoding="utf-8"))

    assert completed.returncode == 2
    assert summary["error"]["reason"] == "InvalidSpec"
    assert "SOURCE" in summary["error"]["message"]


# The emulator's kubelet.


def send(server: KubeApiServer, method: str, path: str,
         body: dict[str, Any] | None = None) -> dict[str, Any]:
    request = urllib.request.Request(
        server.url + path, method=method, headers={"Content-Type": "application/json"},
        data=json.dumps(body).encode("utf-8") if body is not None else None)
    with urllib.request.urlopen(request, timeout=10) as response:
        loaded: dict[str, Any] = json.loads(response.read())
        return loaded


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[tuple[KubeApiServer, Kubelet]]:
    """The emulator with a kubelet, a ConfigMap and a Secret in namespace default."""
    with running_apiserver() as server:
        kubelet = enable_kubelet(server, workdir=tmp_path / "kubelet")
        send(server, "POST", "/api/v1/namespaces/default/configmaps", {
            "metadata": {"name": "greetings"}, "data": {"hello.txt": "hello"}})
        send(server, "POST", "/api/v1/namespaces/default/secrets", {
            "metadata": {"name": "login"}, "stringData": {"password": CANARY}})
        try:
            yield server, kubelet
        finally:
            assert server.loop is not None
            asyncio.run_coroutine_threadsafe(kubelet.close(), server.loop).result(timeout=30)


def shell_job(name: str, script: str, *, deadline_seconds: int | None = None) -> dict[str, Any]:
    spec: dict[str, Any] = {"backoffLimit": 0, "template": {"spec": {
        "restartPolicy": "Never",
        "containers": [{
            "name": "main", "image": "busybox", "command": ["sh", "-c", script],
            "env": [{"name": "PASSWORD", "valueFrom": {"secretKeyRef": {
                "name": "login", "key": "password"}}}],
            "volumeMounts": [{"name": "greetings", "mountPath": "/etc/greetings"}]}],
        "volumes": [{"name": "greetings", "configMap": {"name": "greetings"}}]}}}
    if deadline_seconds is not None:
        spec["activeDeadlineSeconds"] = deadline_seconds
    return {"apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": name}, "spec": spec}


def wait_for_job(server: KubeApiServer, name: str, condition_type: str) -> dict[str, Any]:
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        job = server.get_object("batch", "v1", "jobs", "default", name) or {}
        for condition in (job.get("status") or {}).get("conditions") or []:
            if condition["type"] == condition_type:
                return job
        time.sleep(0.1)
    raise AssertionError(f"Job {name} has no {condition_type} condition: {job.get('status')}")


def pods_of(server: KubeApiServer, job: str) -> list[dict[str, Any]]:
    pods = send(server, "GET", f"/api/v1/namespaces/default/pods?labelSelector=job-name%3D{job}")
    items: list[dict[str, Any]] = pods["items"]
    return items


def test_kubelet_runs_pod_with_mounts_and_secrets(
        cluster: tuple[KubeApiServer, Kubelet]) -> None:
    server, _ = cluster
    send(server, "POST", "/apis/batch/v1/namespaces/default/jobs", shell_job(
        "greet", 'cat /etc/greetings/hello.txt > /dev/termination-log; '
                 'printf " $PASSWORD" >> /dev/termination-log'))

    job = wait_for_job(server, "greet", "Complete")
    pod = pods_of(server, "greet")[0]
    terminated = pod["status"]["containerStatuses"][0]["state"]["terminated"]

    assert job["status"]["succeeded"] == 1
    assert pod["status"]["phase"] == "Succeeded"
    assert terminated["exitCode"] == 0
    assert terminated["message"] == f"hello {CANARY}"


def test_kubelet_fails_job_past_deadline(cluster: tuple[KubeApiServer, Kubelet]) -> None:
    server, _ = cluster
    started = time.monotonic()
    send(server, "POST", "/apis/batch/v1/namespaces/default/jobs",
         shell_job("slow", "sleep 30", deadline_seconds=1))

    job = wait_for_job(server, "slow", "Failed")
    failed = next(condition for condition in job["status"]["conditions"]
                  if condition["type"] == "Failed")

    assert failed["reason"] == "DeadlineExceeded"
    assert job["status"]["failed"] == 1
    assert time.monotonic() - started < 15


def test_kubelet_reports_missing_image(cluster: tuple[KubeApiServer, Kubelet]) -> None:
    server, _ = cluster
    job = shell_job("pull", "true")
    job["spec"]["template"]["spec"]["containers"][0]["image"] = "example.com/does-not-exist"
    send(server, "POST", "/apis/batch/v1/namespaces/default/jobs", job)

    deadline = time.monotonic() + 10
    waiting: dict[str, Any] = {}
    while time.monotonic() < deadline and not waiting:
        for pod in pods_of(server, "pull"):
            for status in pod.get("status", {}).get("containerStatuses") or []:
                waiting = status["state"].get("waiting") or {}
        time.sleep(0.1)

    assert waiting.get("reason") == "ErrImagePull"


# A Job deleted while the operator waits for it.


SLOW_REVISION = '''"""Sleep in short statements."""

from alembic import op

revision = "0001_sleep"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    for _ in range(120):
        op.execute("SELECT pg_sleep(0.25)")


def downgrade() -> None:
    pass
'''


def test_deleted_job_gives_job_deleted(cluster: tuple[KubeApiServer, Kubelet],
                                       make_database: Callable[[str], str]) -> None:
    """Deleting a running sync Job ends the wait with JobDeleted and kills its process."""
    server, _ = cluster
    crd = yaml.safe_load((ROOT / "crds" / "databasesync.yaml").read_text("utf-8"))
    send(server, "POST", "/apis/apiextensions.k8s.io/v1/customresourcedefinitions", crd)
    send(server, "POST", "/api/v1/namespaces/default/configmaps", {
        "metadata": {"name": "slow"}, "data": {"0001_sleep.py": SLOW_REVISION}})
    send(server, "POST", "/api/v1/namespaces/default/secrets", {
        "metadata": {"name": "dbs"}, "stringData": {"uri": make_database("jobdel")}})
    reference = {"uriFrom": {"secretKeyRef": {"name": "dbs", "key": "uri"}}}
    spec = {"source": reference, "target": reference, "executor": "job",
            "migrations": {"configMaps": [{"name": "slow"}]}}
    deadline = time.monotonic() + 10
    while True:
        try:
            body = send(server, "POST", "/apis/dbsync.io/v1alpha1/namespaces/default/"
                        "databasesyncs", {"apiVersion": "dbsync.io/v1alpha1",
                                          "kind": "DatabaseSync",
                                          "metadata": {"name": "deleted"}, "spec": spec})
            break
        except urllib.error.HTTPError:
            # The CRD's resources are served a moment after it is stored.
            assert time.monotonic() < deadline
            time.sleep(0.1)

    name = job_name("deleted", SYNC_ID)

    def delete_when_running() -> None:
        for _ in range(200):
            pods = pods_of(server, name)
            if pods and pods[0].get("status", {}).get("phase") == "Running":
                time.sleep(1.0)
                send(server, "DELETE", f"/apis/batch/v1/namespaces/default/jobs/{name}")
                return
            time.sleep(0.1)

    async def run_sync() -> Any:
        kubeclient.remember_connection(kopf.ConnectionInfo(server=server.url, token="test"))
        client = KubeClient()
        executor = JobExecutor(client=client, settings=JobSettings(poll_interval_seconds=0.2))
        try:
            return await executor.run(body=body, spec=parse_spec(spec),
                                      request={"revision": "head", "sync_id": SYNC_ID},
                                      sync_id=SYNC_ID, started_at=datetime.now(UTC),
                                      trigger="Create")
        finally:
            await client.close()

    deleter = threading.Thread(target=delete_when_running)
    deleter.start()
    outcome = asyncio.run(run_sync())
    deleter.join(timeout=30)
    stored = server.get_object("dbsync.io", "v1alpha1", "databasesyncs", "default", "deleted")

    # The kubelet stops the process (SIGTERM, then SIGKILL) before it deletes the pod.
    pods_deadline = time.monotonic() + 10
    while pods_of(server, name) and time.monotonic() < pods_deadline:
        time.sleep(0.1)

    assert outcome.verdict is not None
    assert outcome.verdict.reason == Reason.JOB_DELETED
    assert (stored or {}).get("status", {}).get("activeJob", {}).get("name") == name
    assert pods_of(server, name) == []
