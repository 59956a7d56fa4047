"""When the scheduler starts a run: interval re-checks, run-at, references and their guards."""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from dbsync.k8s.credentials import SECRET
from dbsync.k8s.executor import SyncExecutor
from dbsync.k8s.kubeclient import KubeClient
from dbsync.k8s.reconcile import Reconciler
from dbsync.k8s.scheduler import Scheduler
from dbsync.k8s.status import Trigger

NOW = datetime(2026, 1, 1, 12, 0, 0, tzinfo=UTC)


def _body(*, interval: str | None = "1m", finished_ago_seconds: float = 120,
          generation: int = 1, observed: int = 1, reconciling: str = "False",
          stalled: str = "False", suspend: bool = False,
          run_at: str | None = None, handled_run_at: str | None = None) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "source": {"uriFrom": {"secretKeyRef": {"name": "source-db", "key": "uri"}}},
        "target": {"uriFrom": {"secretKeyRef": {"name": "target-db", "key": "uri"}}},
        "suspend": suspend,
    }
    if interval is not None:
        spec["interval"] = interval
    finished = NOW - timedelta(seconds=finished_ago_seconds)
    status: dict[str, Any] = {
        "observedGeneration": observed,
        "conditions": [{"type": "Reconciling", "status": reconciling},
                       {"type": "Stalled", "status": stalled}],
        "lastSync": {"finishedAt": finished.strftime("%Y-%m-%dT%H:%M:%SZ")},
    }
    if handled_run_at is not None:
        status["lastHandledRunAt"] = handled_run_at
    metadata: dict[str, Any] = {"namespace": "default", "name": "orders", "uid": "uid-1",
                                "generation": generation}
    if run_at is not None:
        metadata["annotations"] = {"dbsync.io/run-at": run_at}
    return {"apiVersion": "dbsync.io/v1alpha1", "kind": "DatabaseSync", "metadata": metadata,
            "spec": spec, "status": status}


def _plan(body: dict[str, Any]) -> tuple[Trigger, bool] | None:
    client = KubeClient()
    scheduler = Scheduler(reconciler=Reconciler(executor=SyncExecutor(), reader=client),
                          client=client)
    scheduler.observe(body, event_type="ADDED")
    tracked = next(iter(scheduler._resources.values()))
    return scheduler._due(tracked, loop_now=time.monotonic(), wall_now=NOW)


def test_interval_elapsed_starts_a_recheck() -> None:
    assert _plan(_body()) == (Trigger.INTERVAL, False)


@pytest.mark.parametrize("changes", [
    {"finished_ago_seconds": 30},
    {"interval": None},
    {"reconciling": "True"},
    {"stalled": "True"},
    {"suspend": True},
    {"generation": 2},
], ids=["too-early", "no-interval", "reconciling", "stalled", "suspended", "new-generation"])
def test_no_recheck_when_guarded(changes: dict[str, Any]) -> None:
    assert _plan(_body(**changes)) is None


def test_new_run_at_starts_a_full_sync() -> None:
    assert _plan(_body(interval=None, run_at="r2", handled_run_at="r1")) == (Trigger.RUN_AT,
                                                                            True)


def test_handled_run_at_is_ignored() -> None:
    assert _plan(_body(interval=None, run_at="r1", handled_run_at="r1")) is None


def test_changed_secret_marks_referencing_resources() -> None:
    client = KubeClient()
    scheduler = Scheduler(reconciler=Reconciler(executor=SyncExecutor(), reader=client),
                          client=client)
    scheduler.observe(_body(interval=None), event_type="ADDED")
    secret = {"metadata": {"namespace": "default", "name": "target-db"}, "data": {"uri": "YQ=="}}
    other = {"metadata": {"namespace": "default", "name": "unrelated"}, "data": {"x": "YQ=="}}

    scheduler.referenced_object_changed(secret, kind=SECRET, event_type=None)
    listed = next(iter(scheduler._resources.values())).reference_changed
    scheduler.referenced_object_changed(other, kind=SECRET, event_type="MODIFIED")
    unrelated = next(iter(scheduler._resources.values())).reference_changed
    scheduler.referenced_object_changed({**secret, "data": {"uri": "Yg=="}}, kind=SECRET,
                                        event_type="MODIFIED")
    changed = next(iter(scheduler._resources.values()))

    assert listed is False
    assert unrelated is False
    assert changed.reference_changed is True
    assert _plan_for(scheduler) == (Trigger.REFERENCE, True)


def _plan_for(scheduler: Scheduler) -> tuple[Trigger, bool] | None:
    tracked = next(iter(scheduler._resources.values()))
    return scheduler._due(tracked, loop_now=time.monotonic(), wall_now=NOW)
