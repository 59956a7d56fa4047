"""The Kubernetes examples: the migrations ConfigMap is current and every resource is valid."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

import pytest
import yaml

from dbsync.k8s.models import parse_spec

EXAMPLES_K8S = Path(__file__).resolve().parents[1] / "examples" / "k8s"


def _make_configmap_module() -> ModuleType:
    spec = importlib.util.spec_from_file_location("make_configmap",
                                                  EXAMPLES_K8S / "make_configmap.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_committed_configmap_matches_migrations() -> None:
    """Run examples/k8s/make_configmap.py when this fails."""
    module = _make_configmap_module()
    committed = (EXAMPLES_K8S / "migrations-configmap.yaml").read_text(encoding="utf-8")
    assert committed == module.render_configmap()


def test_configmap_holds_every_revision_file() -> None:
    configmap = yaml.safe_load((EXAMPLES_K8S / "migrations-configmap.yaml").read_text("utf-8"))
    revisions = sorted(path.name for path in (EXAMPLES_K8S.parent / "migrations").glob("*.py")
                       if path.name != "__init__.py")
    assert sorted(configmap["data"]) == revisions


@pytest.mark.parametrize("name", ["databasesync.yaml", "databasesync-dry-run.yaml",
                                  "databasesync-drift-check.yaml"])
def test_example_resources_are_valid(name: str) -> None:
    resource = yaml.safe_load((EXAMPLES_K8S / name).read_text(encoding="utf-8"))
    spec = parse_spec(resource["spec"])
    assert resource["apiVersion"] == "dbsync.io/v1alpha1"
    assert spec.source.uri_from is not None


def test_example_secrets_are_secrets() -> None:
    documents = list(yaml.safe_load_all((EXAMPLES_K8S / "secrets.yaml").read_text("utf-8")))
    assert {document["kind"] for document in documents} == {"Secret"}
