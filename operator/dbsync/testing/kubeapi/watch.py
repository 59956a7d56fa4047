"""Watch streams: newline-delimited JSON events, bookmarks, timeouts and ``410 Gone``.

A watch first replays the store's kept history after the requested resourceVersion, or sends
the current objects as ADDED events when none is given. It then streams live events from the
store's queue until ``timeoutSeconds`` passes, the client goes away or the server stops.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable
from contextlib import suppress
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from dbsync.testing.kubeapi import errors
from dbsync.testing.kubeapi.discovery import ResourceType
from dbsync.testing.kubeapi.errors import ApiError
from dbsync.testing.kubeapi.selectors import Selector
from dbsync.testing.kubeapi.store import Store, WatchEvent
from dbsync.testing.kubeapi.tables import TableColumns, build_table

logger = logging.getLogger("dbsync.testing.kubeapi")

JSON = "application/json"
DEFAULT_WATCH_TIMEOUT_SECONDS = 1800


def wants_table(request: web.Request) -> bool:
    """Return whether the first media type in Accept requests a ``meta.k8s.io`` Table."""
    accept = request.headers.get("Accept", "")
    first = accept.split(",")[0].replace(" ", "")
    return "as=Table" in first and "g=meta.k8s.io" in first


def is_true(value: str | None) -> bool:
    return value is not None and value.lower() in ("true", "1")


@dataclass(frozen=True)
class WatchStreamer:
    """Serves watch requests from one store."""

    store: Store
    bookmark_interval_seconds: float
    is_stopping: Callable[[], bool]

    async def serve(self, request: web.Request, resource_type: ResourceType,
                    namespace: str | None) -> web.StreamResponse:
        """Stream the events ``request`` selects until its timeout, a disconnect or a stop."""
        query = request.query
        selector = Selector.parse(query.get("labelSelector"), query.get("fieldSelector"),
                                  resource_type.selectable_fields)
        bookmarks = is_true(query.get("allowWatchBookmarks"))
        timeout_seconds = float(query.get("timeoutSeconds") or DEFAULT_WATCH_TIMEOUT_SECONDS)
        since_text = query.get("resourceVersion") or ""
        send_initial = is_true(query.get("sendInitialEvents"))
        try:
            since = int(since_text) if since_text else None
        except ValueError as error:
            raise errors.bad_request(f"invalid resourceVersion {since_text!r}") from error
        as_table = wants_table(request)

        response = web.StreamResponse(status=200, headers={"Content-Type": JSON})
        response.enable_chunked_encoding()
        await response.prepare(request)
        try:
            initial, watcher = self.store.open_watch(
                resource_type, namespace, selector, None if send_initial else since)
        except ApiError as error:
            # Why 200 with an ERROR event: the real server reports a too-old resourceVersion
            # inside the watch stream, and clients such as kopf look for it there.
            await self.write_event(response, "ERROR", error.to_status())
            await response.write_eof()
            return response

        deadline = time.monotonic() + timeout_seconds
        try:
            for event in initial:
                await self.write_watch_event(response, resource_type, event, as_table)
            if send_initial:
                await self.write_event(response, "BOOKMARK", self.bookmark_object(
                    resource_type, initial_events_end=True))
            await self.pump_watch(response, resource_type, watcher.queue, deadline,
                                  bookmarks, as_table)
        except (ConnectionResetError, asyncio.CancelledError):
            logger.debug("watch client went away")
        finally:
            self.store.close_watch(watcher)
        with suppress(ConnectionResetError):
            await response.write_eof()
        return response

    async def pump_watch(
        self, response: web.StreamResponse, resource_type: ResourceType,
        queue: asyncio.Queue[WatchEvent | None], deadline: float, bookmarks: bool,
        as_table: bool,
    ) -> None:
        while not self.is_stopping():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                if bookmarks:
                    await self.write_event(response, "BOOKMARK",
                                           self.bookmark_object(resource_type))
                return
            wait = min(remaining, self.bookmark_interval_seconds) if bookmarks else remaining
            try:
                event = await asyncio.wait_for(queue.get(), timeout=wait)
            except TimeoutError:
                if bookmarks and time.monotonic() < deadline:
                    await self.write_event(response, "BOOKMARK",
                                           self.bookmark_object(resource_type))
                continue
            if event is None:
                return
            await self.write_watch_event(response, resource_type, event, as_table)

    def bookmark_object(self, resource_type: ResourceType, *,
                        initial_events_end: bool = False) -> dict[str, Any]:
        metadata: dict[str, Any] = {"resourceVersion": str(self.store.resource_version)}
        if initial_events_end:
            metadata["annotations"] = {"k8s.io/initial-events-end": "true"}
        return {"kind": resource_type.kind, "apiVersion": resource_type.api_version,
                "metadata": metadata}

    async def write_watch_event(self, response: web.StreamResponse,
                                resource_type: ResourceType, event: WatchEvent,
                                as_table: bool) -> None:
        obj = self.store.render(resource_type, event.obj)
        obj["metadata"]["resourceVersion"] = str(event.resource_version)
        payload = obj
        if as_table:
            columns = TableColumns.from_printer_columns(list(resource_type.printer_columns))
            payload = build_table(columns, [obj], resource_version=str(event.resource_version),
                                  include_object="Object")
        await self.write_event(response, event.type.value, payload)

    async def write_event(self, response: web.StreamResponse, event_type: str,
                          obj: dict[str, Any]) -> None:
        line = json.dumps({"type": event_type, "object": obj}) + "\n"
        await response.write(line.encode())
