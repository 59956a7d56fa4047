"""Tests of the kustomize manifests in deploy/: schema validity, Pod security and RBAC scope.

Each manifest that ``kubectl kustomize`` renders is validated against the Kubernetes OpenAPI
schemas of the oldest supported release (1.30) and the newest one kubernetes-validate ships.
Then both kustomizations are applied with ``kubectl apply -k`` to the API emulator.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml
from kubernetes_validate.utils import latest_version

from dbsync.testing.kubeapi import KubeApiServer, running_apiserver

ROOT = Path(__file__).resolve().parent.parent
CRD_FILE = ROOT / "crds" / "databasesync.yaml"
BASE = ROOT / "deploy" / "base"
NAMESPACED = ROOT / "deploy" / "overlays" / "namespaced"
KUBERNETES_VERSIONS = ("1.30.0", latest_version())
OPERATOR_NAMESPACE = "dbsync-system"
RUN_AS_USER = 65532

pytestmark = [
    pytest.mark.kubectl,
    pytest.mark.skipif(
        not CRD_FILE.exists(),
        reason=f"{CRD_FILE.relative_to(ROOT)} is missing: generate it with `dbsync crd`",
    ),
]


def render(kustomization: Path) -> list[dict[str, Any]]:
    completed = subprocess.run(
        ["kubectl", "kustomize", str(kustomization)],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    return [document for document in yaml.safe_load_all(completed.stdout) if document]


@pytest.fixture(scope="module")
def base() -> list[dict[str, Any]]:
    return render(BASE)


@pytest.fixture(scope="module")
def namespaced() -> list[dict[str, Any]]:
    return render(NAMESPACED)


def only(documents: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    """Return the single document of ``kind``, failing when there are none or several."""
    matching = [document for document in documents if document["kind"] == kind]
    assert len(matching) == 1, f"expected one {kind}, found {len(matching)}"
    return matching[0]


def of_kind(documents: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [document for document in documents if document["kind"] == kind]


def operator_container(documents: list[dict[str, Any]]) -> dict[str, Any]:
    containers = only(documents, "Deployment")["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1
    container: dict[str, Any] = containers[0]
    return container


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
@pytest.mark.parametrize("kustomization", ["base", "namespaced"])
def test_manifests_match_openapi_schema(
    kustomization: str, version: str, request: pytest.FixtureRequest
) -> None:
    """Every rendered manifest validates strictly: no unknown field, no wrong type."""
    documents: list[dict[str, Any]] = request.getfixturevalue(kustomization)
    failures: dict[str, str] = {}
    for document in documents:
        label = f"{document['kind']}/{document['metadata']['name']}"
        try:
            kubernetes_validate.validate(document, version, strict=True)
        except kubernetes_validate.ValidationError as error:
            failures[label] = str(error.message)

    assert failures == {}


def test_validation_rejects_unknown_field(base: list[dict[str, Any]]) -> None:
    """The schema check above can fail: a misspelt Deployment field is reported."""
    deployment = dict(only(base, "Deployment"))
    deployment["spec"] = dict(deployment["spec"], replica=1)

    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, KUBERNETES_VERSIONS[0], strict=True)


def test_base_contains_install_objects(base: list[dict[str, Any]]) -> None:
    kinds = sorted(document["kind"] for document in base)

    assert kinds == sorted([
        "Namespace", "CustomResourceDefinition", "ServiceAccount", "ClusterRole",
        "ClusterRoleBinding", "Deployment", "Service",
    ])


def test_base_includes_generated_crd(base: list[dict[str, Any]]) -> None:
    """The CRD comes from crds/databasesync.yaml unchanged apart from the common label."""
    rendered = only(base, "CustomResourceDefinition")
    generated = yaml.safe_load(CRD_FILE.read_text(encoding="utf-8"))

    assert rendered["spec"] == generated["spec"]
    assert rendered["metadata"]["name"] == "databasesyncs.dbsync.io"


def test_namespaced_objects_in_operator_namespace(base: list[dict[str, Any]]) -> None:
    namespace = only(base, "Namespace")
    placed = {
        document["kind"]: document["metadata"].get("namespace")
        for document in base
        if document["kind"] in ("ServiceAccount", "Deployment", "Service")
    }

    assert namespace["metadata"]["name"] == OPERATOR_NAMESPACE
    assert placed == dict.fromkeys(("ServiceAccount", "Deployment", "Service"), OPERATOR_NAMESPACE)


def test_namespace_enforces_restricted_pods(base: list[dict[str, Any]]) -> None:
    labels = only(base, "Namespace")["metadata"]["labels"]

    assert labels["pod-security.kubernetes.io/enforce"] == "restricted"


def test_deployment_runs_one_replica_with_recreate(base: list[dict[str, Any]]) -> None:
    """kopf has no usable leader election, so two operator Pods must never overlap."""
    spec = only(base, "Deployment")["spec"]

    assert spec["replicas"] == 1
    assert spec["strategy"] == {"type": "Recreate"}


def test_deployment_probes_kopf_liveness(base: list[dict[str, Any]]) -> None:
    container = operator_container(base)
    ports = {port["name"]: port["containerPort"] for port in container["ports"]}

    for probe_name in ("livenessProbe", "readinessProbe"):
        probe = container[probe_name]["httpGet"]
        assert probe["path"] == "/healthz"
        assert ports[probe["port"]] == 8080
    assert any(argument == "--liveness-port=8080" for argument in container["args"])


def test_deployment_sets_requests_and_limits(base: list[dict[str, Any]]) -> None:
    resources = operator_container(base)["resources"]

    assert set(resources["requests"]) == {"cpu", "memory"}
    assert set(resources["limits"]) == {"cpu", "memory"}


def test_pod_security_context_restricted(base: list[dict[str, Any]]) -> None:
    """The Pod meets the restricted Pod Security Standard with a read-only root filesystem."""
    pod = only(base, "Deployment")["spec"]["template"]["spec"]
    container = operator_container(base)["securityContext"]

    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] == RUN_AS_USER
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert container["runAsNonRoot"] is True
    assert container["runAsUser"] == RUN_AS_USER
    assert container["readOnlyRootFilesystem"] is True
    assert container["allowPrivilegeEscalation"] is False
    assert container["capabilities"] == {"drop": ["ALL"]}
    assert container["seccompProfile"] == {"type": "RuntimeDefault"}


def test_tmp_is_writable_empty_dir(base: list[dict[str, Any]]) -> None:
    pod = only(base, "Deployment")["spec"]["template"]["spec"]
    container = operator_container(base)
    volumes = {volume["name"]: volume for volume in pod["volumes"]}
    mounts = {mount["mountPath"]: mount["name"] for mount in container["volumeMounts"]}
    environment = {item["name"]: item.get("value") for item in container["env"]}

    assert "emptyDir" in volumes[mounts["/tmp"]]
    assert environment["TMPDIR"] == "/tmp"


def test_metrics_service_targets_metrics_port(base: list[dict[str, Any]]) -> None:
    service = only(base, "Service")
    deployment = only(base, "Deployment")
    container = operator_container(base)
    container_ports = {port["name"]: port["containerPort"] for port in container["ports"]}
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]

    assert service["spec"]["ports"][0]["port"] == 9090
    assert container_ports[service["spec"]["ports"][0]["targetPort"]] == 9090
    assert service["spec"]["selector"].items() <= pod_labels.items()
    assert any(argument == "--metrics-port=9090" for argument in container["args"])


def test_base_watches_all_namespaces(base: list[dict[str, Any]]) -> None:
    arguments = operator_container(base)["args"]

    assert "--all-namespaces" in arguments
    assert not any(argument.startswith("--namespace") for argument in arguments)


def test_rules_use_no_wildcards(
    base: list[dict[str, Any]], namespaced: list[dict[str, Any]]
) -> None:
    roles = of_kind(base, "ClusterRole") + of_kind(namespaced, "Role")
    wildcards = [
        (role["kind"], role["metadata"].get("namespace"), rule)
        for role in roles
        for rule in role["rules"]
        if "*" in rule["verbs"] + rule["resources"] + rule["apiGroups"]
    ]

    assert roles != []
    assert wildcards == []


def test_secrets_and_configmaps_read_only(
    base: list[dict[str, Any]], namespaced: list[dict[str, Any]]
) -> None:
    """The operator reads Secrets and ConfigMaps and watches them, but never writes them."""
    roles = of_kind(base, "ClusterRole") + of_kind(namespaced, "Role")
    verbs = {
        verb
        for role in roles
        for rule in role["rules"]
        if {"secrets", "configmaps"} & set(rule["resources"])
        for verb in rule["verbs"]
    }

    assert verbs == {"get", "list", "watch"}


def test_overlay_replaces_cluster_role_with_roles(namespaced: list[dict[str, Any]]) -> None:
    role_namespaces = sorted(role["metadata"]["namespace"] for role in of_kind(namespaced, "Role"))
    binding_namespaces = sorted(
        binding["metadata"]["namespace"] for binding in of_kind(namespaced, "RoleBinding")
    )

    assert of_kind(namespaced, "ClusterRole") == []
    assert of_kind(namespaced, "ClusterRoleBinding") == []
    assert role_namespaces == ["payments-staging", "payments-uat"]
    assert binding_namespaces == role_namespaces


def test_overlay_passes_role_namespaces(namespaced: list[dict[str, Any]]) -> None:
    """The operator serves exactly the namespaces it has Roles in."""
    arguments = operator_container(namespaced)["args"]
    served = sorted(
        argument.removeprefix("--namespace=")
        for argument in arguments
        if argument.startswith("--namespace=")
    )
    role_namespaces = sorted(role["metadata"]["namespace"] for role in of_kind(namespaced, "Role"))

    assert served == role_namespaces
    assert "--all-namespaces" not in arguments


def test_overlay_bindings_name_operator_account(namespaced: list[dict[str, Any]]) -> None:
    service_account = only(
        [account for account in of_kind(namespaced, "ServiceAccount")
         if account["metadata"]["name"] == "dbsync-operator"], "ServiceAccount")["metadata"]
    subjects = [
        subject
        for binding in of_kind(namespaced, "RoleBinding")
        for subject in binding["subjects"]
    ]

    assert subjects == [
        {"kind": "ServiceAccount", "name": service_account["name"],
         "namespace": service_account["namespace"]},
    ] * 2


def test_overlay_gives_sync_jobs_tokenless_account(namespaced: list[dict[str, Any]]) -> None:
    """Each served namespace has the sync Jobs' ServiceAccount, with no token mounted."""
    runners = [account for account in of_kind(namespaced, "ServiceAccount")
               if account["metadata"]["name"] == "dbsync-sync-runner"]
    role_namespaces = sorted(role["metadata"]["namespace"] for role in of_kind(namespaced, "Role"))

    assert sorted(account["metadata"]["namespace"] for account in runners) == role_namespaces
    assert all(account["automountServiceAccountToken"] is False for account in runners)
    assert not any(subject.get("name") == "dbsync-sync-runner"
                   for binding in of_kind(namespaced, "RoleBinding")
                   for subject in binding["subjects"])


@pytest.fixture
def apiserver(tmp_path: Path) -> Iterator[tuple[KubeApiServer, dict[str, str]]]:
    """The API emulator and an environment whose KUBECONFIG points kubectl at it."""
    kubeconfig = tmp_path / "kubeconfig"
    with running_apiserver(kubeconfig_path=kubeconfig) as server:
        yield server, dict(os.environ, KUBECONFIG=str(kubeconfig))


def kubectl(
    environment: dict[str, str], *arguments: str, stdin: str | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["kubectl", *arguments],
        input=stdin,
        capture_output=True,
        text=True,
        check=False,
        env=environment,
        timeout=120,
    )


def test_apply_base_to_apiserver(apiserver: tuple[KubeApiServer, dict[str, str]]) -> None:
    server, environment = apiserver

    applied = kubectl(environment, "apply", "-k", str(BASE))

    assert applied.returncode == 0, applied.stderr
    deployment = server.get_object("apps", "v1", "deployments", OPERATOR_NAMESPACE,
                                   "dbsync-operator")
    assert deployment is not None
    crd = server.get_object("apiextensions.k8s.io", "v1", "customresourcedefinitions", None,
                            "databasesyncs.dbsync.io")
    assert crd is not None


def test_apply_overlay_to_apiserver(apiserver: tuple[KubeApiServer, dict[str, str]]) -> None:
    """The overlay applies once the application namespaces it names exist."""
    server, environment = apiserver
    for namespace in ("payments-uat", "payments-staging"):
        manifest = yaml.safe_dump(
            {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": namespace}}
        )
        created = kubectl(environment, "apply", "-f", "-", stdin=manifest)
        assert created.returncode == 0, created.stderr

    applied = kubectl(environment, "apply", "-k", str(NAMESPACED))

    assert applied.returncode == 0, applied.stderr
    role = server.get_object("rbac.authorization.k8s.io", "v1", "roles", "payments-uat",
                             "dbsync-operator")
    assert role is not None
    cluster_role = server.get_object("rbac.authorization.k8s.io", "v1", "clusterroles", None,
                                     "dbsync-operator")
    assert cluster_role is None
