"""Tests of the Argo CD health check for DatabaseSync, run by a real Lua 5.1 interpreter.

Argo CD embeds gopher-lua, a Lua 5.1 implementation, so the script runs under lupa's Lua 5.1
build. Each fixture in deploy/argocd/fixtures is one live object, and the table below lists the
status and message Argo CD must show for it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml
from lupa import lua51

from dbsync.k8s.models import DatabaseSyncSpec, DatabaseSyncStatus

ROOT = Path(__file__).resolve().parent.parent
ARGOCD = ROOT / "deploy" / "argocd"
HEALTH_SCRIPT = ARGOCD / "health.lua"
FIXTURES = ARGOCD / "fixtures"
CUSTOMIZATION_KEY = "resource.customizations.health.dbsync.io_DatabaseSync"

MIGRATION_FAILED = (
    'Revision 3f2a9c1d0b7e failed: column "iban" of relation "accounts" already exists. '
    "The transaction was rolled back."
)

EXPECTED: dict[str, tuple[str, str]] = {
    "healthy": (
        "Healthy",
        "Target at revision 3f2a9c1d0b7e; schema in sync; ledger balanced",
    ),
    "progressing-no-status": ("Progressing", "Waiting for the operator to report status"),
    "progressing-reconciling": (
        "Progressing",
        "Applying revisions 1a2b3c4d5e6f..3f2a9c1d0b7e",
    ),
    "progressing-rechecking-while-ready": (
        "Progressing",
        "Re-checking schema drift and ledger",
    ),
    "progressing-generation-lag": (
        "Progressing",
        "Waiting for the operator to observe generation 4 (status describes generation 3)",
    ),
    "progressing-stalled-old-generation": (
        "Progressing",
        "Waiting for the operator to observe generation 4 (status describes generation 3)",
    ),
    "progressing-deleting": ("Progressing", "DatabaseSync is being deleted"),
    "progressing-not-ready": (
        "Progressing",
        "3 schema differences between source and target (2 index, 1 column)",
    ),
    "degraded-stalled": ("Degraded", MIGRATION_FAILED),
    "degraded-stalled-without-message": ("Degraded", "BackoffLimitExceeded"),
    "suspended-spec": ("Suspended", "DatabaseSync is suspended (spec.suspend is true)"),
    "suspended-approval-pending": (
        "Suspended",
        "Plan of 2 revisions (1a2b3c4d5e6f..3f2a9c1d0b7e) waits for approval",
    ),
}


def load_fixture(name: str) -> dict[str, Any]:
    # A JSON round trip turns the object into what Argo CD hands the script: JSON values only.
    loaded = yaml.safe_load((FIXTURES / f"{name}.yaml").read_text(encoding="utf-8"))
    converted: dict[str, Any] = json.loads(json.dumps(loaded, default=str))
    return converted


def evaluate_health(script: str, live_object: dict[str, Any]) -> dict[str, Any]:
    """Run a health script with ``obj`` bound to ``live_object`` and return its result table."""
    runtime = lua51.LuaRuntime(unpack_returned_tuples=True)
    runtime.globals().obj = runtime.table_from(live_object, recursive=True)
    result = runtime.execute(script)
    return dict(result.items())


@pytest.mark.parametrize("fixture", sorted(EXPECTED))
def test_health_of_fixture(fixture: str) -> None:
    expected_status, expected_message = EXPECTED[fixture]

    health = evaluate_health(HEALTH_SCRIPT.read_text(encoding="utf-8"), load_fixture(fixture))

    assert health["status"] == expected_status
    assert health["message"] == expected_message


def test_every_fixture_has_expectation() -> None:
    fixtures = {path.stem for path in FIXTURES.glob("*.yaml")}

    assert fixtures == set(EXPECTED)


@pytest.mark.parametrize("fixture", sorted(EXPECTED))
def test_fixture_matches_resource_models(fixture: str) -> None:
    """Fixtures are valid DatabaseSync objects, so the script is tested on real shapes."""
    live_object = load_fixture(fixture)

    assert live_object["apiVersion"] == "dbsync.io/v1alpha1"
    assert live_object["kind"] == "DatabaseSync"
    DatabaseSyncSpec.model_validate(live_object["spec"])
    DatabaseSyncStatus.model_validate(live_object.get("status", {}))


def test_script_runs_on_object_without_metadata() -> None:
    """A partial object never raises a Lua error, which Argo CD would show as unknown health."""
    health = evaluate_health(HEALTH_SCRIPT.read_text(encoding="utf-8"), {"spec": {}})

    assert health["status"] == "Progressing"


def test_configmap_snippet_embeds_script() -> None:
    """The argocd-cm snippet carries the same script as health.lua, under Argo CD's key."""
    snippet = yaml.safe_load((ARGOCD / "argocd-cm-snippet.yaml").read_text(encoding="utf-8"))

    assert snippet["kind"] == "ConfigMap"
    assert snippet["metadata"]["name"] == "argocd-cm"
    assert snippet["data"][CUSTOMIZATION_KEY] == HEALTH_SCRIPT.read_text(encoding="utf-8")
