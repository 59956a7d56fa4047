"""A small asynchronous Kubernetes API client on kopf's own login result.

The operator reads Secrets and ConfigMaps and writes the status of resources outside a
kopf handler (periodic re-checks, runs started by a changed Secret).  It does so with the
same credentials kopf logged in with, captured by :func:`remember_connection`, and with
aiohttp, which kopf already loads.  The synchronous ``kubernetes`` client would block the
event loop and would add tens of megabytes of imported modules.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote

import aiohttp
import kopf

from dbsync.k8s.models import GROUP, PLURAL, VERSION

logger = logging.getLogger("dbsync.k8s.kubeclient")

REQUEST_TIMEOUT_SECONDS = 30.0


class KubeApiError(Exception):
    """An error status returned by the API server."""

    def __init__(self, message: str, *, status: int) -> None:
        super().__init__(message)
        self.status = status


@dataclass
class _ConnectionHolder:
    info: kopf.ConnectionInfo | None = None


_HOLDER = _ConnectionHolder()


def remember_connection(info: kopf.ConnectionInfo | None) -> None:
    """Store the connection kopf logged in with, for :class:`KubeClient` to reuse."""
    if info is not None:
        _HOLDER.info = info


def current_connection() -> kopf.ConnectionInfo:
    """Return the stored connection, raising RuntimeError before the operator has logged in."""
    if _HOLDER.info is None:
        raise RuntimeError("the operator has not logged in to the Kubernetes API yet")
    return _HOLDER.info


def _quote(segment: str) -> str:
    return quote(segment, safe="")


@dataclass
class KubeClient:
    """GET and merge-PATCH requests against the API server kopf talks to."""

    _session: aiohttp.ClientSession | None = field(default=None, init=False)
    _info: kopf.ConnectionInfo | None = field(default=None, init=False)
    _replaced: list[aiohttp.ClientSession] = field(default_factory=list, init=False)

    def _ensure_session(self) -> tuple[aiohttp.ClientSession, str]:
        info = current_connection()

        # kopf may log in again (expired token); a new login gets a new session.
        if self._session is None or self._info is not info:
            if self._session is not None:
                # Closing is asynchronous, so the old session is closed in close().
                logger.info("Kubernetes credentials changed; opening a new API session")
                self._replaced.append(self._session)
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(ssl=info.as_ssl_context()),
                headers=info.as_http_headers(),
                timeout=aiohttp.ClientTimeout(total=REQUEST_TIMEOUT_SECONDS),
            )
            self._info = info
        return self._session, info.server.rstrip("/")

    async def close(self) -> None:
        """Close the HTTP sessions."""
        for replaced in self._replaced:
            await replaced.close()
        self._replaced.clear()
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def get(self, path: str) -> dict[str, Any] | None:
        """Return the object at ``path``, or None when the API server returns 404."""
        session, server = self._ensure_session()
        async with session.get(server + path) as response:
            if response.status == 404:
                return None
            body = await response.text()
            if response.status >= 400:
                raise KubeApiError(f"GET {path} failed with HTTP {response.status}: "
                                   f"{body[:300]}", status=response.status)
            loaded: dict[str, Any] = json.loads(body)
            return loaded

    async def merge_patch(self, path: str, patch: dict[str, Any]) -> dict[str, Any] | None:
        """Apply a JSON merge patch at ``path``; return the object, or None on 404."""
        session, server = self._ensure_session()
        headers = {"Content-Type": "application/merge-patch+json"}
        async with session.patch(server + path, data=json.dumps(patch),
                                 headers=headers) as response:
            if response.status == 404:
                return None
            body = await response.text()
            if response.status >= 400:
                raise KubeApiError(f"PATCH {path} failed with HTTP {response.status}: "
                                   f"{body[:300]}", status=response.status)
            loaded: dict[str, Any] = json.loads(body)
            return loaded

    async def create(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        """POST ``body`` to the collection at ``path``; KubeApiError(status=409) if it exists."""
        session, server = self._ensure_session()
        async with session.post(server + path, data=json.dumps(body),
                                headers={"Content-Type": "application/json"}) as response:
            text = await response.text()
            if response.status >= 400:
                raise KubeApiError(f"POST {path} failed with HTTP {response.status}: "
                                   f"{text[:300]}", status=response.status)
            loaded: dict[str, Any] = json.loads(text)
            return loaded

    async def delete(self, path: str, *, propagation_policy: str = "Background") -> bool:
        """Delete the object at ``path``; return False when it was already gone."""
        session, server = self._ensure_session()
        options = {"kind": "DeleteOptions", "apiVersion": "v1",
                   "propagationPolicy": propagation_policy}
        async with session.delete(server + path, data=json.dumps(options),
                                  headers={"Content-Type": "application/json"}) as response:
            if response.status == 404:
                return False
            text = await response.text()
            if response.status >= 400:
                raise KubeApiError(f"DELETE {path} failed with HTTP {response.status}: "
                                   f"{text[:300]}", status=response.status)
            return True

    async def list_items(self, path: str, *, label_selector: str) -> list[dict[str, Any]]:
        """Return the items of the collection at ``path`` that match ``label_selector``."""
        found = await self.get(f"{path}?labelSelector={quote(label_selector, safe='')}")
        return list((found or {}).get("items") or [])

    async def read_secret(self, namespace: str, name: str) -> dict[str, Any] | None:
        """Return the Secret ``namespace/name``, or None when it does not exist."""
        return await self.get(f"/api/v1/namespaces/{_quote(namespace)}/secrets/{_quote(name)}")

    async def read_config_map(self, namespace: str, name: str) -> dict[str, Any] | None:
        """Return the ConfigMap ``namespace/name``, or None when it does not exist."""
        return await self.get(
            f"/api/v1/namespaces/{_quote(namespace)}/configmaps/{_quote(name)}")

    async def patch_database_sync_status(self, namespace: str, name: str,
                                         status: dict[str, Any]) -> dict[str, Any] | None:
        """Merge ``status`` into a DatabaseSync's status subresource.

        Fields the API server dropped (not declared in the CRD) are logged as a warning.
        """
        written = await self.merge_patch(_database_sync_path(namespace, name) + "/status",
                                         {"status": status})
        if written is not None:
            dropped = missing_fields(status, written.get("status") or {})
            if dropped:
                logger.warning("status patch of %s/%s finished with inconsistencies: the API "
                               "server dropped %s", namespace, name, ", ".join(dropped))
        return written


def _database_sync_path(namespace: str, name: str) -> str:
    return (f"/apis/{GROUP}/{VERSION}/namespaces/{_quote(namespace)}/{PLURAL}/"
            f"{_quote(name)}")


def missing_fields(sent: Any, stored: Any, path: str = "status") -> list[str]:
    """Return the paths of fields in ``sent`` that ``stored`` lacks (None means a removal)."""
    if not isinstance(sent, dict):
        return []
    if not isinstance(stored, dict):
        return [path]
    missing: list[str] = []
    for key, value in sent.items():
        if value is None:
            continue
        if key not in stored:
            missing.append(f"{path}.{key}")
            continue
        missing.extend(missing_fields(value, stored[key], f"{path}.{key}"))
    return missing
