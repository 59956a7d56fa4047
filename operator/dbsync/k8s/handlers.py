"""kopf handlers of the dbsync operator.

Importing this module registers the handlers with kopf's default registry.  The change
handlers run a full sync on create, on resume (once per operator start) and on spec
changes.  Their status writes (``status.observedGeneration`` included) go through kopf's
``patch``; handlers return None, so nothing lands in ``status.<handler id>``.

The ``dbsync.io/run-at`` annotation is not watched by a change handler: kopf removes every
annotation under its storage prefix (``dbsync.io``) from the state it compares, so no
change handler would ever see it change.  The event handler feeds it to the scheduler
(:mod:`dbsync.k8s.scheduler`), which starts the run.

Each change handler works in two kopf sub-handlers: ``begin`` marks the resource
Reconciling (kopf applies that patch at once), then ``run`` starts the child process.  So
``kubectl wait`` and dashboards see the sync start before the long work does.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import kopf

from dbsync.k8s import approval, kubeclient
from dbsync.k8s.conditions import Reason, now_utc
from dbsync.k8s.credentials import CONFIG_MAP, SECRET
from dbsync.k8s.executor import SyncExecutor
from dbsync.k8s.job_executor import JobExecutor
from dbsync.k8s.job_manifest import JobSettings
from dbsync.k8s.kubeclient import KubeClient
from dbsync.k8s.models import GROUP, PLURAL, VERSION, DatabaseSyncSpec, ExecutorKind
from dbsync.k8s.reconcile import Reconciler, spec_or_verdict
from dbsync.k8s.scheduler import Scheduler, retry_delay_seconds
from dbsync.k8s.status import Trigger, VerdictKind, starting_status, suspended_status

logger = logging.getLogger("dbsync.k8s.handlers")

# kopf's bookkeeping (handler progress, last-handled spec) lives in annotations under this
# prefix, so dbsync's annotations and kopf's share one domain.
STORAGE_PREFIX = "dbsync.io"
FINALIZER = "dbsync.io/finalizer"


@dataclass
class OperatorOptions:
    """Settings of one operator process, set by ``dbsync operator`` before kopf starts."""

    max_concurrent_syncs: int = 2
    metrics_port: int | None = None
    retry_base_seconds: float = 1.0
    retry_max_seconds: float = 300.0
    prestart_children: bool = True
    all_namespaces: bool = False
    executor: ExecutorKind = ExecutorKind.PROCESS
    job_settings: JobSettings = field(default_factory=JobSettings)


@dataclass
class Runtime:
    """Objects shared by all handlers of one operator process."""

    options: OperatorOptions
    executor: SyncExecutor
    client: KubeClient
    reconciler: Reconciler
    scheduler: Scheduler
    scheduler_task: asyncio.Task[None] | None = None


_OPTIONS = OperatorOptions()
_RUNTIME: Runtime | None = None


def configure(options: OperatorOptions) -> None:
    """Set the options the next operator start uses."""
    global _OPTIONS
    _OPTIONS = options


def runtime() -> Runtime:
    """Return the running operator's shared objects."""
    if _RUNTIME is None:
        raise RuntimeError("the dbsync operator has not started: no runtime")
    return _RUNTIME


# Start-up, login and shutdown.


@kopf.on.startup()
async def start_operator(settings: kopf.OperatorSettings, **_: Any) -> None:
    """Configure kopf's storage and start the executor, the API client and the scheduler."""
    global _RUNTIME

    # Annotations only: kopf's default also writes progress into status, which the CRD
    # does not declare and the API server would drop.
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(
        prefix=STORAGE_PREFIX)
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix=STORAGE_PREFIX, key="last-handled-configuration")
    settings.persistence.finalizer = FINALIZER

    # With fixed namespaces, kopf need not list and watch Namespaces and CRDs, which are
    # cluster-scoped and which a namespaced Role cannot grant.  The CRD must then exist when
    # the operator starts.
    if not _OPTIONS.all_namespaces:
        settings.scanning.disabled = True

    # Log lines are not posted as Events (kopf's default since 1.44, set here on purpose):
    # the operator posts its own, with condition reasons and sync ids (dbsync.k8s.events).
    settings.posting.loggers = False

    options = _OPTIONS
    # With Jobs by default, a spare child would sit idle for the few process-mode resources.
    executor = SyncExecutor(max_concurrent_syncs=options.max_concurrent_syncs,
                            prestart=options.prestart_children
                            and options.executor is ExecutorKind.PROCESS)
    client = KubeClient()
    reconciler = Reconciler(executor=executor, reader=client,
                            job_executor=JobExecutor(client=client,
                                                     settings=options.job_settings),
                            default_executor=options.executor)
    scheduler = Scheduler(reconciler=reconciler, client=client,
                          retry_base_seconds=options.retry_base_seconds,
                          retry_max_seconds=options.retry_max_seconds)
    _RUNTIME = Runtime(options=options, executor=executor, client=client,
                       reconciler=reconciler, scheduler=scheduler)
    _RUNTIME.scheduler_task = asyncio.create_task(scheduler.run(), name="dbsync-scheduler")
    await executor.warm_up()

    if options.metrics_port is not None:
        from dbsync.k8s import metrics

        metrics.start_metrics_server(port=options.metrics_port)
    logger.info("dbsync operator started (max %d concurrent syncs, %s executor)",
                options.max_concurrent_syncs, options.executor.value)


@kopf.on.cleanup()
async def stop_operator(**_: Any) -> None:
    """Stop the scheduler and the spare child, and close the API session."""
    current = _RUNTIME
    if current is None:
        return
    if current.scheduler_task is not None:
        current.scheduler_task.cancel()
        await asyncio.gather(current.scheduler_task, return_exceptions=True)
    await current.executor.close()
    await current.client.close()
    logger.info("dbsync operator stopped")


@kopf.on.login()
def log_in(**kwargs: Any) -> kopf.ConnectionInfo | None:
    """Log in as kopf does by default and keep the result for the operator's own client."""
    info: kopf.ConnectionInfo | None = (kopf.login_with_service_account(**kwargs)
                                        or kopf.login_with_kubeconfig(**kwargs))
    if info is None:
        # Exec plugins and other kubeconfig extras need the kubernetes client.
        info = kopf.login_via_client(**kwargs)
    kubeclient.remember_connection(info)
    return info


@kopf.on.probe(id="lastWatchEventAgeSeconds")
def last_watch_event_age(**_: Any) -> float:
    """Seconds since the last watch event: a stuck watch shows here, not in liveness."""
    return round(time.monotonic() - runtime().scheduler.last_event_monotonic, 1)


# Change handlers.


async def _begin(body: kopf.Body, patch: kopf.Patch, *, trigger: Trigger,
                 **_: Any) -> None:
    current = runtime()
    parsed = spec_or_verdict(body)
    generation = body.get("metadata", {}).get("generation")
    if isinstance(parsed, DatabaseSyncSpec) and parsed.suspend:
        patch.setdefault("status", {}).update(
            suspended_status(dict(body.get("status") or {}), generation=generation,
                             now=now_utc()))
        return
    current.scheduler.set_handler_busy(body, True)
    patch.setdefault("status", {}).update(starting_status(
        dict(body.get("status") or {}), reason=Reason.SYNCING,
        message=f"{trigger.value}: sync starting", generation=generation, now=now_utc()))


async def _run(body: kopf.Body, patch: kopf.Patch, retry: int, *, trigger: Trigger,
               **_: Any) -> None:
    current = runtime()
    parsed = spec_or_verdict(body)
    if isinstance(parsed, DatabaseSyncSpec) and parsed.suspend:
        current.scheduler.set_handler_busy(body, False)
        return

    outcome = await current.reconciler.sync(body, trigger=Trigger.RETRY if retry else trigger)
    if outcome.clear_approval_annotations:
        # An approval annotation approves one published plan; kopf patches these keys too.
        patch.meta.annotations.update(approval.cleared_annotations())
    patch.setdefault("status", {}).update(outcome.status)

    if outcome.verdict.kind is VerdictKind.TRANSIENT:
        delay = retry_delay_seconds(outcome.failures,
                                    base_seconds=current.options.retry_base_seconds,
                                    max_seconds=current.options.retry_max_seconds)
        raise kopf.TemporaryError(f"{outcome.verdict.reason}: {outcome.verdict.message}",
                                  delay=delay)
    current.scheduler.set_handler_busy(body, False)
    if outcome.verdict.kind is VerdictKind.PERMANENT:
        raise kopf.PermanentError(f"{outcome.verdict.reason}: {outcome.verdict.message}")


def _register_steps(trigger: Trigger) -> None:
    kopf.register(fn=functools.partial(_begin, trigger=trigger), id="begin")
    kopf.register(fn=functools.partial(_run, trigger=trigger), id="run")


@kopf.on.create(GROUP, VERSION, PLURAL, id="sync-create")
async def sync_on_create(**_: Any) -> None:
    """Run a full sync of a new resource."""
    _register_steps(Trigger.CREATE)


@kopf.on.resume(GROUP, VERSION, PLURAL, id="sync-resume")
async def sync_on_resume(**_: Any) -> None:
    """Run a full sync of each existing resource when the operator starts."""
    _register_steps(Trigger.RESUME)


@kopf.on.update(GROUP, VERSION, PLURAL, id="sync-update", field="spec")
async def sync_on_update(**_: Any) -> None:
    """Run a full sync after a spec change; status writes do not reach this handler."""
    _register_steps(Trigger.UPDATE)


# Watch events: no finalizer, no state; they feed the scheduler.


@kopf.on.event(GROUP, VERSION, PLURAL, id="track")
async def track_database_sync(body: kopf.Body, type: str | None, **_: Any) -> None:
    """Keep the scheduler's copy of each DatabaseSync current."""
    current = runtime()
    current.scheduler.observe(body, event_type=type)
    if type == "DELETED":
        _forget_metrics(body)


@kopf.on.event("", "v1", "secrets", id="watch-secrets")
async def watch_secret(body: kopf.Body, type: str | None, **_: Any) -> None:
    """Start a sync of every DatabaseSync that reads a Secret whose data changed."""
    runtime().scheduler.referenced_object_changed(body, kind=SECRET, event_type=type)


@kopf.on.event("", "v1", "configmaps", id="watch-configmaps")
async def watch_config_map(body: kopf.Body, type: str | None, **_: Any) -> None:
    """Start a sync of every DatabaseSync that reads a ConfigMap whose data changed."""
    runtime().scheduler.referenced_object_changed(body, kind=CONFIG_MAP, event_type=type)


def _forget_metrics(body: Mapping[str, Any]) -> None:
    metadata = body.get("metadata") or {}
    try:
        from dbsync.k8s import metrics
    except ImportError:
        return
    metrics.forget(namespace=str(metadata.get("namespace")), name=str(metadata.get("name")))
