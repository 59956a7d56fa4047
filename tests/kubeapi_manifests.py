"""The test custom resource (a ``Widget``) shared by the emulator's test files."""

from __future__ import annotations

from typing import Any

GROUP = "example.dbsync.io"
VERSION = "v1"
PLURAL = "widgets"

WIDGET_CRD: dict[str, Any] = {
    "apiVersion": "apiextensions.k8s.io/v1",
    "kind": "CustomResourceDefinition",
    "metadata": {"name": f"{PLURAL}.{GROUP}"},
    "spec": {
        "group": GROUP,
        "scope": "Namespaced",
        "names": {
            "plural": PLURAL,
            "singular": "widget",
            "kind": "Widget",
            "shortNames": ["wdg"],
            "categories": ["dbsync"],
        },
        "versions": [{
            "name": VERSION,
            "served": True,
            "storage": True,
            "subresources": {"status": {}},
            "additionalPrinterColumns": [
                {"name": "Ready", "type": "string",
                 "jsonPath": '.status.conditions[?(@.type=="Ready")].status'},
                {"name": "Reason", "type": "string",
                 "jsonPath": '.status.conditions[?(@.type=="Ready")].reason'},
                {"name": "Replicas", "type": "integer", "jsonPath": ".spec.replicas"},
                {"name": "Paused", "type": "boolean", "jsonPath": ".spec.paused"},
                {"name": "Last Sync", "type": "date", "jsonPath": ".status.lastSyncTime"},
                {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
                {"name": "Owner", "type": "string", "priority": 1, "jsonPath": ".spec.owner"},
            ],
            "schema": {"openAPIV3Schema": {
                "type": "object",
                "description": "Widget is the emulator tests' custom resource.",
                "properties": {
                    "spec": {
                        "type": "object",
                        "description": "Desired state of the widget.",
                        "required": ["mode"],
                        "properties": {
                            "mode": {"type": "string", "enum": ["fast", "safe"],
                                     "description": "How the widget runs."},
                            "replicas": {"type": "integer", "minimum": 0, "maximum": 10,
                                         "default": 1},
                            "owner": {"type": "string", "pattern": "^[a-z]+$",
                                      "maxLength": 12},
                            "paused": {"type": "boolean", "default": False},
                            "tags": {"type": "array", "maxItems": 3,
                                     "items": {"type": "string", "minLength": 1}},
                            "limits": {"type": "object",
                                       "additionalProperties": {"type": "integer"}},
                            "extra": {"type": "object",
                                      "x-kubernetes-preserve-unknown-fields": True},
                            "note": {"type": "string", "nullable": True},
                            "startAt": {"type": "string", "format": "date-time"},
                            "options": {"type": "object", "default": {},
                                        "properties": {
                                            "retries": {"type": "integer", "default": 3}}},
                        },
                    },
                    "status": {
                        "type": "object",
                        "properties": {
                            "observedGeneration": {"type": "integer"},
                            "lastSyncTime": {"type": "string", "format": "date-time"},
                            "handled": {"type": "array", "items": {"type": "string"}},
                            "conditions": {"type": "array", "items": {
                                "type": "object",
                                "required": ["type", "status"],
                                "properties": {
                                    "type": {"type": "string"},
                                    "status": {"type": "string",
                                               "enum": ["True", "False", "Unknown"]},
                                    "reason": {"type": "string"},
                                    "message": {"type": "string"},
                                    "observedGeneration": {"type": "integer"},
                                },
                            }},
                        },
                    },
                },
            }},
        }],
    },
}


def widget(name: str, **spec: Any) -> dict[str, Any]:
    """Return a Widget manifest in the default namespace; ``spec`` defaults to mode fast."""
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "Widget",
        "metadata": {"name": name, "namespace": "default"},
        "spec": {"mode": "fast", **spec},
    }
