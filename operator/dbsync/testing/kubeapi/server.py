"""The HTTP side of the emulator: routing, request log, patches, tables and lifecycle.

:class:`KubeApiServer` is an aiohttp application on 127.0.0.1. It accepts any bearer token
and serves plain HTTP, which kubectl, kopf and the ``kubernetes`` client all accept from a
kubeconfig. :func:`running_apiserver` runs one in a background thread with its own event loop
for synchronous tests and for clients (the ``kubernetes`` sync client) that would deadlock
if called from the server's own loop.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import threading
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from aiohttp import web

from dbsync.testing.kubeapi import discovery, errors, patches, protobuf
from dbsync.testing.kubeapi.discovery import ResourceType
from dbsync.testing.kubeapi.errors import ApiError
from dbsync.testing.kubeapi.selectors import Selector
from dbsync.testing.kubeapi.store import EventType, Store, WriteListener
from dbsync.testing.kubeapi.tables import TableColumns, build_table
from dbsync.testing.kubeapi.watch import JSON, WatchStreamer, is_true, wants_table

logger = logging.getLogger("dbsync.testing.kubeapi")

# Why one second: the real server sends a bookmark about once a minute, which is too slow
# for tests. Clients only rely on bookmarks arriving now and then.
DEFAULT_BOOKMARK_INTERVAL_SECONDS = 1.0
TOKEN = "dbsync-emulator-token"  # noqa: S105  (any token is accepted; this one is not secret)
PATCH_TYPES = {
    "application/merge-patch+json": "merge",
    "application/json-patch+json": "json",
    "application/strategic-merge-patch+json": "strategic",
    "application/apply-patch+yaml": "apply",
}


@dataclass(frozen=True)
class RequestRecord:
    """One request in RBAC terms: verb, resource, subresource, namespace, and the client.

    Requests outside resources (discovery, OpenAPI, /version) have an empty ``resource``
    and the lowercase HTTP method as ``verb``. Their ``path`` distinguishes them.
    """

    verb: str
    api_group: str
    resource: str
    subresource: str
    namespace: str | None
    name: str
    user_agent: str
    path: str


@dataclass(frozen=True)
class ResourceRequest:
    """A request path decoded into the resource it addresses."""

    group: str
    version: str
    plural: str
    namespace: str | None
    name: str
    subresource: str


def parse_resource_path(parts: list[str]) -> ResourceRequest | None:
    """Decode ``/api/v1/...`` or ``/apis/{group}/{version}/...`` into a resource request."""
    if parts[:2] == ["api", "v1"]:
        group, version, rest = "", "v1", parts[2:]
    elif parts[:1] == ["apis"] and len(parts) >= 3:
        group, version, rest = parts[1], parts[2], parts[3:]
    else:
        return None
    if not rest:
        return None
    namespace: str | None = None
    # Why the check on rest[2]: /api/v1/namespaces/{name}/status addresses a namespace itself,
    # while /api/v1/namespaces/{namespace}/{plural} addresses objects inside it.
    if rest[0] == "namespaces" and len(rest) >= 3 and rest[2] not in ("status", "finalize"):
        namespace, rest = rest[1], rest[2:]
    plural = rest[0]
    name = rest[1] if len(rest) > 1 else ""
    subresource = rest[2] if len(rest) > 2 else ""
    if len(rest) > 3:
        return None
    return ResourceRequest(group, version, plural, namespace, name, subresource)


def rbac_verb(method: str, request: ResourceRequest | None, watch: bool) -> str:
    if request is None:
        return method.lower()
    named = bool(request.name)
    if method == "GET":
        if watch:
            return "watch"
        return "get" if named else "list"
    return {
        "POST": "create",
        "PUT": "update",
        "PATCH": "patch",
        "DELETE": "delete" if named else "deletecollection",
    }.get(method, method.lower())


def json_response(body: Any, *, status: int = 200) -> web.Response:
    return web.Response(status=status, text=json.dumps(body), content_type=JSON)


class KubeApiServer:
    """An in-memory Kubernetes API server for tests: discovery, CRDs, objects and watches.

    It is a test double: no authentication, authorization, admission, garbage collection or
    controllers run, and state lives only in memory.
    """

    def __init__(
        self,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        watch_history_size: int = 1000,
        bookmark_interval_seconds: float = DEFAULT_BOOKMARK_INTERVAL_SECONDS,
    ) -> None:
        self.host = host
        self.requested_port = port
        self.store = Store(watch_history_size=watch_history_size)
        self.kubeconfig_path: Path | None = None
        self.runner: web.AppRunner | None = None
        self.bound_port: int | None = None
        self.records: list[RequestRecord] = []
        self.records_lock = threading.Lock()
        self.stopping = False
        self.loop: asyncio.AbstractEventLoop | None = None
        self.watches = WatchStreamer(self.store, bookmark_interval_seconds,
                                     lambda: self.stopping)

    # --- lifecycle and public helpers ----------------------------------------------------

    async def start(self) -> None:
        """Start listening, on a port the OS chooses when ``port`` is 0."""
        self.loop = asyncio.get_running_loop()
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_route("*", "/{tail:.*}", self.dispatch)
        self.runner = web.AppRunner(app, access_log=None, handle_signals=False,
                                    shutdown_timeout=1.0)
        await self.runner.setup()
        site = web.TCPSite(self.runner, self.host, self.requested_port)
        await site.start()
        address = self.runner.addresses[0]
        self.bound_port = int(address[1])
        logger.info("Kubernetes API emulator listening on %s", self.url)

    async def stop(self) -> None:
        """End open watches and stop listening."""
        self.stopping = True
        with self.store.lock:
            for watcher in list(self.store.watchers):
                watcher.queue.put_nowait(None)
        if self.runner is not None:
            await self.runner.cleanup()
            self.runner = None
        logger.info("Kubernetes API emulator stopped")

    @property
    def url(self) -> str:
        if self.bound_port is None:
            raise RuntimeError("the API emulator is not started: call start() first")
        return f"http://{self.host}:{self.bound_port}"

    def write_kubeconfig(self, path: Path, *, namespace: str = "default") -> Path:
        """Write a kubeconfig pointing at this server, remember it as ``kubeconfig_path``."""
        config = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [{"name": "dbsync-emulator", "cluster": {"server": self.url}}],
            "users": [{"name": "dbsync-emulator", "user": {"token": TOKEN}}],
            "contexts": [{"name": "dbsync-emulator", "context": {
                "cluster": "dbsync-emulator", "user": "dbsync-emulator",
                "namespace": namespace}}],
            "current-context": "dbsync-emulator",
            "preferences": {},
        }
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(yaml.safe_dump(config, sort_keys=False))
        self.kubeconfig_path = path
        return path

    def requests_log(self) -> list[RequestRecord]:
        with self.records_lock:
            return list(self.records)

    def clear_requests_log(self) -> None:
        with self.records_lock:
            self.records.clear()

    def add_write_listener(self, callback: WriteListener) -> None:
        """Call ``callback(WriteEvent)`` after every committed write, on the server's loop.

        A callback may be a plain function or return an awaitable, which is run as a task.
        """
        with self.store.lock:
            self.store.listeners.append(callback)

    def get_object(
        self, group: str, version: str, plural: str, namespace: str | None, name: str
    ) -> dict[str, Any] | None:
        """Return a copy of a stored object, or None. Safe to call from any thread."""
        resource_type = self.store.find_type(group, version, plural)
        if resource_type is None:
            return None
        try:
            return self.store.get(resource_type, namespace if resource_type.namespaced
                                  else None, name)
        except ApiError:
            return None

    def compact_watch_history(self) -> None:
        """Forget watch history, so older resourceVersions get ``410 Gone``, and end watches."""
        loop = self.loop_if_other_thread()
        if loop is None:
            self.store.compact()
        else:
            done = threading.Event()

            def compact() -> None:
                self.store.compact()
                done.set()

            loop.call_soon_threadsafe(compact)
            done.wait(timeout=5)

    def loop_if_other_thread(self) -> asyncio.AbstractEventLoop | None:
        loop = self.loop
        if loop is None:
            return None
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        return None if running is loop else loop

    # --- dispatch ------------------------------------------------------------------------

    async def dispatch(self, request: web.Request) -> web.StreamResponse:
        parts = [part for part in request.path.split("/") if part]
        resource_request = parse_resource_path(parts)
        watch = is_true(request.query.get("watch"))
        self.record(request, resource_request, watch)
        try:
            if resource_request is None:
                return self.serve_non_resource(request, parts)
            return await self.serve_resource(request, resource_request, watch)
        except ApiError as error:
            if error.code >= 500:
                logger.error("request %s %s failed: %s", request.method, request.path, error)
            return json_response(error.to_status(), status=error.code)

    def record(self, request: web.Request, resource_request: ResourceRequest | None,
               watch: bool) -> None:
        record = RequestRecord(
            verb=rbac_verb(request.method, resource_request, watch),
            api_group=resource_request.group if resource_request else "",
            resource=resource_request.plural if resource_request else "",
            subresource=resource_request.subresource if resource_request else "",
            namespace=resource_request.namespace if resource_request else None,
            name=resource_request.name if resource_request else "",
            user_agent=request.headers.get("User-Agent", ""),
            path=request.path,
        )
        with self.records_lock:
            self.records.append(record)

    def serve_non_resource(self, request: web.Request, parts: list[str]) -> web.Response:
        if request.method != "GET":
            raise errors.method_not_allowed(f"the server does not allow {request.method} "
                                            f"on {request.path}")
        if parts in (["healthz"], ["livez"], ["readyz"]):
            return web.Response(text="ok")
        if parts == ["version"]:
            return json_response(discovery.version_document())
        if parts == ["api"]:
            return json_response(discovery.core_versions_document(
                f"{self.host}:{self.bound_port}"))
        if parts == ["apis"]:
            return json_response(discovery.group_list_document(self.store.served_groups()))
        if parts[:1] == ["openapi"]:
            return self.serve_openapi(parts)
        groups = self.store.served_groups()
        if len(parts) == 2 and parts[0] == "apis" and parts[1] in groups:
            return json_response(discovery.group_document(parts[1], groups[parts[1]]))
        if parts == ["api", "v1"]:
            return json_response(discovery.resource_list_document(
                "v1", self.store.types_in("", "v1")))
        if len(parts) == 3 and parts[0] == "apis" and parts[2] in groups.get(parts[1], []):
            return json_response(discovery.resource_list_document(
                f"{parts[1]}/{parts[2]}", self.store.types_in(parts[1], parts[2])))
        raise ApiError(code=404, reason="NotFound",
                       message="the server could not find the requested resource")

    def serve_openapi(self, parts: list[str]) -> web.Response:
        if parts == ["openapi", "v3"]:
            paths = {}
            for key, types in self.group_versions().items():
                document = json.dumps(discovery.openapi_group_version_document(types),
                                      sort_keys=True)
                digest = discovery.short_hash(document)
                paths[key] = {"serverRelativeURL": f"/openapi/v3/{key}?hash={digest}"}
            return json_response({"paths": paths})
        served = self.group_versions().get("/".join(parts[2:]))
        if parts[:2] == ["openapi", "v3"] and served is not None:
            return json_response(discovery.openapi_group_version_document(served))
        raise ApiError(code=404, reason="NotFound",
                       message="the server could not find the requested resource")

    def group_versions(self) -> dict[str, list[ResourceType]]:
        grouped: dict[str, list[ResourceType]] = {}
        with self.store.lock:
            for resource_type in self.store.types.values():
                key = discovery.openapi_path_key(resource_type)
                grouped.setdefault(key, []).append(resource_type)
        return grouped

    # --- resources -----------------------------------------------------------------------

    async def serve_resource(
        self, request: web.Request, target: ResourceRequest, watch: bool
    ) -> web.StreamResponse:
        resource_type = self.store.find_type(target.group, target.version, target.plural)
        if resource_type is None:
            raise ApiError(code=404, reason="NotFound",
                           message="the server could not find the requested resource")
        if target.subresource and not (target.subresource == "status"
                                       and resource_type.has_status):
            raise ApiError(code=404, reason="NotFound",
                           message="the server could not find the requested resource")
        if resource_type.namespaced and target.name and target.namespace is None:
            raise ApiError(code=404, reason="NotFound",
                           message="the server could not find the requested resource")
        namespace = target.namespace if resource_type.namespaced else None
        if is_true(request.query.get("dryRun")) or request.query.get("dryRun") == "All":
            # TODO: server-side dry run is not emulated; such requests are rejected.
            raise errors.bad_request("dryRun is not supported by the API emulator")
        strict = request.query.get("fieldValidation", "").lower() == "strict"
        method = request.method

        if method == "GET" and watch:
            return await self.watches.serve(request, resource_type, namespace)
        if method == "GET" and target.name:
            obj = self.store.get(resource_type, namespace, target.name)
            return self.respond_objects(request, resource_type, [obj], single=True)
        if method == "GET":
            return self.serve_list(request, resource_type, namespace)
        if method == "POST" and not target.name:
            body = await self.read_body(request)
            self.check_kind(resource_type, body)
            created = self.store.create(resource_type, namespace, body, strict=strict)
            return json_response(created, status=201)
        if method == "PUT" and target.name:
            body = await self.read_body(request)
            self.check_kind(resource_type, body)
            updated = self.store.replace(resource_type, namespace, target.name, body,
                                         subresource=target.subresource or None,
                                         strict=strict)
            return json_response(updated)
        if method == "PATCH" and target.name:
            return await self.serve_patch(request, resource_type, namespace, target, strict)
        if method == "DELETE" and target.name and not target.subresource:
            options = await self.read_body(request, optional=True)
            deleted = self.store.delete(resource_type, namespace, target.name, options)
            return json_response(deleted)
        if method == "DELETE" and not target.name:
            return self.serve_delete_collection(request, resource_type, namespace)
        raise errors.method_not_allowed(f"the server does not allow this method on the "
                                        f"requested resource: {method} {request.path}")

    async def read_body(self, request: web.Request, *, optional: bool = False) -> dict[str, Any]:
        if request.content_type == protobuf.PROTOBUF:
            return protobuf.decode(await request.read())
        text = await request.text()
        if not text.strip():
            if optional:
                return {}
            raise errors.bad_request("the request body is empty")
        try:
            body = yaml.safe_load(text) if "yaml" in request.content_type else json.loads(text)
        except (ValueError, yaml.YAMLError) as error:
            raise errors.bad_request(f"the request body is not valid JSON: {error}") from error
        if not isinstance(body, dict):
            raise errors.bad_request("the request body must be a JSON object")
        return body

    def check_kind(self, resource_type: ResourceType, body: dict[str, Any]) -> None:
        kind = body.get("kind")
        api_version = body.get("apiVersion")
        if kind is not None and kind != resource_type.kind:
            raise errors.bad_request(
                f"the API version in the data ({api_version}) does not match the expected API "
                f"version ({resource_type.api_version}) or kind {kind!r} is not "
                f"{resource_type.kind!r}")
        if api_version is not None and api_version != resource_type.api_version:
            raise errors.bad_request(
                f"the API version in the data ({api_version}) does not match the expected API "
                f"version ({resource_type.api_version})")

    def table_columns(self, resource_type: ResourceType) -> TableColumns:
        return TableColumns.from_printer_columns(list(resource_type.printer_columns))

    def respond_objects(
        self, request: web.Request, resource_type: ResourceType, objects: list[dict[str, Any]],
        *, single: bool, resource_version: int | None = None, continue_token: str = "",
        remaining: int | None = None,
    ) -> web.Response:
        if wants_table(request):
            version = (objects[0]["metadata"]["resourceVersion"] if single
                       else str(resource_version))
            return json_response(build_table(
                self.table_columns(resource_type), objects, resource_version=version,
                include_object=request.query.get("includeObject", "Metadata"),
                continue_token=continue_token,
                no_headers=is_true(request.query.get("noHeaders"))))
        if single:
            return json_response(objects[0])
        metadata: dict[str, Any] = {"resourceVersion": str(resource_version)}
        if continue_token:
            metadata["continue"] = continue_token
            metadata["remainingItemCount"] = remaining
        return json_response({
            "kind": resource_type.list_kind,
            "apiVersion": resource_type.api_version,
            "metadata": metadata,
            "items": objects,
        })

    def serve_list(self, request: web.Request, resource_type: ResourceType,
                   namespace: str | None) -> web.Response:
        selector = Selector.parse(request.query.get("labelSelector"),
                                  request.query.get("fieldSelector"),
                                  resource_type.selectable_fields)
        items, version = self.store.list_objects(resource_type, namespace, selector)

        start = 0
        token = request.query.get("continue")
        if token:
            try:
                state = json.loads(base64.urlsafe_b64decode(token.encode()))
                start, version = int(state["start"]), int(state["rv"])
            except (ValueError, KeyError, TypeError) as error:
                raise errors.bad_request(f"invalid continue token {token!r}") from error
            if version < self.store.compacted_version:
                raise errors.gone(version, self.store.compacted_version + 1)
        limit = int(request.query.get("limit", "0") or 0)
        page = items[start:start + limit] if limit > 0 else items[start:]
        continue_token = ""
        remaining = None
        if limit > 0 and start + limit < len(items):
            # NOTE: a continued list reads the current objects, not a snapshot at the first
            # page's resourceVersion as etcd would.
            state = {"start": start + limit, "rv": version}
            continue_token = base64.urlsafe_b64encode(json.dumps(state).encode()).decode()
            remaining = len(items) - start - limit
        return self.respond_objects(request, resource_type, page, single=False,
                                    resource_version=version, continue_token=continue_token,
                                    remaining=remaining)

    def serve_delete_collection(self, request: web.Request, resource_type: ResourceType,
                                namespace: str | None) -> web.Response:
        selector = Selector.parse(request.query.get("labelSelector"),
                                  request.query.get("fieldSelector"),
                                  resource_type.selectable_fields)
        items, _ = self.store.list_objects(resource_type, namespace, selector)
        deleted = []
        for item in items:
            metadata = item["metadata"]
            with suppress(ApiError):
                deleted.append(self.store.delete(resource_type, metadata.get("namespace"),
                                                 metadata["name"], {}))
        return self.respond_objects(request, resource_type, deleted, single=False,
                                    resource_version=self.store.resource_version)

    async def serve_patch(
        self, request: web.Request, resource_type: ResourceType, namespace: str | None,
        target: ResourceRequest, strict: bool,
    ) -> web.Response:
        patch_type = PATCH_TYPES.get(request.content_type)
        if patch_type is None or (patch_type == "strategic" and resource_type.custom):
            raise errors.unsupported_media_type(request.content_type)
        text = await request.text()
        try:
            body = yaml.safe_load(text) if patch_type == "apply" else json.loads(text)
        except (ValueError, yaml.YAMLError) as error:
            raise errors.bad_request(f"the patch is not valid: {error}") from error

        try:
            current = self.store.get(resource_type, namespace, target.name)
        except ApiError as error:
            if patch_type == "apply" and error.code == 404 and not target.subresource:
                self.check_kind(resource_type, body)
                created = self.store.create(resource_type, namespace, body, strict=strict)
                return json_response(created, status=201)
            raise

        if patch_type == "merge":
            patched = patches.merge_patch(current, body)
        elif patch_type == "json":
            patched = patches.json_patch(current, body)
        elif patch_type == "strategic":
            patched = patches.strategic_merge_patch(current, body)
        else:
            # NOTE: server-side apply is approximated by a merge of the applied configuration;
            # field ownership is not tracked, so fields dropped from it are not removed.
            self.check_kind(resource_type, body)
            patched = patches.merge_patch(current, body)
        if not isinstance(patched, dict):
            raise errors.bad_request("the patched object must be a JSON object")
        self.check_kind(resource_type, patched)
        updated = self.store.replace(resource_type, namespace, target.name, patched,
                                     subresource=target.subresource or None, strict=strict)
        return json_response(updated)


@contextmanager
def running_apiserver(
    *, kubeconfig_path: Path | None = None, **kwargs: Any
) -> Iterator[KubeApiServer]:
    """Run a :class:`KubeApiServer` in a background thread with its own event loop.

    ``kwargs`` go to the constructor. When ``kubeconfig_path`` is given, a kubeconfig is
    written there before the server is yielded.
    """
    server = KubeApiServer(**kwargs)
    loop = asyncio.new_event_loop()
    started = threading.Event()
    failure: list[BaseException] = []

    def run() -> None:
        asyncio.set_event_loop(loop)
        try:
            loop.run_until_complete(server.start())
        except BaseException as error:
            failure.append(error)
            started.set()
            return
        started.set()
        loop.run_forever()

    thread = threading.Thread(target=run, name="kubeapi-emulator", daemon=True)
    thread.start()
    started.wait(timeout=30)
    if failure:
        raise failure[0]
    try:
        if kubeconfig_path is not None:
            server.write_kubeconfig(kubeconfig_path)
        yield server
    finally:
        stop = asyncio.run_coroutine_threadsafe(server.stop(), loop)
        stop.result(timeout=30)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=30)
        loop.close()


__all__ = ["EventType", "KubeApiServer", "RequestRecord", "running_apiserver"]
