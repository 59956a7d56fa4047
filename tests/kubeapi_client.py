"""A small HTTP client for driving the API emulator directly from tests (urllib only)."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from dbsync.testing.kubeapi import KubeApiServer
from tests.kubeapi_manifests import GROUP, PLURAL, VERSION, WIDGET_CRD

WIDGETS = f"/apis/{GROUP}/{VERSION}/namespaces/default/{PLURAL}"


@dataclass(frozen=True)
class Reply:
    """An HTTP status and the decoded JSON body."""

    status: int
    body: Any


@dataclass(frozen=True)
class ApiClient:
    """Sends JSON requests to one emulator."""

    base_url: str

    def call(self, method: str, path: str, body: Any = None, *,
             content_type: str = "application/json",
             headers: dict[str, str] | None = None) -> Reply:
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(
            self.base_url + path, data=data, method=method,
            headers={"Content-Type": content_type, "Authorization": "Bearer any",
                     **(headers or {})})
        try:
            with urllib.request.urlopen(request, timeout=10) as response:
                return Reply(response.status, json.loads(response.read() or b"null"))
        except urllib.error.HTTPError as error:
            return Reply(error.code, json.loads(error.read() or b"null"))

    def stream(self, path: str, *, timeout_seconds: float = 5) -> Iterator[dict[str, Any]]:
        """Yield watch events until the server ends the stream."""
        request = urllib.request.Request(self.base_url + path)
        with urllib.request.urlopen(request, timeout=timeout_seconds) as response:
            for line in response:
                if line.strip():
                    yield json.loads(line)

    def install_widget_crd(self) -> None:
        reply = self.call("POST", "/apis/apiextensions.k8s.io/v1/customresourcedefinitions",
                          WIDGET_CRD)
        assert reply.status == 201, reply.body


def client_for(server: KubeApiServer) -> ApiClient:
    return ApiClient(server.url)
