"""Generate the DatabaseSync CustomResourceDefinition from the pydantic models.

Pydantic writes JSON Schema 2020-12, which Kubernetes does not accept as a structural
schema: it uses ``$ref`` into ``$defs``, ``anyOf`` with ``{"type": "null"}`` for optional
fields, ``title``, ``const`` and numeric ``exclusiveMinimum``.  :func:`to_structural`
rewrites such a schema into the OpenAPI v3.0 subset that the API server accepts, and
raises :class:`UnsupportedSchemaError` for constructs with no structural equivalent, so a
model change that cannot be expressed fails at generation time, not at ``kubectl apply``.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel

from dbsync.k8s.models import (
    CATEGORIES,
    GROUP,
    KIND,
    PLURAL,
    SHORT_NAMES,
    SINGULAR,
    VERSION,
    DatabaseSyncSpec,
    DatabaseSyncStatus,
)

DEFAULT_CRD_PATH = Path("crds/databasesync.yaml")

# Keywords with the same meaning in both dialects, copied as they are.
_KEPT_KEYWORDS = frozenset({
    "type", "format", "description", "enum", "pattern", "minimum", "maximum",
    "minLength", "maxLength", "minItems", "maxItems", "uniqueItems", "minProperties",
    "maxProperties", "multipleOf", "required", "default", "nullable",
})

# Keywords that only annotate and have no place in a CRD.
# propertyNames (map key rules) has no structural form either: the operator's own pydantic
# validation still applies it and reports a violation as InvalidSpec.
_DROPPED_KEYWORDS = frozenset({"title", "examples", "$schema", "$id", "readOnly", "writeOnly",
                               "deprecated", "discriminator", "propertyNames"})

READY_JSONPATH = '.status.conditions[?(@.type=="Ready")]'


class UnsupportedSchemaError(ValueError):
    """A model uses a JSON Schema construct that a structural schema cannot express."""


def _resolve(node: dict[str, Any], definitions: dict[str, Any]) -> dict[str, Any]:
    reference = node.get("$ref")
    if reference is None:
        return node
    prefix = "#/$defs/"
    if not reference.startswith(prefix):
        raise UnsupportedSchemaError(f"unsupported $ref {reference!r}: only local $defs")
    merged = dict(definitions[reference[len(prefix):]])

    # Sibling keywords of a $ref (description, default) override the referenced ones.
    merged.update({key: value for key, value in node.items() if key != "$ref"})
    return merged


def _collapse_optional(node: dict[str, Any], path: str) -> dict[str, Any]:
    """Turn ``anyOf: [X, {type: null}]`` into X with ``nullable: true``."""
    alternatives = node.get("anyOf")
    if alternatives is None:
        return node
    non_null = [item for item in alternatives if item.get("type") != "null"]
    others = {key: value for key, value in node.items() if key != "anyOf"}

    # int | str has one structural spelling: the int-or-string extension.
    if sorted(item.get("type", "") for item in non_null) == ["integer", "string"]:
        replaced: dict[str, Any] = {**others, "x-kubernetes-int-or-string": True}
        if len(non_null) != len(alternatives):
            replaced["nullable"] = True
        return replaced
    if len(non_null) != 1:
        raise UnsupportedSchemaError(
            f"{path}: anyOf with {len(non_null)} non-null alternatives cannot be structural; "
            "use a single type per field")
    # The field's own keywords (description, default) win over the alternative's.
    collapsed = dict(non_null[0])
    collapsed.update(others)
    if len(non_null) != len(alternatives):
        collapsed["nullable"] = True
    return collapsed


def _convert(node: dict[str, Any], definitions: dict[str, Any], path: str) -> dict[str, Any]:
    # Inline references and optional wrappers until the node has a concrete shape.
    node = _resolve(node, definitions)
    node = _collapse_optional(node, path)
    node = _resolve(node, definitions)
    if "allOf" in node:
        parts = node["allOf"]
        if len(parts) != 1:
            raise UnsupportedSchemaError(f"{path}: allOf with {len(parts)} parts")
        merged = _resolve(parts[0], definitions)
        merged.update({key: value for key, value in node.items() if key != "allOf"})
        node = merged

    for keyword in ("oneOf", "not", "prefixItems", "patternProperties", "if"):
        if keyword in node:
            raise UnsupportedSchemaError(f"{path}: {keyword} has no structural equivalent")

    result: dict[str, Any] = {}
    for key, value in node.items():
        if key in _DROPPED_KEYWORDS or key in ("properties", "items", "additionalProperties",
                                               "const", "exclusiveMinimum",
                                               "exclusiveMaximum", "$defs"):
            continue
        if key.startswith("x-kubernetes-"):
            result[key] = copy.deepcopy(value)
            continue
        if key not in _KEPT_KEYWORDS:
            raise UnsupportedSchemaError(f"{path}: unsupported keyword {key!r}")
        result[key] = copy.deepcopy(value)

    # JSON Schema 2020 writes exclusive bounds as numbers; OpenAPI 3.0 as flags.
    if "exclusiveMinimum" in node:
        result["minimum"] = node["exclusiveMinimum"]
        result["exclusiveMinimum"] = True
    if "exclusiveMaximum" in node:
        result["maximum"] = node["exclusiveMaximum"]
        result["exclusiveMaximum"] = True
    if "const" in node:
        result["enum"] = [node["const"]]
        if "type" not in result and isinstance(node["const"], str):
            result["type"] = "string"

    # A structural schema may not default to null; an absent field is already null.
    if result.get("default", 0) is None:
        del result["default"]

    if "properties" in node:
        result["type"] = "object"
        result["properties"] = {
            name: _convert(child, definitions, f"{path}.{name}")
            for name, child in node["properties"].items()
        }
    elif isinstance(node.get("additionalProperties"), dict):
        result["additionalProperties"] = _convert(
            node["additionalProperties"], definitions, f"{path}.*")

    if "items" in node:
        result["items"] = _convert(node["items"], definitions, f"{path}[]")

    if "type" not in result and not any(key.startswith("x-kubernetes-") for key in result):
        raise UnsupportedSchemaError(f"{path}: every node of a structural schema needs a type")

    # type and description first, so the YAML reads like a hand-written CRD.
    ordered: dict[str, Any] = {key: result[key] for key in ("type", "description")
                               if key in result}
    ordered.update(result)
    return ordered


def to_structural(schema: dict[str, Any]) -> dict[str, Any]:
    """Convert a pydantic JSON schema into a Kubernetes structural OpenAPI v3 schema."""
    definitions = schema.get("$defs", {})
    return _convert(schema, definitions, "")


def model_schema(model: type[BaseModel]) -> dict[str, Any]:
    """Return the structural schema of ``model``, with camelCase field names."""
    return to_structural(model.model_json_schema(by_alias=True, mode="validation"))


def _printer_columns() -> list[dict[str, Any]]:
    return [
        {"name": "Ready", "type": "string", "jsonPath": f"{READY_JSONPATH}.status"},
        {"name": "Reason", "type": "string", "jsonPath": f"{READY_JSONPATH}.reason"},
        {"name": "Revision", "type": "string", "jsonPath": ".status.migration.currentRevision"},
        {"name": "Drift", "type": "integer", "jsonPath": ".status.drift.differences"},
        {"name": "Ledger", "type": "boolean", "jsonPath": ".status.ledger.balanced",
         "description": "Whether every ledger check passed at the last sync."},
        {"name": "Last Sync", "type": "date", "jsonPath": ".status.lastSync.finishedAt"},
        {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
        {"name": "Sync ID", "type": "string", "jsonPath": ".status.lastSync.syncId",
         "priority": 1},
    ]


def build_crd() -> dict[str, Any]:
    """Return the CustomResourceDefinition as a dictionary."""
    spec_schema = model_schema(DatabaseSyncSpec)
    status_schema = model_schema(DatabaseSyncStatus)
    spec_schema["description"] = "What to sync, how, and how often to check it again."
    status_schema["description"] = "What the operator observed; written only by the operator."
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": f"{PLURAL}.{GROUP}"},
        "spec": {
            "group": GROUP,
            "scope": "Namespaced",
            "names": {
                "kind": KIND,
                "listKind": f"{KIND}List",
                "plural": PLURAL,
                "singular": SINGULAR,
                "shortNames": list(SHORT_NAMES),
                "categories": list(CATEGORIES),
            },
            "versions": [{
                "name": VERSION,
                "served": True,
                "storage": True,
                "subresources": {"status": {}},
                "additionalPrinterColumns": _printer_columns(),
                "schema": {"openAPIV3Schema": {
                    "type": "object",
                    "description": "DatabaseSync keeps a PostgreSQL target in step with its "
                                   "source: migrations, schema diff, ledger checks and audit.",
                    "required": ["spec"],
                    "properties": {
                        "apiVersion": {"type": "string"},
                        "kind": {"type": "string"},
                        "metadata": {"type": "object"},
                        "spec": spec_schema,
                        "status": status_schema,
                    },
                }},
            }],
        },
    }


def render_crd() -> str:
    """Return the CRD as YAML, with a header saying how it is made."""
    header = ("# Generated by `dbsync crd` from dbsync/k8s/models.py; do not edit by hand.\n"
              "# A test fails when this file differs from the models.\n")
    body = yaml.safe_dump(build_crd(), sort_keys=False, width=100, allow_unicode=True)
    return header + body


def write_crd(path: Path = DEFAULT_CRD_PATH) -> Path:
    """Write the CRD YAML to ``path``, creating its directory, and return the path."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(render_crd(), encoding="utf-8")
    return path
