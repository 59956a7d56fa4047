"""The API emulator driven by the real kubectl binary (v1.32): apply, get, wait, delete, patch."""

from __future__ import annotations

import json
import shutil
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from dbsync.testing.kubeapi import KubeApiServer, running_apiserver
from tests.kubeapi_client import WIDGETS, client_for
from tests.kubeapi_manifests import WIDGET_CRD, widget

KUBECTL = shutil.which("kubectl")

pytestmark = [
    pytest.mark.kubectl,
    pytest.mark.skipif(KUBECTL is None, reason="kubectl is not on PATH"),
]


@dataclass(frozen=True)
class Kubectl:
    """Runs kubectl against one emulator with its own kubeconfig and discovery cache."""

    kubeconfig: Path
    cache_dir: Path
    work_dir: Path

    def run(self, *args: str, stdin: str | None = None,
            check: bool = True) -> subprocess.CompletedProcess[str]:
        assert KUBECTL is not None
        result = subprocess.run(
            [KUBECTL, f"--kubeconfig={self.kubeconfig}", f"--cache-dir={self.cache_dir}",
             *args],
            input=stdin, capture_output=True, text=True, timeout=60,
            env={"PATH": "/usr/bin:/bin", "HOME": str(self.work_dir)},
        )
        if check and result.returncode != 0:
            raise AssertionError(f"kubectl {' '.join(args)} failed: {result.stderr}")
        return result

    def apply(self, manifest: dict[str, object], *, check: bool = True
              ) -> subprocess.CompletedProcess[str]:
        return self.run("apply", "-f", "-", stdin=yaml.safe_dump(manifest), check=check)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[KubeApiServer]:
    """One emulator for the module, because each kubectl start rereads discovery."""
    path = tmp_path_factory.mktemp("kubectl") / "kubeconfig"
    with running_apiserver(kubeconfig_path=path) as running:
        yield running


@pytest.fixture(scope="module")
def kubectl(server: KubeApiServer, tmp_path_factory: pytest.TempPathFactory) -> Kubectl:
    """kubectl with the Widget CRD applied."""
    assert server.kubeconfig_path is not None
    work_dir = tmp_path_factory.mktemp("kubectl-home")
    runner = Kubectl(server.kubeconfig_path, work_dir / "cache", work_dir)
    result = runner.apply(WIDGET_CRD)
    assert "created" in result.stdout
    return runner


def test_apply_creates_then_reports_unchanged(kubectl: Kubectl) -> None:
    """kubectl apply creates an object, then reports the same manifest unchanged."""
    first = kubectl.apply(widget("apply", replicas=2, owner="ann"))
    second = kubectl.apply(widget("apply", replicas=2, owner="ann"))
    assert first.stdout.strip() == "widget.example.dbsync.io/apply created"
    assert second.stdout.strip() == "widget.example.dbsync.io/apply unchanged"


def test_apply_changes_and_removes_fields(kubectl: Kubectl, server: KubeApiServer) -> None:
    """A second apply sends a merge patch that updates and removes fields."""
    kubectl.apply(widget("reapply", replicas=2, owner="ann"))
    result = kubectl.apply(widget("reapply", replicas=3))
    stored = server.get_object("example.dbsync.io", "v1", "widgets", "default", "reapply")
    assert result.stdout.strip() == "widget.example.dbsync.io/reapply configured"
    assert stored is not None
    assert stored["spec"]["replicas"] == 3
    assert "owner" not in stored["spec"]
    assert stored["metadata"]["generation"] == 2


def test_get_prints_printer_columns(kubectl: Kubectl) -> None:
    """kubectl get by plural and by short name prints the printer columns."""
    kubectl.apply(widget("cols", replicas=4, owner="bob"))
    by_plural = kubectl.run("get", "widgets", "cols").stdout.splitlines()
    by_short_name = kubectl.run("get", "wdg", "cols").stdout.splitlines()
    assert by_plural[0].split() == ["NAME", "READY", "REASON", "REPLICAS", "PAUSED",
                                    "LAST", "SYNC", "AGE"]
    # Why four cells: kubectl prints the empty Ready, Reason and Last Sync cells as blanks.
    assert by_plural[1].split()[:3] == ["cols", "4", "false"]
    assert by_plural[1].split()[3].endswith("s")
    # Why not the Age cell: a second may pass between the two calls.
    assert by_short_name[0] == by_plural[0]
    assert by_short_name[1].split()[:3] == by_plural[1].split()[:3]


def test_get_wide_shows_priority_columns(kubectl: Kubectl) -> None:
    """-o wide adds the priority-1 column."""
    kubectl.apply(widget("wide", owner="carol"))
    lines = kubectl.run("get", "widget", "wide", "-o", "wide").stdout.splitlines()
    assert lines[0].split()[-1] == "OWNER"
    assert lines[1].split()[-1] == "carol"


def test_get_shows_ready_condition_from_status(kubectl: Kubectl) -> None:
    """The Ready column reads the condition through a JSONPath filter."""
    kubectl.apply(widget("ready"))
    kubectl.run("patch", "widget", "ready", "--subresource", "status", "--type", "merge",
                "-p", json.dumps({"status": {"conditions": [
                    {"type": "Ready", "status": "False", "reason": "Migrating"}]}}))
    row = kubectl.run("get", "widget", "ready", "--no-headers").stdout.split()
    assert row[:3] == ["ready", "False", "Migrating"]


def test_get_jsonpath_output(kubectl: Kubectl) -> None:
    """-o jsonpath reads fields of the served object."""
    kubectl.apply(widget("jp", replicas=5))
    result = kubectl.run("get", "widget", "jp", "-o", "jsonpath={.spec.replicas}/{.spec.mode}")
    assert result.stdout == "5/fast"


def test_get_by_category(kubectl: Kubectl) -> None:
    """kubectl get <category> lists the CRD's resources."""
    kubectl.apply(widget("cat"))
    names = kubectl.run("get", "dbsync", "-o", "name").stdout.splitlines()
    assert "widget.example.dbsync.io/cat" in names


def test_apply_invalid_object_names_field(kubectl: Kubectl) -> None:
    """kubectl apply of a schema violation fails and names the field."""
    result = kubectl.apply(widget("invalid", mode="slow", replicas=20), check=False)
    assert result.returncode != 0
    assert "spec.mode: Unsupported value: \"slow\"" in result.stderr
    assert "spec.replicas: Invalid value: 20" in result.stderr


def test_apply_unknown_field_is_rejected_strictly(kubectl: Kubectl) -> None:
    """kubectl's default strict validation makes an unknown field an error."""
    result = kubectl.apply(widget("unknown", stray=1), check=False)
    assert result.returncode != 0
    assert 'unknown field "spec.stray"' in result.stderr


def test_wait_returns_when_condition_is_set(kubectl: Kubectl, server: KubeApiServer) -> None:
    """kubectl wait --for=condition=Ready returns once a status patch sets it."""
    kubectl.apply(widget("waited"))
    client = client_for(server)

    def set_ready() -> None:
        time.sleep(1)
        client.call("PATCH", f"{WIDGETS}/waited/status", {"status": {"conditions": [
            {"type": "Ready", "status": "True", "reason": "Synced"}]}},
            content_type="application/merge-patch+json")

    patcher = threading.Thread(target=set_ready)
    patcher.start()
    started = time.monotonic()
    result = kubectl.run("wait", "--for=condition=Ready", "widget/waited", "--timeout=20s",
                         check=False)
    elapsed = time.monotonic() - started
    patcher.join()
    assert result.returncode == 0, result.stderr
    assert "condition met" in result.stdout
    assert elapsed < 10


def test_wait_times_out_without_condition(kubectl: Kubectl) -> None:
    """kubectl wait fails after its timeout when the condition never appears."""
    kubectl.apply(widget("never"))
    result = kubectl.run("wait", "--for=condition=Ready", "widget/never", "--timeout=1s",
                         check=False)
    assert result.returncode != 0
    assert "timed out" in result.stderr


def test_delete_with_finalizer_waits_for_removal(kubectl: Kubectl) -> None:
    """kubectl delete --wait=false leaves a deletionTimestamp until the finalizer goes."""
    manifest = widget("final")
    manifest["metadata"]["finalizers"] = ["example.dbsync.io/cleanup"]
    kubectl.apply(manifest)
    kubectl.run("delete", "widget", "final", "--wait=false")
    stamp = kubectl.run("get", "widget", "final", "-o",
                        "jsonpath={.metadata.deletionTimestamp}").stdout
    kubectl.run("patch", "widget", "final", "--type", "merge", "-p",
                '{"metadata":{"finalizers":null}}')
    after = kubectl.run("get", "widget", "final", "--ignore-not-found", "-o", "name").stdout
    assert stamp.endswith("Z")
    assert after == ""


def test_patch_merge_updates_spec_not_status(kubectl: Kubectl, server: KubeApiServer) -> None:
    """kubectl patch --type merge changes spec; status in it is ignored."""
    kubectl.apply(widget("merge"))
    kubectl.run("patch", "widget", "merge", "--type", "merge", "-p",
                '{"spec":{"replicas":6},"status":{"observedGeneration":7}}')
    stored = server.get_object("example.dbsync.io", "v1", "widgets", "default", "merge")
    assert stored is not None
    assert stored["spec"]["replicas"] == 6
    assert "status" not in stored


def test_patch_status_subresource_leaves_spec(kubectl: Kubectl, server: KubeApiServer) -> None:
    """kubectl patch --subresource status changes status only."""
    kubectl.apply(widget("status"))
    kubectl.run("patch", "widget", "status", "--subresource", "status", "--type", "merge",
                "-p", '{"spec":{"replicas":9},"status":{"observedGeneration":1}}')
    stored = server.get_object("example.dbsync.io", "v1", "widgets", "default", "status")
    assert stored is not None
    assert stored["spec"]["replicas"] == 1
    assert stored["status"] == {"observedGeneration": 1}


def test_explain_describes_custom_resource(kubectl: Kubectl) -> None:
    """kubectl explain renders the CRD schema from OpenAPI v3."""
    result = kubectl.run("explain", "widgets.spec")
    assert "Desired state of the widget." in result.stdout
    assert "mode\t<string> -required-" in result.stdout


def test_apply_builtins_uses_strategic_merge(kubectl: Kubectl, server: KubeApiServer) -> None:
    """kubectl apply of built-in kinds works, including a re-apply that removes a field."""
    config_map = {"apiVersion": "v1", "kind": "ConfigMap",
                  "metadata": {"name": "settings", "namespace": "default"},
                  "data": {"a": "1", "b": "2"}}
    secret = {"apiVersion": "v1", "kind": "Secret",
              "metadata": {"name": "creds", "namespace": "default"},
              "stringData": {"user": "dbsync"}}
    kubectl.apply(config_map)
    kubectl.apply(secret)
    config_map["data"] = {"a": "3"}
    result = kubectl.apply(config_map)
    stored = server.get_object("", "v1", "configmaps", "default", "settings")
    stored_secret = server.get_object("", "v1", "secrets", "default", "creds")
    assert result.stdout.strip() == "configmap/settings configured"
    assert stored is not None
    assert stored["data"] == {"a": "3"}
    assert stored_secret is not None
    assert stored_secret["data"] == {"user": "ZGJzeW5j"}


def test_apply_deployment_and_rbac(kubectl: Kubectl) -> None:
    """An operator's deployment and RBAC manifests apply and re-apply."""
    manifests = [
        {"apiVersion": "v1", "kind": "ServiceAccount",
         "metadata": {"name": "op", "namespace": "default"}},
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole",
         "metadata": {"name": "op"},
         "rules": [{"apiGroups": [""], "resources": ["events"], "verbs": ["create"]}]},
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding",
         "metadata": {"name": "op"},
         "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole",
                     "name": "op"},
         "subjects": [{"kind": "ServiceAccount", "name": "op", "namespace": "default"}]},
        {"apiVersion": "apps/v1", "kind": "Deployment",
         "metadata": {"name": "op", "namespace": "default"},
         "spec": {"replicas": 1, "selector": {"matchLabels": {"app": "op"}},
                  "template": {"metadata": {"labels": {"app": "op"}},
                               "spec": {"containers": [{"name": "op", "image": "op:1"}]}}}},
    ]
    document = yaml.safe_dump_all(manifests)
    created = kubectl.run("apply", "-f", "-", stdin=document)
    manifests[3]["spec"]["template"]["spec"]["containers"][0]["image"] = "op:2"
    updated = kubectl.run("apply", "-f", "-", stdin=yaml.safe_dump_all(manifests))
    image = kubectl.run("get", "deployment", "op", "-o",
                        "jsonpath={.spec.template.spec.containers[0].image}").stdout
    assert created.stdout.count("created") == 4
    assert "deployment.apps/op configured" in updated.stdout
    assert image == "op:2"


def test_create_commands_send_protobuf(kubectl: Kubectl, server: KubeApiServer) -> None:
    """kubectl create configmap, secret and namespace (protobuf bodies) are decoded."""
    kubectl.run("create", "configmap", "imperative", "--from-literal=a=b")
    kubectl.run("create", "secret", "generic", "imperative", "--from-literal=password=pw")
    kubectl.run("create", "namespace", "imperative")
    config_map = server.get_object("", "v1", "configmaps", "default", "imperative")
    secret = server.get_object("", "v1", "secrets", "default", "imperative")
    namespace = server.get_object("", "v1", "namespaces", None, "imperative")
    assert config_map is not None
    assert config_map["data"] == {"a": "b"}
    assert secret is not None
    assert secret["data"] == {"password": "cHc="}
    assert secret["type"] == "Opaque"
    assert namespace is not None


def test_create_deployment_protobuf_is_rejected(kubectl: Kubectl) -> None:
    """A protobuf body of an undecoded kind gets a clear 415, not a wrong object."""
    result = kubectl.run("create", "deployment", "imperative", "--image=x", check=False)
    assert result.returncode != 0
    assert "cannot decode this protobuf body" in result.stderr


DEPLOY_BASE = Path(__file__).resolve().parent.parent / "deploy" / "base"


@pytest.mark.skipif(not DEPLOY_BASE.is_dir(), reason="deploy/base is not in this checkout")
def test_apply_kustomize_deploy_base(kubectl: Kubectl) -> None:
    """kubectl apply -k deploy/base creates the operator's manifests, then finds them unchanged."""
    created = kubectl.run("apply", "-k", str(DEPLOY_BASE))
    again = kubectl.run("apply", "-k", str(DEPLOY_BASE))
    assert "deployment.apps/dbsync-operator created" in created.stdout
    assert "customresourcedefinition.apiextensions.k8s.io/databasesyncs.dbsync.io created" in (
        created.stdout)
    assert "configured" not in again.stdout
