"""Runs that no kopf change handler starts: periodic re-checks and changed references.

kopf timers and daemons always put a finalizer on every matching object (kopf 1.45 sets
``requires_finalizer=True`` for both), so deleting a DatabaseSync would hang whenever the
operator is down.  A sync never needs clean-up at deletion (deleting the resource never
touches either database), so this scheduler replaces them: one asyncio task, fed by
``@kopf.on.event`` handlers that add no finalizer, wakes twice a second and starts what is
due.

A resource is due for a re-check ``spec.interval`` after its last sync finished, when it is
settled (neither Reconciling nor Stalled) for its current generation.  A new value of the
``dbsync.io/run-at`` annotation (one that ``status.lastHandledRunAt`` does not echo yet)
starts a full sync at once.  A change to a Secret
or ConfigMap it references starts a full sync, which is how a resource Stalled on a missing
Secret recovers.  Transient failures of these runs are retried here with the same backoff
the kopf handlers use.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import json
import logging
import re
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from dbsync.k8s import approval
from dbsync.k8s.conditions import ConditionType, Reason, find_condition, now_utc
from dbsync.k8s.credentials import referenced_objects
from dbsync.k8s.kubeclient import KubeApiError, KubeClient
from dbsync.k8s.models import DatabaseSyncSpec
from dbsync.k8s.reconcile import Reconciler, run_at_of, spec_or_verdict
from dbsync.k8s.status import Trigger, VerdictKind, starting_status

logger = logging.getLogger("dbsync.k8s.scheduler")

TICK_SECONDS = 0.5

_DURATION_PART = re.compile(r"([0-9]+)(ms|s|m|h)")
_UNIT_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}


def parse_duration_seconds(text: str) -> float:
    """Return the seconds in a duration such as ``90s``, ``5m`` or ``1h30m``."""
    parts = _DURATION_PART.findall(text)
    if not parts or "".join(number + unit for number, unit in parts) != text:
        raise ValueError(f"invalid duration {text!r}: use whole units such as 30s, 5m or 1h30m")
    return sum(int(number) * _UNIT_SECONDS[unit] for number, unit in parts)


def retry_delay_seconds(failures: int, *, base_seconds: float, max_seconds: float) -> float:
    """Return the backoff after ``failures`` failures: the base, doubled each time, capped."""
    exponent = max(0, failures - 1)
    return float(min(max_seconds, base_seconds * (2 ** min(exponent, 30))))


def _parse_time(text: str | None) -> datetime | None:
    if not text:
        return None
    try:
        return datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        return None


def _is_true(status: Mapping[str, Any], condition_type: ConditionType) -> bool:
    condition = find_condition(status.get("conditions"), condition_type)
    return condition is not None and condition.get("status") == "True"


@dataclass
class TrackedResource:
    """The latest copy of one DatabaseSync and the scheduler's plans for it."""

    body: dict[str, Any]
    spec: DatabaseSyncSpec | None
    references: frozenset[tuple[str, str]]
    reference_changed: bool = False
    retry_at: float | None = None
    retry_full: bool = True
    handler_busy: bool = False

    @property
    def uid(self) -> str:
        return str((self.body.get("metadata") or {}).get("uid") or "")


@dataclass
class Scheduler:
    """Starts periodic re-checks and reference-triggered syncs; see the module docstring."""

    reconciler: Reconciler
    client: KubeClient
    retry_base_seconds: float = 1.0
    retry_max_seconds: float = 300.0
    tick_seconds: float = TICK_SECONDS
    _resources: dict[tuple[str, str], TrackedResource] = field(default_factory=dict)
    _object_hashes: dict[tuple[str, str, str], str] = field(default_factory=dict)
    _running: dict[tuple[str, str], asyncio.Task[None]] = field(default_factory=dict)
    _wake: asyncio.Event = field(default_factory=asyncio.Event)
    last_event_monotonic: float = field(default_factory=time.monotonic)

    # Resource bookkeeping, called from kopf's event handlers.

    def observe(self, body: Mapping[str, Any], *, event_type: str | None) -> None:
        """Record the latest copy of a DatabaseSync, or forget it when it was deleted."""
        self.last_event_monotonic = time.monotonic()
        metadata = body.get("metadata") or {}
        key = (str(metadata.get("namespace")), str(metadata.get("name")))
        if event_type == "DELETED":
            tracked = self._resources.pop(key, None)
            if tracked is not None:
                self.reconciler.forget(tracked.uid)
            return
        parsed = spec_or_verdict(body)
        spec = parsed if isinstance(parsed, DatabaseSyncSpec) else None
        references = referenced_objects(spec) if spec is not None else frozenset()
        tracked = self._resources.get(key)
        if tracked is None or tracked.uid != str(metadata.get("uid") or ""):
            self._resources[key] = TrackedResource(body=dict(body), spec=spec,
                                                   references=references)
            return
        tracked.body = dict(body)
        tracked.spec = spec
        tracked.references = references

    def set_handler_busy(self, body: Mapping[str, Any], busy: bool) -> None:
        """Mark a resource as owned by a kopf handler (which retries by itself) or not."""
        metadata = body.get("metadata") or {}
        key = (str(metadata.get("namespace")), str(metadata.get("name")))
        tracked = self._resources.get(key)
        if tracked is None:
            self.observe(body, event_type=None)
            tracked = self._resources[key]
        tracked.handler_busy = busy
        if busy:
            # A handler run supersedes a pending scheduler retry.
            tracked.retry_at = None

    def referenced_object_changed(self, body: Mapping[str, Any], *, kind: str,
                                  event_type: str | None) -> None:
        """Note a Secret or ConfigMap event; a changed referenced object starts a sync."""
        self.last_event_monotonic = time.monotonic()
        metadata = body.get("metadata") or {}
        namespace = str(metadata.get("namespace"))
        name = str(metadata.get("name"))
        object_key = (kind, namespace, name)
        if event_type == "DELETED" or not self.is_referenced(kind=kind, namespace=namespace,
                                                             name=name):
            self._object_hashes.pop(object_key, None)
            return

        # Only the data counts: metadata-only updates must not start syncs.
        payload = {"data": body.get("data"), "stringData": body.get("stringData"),
                   "binaryData": body.get("binaryData")}
        digest = hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode())
        new_hash = digest.hexdigest()
        old_hash = self._object_hashes.get(object_key)
        self._object_hashes[object_key] = new_hash

        # The initial listing (no event type) only records what exists.
        if event_type is None or old_hash == new_hash:
            return
        for (resource_namespace, _name), tracked in self._resources.items():
            if resource_namespace == namespace and (kind, name) in tracked.references:
                logger.info("%s %s/%s changed; syncing %s/%s", kind, namespace, name,
                            resource_namespace, _name)
                tracked.reference_changed = True
        self._wake.set()

    def is_referenced(self, *, kind: str, namespace: str, name: str) -> bool:
        """Return whether any tracked DatabaseSync reads this Secret or ConfigMap."""
        return any(resource_namespace == namespace and (kind, name) in tracked.references
                   for (resource_namespace, _name), tracked in self._resources.items())

    # The loop.

    async def run(self) -> None:
        """Start due runs until cancelled."""
        logger.info("scheduler started (tick %.1f s)", self.tick_seconds)
        try:
            while True:
                self._start_due_runs()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), timeout=self.tick_seconds)
                self._wake.clear()
        finally:
            for task in list(self._running.values()):
                task.cancel()
            logger.info("scheduler stopped")

    def _start_due_runs(self) -> None:
        loop_now = time.monotonic()
        wall_now = now_utc()
        for key, tracked in list(self._resources.items()):
            if key in self._running:
                continue
            plan = self._due(tracked, loop_now=loop_now, wall_now=wall_now)
            if plan is None:
                continue
            trigger, run_migrations = plan
            task = asyncio.create_task(self._run(key, tracked, trigger=trigger,
                                                 run_migrations=run_migrations),
                                       name=f"dbsync-{key[0]}-{key[1]}")
            self._running[key] = task
            task.add_done_callback(functools.partial(self._forget_task, key))

    def _forget_task(self, key: tuple[str, str], _task: asyncio.Task[None]) -> None:
        self._running.pop(key, None)

    def _due(self, tracked: TrackedResource, *, loop_now: float,
             wall_now: datetime) -> tuple[Trigger, bool] | None:
        spec = tracked.spec
        metadata = tracked.body.get("metadata") or {}
        if spec is None or spec.suspend or metadata.get("deletionTimestamp"):
            return None
        if tracked.handler_busy or self.reconciler.lock_for(tracked.uid).locked():
            return None

        # Until the status describes the current generation, a kopf change handler owns the
        # resource (it writes observedGeneration first), and a run here would duplicate it.
        status = tracked.body.get("status") or {}
        if status.get("observedGeneration") != metadata.get("generation"):
            return None
        if tracked.reference_changed:
            return Trigger.REFERENCE, True
        run_at = run_at_of(tracked.body)
        if run_at is not None and run_at != status.get("lastHandledRunAt"):
            return Trigger.RUN_AT, True
        if approval.approval_due(tracked.body, spec):
            plan = approval.published_plan(status) or {}
            if not self.reconciler.approval_acted_on(tracked.uid, plan):
                return Trigger.APPROVAL, True
        if tracked.retry_at is not None:
            if loop_now >= tracked.retry_at:
                return Trigger.RETRY, tracked.retry_full
            return None
        if spec.interval is None or approval.waiting_for_approval(tracked.body, spec):
            return None
        if _is_true(status, ConditionType.STALLED) or _is_true(status,
                                                                ConditionType.RECONCILING):
            return None
        finished_at = _parse_time((status.get("lastSync") or {}).get("finishedAt"))
        if finished_at is None:
            return None
        elapsed = (wall_now - finished_at.astimezone(UTC)).total_seconds()
        if elapsed < parse_duration_seconds(spec.interval):
            return None
        return Trigger.INTERVAL, spec.migrate_on_interval

    async def _run(self, key: tuple[str, str], tracked: TrackedResource, *, trigger: Trigger,
                   run_migrations: bool) -> None:
        namespace, name = key
        tracked.reference_changed = False
        tracked.retry_at = None
        body = tracked.body
        metadata = body.get("metadata") or {}
        try:
            reason = Reason.SYNCING if run_migrations else Reason.RECHECKING
            starting = starting_status(body.get("status") or {}, reason=reason,
                                       message=f"{trigger.value}: sync starting",
                                       generation=metadata.get("generation"), now=now_utc())
            written = await self.client.patch_database_sync_status(namespace, name, starting)
            if written is None:
                return
            outcome = await self.reconciler.sync(written, trigger=trigger,
                                                 run_migrations=run_migrations)
            if outcome.clear_approval_annotations:
                # Before the status write, so no copy shows the new plan with an old approval.
                await self.client.merge_patch(
                    approval.resource_path(namespace, name),
                    {"metadata": {"annotations": approval.cleared_annotations()}})
            written = await self.client.patch_database_sync_status(namespace, name,
                                                                   outcome.status)
            if written is not None and key in self._resources:
                self._resources[key].body = written
        except KubeApiError as error:
            logger.error("writing the status of %s/%s failed: %s; retrying", namespace, name,
                         error)
            tracked.retry_at = time.monotonic() + self.retry_base_seconds
            tracked.retry_full = run_migrations
            return
        except Exception:
            logger.exception("scheduled sync of %s/%s failed; retrying", namespace, name)
            tracked.retry_at = time.monotonic() + self.retry_max_seconds
            tracked.retry_full = run_migrations
            return

        if outcome.verdict.kind is VerdictKind.TRANSIENT:
            delay = retry_delay_seconds(outcome.failures, base_seconds=self.retry_base_seconds,
                                        max_seconds=self.retry_max_seconds)
            logger.info("sync of %s/%s failed (%s); retrying in %.1f s", namespace, name,
                        outcome.verdict.reason, delay)
            tracked.retry_at = time.monotonic() + delay
            tracked.retry_full = run_migrations
