"""Resource types the emulator serves, and the discovery and OpenAPI documents describing them.

Discovery is served in the plain (unaggregated) form: kubectl v1.32 requests
``apidiscovery.k8s.io/v2`` first but falls back when the reply's Content-Type is plain
``application/json``. OpenAPI v3 is served per group-version with a PATCH operation carrying
the ``fieldValidation`` parameter for every kind, because kubectl checks that parameter to
decide whether the server validates fields itself, and with the CRD schemas, which
``kubectl explain`` renders. OpenAPI v2 is not served (kubectl tolerates its absence when
v3 is present).
"""

from __future__ import annotations

import copy
import hashlib
import re
from dataclasses import dataclass, field
from typing import Any

KUBERNETES_VERSION = {"major": "1", "minor": "32", "gitVersion": "v1.32.0"}

ALL_VERBS = ("create", "delete", "deletecollection", "get", "list", "patch", "update", "watch")
STATUS_VERBS = ("get", "patch", "update")


@dataclass(frozen=True)
class ResourceType:
    """One served resource in one group-version, with the schema and columns it is served by."""

    group: str
    version: str
    plural: str
    kind: str
    namespaced: bool
    singular: str = ""
    short_names: tuple[str, ...] = ()
    categories: tuple[str, ...] = ()
    verbs: tuple[str, ...] = ALL_VERBS
    has_status: bool = False
    sets_generation: bool = False
    schema: dict[str, Any] | None = field(default=None, compare=False, hash=False)
    printer_columns: tuple[dict[str, Any], ...] = field(default=(), compare=False, hash=False)
    custom: bool = False
    # Field selector labels the server accepts besides metadata.name and metadata.namespace.
    selectable_fields: tuple[str, ...] = ()

    @property
    def api_version(self) -> str:
        return f"{self.group}/{self.version}" if self.group else self.version

    @property
    def storage_key(self) -> tuple[str, str]:
        """Objects of every version of a resource share one store, keyed by group and plural."""
        return (self.group, self.plural)

    @property
    def list_kind(self) -> str:
        return f"{self.kind}List"

    def api_resources(self) -> list[dict[str, Any]]:
        """Return the ``APIResource`` entries for this type and its status subresource."""
        main = {
            "name": self.plural,
            "singularName": self.singular or self.kind.lower(),
            "namespaced": self.namespaced,
            "kind": self.kind,
            "verbs": list(self.verbs),
            "storageVersionHash": short_hash(f"{self.group}/{self.plural}"),
        }
        if self.short_names:
            main["shortNames"] = list(self.short_names)
        if self.categories:
            main["categories"] = list(self.categories)
        entries = [main]
        if self.has_status:
            entries.append({
                "name": f"{self.plural}/status",
                "singularName": "",
                "namespaced": self.namespaced,
                "kind": self.kind,
                "verbs": list(STATUS_VERBS),
            })
        return entries


def short_hash(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def builtin(
    group: str, version: str, plural: str, kind: str, *, namespaced: bool = True,
    short_names: tuple[str, ...] = (), categories: tuple[str, ...] = (),
    has_status: bool = False, sets_generation: bool = False,
    selectable_fields: tuple[str, ...] = (),
) -> ResourceType:
    return ResourceType(
        group=group, version=version, plural=plural, kind=kind, namespaced=namespaced,
        singular=kind.lower(), short_names=short_names, categories=categories,
        has_status=has_status, sets_generation=sets_generation,
        selectable_fields=selectable_fields,
    )


# Field selector labels that built-in kinds accept in Kubernetes v1.32, besides metadata.name
# and metadata.namespace. Any other label is rejected with 400, as the real server does.
EVENT_FIELDS = (
    "involvedObject.kind", "involvedObject.namespace", "involvedObject.name",
    "involvedObject.uid", "involvedObject.apiVersion", "involvedObject.resourceVersion",
    "involvedObject.fieldPath", "reason", "reportingComponent", "source", "type",
)
POD_FIELDS = (
    "spec.nodeName", "spec.restartPolicy", "spec.schedulerName", "spec.serviceAccountName",
    "spec.hostNetwork", "status.phase", "status.podIP", "status.podIPs",
    "status.nominatedNodeName",
)


# The built-in kinds dbsync's operator and its manifests touch.
BUILTIN_TYPES: tuple[ResourceType, ...] = (
    builtin("", "v1", "namespaces", "Namespace", namespaced=False, short_names=("ns",),
            has_status=True, selectable_fields=("status.phase",)),
    builtin("", "v1", "secrets", "Secret", selectable_fields=("type",)),
    builtin("", "v1", "configmaps", "ConfigMap", short_names=("cm",)),
    builtin("", "v1", "events", "Event", short_names=("ev",), selectable_fields=EVENT_FIELDS),
    builtin("", "v1", "serviceaccounts", "ServiceAccount", short_names=("sa",)),
    builtin("", "v1", "pods", "Pod", short_names=("po",), categories=("all",),
            has_status=True, selectable_fields=POD_FIELDS),
    builtin("", "v1", "services", "Service", short_names=("svc",), categories=("all",),
            has_status=True),
    builtin("events.k8s.io", "v1", "events", "Event", short_names=("ev",),
            selectable_fields=EVENT_FIELDS),
    builtin("coordination.k8s.io", "v1", "leases", "Lease"),
    builtin("batch", "v1", "jobs", "Job", categories=("all",), has_status=True,
            sets_generation=True, selectable_fields=("status.successful",)),
    builtin("apps", "v1", "deployments", "Deployment", short_names=("deploy",),
            categories=("all",), has_status=True, sets_generation=True),
    builtin("rbac.authorization.k8s.io", "v1", "roles", "Role"),
    builtin("rbac.authorization.k8s.io", "v1", "rolebindings", "RoleBinding"),
    builtin("rbac.authorization.k8s.io", "v1", "clusterroles", "ClusterRole", namespaced=False),
    builtin("rbac.authorization.k8s.io", "v1", "clusterrolebindings", "ClusterRoleBinding",
            namespaced=False),
    builtin("apiextensions.k8s.io", "v1", "customresourcedefinitions",
            "CustomResourceDefinition", namespaced=False, short_names=("crd", "crds"),
            categories=("api-extensions",), has_status=True, sets_generation=True),
)


def version_priority(version: str) -> tuple[int, int, int, str]:
    """Sort key giving Kubernetes' version priority: GA, then beta, then alpha, newest first."""
    match = re.fullmatch(r"v(\d+)(?:(alpha|beta)(\d+))?", version)
    if match is None:
        return (3, 0, 0, version)
    major = int(match.group(1))
    stage = {"": 0, "beta": 1, "alpha": 2}[match.group(2) or ""]
    minor = int(match.group(3) or 0)
    return (stage, -major, -minor, version)


def version_document() -> dict[str, Any]:
    return {
        **KUBERNETES_VERSION,
        "gitCommit": "0000000000000000000000000000000000000000",
        "gitTreeState": "clean",
        "buildDate": "2024-12-11T00:00:00Z",
        "goVersion": "go1.23.0",
        "compiler": "gc",
        "platform": "linux/amd64",
        "emulator": "dbsync.testing.kubeapi",
    }


def core_versions_document(server_address: str) -> dict[str, Any]:
    return {
        "kind": "APIVersions",
        "versions": ["v1"],
        "serverAddressByClientCIDRs": [
            {"clientCIDR": "0.0.0.0/0", "serverAddress": server_address},
        ],
    }


def group_document(group: str, versions: list[str]) -> dict[str, Any]:
    ordered = sorted(versions, key=version_priority)
    entries = [{"groupVersion": f"{group}/{version}", "version": version} for version in ordered]
    return {
        "kind": "APIGroup",
        "apiVersion": "v1",
        "name": group,
        "versions": entries,
        "preferredVersion": entries[0],
    }


def group_list_document(groups: dict[str, list[str]]) -> dict[str, Any]:
    documents = []
    for group, versions in groups.items():
        document = group_document(group, versions)
        del document["kind"], document["apiVersion"]
        documents.append(document)
    return {"kind": "APIGroupList", "apiVersion": "v1", "groups": documents}


def resource_list_document(group_version: str, types: list[ResourceType]) -> dict[str, Any]:
    resources: list[dict[str, Any]] = []
    for resource_type in types:
        resources.extend(resource_type.api_resources())
    return {
        "kind": "APIResourceList",
        "apiVersion": "v1",
        "groupVersion": group_version,
        "resources": resources,
    }


# --- OpenAPI v3 --------------------------------------------------------------------------

OBJECT_META_REF = "#/components/schemas/io.k8s.apimachinery.pkg.apis.meta.v1.ObjectMeta"

OBJECT_META_SCHEMA: dict[str, Any] = {
    "description": "ObjectMeta is metadata that all persisted resources must have.",
    "type": "object",
    "properties": {
        "name": {"type": "string", "description": "Name must be unique within a namespace."},
        "namespace": {"type": "string", "description": "Namespace defines the space within "
                      "which each name must be unique."},
        "labels": {"type": "object", "additionalProperties": {"type": "string"},
                   "description": "Map of string keys and values for selecting objects."},
        "annotations": {"type": "object", "additionalProperties": {"type": "string"},
                        "description": "Unstructured key value map stored with a resource."},
        "finalizers": {"type": "array", "items": {"type": "string"},
                       "description": "Must be empty before the object is deleted."},
        "uid": {"type": "string", "description": "Unique in time and space."},
        "resourceVersion": {"type": "string", "description": "Internal version of this "
                            "object, used for optimistic concurrency."},
        "generation": {"type": "integer", "format": "int64", "description": "A sequence "
                       "number representing a specific generation of the desired state."},
        "creationTimestamp": {"type": "string", "format": "date-time", "description":
                              "Time at which this object was created."},
        "deletionTimestamp": {"type": "string", "format": "date-time", "description":
                              "Time at which this object will be deleted."},
    },
}


def schema_name(resource_type: ResourceType) -> str:
    group = ".".join(reversed(resource_type.group.split("."))) if resource_type.group else "core"
    prefix = "io.k8s.api" if not resource_type.custom else group
    if not resource_type.custom:
        prefix = f"{prefix}.{group}"
    return f"{prefix}.{resource_type.version}.{resource_type.kind}"


def kind_schema(resource_type: ResourceType) -> dict[str, Any]:
    """Return the component schema of a kind: the CRD's schema, or an open one for built-ins."""
    gvk = {"group": resource_type.group, "version": resource_type.version,
           "kind": resource_type.kind}
    if resource_type.schema is not None:
        schema = copy.deepcopy(resource_type.schema)
    else:
        schema = {
            "type": "object",
            "description": f"{resource_type.kind} (built-in kind, schema not published by "
            "this emulator).",
            "properties": {},
            "x-kubernetes-preserve-unknown-fields": True,
        }
    properties = schema.setdefault("properties", {})
    properties.setdefault("apiVersion", {
        "type": "string", "description": "APIVersion defines the versioned schema of this "
        "representation of an object."})
    properties.setdefault("kind", {
        "type": "string", "description": "Kind is a string value representing the REST "
        "resource this object represents."})
    properties["metadata"] = {
        "allOf": [{"$ref": OBJECT_META_REF}],
        "description": "Standard object's metadata.",
    }
    schema["x-kubernetes-group-version-kind"] = [gvk]
    return schema


def patch_operation(resource_type: ResourceType) -> dict[str, Any]:
    ref = {"$ref": f"#/components/schemas/{schema_name(resource_type)}"}
    return {
        "description": f"partially update the specified {resource_type.kind}",
        "operationId": f"patch{resource_type.kind}",
        "parameters": [
            {"name": "dryRun", "in": "query", "schema": {"type": "string"}},
            {"name": "fieldManager", "in": "query", "schema": {"type": "string"}},
            {"name": "fieldValidation", "in": "query", "schema": {"type": "string"}},
            {"name": "force", "in": "query", "schema": {"type": "boolean"}},
        ],
        # Why no strategic merge patch here: kubectl then computes it from its compiled-in
        # types, which carry the list merge keys this document does not describe.
        "requestBody": {"content": {
            "application/json-patch+json": {"schema": {"type": "object"}},
            "application/merge-patch+json": {"schema": {"type": "object"}},
            "application/apply-patch+yaml": {"schema": {"type": "object"}},
        }, "required": True},
        "responses": {"200": {"description": "OK", "content": {
            "application/json": {"schema": ref}}}},
        "x-kubernetes-action": "patch",
        "x-kubernetes-group-version-kind": {
            "group": resource_type.group, "version": resource_type.version,
            "kind": resource_type.kind},
    }


def object_path(resource_type: ResourceType) -> str:
    prefix = f"/apis/{resource_type.api_version}" if resource_type.group else "/api/v1"
    if resource_type.namespaced:
        return f"{prefix}/namespaces/{{namespace}}/{resource_type.plural}/{{name}}"
    return f"{prefix}/{resource_type.plural}/{{name}}"


def openapi_group_version_document(types: list[ResourceType]) -> dict[str, Any]:
    """Return the OpenAPI v3 document of one group-version."""
    schemas: dict[str, Any] = {
        "io.k8s.apimachinery.pkg.apis.meta.v1.ObjectMeta": OBJECT_META_SCHEMA,
    }
    paths: dict[str, Any] = {}
    for resource_type in types:
        schemas[schema_name(resource_type)] = kind_schema(resource_type)
        paths[object_path(resource_type)] = {
            "parameters": [
                {"name": "name", "in": "path", "required": True, "schema": {"type": "string"}},
            ],
            "patch": patch_operation(resource_type),
        }
    return {
        "openapi": "3.0.0",
        "info": {"title": "Kubernetes", "version": KUBERNETES_VERSION["gitVersion"]},
        "paths": paths,
        "components": {"schemas": schemas},
    }


def openapi_path_key(resource_type: ResourceType) -> str:
    return f"apis/{resource_type.api_version}" if resource_type.group else "api/v1"
