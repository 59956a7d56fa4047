"""The API emulator driven by kopf's real runtime: handlers, finalizers, status, 410 Gone."""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import kopf
import pytest
import yaml

from dbsync.testing.kubeapi import KubeApiServer
from tests.kubeapi_client import WIDGETS, ApiClient, client_for
from tests.kubeapi_fixtures import kubeapi  # noqa: F401
from tests.kubeapi_manifests import GROUP, PLURAL, VERSION, widget

FINALIZER = "example.dbsync.io/finalizer"
MERGE = "application/merge-patch+json"


@dataclass
class HandlerCalls:
    """What the test operator's handlers saw, shared with the test thread."""

    calls: list[tuple[str, str, Any]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, event: str, name: str, detail: Any) -> None:
        with self.lock:
            self.calls.append((event, name, detail))

    def seen(self, event: str, name: str) -> list[Any]:
        with self.lock:
            return [detail for kind, who, detail in self.calls if (kind, who) == (event, name)]


def build_registry(server: KubeApiServer, calls: HandlerCalls) -> kopf.OperatorRegistry:
    """Register a small operator for Widgets: create, spec update and delete handlers."""
    registry = kopf.OperatorRegistry()
    assert server.kubeconfig_path is not None
    config = yaml.safe_load(server.kubeconfig_path.read_text())

    @kopf.on.login(registry=registry)
    def login(**_: Any) -> kopf.ConnectionInfo:
        # Why parse the file: it is the kubeconfig clients get, and kopf's own kubeconfig
        # login reads only $KUBECONFIG, which tests must not set process-wide.
        return kopf.ConnectionInfo(server=config["clusters"][0]["cluster"]["server"],
                                   token=config["users"][0]["user"]["token"],
                                   default_namespace="default")

    @kopf.on.startup(registry=registry)
    def configure(settings: kopf.OperatorSettings, **_: Any) -> None:
        settings.persistence.finalizer = FINALIZER
        settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(
            prefix="example.dbsync.io")
        settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
            prefix="example.dbsync.io", key="last-handled")
        settings.posting.level = logging.WARNING
        settings.watching.server_timeout = 30

    @kopf.on.create(GROUP, VERSION, PLURAL, registry=registry, id="widget-create")
    def on_create(name: str, spec: Any, body: kopf.Body, patch: kopf.Patch, **_: Any) -> None:
        calls.add("create", name, spec.get("replicas"))
        kopf.event(body, type="Normal", reason="Synced", message=f"widget {name} created")
        if spec.get("owner") == "undeclared":
            patch.status["undeclaredField"] = "dropped by the schema"
        patch.status["conditions"] = [{"type": "Ready", "status": "True", "reason": "Synced"}]

    @kopf.on.update(GROUP, VERSION, PLURAL, registry=registry, id="widget-update",
                    field="spec")
    def on_update(name: str, new: Any, patch: kopf.Patch, **_: Any) -> None:
        calls.add("update", name, new.get("replicas"))
        patch.status["observedGeneration"] = 2

    @kopf.on.delete(GROUP, VERSION, PLURAL, registry=registry, id="widget-delete")
    def on_delete(name: str, **_: Any) -> None:
        calls.add("delete", name, None)

    return registry


@dataclass
class RunningOperator:
    """A kopf operator in a thread with its own event loop."""

    calls: HandlerCalls
    thread: threading.Thread
    stop: threading.Event


@pytest.fixture
def operator(kubeapi: KubeApiServer,  # noqa: F811
             request: pytest.FixtureRequest) -> Iterator[RunningOperator]:
    """Install the Widget CRD and run the test operator until the test ends.

    The operator watches the default namespace, or every namespace when the test
    parametrizes this fixture indirectly with ``"clusterwide"``.
    """
    clusterwide = getattr(request, "param", "namespaced") == "clusterwide"
    client_for(kubeapi).install_widget_crd()
    calls = HandlerCalls()
    registry = build_registry(kubeapi, calls)
    stop = threading.Event()
    ready = threading.Event()

    def run() -> None:
        namespaces = [] if clusterwide else ["default"]
        asyncio.run(kopf.operator(registry=registry, standalone=True, clusterwide=clusterwide,
                                  namespaces=namespaces, stop_flag=stop, ready_flag=ready))

    thread = threading.Thread(target=run, name="kopf-operator", daemon=True)
    thread.start()
    assert ready.wait(timeout=30), "kopf did not become ready"
    yield RunningOperator(calls, thread, stop)
    stop.set()
    thread.join(timeout=30)


def wait_until(condition: Callable[[], Any], *, timeout_seconds: float = 15) -> Any:
    """Poll ``condition`` until it returns a true value; fail with a clear message."""
    deadline = time.monotonic() + timeout_seconds
    while time.monotonic() < deadline:
        result = condition()
        if result:
            return result
        time.sleep(0.05)
    raise AssertionError(f"condition not met within {timeout_seconds} s: {condition}")


def stored(server: KubeApiServer, name: str) -> dict[str, Any] | None:
    return server.get_object(GROUP, VERSION, PLURAL, "default", name)


def create(client: ApiClient, name: str, **spec: Any) -> None:
    reply = client.call("POST", WIDGETS, widget(name, **spec))
    assert reply.status == 201, reply.body


def test_kopf_sees_create_and_patches_status(
    kubeapi: KubeApiServer, operator: RunningOperator,  # noqa: F811
    caplog: pytest.LogCaptureFixture,
) -> None:
    """kopf runs the create handler, adds its finalizer and writes status consistently."""
    create(client_for(kubeapi), "one", replicas=2)
    assert wait_until(lambda: operator.calls.seen("create", "one")) == [2]
    obj = wait_until(lambda: (o := stored(kubeapi, "one")) and o.get("status") and o)
    assert obj["status"]["conditions"][0]["status"] == "True"
    assert FINALIZER in obj["metadata"]["finalizers"]
    # Why: kopf warns when a patch's result differs from the patch it sent.
    assert not [record for record in caplog.records if "inconsistencies" in record.getMessage()]


def test_kopf_posts_events(kubeapi: KubeApiServer, operator: RunningOperator) -> None:  # noqa: F811
    """An event posted from a handler is stored as a core/v1 Event about the object."""
    client = client_for(kubeapi)
    create(client, "evented")

    def synced_events() -> list[dict[str, Any]]:
        items = client.call("GET", "/api/v1/namespaces/default/events").body["items"]
        return [item for item in items if item.get("reason") == "Synced"]

    event = wait_until(synced_events)[0]
    assert event["involvedObject"]["name"] == "evented"
    assert event["involvedObject"]["kind"] == "Widget"
    assert event["message"] == "widget evented created"


def test_kopf_warns_on_undeclared_status_field(
    kubeapi: KubeApiServer, operator: RunningOperator,  # noqa: F811
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A status field the schema lacks is pruned, and kopf reports the inconsistency."""
    create(client_for(kubeapi), "pruned", owner="undeclared")

    def warned() -> bool:
        return any("inconsistencies" in record.getMessage() for record in caplog.records)

    wait_until(warned)
    obj = stored(kubeapi, "pruned")
    assert obj is not None
    assert "undeclaredField" not in obj.get("status", {})


def test_kopf_sees_spec_update(kubeapi: KubeApiServer, operator: RunningOperator) -> None:  # noqa: F811
    """A spec change reaches kopf's update handler, and its status write lands."""
    client = client_for(kubeapi)
    create(client, "two")
    wait_until(lambda: operator.calls.seen("create", "two"))
    wait_until(lambda: (o := stored(kubeapi, "two")) and "status" in o)
    client.call("PATCH", f"{WIDGETS}/two", {"spec": {"replicas": 5}}, content_type=MERGE)
    assert wait_until(lambda: operator.calls.seen("update", "two")) == [5]
    obj = wait_until(lambda: (o := stored(kubeapi, "two"))
                     and o["status"].get("observedGeneration") and o)
    assert obj["status"]["observedGeneration"] == 2


def test_kopf_handles_delete_and_removes_finalizer(
    kubeapi: KubeApiServer, operator: RunningOperator  # noqa: F811
) -> None:
    """Deletion waits for kopf's delete handler, which then releases the finalizer."""
    client = client_for(kubeapi)
    create(client, "three")
    wait_until(lambda: (o := stored(kubeapi, "three"))
               and FINALIZER in (o["metadata"].get("finalizers") or []))
    client.call("DELETE", f"{WIDGETS}/three")
    wait_until(lambda: operator.calls.seen("delete", "three"))
    wait_until(lambda: stored(kubeapi, "three") is None)
    assert operator.calls.seen("delete", "three") == [None]


@pytest.mark.parametrize("operator", ["namespaced", "clusterwide"], indirect=True)
def test_kopf_recovers_from_gone_watch(
    kubeapi: KubeApiServer, operator: RunningOperator  # noqa: F811
) -> None:
    """After compaction kopf's watch gets 410, kopf relists, and later changes still arrive."""
    client = client_for(kubeapi)
    create(client, "four")
    wait_until(lambda: operator.calls.seen("create", "four"))
    wait_until(lambda: (o := stored(kubeapi, "four")) and "status" in o)
    time.sleep(0.5)
    kubeapi.clear_requests_log()
    kubeapi.compact_watch_history()

    def relisted() -> bool:
        return any(record.verb == "list" and record.resource == PLURAL
                   for record in kubeapi.requests_log())

    wait_until(relisted)
    widget_calls = [record.verb for record in kubeapi.requests_log()
                    if record.resource == PLURAL]
    # Why this order: kopf reconnects from its last resourceVersion, gets 410, then relists.
    assert widget_calls[:2] == ["watch", "list"]
    client.call("PATCH", f"{WIDGETS}/four", {"spec": {"replicas": 7}}, content_type=MERGE)
    assert wait_until(lambda: operator.calls.seen("update", "four")) == [7]
    watches = [record for record in kubeapi.requests_log()
               if record.verb == "watch" and record.resource == PLURAL]
    assert len(watches) >= 2
