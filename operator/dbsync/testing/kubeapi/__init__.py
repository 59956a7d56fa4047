"""An in-memory Kubernetes API server emulator for dbsync's operator tests and demo.

It is a test double, checked against kubectl v1.32 and kopf 1.45: discovery, CRDs with
OpenAPI v3 validation, defaulting and pruning, objects with resourceVersion, generation,
status subresource and finalizers, watches with bookmarks and ``410 Gone``, and
server-side tables. ``docs/testing.md`` lists what it does not prove.
"""

from dbsync.testing.kubeapi.server import KubeApiServer, RequestRecord, running_apiserver
from dbsync.testing.kubeapi.store import EventType, WriteEvent

__all__ = ["EventType", "KubeApiServer", "RequestRecord", "WriteEvent", "running_apiserver"]
