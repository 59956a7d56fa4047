"""Tests that the operator's RBAC grants cover every API call it makes, and nothing more.

:func:`compare_rbac` takes API calls, as recorded by the Kubernetes API emulator, and the
Roles and ClusterRoles bound to the operator's ServiceAccount in the rendered manifests. It
returns the calls no rule allows and the permissions no call used. The function is tested
on explicit calls first, then on the calls of a real ``dbsync operator`` process.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import pytest
import yaml

from dbsync.testing.kubeapi import KubeApiServer, running_apiserver
from dbsync.testing.kubeapi.kubelet import enable_kubelet

ROOT = Path(__file__).resolve().parent.parent
CRD_FILE = ROOT / "crds" / "databasesync.yaml"
BASE = ROOT / "deploy" / "base"
NAMESPACED = ROOT / "deploy" / "overlays" / "namespaced"
# One small revision keeps the sync short while still making the operator read a ConfigMap.
REVISION_FILE = '''"""Create the accounts table."""

import sqlalchemy as sa
from alembic import op

revision = "0001_accounts"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table("accounts", sa.Column("id", sa.BigInteger, primary_key=True))


def downgrade() -> None:
    op.drop_table("accounts")
'''
READY_TIMEOUT_SECONDS = 120.0
OPERATOR_NAMESPACE = "dbsync-system"
OPERATOR_SERVICE_ACCOUNT = "dbsync-operator"


class CallRecord(Protocol):
    """The request fields RBAC decides on, as in the emulator's ``RequestRecord``."""

    @property
    def verb(self) -> str: ...
    @property
    def api_group(self) -> str: ...
    @property
    def resource(self) -> str: ...
    @property
    def subresource(self) -> str: ...
    @property
    def namespace(self) -> str | None: ...
    @property
    def name(self) -> str: ...


@dataclass(frozen=True)
class ApiCall:
    """One API call: a Kubernetes verb on a resource or subresource, in a namespace or not."""

    verb: str
    api_group: str
    resource: str
    subresource: str = ""
    namespace: str | None = None
    name: str = ""


@dataclass(frozen=True)
class Grant:
    """The rules of one Role or ClusterRole bound to the operator, with the Role's namespace.

    ``namespace`` is None for a ClusterRole bound by a ClusterRoleBinding, which applies in
    every namespace and to cluster-scoped resources.
    """

    kind: str
    name: str
    namespace: str | None
    rules: tuple[Mapping[str, Any], ...]


@dataclass(frozen=True)
class Permission:
    """One verb on one resource of one API group, as granted by a rule of a Role."""

    role: str
    namespace: str | None
    api_group: str
    resource: str
    verb: str


@dataclass(frozen=True)
class RbacComparison:
    uncovered_calls: list[ApiCall]
    unused_permissions: list[Permission]


def as_call(record: CallRecord) -> ApiCall:
    return ApiCall(
        verb=record.verb,
        api_group=record.api_group,
        resource=record.resource,
        subresource=record.subresource,
        namespace=record.namespace,
        name=record.name,
    )


def rule_allows(rule: Mapping[str, Any], call: ApiCall, *, verb: str, group: str,
                resource: str) -> bool:
    """Return whether one (group, resource, verb) entry of ``rule`` allows ``call``."""
    if verb not in ("*", call.verb):
        return False
    if group not in ("*", call.api_group):
        return False
    if call.subresource:
        matching = {f"{call.resource}/{call.subresource}", f"*/{call.subresource}", "*"}
    else:
        matching = {call.resource, "*"}
    if resource not in matching:
        return False

    # resourceNames limit a rule to named objects, so calls without a name are not allowed.
    names = rule.get("resourceNames") or []
    return not names or call.name in names


def grant_applies(grant: Grant, call: ApiCall) -> bool:
    """Return whether a grant's scope includes the call's namespace."""
    if grant.namespace is None:
        return True
    return call.namespace == grant.namespace


def compare_rbac(
    records: Iterable[CallRecord | ApiCall], grants: Sequence[Grant]
) -> RbacComparison:
    """Return the calls no grant allows and the granted permissions no call used.

    Requests to non-resource URLs (discovery under /api and /apis, /version) are left out,
    because every authenticated client may send them through the system:discovery role.
    """
    calls = [record if isinstance(record, ApiCall) else as_call(record) for record in records]
    calls = [call for call in calls if call.resource]

    used: set[Permission] = set()
    uncovered: list[ApiCall] = []
    for call in calls:
        covered = False
        for grant in grants:
            if not grant_applies(grant, call):
                continue
            for rule in grant.rules:
                entries = itertools.product(
                    rule.get("verbs", []), rule.get("apiGroups", []), rule.get("resources", [])
                )
                for verb, group, resource in entries:
                    if rule_allows(rule, call, verb=verb, group=group, resource=resource):
                        covered = True
                        used.add(Permission(grant.name, grant.namespace, group, resource, verb))
        if not covered and call not in uncovered:
            uncovered.append(call)

    unused: list[Permission] = []
    for grant in grants:
        for rule in grant.rules:
            entries = itertools.product(
                rule.get("apiGroups", []), rule.get("resources", []), rule.get("verbs", [])
            )
            for group, resource, verb in entries:
                permission = Permission(grant.name, grant.namespace, group, resource, verb)
                if permission not in used and permission not in unused:
                    unused.append(permission)
    return RbacComparison(uncovered_calls=uncovered, unused_permissions=unused)


def operator_grants(manifests: Sequence[Mapping[str, Any]]) -> list[Grant]:
    """Return the Roles and ClusterRoles that bindings in ``manifests`` give the operator."""
    roles = {
        (document["kind"], document["metadata"]["name"], document["metadata"].get("namespace")):
            document
        for document in manifests
        if document.get("kind") in ("Role", "ClusterRole")
    }
    grants: list[Grant] = []
    for binding in manifests:
        if binding.get("kind") not in ("RoleBinding", "ClusterRoleBinding"):
            continue
        subjects = binding.get("subjects") or []
        binds_operator = any(
            subject.get("kind") == "ServiceAccount"
            and subject.get("name") == OPERATOR_SERVICE_ACCOUNT
            and subject.get("namespace") == OPERATOR_NAMESPACE
            for subject in subjects
        )
        if not binds_operator:
            continue

        # A RoleBinding grants in its own namespace, even when it refers to a ClusterRole.
        scope = binding["metadata"].get("namespace") if binding["kind"] == "RoleBinding" else None
        role_ref = binding["roleRef"]
        role_namespace = scope if role_ref["kind"] == "Role" else None
        role = roles.get((role_ref["kind"], role_ref["name"], role_namespace))
        assert role is not None, f"{binding['kind']} {binding['metadata']['name']} refers to " \
            f"{role_ref['kind']} {role_ref['name']}, which the manifests do not contain"
        grants.append(Grant(role_ref["kind"], role_ref["name"], scope, tuple(role["rules"])))
    return grants


def render(kustomization: Path) -> list[dict[str, Any]]:
    completed = subprocess.run(
        ["kubectl", "kustomize", str(kustomization)],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    return [document for document in yaml.safe_load_all(completed.stdout) if document]


CLUSTER_ROLE = Grant(
    kind="ClusterRole",
    name="operator",
    namespace=None,
    rules=(
        {"apiGroups": ["dbsync.io"], "resources": ["databasesyncs"],
         "verbs": ["list", "watch", "patch"]},
        {"apiGroups": ["dbsync.io"], "resources": ["databasesyncs/status"], "verbs": ["patch"]},
        {"apiGroups": [""], "resources": ["secrets"], "verbs": ["get"]},
    ),
)


def test_compare_rbac_finds_uncovered_call() -> None:
    calls = [
        ApiCall("list", "dbsync.io", "databasesyncs"),
        ApiCall("watch", "dbsync.io", "databasesyncs"),
        ApiCall("patch", "dbsync.io", "databasesyncs", namespace="payments", name="uat"),
        ApiCall("patch", "dbsync.io", "databasesyncs", "status", "payments", "uat"),
        ApiCall("get", "", "secrets", namespace="payments", name="uat-owner"),
        ApiCall("list", "", "secrets", namespace="payments"),
    ]

    comparison = compare_rbac(calls, [CLUSTER_ROLE])

    assert comparison.uncovered_calls == [ApiCall("list", "", "secrets", namespace="payments")]
    assert comparison.unused_permissions == []


def test_compare_rbac_finds_unused_permission() -> None:
    calls = [
        ApiCall("list", "dbsync.io", "databasesyncs"),
        ApiCall("watch", "dbsync.io", "databasesyncs"),
        ApiCall("patch", "dbsync.io", "databasesyncs", "status", "payments", "uat"),
        ApiCall("get", "", "secrets", namespace="payments", name="uat-owner"),
    ]

    comparison = compare_rbac(calls, [CLUSTER_ROLE])

    assert comparison.uncovered_calls == []
    assert comparison.unused_permissions == [
        Permission("operator", None, "dbsync.io", "databasesyncs", "patch")
    ]


def test_compare_rbac_subresource_needs_own_rule() -> None:
    """A rule on databasesyncs does not allow patching databasesyncs/status."""
    grant = Grant("ClusterRole", "operator", None, (
        {"apiGroups": ["dbsync.io"], "resources": ["databasesyncs"], "verbs": ["patch"]},
    ))
    call = ApiCall("patch", "dbsync.io", "databasesyncs", "status", "payments", "uat")

    comparison = compare_rbac([call], [grant])

    assert comparison.uncovered_calls == [call]


def test_compare_rbac_matches_api_group() -> None:
    """events in the core group and in events.k8s.io are different resources."""
    grant = Grant("ClusterRole", "operator", None, (
        {"apiGroups": ["events.k8s.io"], "resources": ["events"], "verbs": ["create"]},
    ))
    call = ApiCall("create", "", "events", namespace="payments")

    comparison = compare_rbac([call], [grant])

    assert comparison.uncovered_calls == [call]


def test_compare_rbac_role_limited_to_namespace() -> None:
    """A Role allows calls in its namespace only, and never cluster-wide lists."""
    grant = Grant("Role", "operator", "payments", (
        {"apiGroups": ["dbsync.io"], "resources": ["databasesyncs"], "verbs": ["list"]},
    ))
    inside = ApiCall("list", "dbsync.io", "databasesyncs", namespace="payments")
    elsewhere = ApiCall("list", "dbsync.io", "databasesyncs", namespace="cards")
    cluster_wide = ApiCall("list", "dbsync.io", "databasesyncs")

    comparison = compare_rbac([inside, elsewhere, cluster_wide], [grant])

    assert comparison.uncovered_calls == [elsewhere, cluster_wide]


def test_compare_rbac_wildcards_and_resource_names() -> None:
    grant = Grant("ClusterRole", "operator", None, (
        {"apiGroups": ["*"], "resources": ["*"], "verbs": ["get"]},
        {"apiGroups": [""], "resources": ["configmaps"], "verbs": ["update"],
         "resourceNames": ["dbsync-settings"]},
    ))
    named = ApiCall("update", "", "configmaps", namespace="dbsync-system", name="dbsync-settings")
    other = ApiCall("update", "", "configmaps", namespace="dbsync-system", name="other")
    anything = ApiCall("get", "apps", "deployments", namespace="dbsync-system", name="operator")

    comparison = compare_rbac([named, other, anything], [grant])

    assert comparison.uncovered_calls == [other]
    assert comparison.unused_permissions == []


def test_compare_rbac_ignores_non_resource_urls() -> None:
    """Discovery requests (/api, /apis) carry no resource and need no rule."""
    comparison = compare_rbac([ApiCall("get", "", "")], [])

    assert comparison.uncovered_calls == []


def test_operator_grants_follow_bindings() -> None:
    """Only roles bound to the operator's ServiceAccount count, with the binding's scope."""
    manifests: list[dict[str, Any]] = [
        {"kind": "ClusterRole", "metadata": {"name": "dbsync-operator"}, "rules": [{"x": 1}]},
        {"kind": "ClusterRole", "metadata": {"name": "unbound"}, "rules": [{"y": 2}]},
        {"kind": "Role", "metadata": {"name": "reader", "namespace": "payments"},
         "rules": [{"z": 3}]},
        {"kind": "ClusterRoleBinding", "metadata": {"name": "dbsync-operator"},
         "roleRef": {"kind": "ClusterRole", "name": "dbsync-operator"},
         "subjects": [{"kind": "ServiceAccount", "name": "dbsync-operator",
                       "namespace": "dbsync-system"}]},
        {"kind": "RoleBinding", "metadata": {"name": "reader", "namespace": "payments"},
         "roleRef": {"kind": "Role", "name": "reader"},
         "subjects": [{"kind": "ServiceAccount", "name": "dbsync-operator",
                       "namespace": "dbsync-system"}]},
        {"kind": "ClusterRoleBinding", "metadata": {"name": "someone-else"},
         "roleRef": {"kind": "ClusterRole", "name": "unbound"},
         "subjects": [{"kind": "ServiceAccount", "name": "other", "namespace": "default"}]},
    ]

    grants = operator_grants(manifests)

    assert grants == [
        Grant("ClusterRole", "dbsync-operator", None, ({"x": 1},)),
        Grant("Role", "reader", "payments", ({"z": 3},)),
    ]


# The real operator against the API emulator.


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def kubectl_apply(environment: dict[str, str], *arguments: str, stdin: str | None = None) -> None:
    completed = subprocess.run(
        ["kubectl", "apply", *arguments],
        input=stdin,
        capture_output=True,
        text=True,
        check=False,
        env=environment,
        timeout=120,
    )
    assert completed.returncode == 0, completed.stderr


def operator_arguments(manifests: Sequence[Mapping[str, Any]], *, liveness_port: int,
                       metrics_port: int) -> list[str]:
    """Return the Deployment's container args with the ports moved to free local ones."""
    deployment = next(document for document in manifests if document["kind"] == "Deployment")
    arguments = list(deployment["spec"]["template"]["spec"]["containers"][0]["args"])
    replacements = {"--liveness-port=": liveness_port, "--metrics-port=": metrics_port}
    for index, argument in enumerate(arguments):
        for prefix, port in replacements.items():
            if argument.startswith(prefix):
                arguments[index] = f"{prefix}{port}"
    return arguments


def wait_until_ready(server: KubeApiServer, namespace: str, name: str,
                     process: subprocess.Popen[bytes]) -> dict[str, Any]:
    """Poll the stored object until its Ready condition is True; return that condition."""
    deadline = time.monotonic() + READY_TIMEOUT_SECONDS
    conditions: dict[str, Any] = {}
    while time.monotonic() < deadline:
        assert process.poll() is None, f"dbsync operator exited with {process.returncode}"
        stored = server.get_object("dbsync.io", "v1alpha1", "databasesyncs", namespace, name)
        status = (stored or {}).get("status") or {}
        conditions = {condition["type"]: condition for condition in status.get("conditions", [])}
        if conditions.get("Ready", {}).get("status") == "True":
            ready: dict[str, Any] = conditions["Ready"]
            return ready
        time.sleep(0.5)
    raise AssertionError(f"{namespace}/{name} not Ready after {READY_TIMEOUT_SECONDS} s: "
                         f"{conditions}")


@pytest.fixture
def operator_environment(tmp_path: Path) -> Iterator[tuple[KubeApiServer, dict[str, str]]]:
    kubeconfig = tmp_path / "kubeconfig"
    with running_apiserver(kubeconfig_path=kubeconfig) as server:
        yield server, dict(os.environ, KUBECONFIG=str(kubeconfig))


@dataclass(frozen=True)
class OperatorRun:
    calls: list[ApiCall]
    ready: dict[str, Any]
    healthz_status: int
    metrics_text: str


def run_operator_once(
    *,
    server: KubeApiServer,
    environment: dict[str, str],
    manifests: list[dict[str, Any]],
    namespace: str,
    source_dsn: str,
    target_dsn: str,
    log_path: Path,
    extra_arguments: Sequence[str] = (),
) -> OperatorRun:
    """Sync one DatabaseSync with the real operator and return the API calls it made.

    The DatabaseSync reads its URIs from a Secret and its revisions from a ConfigMap, so
    both reading paths run. The request log is cleared before the operator starts, so only
    the operator's own calls remain; kubectl is not used again until it stops.
    """
    resources = [
        {"apiVersion": "v1", "kind": "Secret",
         "metadata": {"name": "payments-databases", "namespace": namespace},
         "stringData": {"source": source_dsn, "target": target_dsn}},
        {"apiVersion": "v1", "kind": "ConfigMap",
         "metadata": {"name": "payments-migrations", "namespace": namespace},
         "data": {"0001_create_accounts.py": REVISION_FILE}},
        {"apiVersion": "dbsync.io/v1alpha1", "kind": "DatabaseSync",
         "metadata": {"name": "payments-uat", "namespace": namespace},
         "spec": {
             "source": {"uriFrom": {"secretKeyRef": {"name": "payments-databases",
                                                     "key": "source"}}},
             "target": {"uriFrom": {"secretKeyRef": {"name": "payments-databases",
                                                     "key": "target"}}},
             "migrations": {"configMaps": [{"name": "payments-migrations"}]},
             # The source stays empty, so the migrated target differs from it by design.
             "diff": {"failOnDrift": False},
         }},
    ]
    kubectl_apply(environment, "-f", "-", stdin=yaml.safe_dump_all(resources))
    server.clear_requests_log()

    liveness_port, metrics_port = free_port(), free_port()
    arguments = operator_arguments(manifests, liveness_port=liveness_port,
                                   metrics_port=metrics_port) + list(extra_arguments)
    dbsync = Path(sys.executable).parent / "dbsync"
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [str(dbsync), "operator", *arguments],
            env=environment,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        ready = wait_until_ready(server, namespace, "payments-uat", process)
        with urllib.request.urlopen(f"http://127.0.0.1:{liveness_port}/healthz",
                                    timeout=10) as response:
            healthz_status = response.status
        with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics",
                                    timeout=10) as response:
            metrics_text = response.read().decode("utf-8")
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)

    calls = [as_call(record) for record in server.requests_log()
             if not record.user_agent.startswith("kubectl")]
    return OperatorRun(calls=calls, ready=ready, healthz_status=healthz_status,
                       metrics_text=metrics_text)


def describe_comparison(comparison: RbacComparison) -> str:
    uncovered = sorted({(call.verb, call.api_group, call.resource, call.subresource,
                         call.namespace) for call in comparison.uncovered_calls}, key=str)
    unused = [(permission.role, permission.namespace, permission.api_group,
               permission.resource, permission.verb)
              for permission in comparison.unused_permissions]
    return f"uncovered calls: {uncovered}; unused permissions: {unused}"


# Resources only job mode calls; a process-mode run leaves their permissions unused.
JOB_MODE_RESOURCES = {("batch", "jobs"), ("", "pods")}


def process_mode_unused(comparison: RbacComparison) -> list[Permission]:
    """Return the unused permissions, leaving out those only job mode needs."""
    return [permission for permission in comparison.unused_permissions
            if (permission.api_group, permission.resource) not in JOB_MODE_RESOURCES]


requires_crd = pytest.mark.skipif(
    not CRD_FILE.exists(),
    reason=f"{CRD_FILE.relative_to(ROOT)} is missing: generate it with `dbsync crd`",
)


@requires_crd
def test_cluster_role_matches_operator_calls(
    operator_environment: tuple[KubeApiServer, dict[str, str]],
    make_database: Callable[[str], str],
    tmp_path: Path,
) -> None:
    """The base ClusterRole allows every call of a real sync, and each of its rules is used."""
    server, environment = operator_environment
    manifests = render(BASE)
    kubectl_apply(environment, "-k", str(BASE))
    kubectl_apply(environment, "-f", "-", stdin=yaml.safe_dump(
        {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "payments"}}))

    run = run_operator_once(
        server=server, environment=environment, manifests=manifests, namespace="payments",
        source_dsn=make_database("src"), target_dsn=make_database("tgt"),
        log_path=tmp_path / "operator.log",
    )
    comparison = compare_rbac(run.calls, operator_grants(manifests))

    assert run.ready["status"] == "True"
    assert run.healthz_status == 200
    assert 'dbsync_syncs_total{name="payments-uat",namespace="payments"' in run.metrics_text
    assert comparison.uncovered_calls == [], describe_comparison(comparison)
    assert process_mode_unused(comparison) == [], describe_comparison(comparison)


@requires_crd
def test_cluster_role_matches_job_mode_calls(
    operator_environment: tuple[KubeApiServer, dict[str, str]],
    make_database: Callable[[str], str],
    tmp_path: Path,
) -> None:
    """In job mode the base ClusterRole allows every call, and only Job deletion goes unused.

    The operator deletes a Job only when its image cannot be pulled or it outlives its
    deadline, which a successful sync never does.
    """
    server, environment = operator_environment
    manifests = render(BASE)
    kubectl_apply(environment, "-k", str(BASE))
    kubectl_apply(environment, "-f", "-", stdin=yaml.safe_dump(
        {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "payments"}}))
    kubelet = enable_kubelet(server, workdir=tmp_path / "kubelet")

    try:
        run = run_operator_once(
            server=server, environment=environment, manifests=manifests, namespace="payments",
            source_dsn=make_database("src"), target_dsn=make_database("tgt"),
            log_path=tmp_path / "operator.log", extra_arguments=("--executor=job",),
        )
    finally:
        assert server.loop is not None
        asyncio.run_coroutine_threadsafe(kubelet.close(), server.loop).result(timeout=30)
    comparison = compare_rbac(run.calls, operator_grants(manifests))
    job_calls = {(call.verb, call.resource) for call in run.calls
                 if (call.api_group, call.resource) in JOB_MODE_RESOURCES}

    assert run.ready["status"] == "True"
    assert job_calls == {("create", "jobs"), ("get", "jobs"), ("list", "jobs"),
                         ("list", "pods")}
    assert comparison.uncovered_calls == [], describe_comparison(comparison)
    assert comparison.unused_permissions == [
        Permission("dbsync-operator", None, "batch", "jobs", "delete")
    ], describe_comparison(comparison)


@requires_crd
def test_roles_match_operator_calls(
    operator_environment: tuple[KubeApiServer, dict[str, str]],
    make_database: Callable[[str], str],
    tmp_path: Path,
) -> None:
    """The namespaced overlay's Roles allow every call of a real sync in their namespaces."""
    server, environment = operator_environment
    manifests = render(NAMESPACED)
    namespaces = [
        {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}}
        for name in ("payments-uat", "payments-staging")
    ]
    kubectl_apply(environment, "-f", "-", stdin=yaml.safe_dump_all(namespaces))
    kubectl_apply(environment, "-k", str(NAMESPACED))

    run = run_operator_once(
        server=server, environment=environment, manifests=manifests, namespace="payments-uat",
        source_dsn=make_database("src"), target_dsn=make_database("tgt"),
        log_path=tmp_path / "operator.log",
    )
    comparison = compare_rbac(run.calls, operator_grants(manifests))

    assert run.ready["status"] == "True"
    assert comparison.uncovered_calls == [], describe_comparison(comparison)
