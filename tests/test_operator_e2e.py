"""The operator end to end: a real `dbsync operator` process (kopf's runtime), the Kubernetes
API emulator, the real kubectl and real PostgreSQL.

One emulator and one operator serve the whole module; each test uses its own resource names
and its own target database.  The source database is at head with a balanced ledger.
"""

from __future__ import annotations

import copy
import json
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psutil
import psycopg
import pytest
import yaml

from dbsync.cli.demo_command import SAMPLE_LEDGER_SQL
from dbsync.k8s.demo import (
    CRD_PATH,
    EXAMPLES_K8S,
    INCONSISTENT_PATCH_WARNING,
    Kubectl,
    OperatorProcess,
    condition_of,
    wait_for,
)
from dbsync.pipeline.lock import SyncLock
from dbsync.pipeline.request import SyncRequest
from dbsync.pipeline.runner import run_sync
from dbsync.testing.kubeapi import KubeApiServer, running_apiserver
from dbsync.testing.postgres import LocalPostgres, find_free_port
from dbsync.testing.servers import TestServer
from tests.dbtools import alembic_versions, execute
from tests.migration_fixtures import FAILING_REVISION

pytestmark = [
    pytest.mark.kubectl,
    pytest.mark.skipif(shutil.which("kubectl") is None, reason="needs the kubectl binary"),
]

REPOSITORY = Path(__file__).resolve().parents[1]
EXAMPLE_MIGRATIONS = REPOSITORY / "examples" / "migrations"
EXAMPLE_HEAD = "0006_txn_status"
NAMESPACE = "default"


@dataclass
class Cluster:
    """The emulator, kubectl, the operator process and the shared source database."""

    api: KubeApiServer
    kubectl: Kubectl
    operator: OperatorProcess
    server: TestServer
    source_dsn: str
    empty_source_dsn: str

    def get(self, name: str) -> dict[str, Any] | None:
        return self.api.get_object("dbsync.io", "v1alpha1", "databasesyncs", NAMESPACE, name)

    def wait(self, name: str, predicate: Callable[[dict[str, Any]], bool], *,
             description: str, timeout_seconds: float = 40.0) -> dict[str, Any]:
        def check() -> dict[str, Any] | None:
            resource = self.get(name)
            return resource if resource is not None and predicate(resource) else None

        try:
            found: dict[str, Any] = wait_for(check, timeout_seconds=timeout_seconds,
                                             description=f"{name}: {description}")
        except TimeoutError:
            resource = self.get(name)
            raise AssertionError(
                f"{name}: {description} not reached; status: "
                f"{json.dumps((resource or {}).get('status'), indent=1)}\n"
                f"operator log tail:\n{self.operator.log_text()[-3000:]}") from None
        return found

    def wait_condition(self, name: str, condition_type: str, status: str,
                       reason: str | None = None, *,
                       timeout_seconds: float = 40.0) -> dict[str, Any]:
        def matches(resource: dict[str, Any]) -> bool:
            condition = condition_of(resource, condition_type) or {}
            return condition.get("status") == status and (
                reason is None or condition.get("reason") == reason)

        return self.wait(name, matches, description=f"{condition_type}={status} {reason or ''}",
                         timeout_seconds=timeout_seconds)

    def new_target(self) -> str:
        return self.server.dsn(self.server.create_database("tgt"))

    def apply_secret(self, name: str, data: dict[str, str]) -> None:
        self.kubectl.apply_text(yaml.safe_dump({
            "apiVersion": "v1", "kind": "Secret", "metadata": {"name": name},
            "type": "Opaque", "stringData": data}))

    def apply_sync(self, name: str, *, target_secret: str, changes: dict[str, Any] | None = None,
                   drop: tuple[str, ...] = ()) -> None:
        """Apply the example DatabaseSync under ``name`` with another target Secret."""
        resource = yaml.safe_load((EXAMPLES_K8S / "databasesync.yaml").read_text("utf-8"))
        resource["metadata"] = {"name": name}
        spec = resource["spec"]
        spec["target"] = {"uriFrom": {"secretKeyRef": {"name": target_secret, "key": "uri"}}}
        for key in drop:
            spec.pop(key, None)
        spec.update(copy.deepcopy(changes or {}))
        self.kubectl.apply_text(yaml.safe_dump(resource))

    def apply_noop_sync(self, name: str, *, target_secret: str,
                        changes: dict[str, Any] | None = None) -> None:
        """Apply a sync of an empty source without migrations or ledger: the quickest run."""
        source = {"uriFrom": {"secretKeyRef": {"name": "empty-source-db", "key": "uri"}}}
        self.apply_sync(name, target_secret=target_secret, drop=("ledger", "migrations"),
                        changes={"source": source, **(changes or {})})

    def patch_spec(self, name: str, spec: dict[str, Any]) -> None:
        self.kubectl.run("patch", "dbsync", name, "--type=merge", "-p",
                         json.dumps({"spec": spec}))


def _sync_source_to_head(dsn: str) -> None:
    report = run_sync(SyncRequest(source_dsn=dsn, target_dsn=dsn,
                                  migrations_dir=EXAMPLE_MIGRATIONS))
    assert report.exit_code == 0, report.render_text()
    execute(dsn, SAMPLE_LEDGER_SQL)


@pytest.fixture(scope="module")
def cluster(pg: TestServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """The API emulator with the CRD and example ConfigMap applied, and a running operator."""
    workdir = tmp_path_factory.mktemp("operator-e2e")
    source_dsn = pg.dsn(pg.create_database("src"))
    empty_source_dsn = pg.dsn(pg.create_database("empty"))
    _sync_source_to_head(source_dsn)
    with running_apiserver(kubeconfig_path=workdir / "kubeconfig") as api:
        kubectl = Kubectl(kubeconfig=workdir / "kubeconfig")
        kubectl.apply(CRD_PATH)
        kubectl.apply(EXAMPLES_K8S / "migrations-configmap.yaml")
        kubectl.apply_text(yaml.safe_dump({
            "apiVersion": "v1", "kind": "Secret", "metadata": {"name": "payments-source-db"},
            "type": "Opaque", "stringData": {"uri": source_dsn}}))
        kubectl.apply_text(yaml.safe_dump({
            "apiVersion": "v1", "kind": "Secret", "metadata": {"name": "empty-source-db"},
            "type": "Opaque", "stringData": {"uri": empty_source_dsn}}))
        operator = OperatorProcess(
            kubeconfig=workdir / "kubeconfig", log_path=workdir / "operator.log",
            extra_arguments=("--retry-base-seconds", "0.5", "--retry-max-seconds", "2"))
        with operator:
            wait_for(lambda: "Initial authentication has finished" in operator.log_text(),
                     timeout_seconds=30, description="the operator to log in")
            yield Cluster(api=api, kubectl=kubectl, operator=operator, server=pg,
                          source_dsn=source_dsn, empty_source_dsn=empty_source_dsn)


@pytest.fixture(autouse=True)
def no_dropped_status_fields(cluster: Cluster) -> Iterator[None]:
    """Fail a test if kopf saw the API server drop fields of its patch (undeclared status)."""
    yield
    assert INCONSISTENT_PATCH_WARNING not in cluster.operator.log_text()


def _audit_sync_ids(dsn: str, sync_id: str) -> list[str]:
    with psycopg.connect(dsn) as connection:
        rows = connection.execute(
            "SELECT DISTINCT sync_id::text FROM sync_audit_operations WHERE sync_id = %s",
            (sync_id,)).fetchall()
    return [str(row[0]) for row in rows]


def _audit_statuses(dsn: str, sync_id: str) -> set[str]:
    with psycopg.connect(dsn) as connection:
        rows = connection.execute(
            "SELECT status::text FROM sync_audit_operations WHERE sync_id = %s",
            (sync_id,)).fetchall()
    return {str(row[0]) for row in rows}


def _open_sync_ids(dsn: str) -> list[str]:
    """Return syncs with unfinished audit operations; none before the audit table exists."""
    with psycopg.connect(dsn) as connection:
        try:
            rows = connection.execute(
                "SELECT DISTINCT sync_id::text FROM sync_audit_operations "
                "WHERE status = 'IN_PROGRESS'").fetchall()
        except psycopg.errors.UndefinedTable:
            return []
    return [str(row[0]) for row in rows]


def _sync_id(resource: dict[str, Any]) -> str | None:
    return ((resource.get("status") or {}).get("lastSync") or {}).get("syncId")


def test_example_resource_becomes_ready(cluster: Cluster) -> None:
    """kubectl apply of the example, then kubectl wait Ready; the table shows the outcome."""
    target = cluster.new_target()
    cluster.apply_secret("payments-target-db", {"uri": target})
    cluster.kubectl.apply(EXAMPLES_K8S / "databasesync.yaml")

    waited = cluster.kubectl.run("wait", "--for=condition=Ready", "dbsync/payments-staging",
                                 "--timeout=60s", check=False)
    table = cluster.kubectl.run("get", "dbsyncs", "-o", "wide").stdout
    resource = cluster.get("payments-staging") or {}
    status = resource.get("status") or {}
    row = next(line.split() for line in table.splitlines() if line.startswith("payments-staging "))

    assert waited.returncode == 0, waited.stderr + cluster.operator.log_text()[-3000:]
    assert row[1:6] == ["True", "Succeeded", EXAMPLE_HEAD, "0", "true"]
    assert row[-1] == status["lastSync"]["syncId"]
    assert _audit_sync_ids(target, status["lastSync"]["syncId"]) == [status["lastSync"]["syncId"]]
    assert status["observedGeneration"] == resource["metadata"]["generation"]
    assert all(condition["observedGeneration"] == resource["metadata"]["generation"]
               for condition in status["conditions"])
    assert {condition["type"]: condition["status"] for condition in status["conditions"]} == {
        "Ready": "True", "Reconciling": "False", "Stalled": "False",
        "MigrationsApplied": "True", "SchemaInSync": "True", "LedgerBalanced": "True",
        "AuditRecorded": "True"}
    assert [step["name"] for step in status["lastSync"]["steps"]] == [
        "preflight", "lock", "migrate", "diff", "ledger"]
    assert "dbsync-test-password" not in json.dumps(resource)
    finished_at = datetime.fromisoformat(status["lastSync"]["finishedAt"].replace("Z", "+00:00"))
    assert finished_at.tzinfo == UTC

    # The Event's reason is the Ready reason and its message carries the sync id.
    sync_id = status["lastSync"]["syncId"]

    def succeeded_event() -> dict[str, Any] | None:
        events = cluster.kubectl.get_json("events")["items"]
        return next((event for event in events if event.get("reason") == "Succeeded"
                     and sync_id in event.get("message", "")), None)

    event = wait_for(succeeded_event, timeout_seconds=15, interval_seconds=0.5,
                     description="a Succeeded Event")
    assert event["type"] == "Normal"
    assert event["involvedObject"]["name"] == "payments-staging"


def test_failing_migration_stalls_and_leaves_target_unchanged(cluster: Cluster) -> None:
    target = cluster.new_target()
    cluster.apply_secret("failing-target-db", {"uri": target})
    configmap = yaml.safe_load((EXAMPLES_K8S / "migrations-configmap.yaml").read_text("utf-8"))
    configmap["metadata"]["name"] = "failing-migrations"
    configmap["data"]["0007_fails.py"] = FAILING_REVISION
    cluster.kubectl.apply_text(yaml.safe_dump(configmap))
    cluster.apply_sync("failing", target_secret="failing-target-db", changes={
        "migrations": {"configMaps": [{"name": "failing-migrations"}]},
        "transactionMode": "all"})

    resource = cluster.wait_condition("failing", "Stalled", "True", "MigrationFailed")
    ready = condition_of(resource, "Ready") or {}
    migrations = condition_of(resource, "MigrationsApplied") or {}

    assert ready["status"] == "False"
    assert ready["reason"] == "MigrationFailed"
    assert migrations["status"] == "False"
    assert alembic_versions(target) == []


def test_unbalanced_ledger_is_not_ready(cluster: Cluster) -> None:
    target = cluster.new_target()
    cluster.apply_secret("ledger-target-db", {"uri": target})
    cluster.apply_sync("ledger", target_secret="ledger-target-db")
    cluster.wait_condition("ledger", "Ready", "True")
    execute(target, SAMPLE_LEDGER_SQL)
    execute(target, "UPDATE postings SET amount = amount + 0.01 WHERE id = 7")

    cluster.kubectl.run("annotate", "--overwrite", "dbsync", "ledger",
                        "dbsync.io/run-at=ledger-1")
    resource = cluster.wait_condition("ledger", "LedgerBalanced", "False", "LedgerUnbalanced")
    ready = condition_of(resource, "Ready") or {}

    assert ready["status"] == "False"
    assert ready["reason"] == "LedgerUnbalanced"
    assert "transaction_balance" in resource["status"]["ledger"]["failedChecks"]


def test_stopped_database_retries_until_it_is_back(cluster: Cluster) -> None:
    """An unreachable target keeps the resource Reconciling with retries, then Ready."""
    with LocalPostgres() as dedicated:
        target = dedicated.dsn("postgres")
        cluster.apply_secret("flaky-target-db", {"uri": target})
        dedicated.stop()
        cluster.apply_noop_sync("flaky", target_secret="flaky-target-db")

        retrying = cluster.wait(
            "flaky", lambda resource: (resource.get("status") or {}).get("failures", 0) >= 2,
            description="two failed attempts")
        reconciling = condition_of(retrying, "Reconciling") or {}
        stalled = condition_of(retrying, "Stalled") or {}
        dedicated.start()
        resource = cluster.wait_condition("flaky", "Ready", "True")

    assert reconciling["status"] == "True"
    assert reconciling["reason"] == "DatabaseUnreachable"
    assert stalled["status"] == "False"
    assert resource["status"]["failures"] == 0


def test_backoff_limit_stalls_after_failures(cluster: Cluster) -> None:
    """Transient failures up to backoffLimit end as Stalled with BackoffLimitExceeded."""
    closed_port = find_free_port()
    cluster.apply_secret("closed-target-db", {
        "uri": f"postgresql://nobody:unused@127.0.0.1:{closed_port}/nothing"})
    cluster.apply_noop_sync("closed", target_secret="closed-target-db",
                            changes={"backoffLimit": 2, "connectTimeoutSeconds": 2})

    resource = cluster.wait_condition("closed", "Stalled", "True", "BackoffLimitExceeded")
    reconciling = condition_of(resource, "Reconciling") or {}

    assert resource["status"]["failures"] == 2
    assert reconciling["status"] == "False"
    assert "DatabaseUnreachable" in (condition_of(resource, "Stalled") or {})["message"]


def test_spec_edit_starts_a_new_sync(cluster: Cluster) -> None:
    target = cluster.new_target()
    cluster.apply_secret("edit-target-db", {"uri": target})
    cluster.apply_noop_sync("edit", target_secret="edit-target-db")
    first = cluster.wait_condition("edit", "Ready", "True")

    cluster.patch_spec("edit", {"lockWaitSeconds": 30})
    second = cluster.wait(
        "edit", lambda resource: resource["status"].get("observedGeneration") == 2
        and (condition_of(resource, "Ready") or {}).get("status") == "True",
        description="generation 2 observed and Ready")

    assert first["metadata"]["generation"] == 1
    assert second["metadata"]["generation"] == 2
    assert _sync_id(second) != _sync_id(first)
    assert second["status"]["lastSync"]["trigger"] == "Update"


def test_missing_secret_stalls_then_creating_it_recovers(cluster: Cluster) -> None:
    target = cluster.new_target()
    cluster.apply_noop_sync("nosecret", target_secret="late-target-db")

    stalled = cluster.wait_condition("nosecret", "Stalled", "True", "CredentialsNotFound")
    message = (condition_of(stalled, "Stalled") or {}).get("message", "")
    cluster.apply_secret("late-target-db", {"uri": target})
    recovered = cluster.wait_condition("nosecret", "Ready", "True")

    assert "late-target-db" in message
    assert recovered["status"]["lastSync"]["trigger"] == "Reference"


def test_suspend_prevents_runs_and_run_at_forces_one(cluster: Cluster) -> None:
    target = cluster.new_target()
    cluster.apply_secret("suspend-target-db", {"uri": target})
    cluster.apply_noop_sync("suspend", target_secret="suspend-target-db")
    first = cluster.wait_condition("suspend", "Ready", "True")

    cluster.patch_spec("suspend", {"suspend": True})
    suspended = cluster.wait_condition("suspend", "Ready", "False", "Suspended")
    cluster.patch_spec("suspend", {"lockWaitSeconds": 45})
    cluster.kubectl.run("annotate", "--overwrite", "dbsync", "suspend",
                        "dbsync.io/run-at=while-suspended")
    time.sleep(2.0)
    still = cluster.get("suspend") or {}

    cluster.patch_spec("suspend", {"suspend": False})
    resumed = cluster.wait_condition("suspend", "Ready", "True")
    cluster.kubectl.run("annotate", "--overwrite", "dbsync", "suspend",
                        "dbsync.io/run-at=2026-01-01T00:00:00Z")
    forced = cluster.wait(
        "suspend", lambda resource: resource["status"].get("lastHandledRunAt")
        == "2026-01-01T00:00:00Z" and _sync_id(resource) != _sync_id(resumed),
        description="the run-at annotation handled")

    assert _sync_id(suspended) == _sync_id(first)
    assert _sync_id(still) == _sync_id(first)
    assert _sync_id(resumed) != _sync_id(first)
    assert forced["status"]["lastSync"]["trigger"] == "RunAt"


def test_periodic_recheck_reports_manual_drift(cluster: Cluster) -> None:
    target = cluster.new_target()
    cluster.apply_secret("drift-target-db", {"uri": target})
    cluster.apply_sync("drift", target_secret="drift-target-db", drop=("ledger",),
                       changes={"interval": "2s"})
    cluster.wait_condition("drift", "Ready", "True")

    execute(target, "ALTER TABLE accounts ADD COLUMN nickname text")
    resource = cluster.wait_condition("drift", "SchemaInSync", "False", "DriftDetected")
    ready = condition_of(resource, "Ready") or {}

    assert resource["status"]["drift"]["differences"] >= 1
    assert resource["status"]["lastSync"]["trigger"] == "Interval"
    assert ready["reason"] == "DriftDetected"
    assert [step["result"] for step in resource["status"]["lastSync"]["steps"]
            if step["name"] == "migrate"] == ["Skipped"]


def test_killed_child_is_transient_and_audited_as_abandoned(cluster: Cluster) -> None:
    """A sync child killed from outside is retried; the next sync closes its operations."""
    target = cluster.new_target()
    cluster.apply_secret("killed-target-db", {"uri": target})
    # Holding the target's sync lock parks the operator's child in its lock wait.
    with SyncLock(dsn=target, lock_wait_seconds=1, connect_timeout_seconds=5):
        cluster.apply_noop_sync("killed", target_secret="killed-target-db",
                                changes={"lockWaitSeconds": 60})
        cluster.wait_condition("killed", "Reconciling", "True", "Syncing")
        wait_for(lambda: _open_sync_ids(target), timeout_seconds=30,
                 description="the child's audit operations to start")
        children = psutil.Process(cluster.operator.pid).children()
        for child in children:
            child.kill()
        interrupted = cluster.wait_condition("killed", "Reconciling", "True",
                                             "SyncInterrupted")
    resource = cluster.wait_condition("killed", "Ready", "True")
    killed_sync_id = _sync_id(interrupted)

    assert children
    assert killed_sync_id is not None
    assert "ABANDONED" in _audit_statuses(target, killed_sync_id)
    assert _sync_id(resource) != killed_sync_id


def test_deleting_a_resource_leaves_databases_alone(cluster: Cluster) -> None:
    target = cluster.new_target()
    cluster.apply_secret("delete-target-db", {"uri": target})
    cluster.apply_sync("delete", target_secret="delete-target-db", drop=("ledger",))
    cluster.wait_condition("delete", "Ready", "True")
    before = alembic_versions(target)

    deleted = cluster.kubectl.run("delete", "dbsync", "delete", "--timeout=20s", check=False)
    removed = wait_for(lambda: cluster.get("delete") is None, timeout_seconds=20,
                    description="the resource to disappear")

    assert deleted.returncode == 0
    assert removed
    assert alembic_versions(target) == before == [EXAMPLE_HEAD]
