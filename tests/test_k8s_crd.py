"""The DatabaseSync CRD: generated from the models, structural, and strict about the spec."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml
from pydantic import ValidationError

from dbsync.k8s.crd import (
    DEFAULT_CRD_PATH,
    UnsupportedSchemaError,
    build_crd,
    render_crd,
    to_structural,
)
from dbsync.k8s.models import DatabaseSyncSpec, DatabaseSyncStatus, parse_spec

REPOSITORY = Path(__file__).resolve().parent.parent

MINIMAL_SPEC: dict[str, Any] = {
    "source": {"host": "db-source", "database": "app", "user": "sync",
               "passwordFrom": {"secretKeyRef": {"name": "source-db", "key": "password"}}},
    "target": {"uriFrom": {"secretKeyRef": {"name": "target-db", "key": "uri"}}},
}


def _schema() -> dict[str, Any]:
    version = build_crd()["spec"]["versions"][0]
    schema: dict[str, Any] = version["schema"]["openAPIV3Schema"]
    return schema


def _walk(node: dict[str, Any], path: str = "") -> list[tuple[str, dict[str, Any]]]:
    nodes = [(path, node)]
    for name, child in node.get("properties", {}).items():
        nodes.extend(_walk(child, f"{path}.{name}"))
    if isinstance(node.get("additionalProperties"), dict):
        nodes.extend(_walk(node["additionalProperties"], f"{path}.*"))
    if "items" in node:
        nodes.extend(_walk(node["items"], f"{path}[]"))
    return nodes


def test_committed_crd_matches_models() -> None:
    """crds/databasesync.yaml is what `dbsync crd` writes today; regenerate it if this fails."""
    committed = (REPOSITORY / DEFAULT_CRD_PATH).read_text(encoding="utf-8")
    assert committed == render_crd(), "run `dbsync crd` and commit crds/databasesync.yaml"


def test_crd_is_a_valid_kubernetes_object() -> None:
    kubernetes_validate.validate(build_crd(), "1.30", strict=True)


@pytest.mark.parametrize("keyword", ["$ref", "anyOf", "allOf", "oneOf", "title", "$defs",
                                     "const", "prefixItems", "propertyNames"])
def test_schema_has_no_non_structural_keyword(keyword: str) -> None:
    offenders = [path for path, node in _walk(_schema()) if keyword in node]
    assert offenders == []


def test_every_schema_node_has_a_type() -> None:
    untyped = [path for path, node in _walk(_schema())
               if "type" not in node and not node.get("x-kubernetes-int-or-string")]
    assert untyped == []


def test_no_node_mixes_properties_and_additional_properties() -> None:
    mixed = [path for path, node in _walk(_schema())
             if "properties" in node and "additionalProperties" in node]
    assert mixed == []


def test_status_schema_declares_every_model_field() -> None:
    """The API server drops undeclared status fields, so each model field must be declared."""
    status = _schema()["properties"]["status"]

    def missing(model: Any, node: dict[str, Any], path: str) -> list[str]:
        absent = []
        for name, info in model.model_fields.items():
            alias = info.alias or name
            if alias not in node.get("properties", {}):
                absent.append(f"{path}.{alias}")
                continue
            child = node["properties"][alias]
            annotation = info.annotation
            nested = getattr(annotation, "model_fields", None)
            if nested is not None:
                absent.extend(missing(annotation, child, f"{path}.{alias}"))
        return absent

    assert missing(DatabaseSyncStatus, status, "status") == []


def test_names_and_short_names() -> None:
    names = build_crd()["spec"]["names"]
    assert (names["plural"], names["kind"]) == ("databasesyncs", "DatabaseSync")
    assert {"dbsync", "dbsyncs"} <= set(names["shortNames"])
    assert names["categories"] == ["dbsync"]


def test_printer_columns() -> None:
    columns = {column["name"]: column
               for column in build_crd()["spec"]["versions"][0]["additionalPrinterColumns"]}
    assert list(columns) == ["Ready", "Reason", "Revision", "Drift", "Ledger", "Last Sync",
                             "Age", "Sync ID"]
    assert columns["Sync ID"]["priority"] == 1
    assert columns["Drift"]["type"] == "integer"
    assert columns["Last Sync"]["type"] == "date"


def test_spec_requires_source_and_target() -> None:
    assert set(_schema()["properties"]["spec"]["required"]) == {"source", "target"}


def test_interval_pattern_rejects_prose() -> None:
    pattern = _schema()["properties"]["spec"]["properties"]["interval"]["pattern"]
    with pytest.raises(ValidationError):
        parse_spec({**MINIMAL_SPEC, "interval": "5 minutes"})
    assert pattern == "^([0-9]+(ms|s|m|h))+$"


def test_enums_are_declared() -> None:
    spec = _schema()["properties"]["spec"]["properties"]
    assert spec["dryRun"]["enum"] == ["off", "plan", "rehearse"]
    assert spec["transactionMode"]["enum"] == ["all", "per-revision"]
    assert spec["source"]["properties"]["sslMode"]["enum"][-1] == "verify-full"


def test_ledger_model_is_embedded() -> None:
    ledger = _schema()["properties"]["spec"]["properties"]["ledger"]
    assert "postings" in ledger["properties"]


def test_minimal_spec_parses() -> None:
    spec = parse_spec(MINIMAL_SPEC)
    assert spec.revision == "head"


@pytest.mark.parametrize(("change", "message"), [
    ({"target": {"host": "x", "database": "d",
                 "uriFrom": {"secretKeyRef": {"name": "a", "key": "b"}}}}, "not both"),
    ({"target": {"host": "x"}}, "host and database"),
    ({"target": {"host": "x", "database": "d", "sslMode": "verify-full"}}, "caCertFrom"),
    ({"migrations": {"path": "/m", "configMaps": [{"name": "m"}]}}, "exactly one"),
    ({"backoffLimit": -1}, "greater than or equal"),
    ({"revision": "head; drop"}, "pattern"),
    ({"unknownField": 1}, "Extra inputs"),
])
def test_invalid_specs_are_rejected(change: dict[str, Any], message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        parse_spec({**MINIMAL_SPEC, **change})


def test_passwords_only_through_secret_references() -> None:
    """A literal password field does not exist: only passwordFrom.secretKeyRef."""
    with pytest.raises(ValidationError):
        parse_spec({**MINIMAL_SPEC, "source": {"host": "h", "database": "d",
                                               "password": "hunter2"}})


def test_converter_rejects_unions_of_objects() -> None:
    schema = {"type": "object", "properties": {"value": {"anyOf": [
        {"type": "object", "properties": {"a": {"type": "string"}}},
        {"type": "array", "items": {"type": "string"}}]}}}
    with pytest.raises(UnsupportedSchemaError, match="anyOf"):
        to_structural(schema)


def test_converter_turns_optional_into_nullable() -> None:
    converted = to_structural({"type": "object", "properties": {
        "name": {"anyOf": [{"type": "string"}, {"type": "null"}], "default": None,
                 "title": "Name"}}})
    assert converted["properties"]["name"] == {"type": "string", "nullable": True}


def test_crd_yaml_loads() -> None:
    loaded = yaml.safe_load(render_crd())
    assert loaded["metadata"]["name"] == "databasesyncs.dbsync.io"


def test_spec_model_round_trips_defaults() -> None:
    spec = DatabaseSyncSpec.model_validate(MINIMAL_SPEC)
    dumped = spec.model_dump(mode="json", by_alias=True, exclude_none=True)
    assert parse_spec(dumped) == spec
