"""CustomResourceDefinition handling: the checks, defaults and status the real server applies.

The checks cover what a CRD must have for the emulator to serve it (group, names, scope, one
storage version, a schema with ``type: object`` at its root). The real server's further
structural-schema rules are not checked.
"""

from __future__ import annotations

import copy
from datetime import UTC, datetime
from typing import Any

from dbsync.testing.kubeapi import errors
from dbsync.testing.kubeapi.discovery import ResourceType
from dbsync.testing.kubeapi.errors import FieldError

CRD_GROUP = "apiextensions.k8s.io"


def now_timestamp() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def prepare_crd(crd: dict[str, Any], previous: dict[str, Any] | None) -> None:
    """Check and default a CRD and fill in its status, or raise ``422 Invalid``."""
    spec = crd.get("spec")
    name = crd["metadata"].get("name", "")
    problems: list[FieldError] = []
    if not isinstance(spec, dict):
        raise errors.invalid(kind="CustomResourceDefinition", group=CRD_GROUP, name=name,
                             errors=[FieldError("FieldValueRequired", "spec",
                                                "Required value")])
    names = spec.setdefault("names", {})
    group = spec.get("group", "")
    plural = names.get("plural", "")
    kind = names.get("kind", "")
    for path, value in (("spec.group", group), ("spec.names.plural", plural),
                        ("spec.names.kind", kind)):
        if not value:
            problems.append(FieldError("FieldValueRequired", path, "Required value"))
    if plural and group and name != f"{plural}.{group}":
        problems.append(FieldError(
            "FieldValueInvalid", "metadata.name",
            f'Invalid value: "{name}": must be spec.names.plural+"."+spec.group'))
    if spec.get("scope") not in ("Namespaced", "Cluster"):
        problems.append(FieldError(
            "FieldValueNotSupported", "spec.scope",
            f"Unsupported value: {errors.format_field_value(spec.get('scope'))}: "
            'supported values: "Cluster", "Namespaced"'))
    versions = spec.get("versions") or []
    if not versions:
        problems.append(FieldError("FieldValueRequired", "spec.versions",
                                   "Required value: must have exactly one version marked "
                                   "as storage version"))
    elif sum(1 for version in versions if version.get("storage")) != 1:
        problems.append(FieldError(
            "FieldValueInvalid", "spec.versions",
            "Invalid value: must have exactly one version marked as storage version"))
    for index, version in enumerate(versions):
        schema = (version.get("schema") or {}).get("openAPIV3Schema")
        path = f"spec.versions[{index}].schema.openAPIV3Schema"
        if not isinstance(schema, dict):
            problems.append(FieldError("FieldValueRequired", path,
                                       "Required value: schemas are required"))
        elif schema.get("type") != "object":
            problems.append(FieldError(
                "FieldValueInvalid", f"{path}.type",
                f"Invalid value: {errors.format_field_value(schema.get('type'))}: "
                'must be "object" at the root'))
    if previous is not None and previous["spec"].get("group") != group:
        problems.append(FieldError("FieldValueInvalid", "spec.group",
                                   "Invalid value: field is immutable"))
    if problems:
        raise errors.invalid(kind="CustomResourceDefinition", group=CRD_GROUP, name=name,
                             errors=problems)

    names.setdefault("singular", kind.lower())
    names.setdefault("listKind", f"{kind}List")
    spec.setdefault("conversion", {"strategy": "None"})
    for version in versions:
        version.setdefault("served", True)
    # Why keep the old conditions: their lastTransitionTime changes only on a transition,
    # and a fresh time would turn every no-op update into a write.
    previous_status = (previous or {}).get("status", {})
    conditions = previous_status.get("conditions") or [
        {"type": "NamesAccepted", "status": "True", "reason": "NoConflicts",
         "message": "no conflicts found", "lastTransitionTime": now_timestamp()},
        {"type": "Established", "status": "True", "reason": "InitialNamesAccepted",
         "message": "the initial names have been accepted",
         "lastTransitionTime": now_timestamp()},
    ]
    stored = [version["name"] for version in versions if version.get("storage")]
    crd["status"] = {
        "acceptedNames": copy.deepcopy(names),
        "conditions": copy.deepcopy(conditions),
        "storedVersions": sorted(set(stored) | set(previous_status.get("storedVersions", []))),
    }


def crd_resource_type(spec: dict[str, Any], version: dict[str, Any]) -> ResourceType:
    names = spec["names"]
    subresources = version.get("subresources") or {}
    schema = (version.get("schema") or {}).get("openAPIV3Schema")
    return ResourceType(
        group=spec["group"],
        version=version["name"],
        plural=names["plural"],
        kind=names["kind"],
        namespaced=spec["scope"] == "Namespaced",
        singular=names.get("singular") or names["kind"].lower(),
        short_names=tuple(names.get("shortNames") or ()),
        categories=tuple(names.get("categories") or ()),
        has_status="status" in subresources,
        sets_generation=True,
        schema=schema,
        printer_columns=tuple(version.get("additionalPrinterColumns") or ()),
        custom=True,
        selectable_fields=tuple(
            field["jsonPath"].lstrip(".") for field in version.get("selectableFields") or ()),
    )


def served_types(spec: dict[str, Any]) -> list[ResourceType]:
    """Return a resource type for each served version of a (checked) CRD spec."""
    return [crd_resource_type(spec, version) for version in spec["versions"]
            if version.get("served")]
