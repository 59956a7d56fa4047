"""In-memory object store: resourceVersions, generations, finalizers, watch history and CRDs.

Every write bumps one cluster-wide resourceVersion counter, as etcd's revision does, and
appends a watch event to a bounded history. A watch that starts from a resourceVersion older
than the history gets ``410 Gone``. All methods run on the server's event loop thread except
the read-only helpers the test thread calls, so one lock guards the maps.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import copy
import inspect
import logging
import re
import threading
import uuid
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from dbsync.testing.kubeapi import crds, errors
from dbsync.testing.kubeapi.crds import CRD_GROUP, now_timestamp
from dbsync.testing.kubeapi.discovery import BUILTIN_TYPES, ResourceType, version_priority
from dbsync.testing.kubeapi.errors import FieldError
from dbsync.testing.kubeapi.schema import prepare
from dbsync.testing.kubeapi.selectors import Selector

logger = logging.getLogger("dbsync.testing.kubeapi")

INITIAL_NAMESPACES = ("default", "kube-system", "kube-public", "kube-node-lease")
DNS_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
DNS_SUBDOMAIN_MESSAGE = (
    "a lowercase RFC 1123 subdomain must consist of lower case alphanumeric characters, '-' "
    "or '.', and must start and end with an alphanumeric character (e.g. 'example.com', regex "
    "used for validation is '[a-z0-9]([-a-z0-9]*[a-z0-9])?(\\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*')"
)


class EventType(StrEnum):
    """Watch event types, as they appear in the ``type`` field of a watch stream."""

    ADDED = "ADDED"
    MODIFIED = "MODIFIED"
    DELETED = "DELETED"
    BOOKMARK = "BOOKMARK"
    ERROR = "ERROR"


@dataclass(frozen=True)
class WatchEvent:
    """One committed write: the object after it, and before it for selector transitions."""

    resource_version: int
    type: EventType
    storage_key: tuple[str, str]
    namespace: str | None
    obj: dict[str, Any]
    previous: dict[str, Any] | None = None


@dataclass(frozen=True)
class WriteEvent:
    """A committed write as write listeners see it."""

    type: EventType
    group: str
    version: str
    plural: str
    namespace: str | None
    name: str
    obj: dict[str, Any]


WriteListener = Callable[[WriteEvent], Awaitable[None] | None]


@dataclass(eq=False)
class Watcher:
    """An open watch: its filter and the queue the store pushes matching events into."""

    storage_key: tuple[str, str]
    namespace: str | None
    selector: Selector
    queue: asyncio.Queue[WatchEvent | None] = field(default_factory=asyncio.Queue)

    def translate(self, event: WatchEvent) -> WatchEvent | None:
        """Return the event as delivered to this watcher, or None when it does not match.

        An object leaving the selector is delivered as DELETED, one entering it as ADDED.
        """
        if event.storage_key != self.storage_key:
            return None
        if self.namespace is not None and event.namespace != self.namespace:
            return None
        now = self.selector.matches(event.obj)
        before = event.previous is not None and self.selector.matches(event.previous)
        if event.type is EventType.MODIFIED and now != before:
            new_type = EventType.ADDED if now else EventType.DELETED
            return WatchEvent(event.resource_version, new_type, event.storage_key,
                              event.namespace, event.obj)
        return event if now else None


def spec_part(obj: dict[str, Any], *, has_status: bool) -> dict[str, Any]:
    """Return what a generation counts: everything but metadata (and status, if a subresource)."""
    ignored = {"metadata", "status"} if has_status else {"metadata"}
    return {key: value for key, value in obj.items() if key not in ignored}


class Store:
    """Objects of every served resource, the resourceVersion counter and the watch history."""

    def __init__(self, *, watch_history_size: int) -> None:
        if watch_history_size < 1:
            raise ValueError(f"watch_history_size must be at least 1, got {watch_history_size}")
        self.lock = threading.RLock()
        self.types: dict[tuple[str, str, str], ResourceType] = {}
        self.objects: dict[tuple[str, str], dict[tuple[str | None, str], dict[str, Any]]] = {}
        self.resource_version = 0
        self.compacted_version = 0
        self.history: deque[WatchEvent] = deque(maxlen=watch_history_size)
        self.watchers: set[Watcher] = set()
        self.listeners: list[WriteListener] = []
        self.listener_tasks: set[asyncio.Task[None]] = set()
        for resource_type in BUILTIN_TYPES:
            self.register(resource_type)
        namespaces = self.types[("", "v1", "namespaces")]
        for name in INITIAL_NAMESPACES:
            self.create(namespaces, None, {"metadata": {"name": name}})

    # --- types ---------------------------------------------------------------------------

    def register(self, resource_type: ResourceType) -> None:
        with self.lock:
            key = (resource_type.group, resource_type.version, resource_type.plural)
            self.types[key] = resource_type
            self.objects.setdefault(resource_type.storage_key, {})

    def find_type(self, group: str, version: str, plural: str) -> ResourceType | None:
        with self.lock:
            return self.types.get((group, version, plural))

    def served_groups(self) -> dict[str, list[str]]:
        """Return each named group with its versions, built-in groups first."""
        with self.lock:
            groups: dict[str, list[str]] = {}
            for group, version, _ in self.types:
                if group and version not in groups.setdefault(group, []):
                    groups[group].append(version)
            return groups

    def types_in(self, group: str, version: str) -> list[ResourceType]:
        with self.lock:
            return [resource_type for (g, v, _), resource_type in self.types.items()
                    if g == group and v == version]

    # --- reads ---------------------------------------------------------------------------

    def render(self, resource_type: ResourceType, obj: dict[str, Any]) -> dict[str, Any]:
        """Return a copy of a stored object as served in ``resource_type``'s version."""
        rendered = copy.deepcopy(obj)
        rendered["apiVersion"] = resource_type.api_version
        rendered["kind"] = resource_type.kind
        return rendered

    def bucket(self, resource_type: ResourceType) -> dict[tuple[str | None, str], dict[str, Any]]:
        return self.objects[resource_type.storage_key]

    def get(self, resource_type: ResourceType, namespace: str | None, name: str) -> dict[str, Any]:
        with self.lock:
            obj = self.bucket(resource_type).get((namespace, name))
            if obj is None:
                raise errors.not_found(resource_type.group, resource_type.plural, name)
            return self.render(resource_type, obj)

    def list_objects(
        self, resource_type: ResourceType, namespace: str | None, selector: Selector
    ) -> tuple[list[dict[str, Any]], int]:
        """Return matching objects sorted by namespace and name, and the list's version."""
        with self.lock:
            items = [
                self.render(resource_type, obj)
                for (object_namespace, _), obj in sorted(
                    self.bucket(resource_type).items(), key=lambda item: (item[0][0] or "",
                                                                          item[0][1]))
                if (namespace is None or object_namespace == namespace)
                and selector.matches(obj)
            ]
            return items, self.resource_version

    # --- writes --------------------------------------------------------------------------

    def commit(
        self,
        resource_type: ResourceType,
        event_type: EventType,
        obj: dict[str, Any],
        previous: dict[str, Any] | None,
    ) -> dict[str, Any]:
        """Give ``obj`` the next resourceVersion, store or remove it, and publish the event."""
        self.resource_version += 1
        metadata = obj["metadata"]
        metadata["resourceVersion"] = str(self.resource_version)
        key = (metadata.get("namespace"), metadata["name"])
        bucket = self.bucket(resource_type)
        if event_type is EventType.DELETED:
            bucket.pop(key, None)
        else:
            bucket[key] = obj
        event = WatchEvent(self.resource_version, event_type, resource_type.storage_key,
                           metadata.get("namespace"), copy.deepcopy(obj),
                           copy.deepcopy(previous) if previous is not None else None)
        if len(self.history) == self.history.maxlen:
            self.compacted_version = self.history[0].resource_version
        self.history.append(event)
        for watcher in list(self.watchers):
            seen = watcher.translate(event)
            if seen is not None:
                watcher.queue.put_nowait(seen)
        self.notify(resource_type, event_type, obj)
        return self.render(resource_type, obj)

    def notify(self, resource_type: ResourceType, event_type: EventType,
               obj: dict[str, Any]) -> None:
        metadata = obj["metadata"]
        write = WriteEvent(event_type, resource_type.group, resource_type.version,
                           resource_type.plural, metadata.get("namespace"), metadata["name"],
                           self.render(resource_type, obj))
        for listener in list(self.listeners):
            try:
                result = listener(write)
            except Exception:
                logger.exception("write listener %r failed on %s %s", listener, event_type,
                                 metadata["name"])
                continue
            if inspect.isawaitable(result):
                task = asyncio.ensure_future(result)
                self.listener_tasks.add(task)
                task.add_done_callback(self.finish_listener_task)

    def finish_listener_task(self, task: asyncio.Task[None]) -> None:
        self.listener_tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            logger.error("write listener failed: %s", task.exception())

    def check_namespace(self, resource_type: ResourceType, namespace: str | None) -> None:
        if not resource_type.namespaced:
            return
        namespaces = self.objects[("", "namespaces")]
        if namespace is None or (None, namespace) not in namespaces:
            raise errors.not_found("", "namespaces", namespace or "")
        if namespaces[(None, namespace)]["metadata"].get("deletionTimestamp"):
            raise errors.forbidden(
                resource_type.group, resource_type.plural, "",
                f"unable to create new content in namespace {namespace} because it is being "
                "terminated")

    def create(
        self, resource_type: ResourceType, namespace: str | None, body: dict[str, Any],
        *, strict: bool = False,
    ) -> dict[str, Any]:
        """Create an object from ``body`` and return it as stored."""
        with self.lock:
            obj = copy.deepcopy(body)
            metadata = obj.setdefault("metadata", {})
            if not isinstance(metadata, dict):
                raise errors.bad_request("metadata must be an object")
            self.check_body_namespace(resource_type, namespace, metadata)
            if not metadata.get("name") and metadata.get("generateName"):
                metadata["name"] = metadata["generateName"] + uuid.uuid4().hex[:5]
            name = metadata.get("name") or ""
            self.check_namespace(resource_type, namespace)
            if (namespace, name) in self.bucket(resource_type) and name:
                raise errors.already_exists(resource_type.group, resource_type.plural, name)

            for key in ("deletionTimestamp", "deletionGracePeriodSeconds", "resourceVersion",
                        "generation", "managedFields", "selfLink"):
                metadata.pop(key, None)
            metadata["uid"] = str(uuid.uuid4())
            metadata["creationTimestamp"] = now_timestamp()
            if resource_type.custom or resource_type.sets_generation:
                metadata["generation"] = 1
            if resource_type.namespaced:
                metadata["namespace"] = namespace
            else:
                metadata.pop("namespace", None)
            obj["apiVersion"] = resource_type.api_version
            obj["kind"] = resource_type.kind
            if resource_type.has_status:
                # Why: with a status subresource, status is written only through /status.
                obj.pop("status", None)
            self.apply_kind_rules(resource_type, obj, None)
            self.check_object(resource_type, obj, strict=strict)
            created = self.commit(resource_type, EventType.ADDED, obj, None)
            self.after_write(resource_type, obj, None)
            return created

    def check_body_namespace(self, resource_type: ResourceType, namespace: str | None,
                             metadata: dict[str, Any]) -> None:
        body_namespace = metadata.get("namespace")
        if resource_type.namespaced and body_namespace and body_namespace != namespace:
            raise errors.bad_request(
                "the namespace of the provided object does not match the namespace sent on "
                "the request")

    def check_object(self, resource_type: ResourceType, obj: dict[str, Any], *,
                     strict: bool) -> None:
        """Validate metadata, then prune, default and validate by the CRD's schema."""
        metadata = obj["metadata"]
        name = metadata.get("name") or ""
        field_errors: list[FieldError] = []
        if not name:
            field_errors.append(FieldError("FieldValueRequired", "metadata.name",
                                           "Required value: name or generateName is required"))
        elif resource_type.plural != "events" and not DNS_SUBDOMAIN.match(name):
            field_errors.append(FieldError(
                "FieldValueInvalid", "metadata.name",
                f"Invalid value: {errors.format_field_value(name)}: {DNS_SUBDOMAIN_MESSAGE}"))
        pruned, schema_errors = prepare(obj, resource_type.schema)
        if strict and pruned and resource_type.custom:
            fields = ", ".join(f'unknown field "{path}"' for path in pruned)
            raise errors.bad_request(
                f'{resource_type.kind} in version "{resource_type.version}" cannot be handled '
                f"as a {resource_type.kind}: strict decoding error: {fields}")
        field_errors.extend(schema_errors)
        if field_errors:
            raise errors.invalid(kind=resource_type.kind, group=resource_type.group,
                                 name=name, errors=field_errors)

    def apply_kind_rules(self, resource_type: ResourceType, obj: dict[str, Any],
                         previous: dict[str, Any] | None) -> None:
        """Apply what the real server's strategies do for particular kinds."""
        if (resource_type.group, resource_type.plural) == ("", "secrets"):
            fold_string_data(obj)
        elif (resource_type.group, resource_type.plural) == ("", "namespaces"):
            obj.setdefault("status", {}).setdefault("phase", "Active")
            labels = obj["metadata"].setdefault("labels", {})
            labels["kubernetes.io/metadata.name"] = obj["metadata"]["name"]
        elif is_crd(resource_type):
            crds.prepare_crd(obj, previous)

    def replace(
        self, resource_type: ResourceType, namespace: str | None, name: str,
        body: dict[str, Any], *, subresource: str | None = None, strict: bool = False,
    ) -> dict[str, Any]:
        """Update (PUT) an object. With ``subresource="status"`` only its status changes."""
        with self.lock:
            current = self.bucket(resource_type).get((namespace, name))
            if current is None:
                raise errors.not_found(resource_type.group, resource_type.plural, name)
            new = copy.deepcopy(body)
            metadata = new.get("metadata")
            if not isinstance(metadata, dict):
                new["metadata"] = metadata = {}
            self.check_body_namespace(resource_type, namespace, metadata)
            if metadata.get("name", name) != name:
                raise errors.bad_request(
                    f"the name of the object ({metadata.get('name')}) does not match the "
                    f"name on the URL ({name})")
            requested_version = metadata.get("resourceVersion")
            if requested_version and requested_version != current["metadata"][
                    "resourceVersion"]:
                raise errors.conflict(resource_type.group, resource_type.plural, name)
            return self.update_checked(resource_type, current, new, subresource=subresource,
                                       strict=strict)

    def update_checked(
        self, resource_type: ResourceType, current: dict[str, Any], new: dict[str, Any],
        *, subresource: str | None, strict: bool,
    ) -> dict[str, Any]:
        """Store ``new`` in place of ``current``, keeping the fields the server owns."""
        if subresource == "status":
            status = new.get("status")
            new = copy.deepcopy(current)
            if status is None:
                new.pop("status", None)
            else:
                new["status"] = status
        elif resource_type.has_status:
            new.pop("status", None)
            if "status" in current:
                new["status"] = copy.deepcopy(current["status"])

        metadata = new["metadata"]
        old_metadata = current["metadata"]
        for key in ("uid", "creationTimestamp", "deletionTimestamp",
                    "deletionGracePeriodSeconds", "generation", "namespace"):
            if key in old_metadata:
                metadata[key] = old_metadata[key]
            else:
                metadata.pop(key, None)
        metadata["name"] = old_metadata["name"]
        metadata.pop("managedFields", None)
        new["apiVersion"] = resource_type.api_version
        new["kind"] = resource_type.kind

        deleting = bool(old_metadata.get("deletionTimestamp"))
        added = set(metadata.get("finalizers") or []) - set(old_metadata.get("finalizers") or [])
        if deleting and added:
            raise errors.invalid(kind=resource_type.kind, group=resource_type.group,
                                 name=metadata["name"], errors=[FieldError(
                                     "FieldValueForbidden", "metadata.finalizers",
                                     "Forbidden: no new finalizers can be added if the object "
                                     f"is being deleted, found new finalizers {sorted(added)}")])

        self.apply_kind_rules(resource_type, new, current)
        self.check_object(resource_type, new, strict=strict)
        if "generation" in old_metadata and spec_part(
                new, has_status=resource_type.has_status) != spec_part(
                current, has_status=resource_type.has_status):
            metadata["generation"] = old_metadata["generation"] + 1

        unchanged = dict(new, metadata={**metadata, "resourceVersion": None}) == dict(
            current, metadata={**old_metadata, "resourceVersion": None})
        if unchanged:
            # Why: the real server skips the storage write (and the resourceVersion bump and
            # watch event) when an update changes nothing.
            return self.render(resource_type, current)
        if deleting and not metadata.get("finalizers"):
            self.before_delete(resource_type, current)
            return self.commit(resource_type, EventType.DELETED, new, current)
        updated = self.commit(resource_type, EventType.MODIFIED, new, current)
        self.after_write(resource_type, new, current)
        return updated

    def delete(
        self, resource_type: ResourceType, namespace: str | None, name: str,
        options: dict[str, Any],
    ) -> dict[str, Any]:
        """Delete an object, or mark it with a deletionTimestamp while finalizers remain."""
        with self.lock:
            current = self.bucket(resource_type).get((namespace, name))
            if current is None:
                raise errors.not_found(resource_type.group, resource_type.plural, name)
            self.check_preconditions(resource_type, current, options.get("preconditions"))

            if current["metadata"].get("finalizers"):
                if current["metadata"].get("deletionTimestamp"):
                    return self.render(resource_type, current)
                marked = copy.deepcopy(current)
                marked["metadata"]["deletionTimestamp"] = now_timestamp()
                marked["metadata"]["deletionGracePeriodSeconds"] = 0
                # Why: the real server bumps the generation on the first graceful deletion so
                # controllers notice the change of intent.
                if "generation" in marked["metadata"]:
                    marked["metadata"]["generation"] += 1
                return self.commit(resource_type, EventType.MODIFIED, marked, current)

            self.before_delete(resource_type, current)
            # TODO: ownerReferences are not garbage-collected; dependents outlive their owner.
            return self.commit(resource_type, EventType.DELETED, copy.deepcopy(current), current)

    def check_preconditions(self, resource_type: ResourceType, current: dict[str, Any],
                            preconditions: Any) -> None:
        if not isinstance(preconditions, dict):
            return
        metadata = current["metadata"]
        uid = preconditions.get("uid")
        if uid and uid != metadata["uid"]:
            raise errors.ApiError(
                code=409, reason="Conflict",
                message=f"Precondition failed: UID in precondition: {uid}, UID in object meta: "
                f"{metadata['uid']}", name=metadata["name"], group=resource_type.group,
                kind=resource_type.plural)
        version = preconditions.get("resourceVersion")
        if version and version != metadata["resourceVersion"]:
            raise errors.ApiError(
                code=409, reason="Conflict",
                message=f"Precondition failed: ResourceVersion in precondition: {version}, "
                f"ResourceVersion in object meta: {metadata['resourceVersion']}",
                name=metadata["name"], group=resource_type.group, kind=resource_type.plural)

    def delete_namespace_contents(self, namespace: str) -> None:
        # NOTE: the real server keeps a namespace Terminating while its content is finalized;
        # here its objects are removed at once, finalizers or not.
        for resource_type in list(self.types.values()):
            if not resource_type.namespaced or resource_type.version != self.storage_version(
                    resource_type):
                continue
            for (object_namespace, _), obj in list(self.bucket(resource_type).items()):
                if object_namespace == namespace:
                    self.commit(resource_type, EventType.DELETED, copy.deepcopy(obj), obj)

    def storage_version(self, resource_type: ResourceType) -> str:
        """Return one version per stored resource, so bulk deletion visits each object once."""
        versions = [v for (g, v, p) in self.types if (g, p) == resource_type.storage_key]
        return sorted(versions, key=version_priority)[0]

    # --- custom resource definitions -----------------------------------------------------

    def after_write(self, resource_type: ResourceType, obj: dict[str, Any],
                    previous: dict[str, Any] | None) -> None:
        """Serve a stored CRD's resource types, replacing those of its previous version."""
        if not is_crd(resource_type):
            return
        if previous is not None:
            self.unregister_crd(previous)
        for served in crds.served_types(obj["spec"]):
            self.register(served)

    def before_delete(self, resource_type: ResourceType, obj: dict[str, Any]) -> None:
        """Remove what depends on an object about to go: a namespace's or a CRD's objects."""
        if (resource_type.group, resource_type.plural) == ("", "namespaces"):
            self.delete_namespace_contents(obj["metadata"]["name"])
        elif is_crd(resource_type):
            self.remove_crd(obj)

    def unregister_crd(self, crd: dict[str, Any]) -> None:
        spec = crd["spec"]
        for key in [key for key in self.types
                    if (key[0], key[2]) == (spec["group"], spec["names"]["plural"])]:
            del self.types[key]

    def remove_crd(self, crd: dict[str, Any]) -> None:
        spec = crd["spec"]
        storage_key = (spec["group"], spec["names"]["plural"])
        resource_type = next((t for t in self.types.values()
                              if t.storage_key == storage_key), None)
        if resource_type is not None:
            for obj in list(self.objects.get(storage_key, {}).values()):
                self.commit(resource_type, EventType.DELETED, copy.deepcopy(obj), obj)
        self.unregister_crd(crd)
        self.objects.pop(storage_key, None)

    # --- watches -------------------------------------------------------------------------

    def open_watch(
        self, resource_type: ResourceType, namespace: str | None, selector: Selector,
        since: int | None,
    ) -> tuple[list[WatchEvent], Watcher]:
        """Register a watcher and return the events it must be sent first.

        Without ``since`` (or with 0) those are synthetic ADDED events for every current
        object; otherwise every kept event after ``since``. Raises ``410 Gone`` when the
        history no longer reaches back to ``since``.
        """
        with self.lock:
            watcher = Watcher(resource_type.storage_key, namespace, selector)
            initial: list[WatchEvent] = []
            if not since:
                items, _ = self.list_objects(resource_type, namespace, selector)
                for item in items:
                    initial.append(WatchEvent(int(item["metadata"]["resourceVersion"]),
                                              EventType.ADDED, resource_type.storage_key,
                                              item["metadata"].get("namespace"), item))
            else:
                if since < self.compacted_version:
                    raise errors.gone(since, self.compacted_version + 1)
                for event in self.history:
                    if event.resource_version > since:
                        seen = watcher.translate(event)
                        if seen is not None:
                            initial.append(seen)
            self.watchers.add(watcher)
            return initial, watcher

    def close_watch(self, watcher: Watcher) -> None:
        with self.lock:
            self.watchers.discard(watcher)

    def compact(self) -> None:
        """Forget the watch history so every resourceVersion handed out so far is too old.

        Open watches are ended, as a restarting API server ends them, so clients reconnect
        from their last resourceVersion and receive ``410 Gone``.
        """
        with self.lock:
            self.resource_version += 1
            self.compacted_version = self.resource_version
            self.history.clear()
            for watcher in list(self.watchers):
                watcher.queue.put_nowait(None)


def is_crd(resource_type: ResourceType) -> bool:
    return (resource_type.group, resource_type.plural) == (CRD_GROUP, "customresourcedefinitions")


def fold_string_data(secret: dict[str, Any]) -> None:
    """Move ``stringData`` into ``data`` as base64 and check that ``data`` is base64."""
    string_data = secret.pop("stringData", None) or {}
    data = secret.get("data") or {}
    for key, value in data.items():
        try:
            base64.b64decode(value, validate=True)
        except (binascii.Error, TypeError) as error:
            raise errors.bad_request(
                f"illegal base64 data in Secret data key {key!r}: {error}") from error
    for key, value in string_data.items():
        data[key] = base64.b64encode(str(value).encode()).decode()
    if data:
        secret["data"] = data
    if not secret.get("type"):
        secret["type"] = "Opaque"
