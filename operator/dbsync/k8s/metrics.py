"""Prometheus metrics of the operator: sync results and durations, drift and ledger state.

Every metric lives in a registry owned by an :class:`OperatorMetrics` instance, never in
prometheus-client's process-wide default registry, so tests can build a fresh instance and
read exact values. The operator uses the module-level functions, which act on one shared
instance, and serves it with :func:`start_metrics_server` (port 9090 in the deployment).

Series labelled with a resource's ``namespace`` and ``name`` are removed by :func:`forget`
when the resource is deleted, so deleted resources do not linger on dashboards.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from wsgiref.simple_server import WSGIServer

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    GCCollector,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    start_http_server,
)

logger = logging.getLogger("dbsync.k8s.metrics")

# Steps range from a preflight query of a few milliseconds to migrations of large tables
# that take many minutes, so the buckets span 50 ms to one hour.
STEP_DURATION_BUCKETS_SECONDS = (
    0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0,
)

RESOURCE_LABELS = ("namespace", "name")


class OperatorMetrics:
    """The operator's metrics, registered in a registry of their own.

    ``result`` labels are meant for a small fixed set of values, such as the operator's sync
    results, because each distinct value creates new time series.
    """

    def __init__(self, *, include_process_metrics: bool = False) -> None:
        self.registry = CollectorRegistry(auto_describe=True)

        # Process, platform and garbage collector metrics show the operator's memory use,
        # which imported modules dominate. Only the served instance needs them.
        if include_process_metrics:
            ProcessCollector(registry=self.registry)
            PlatformCollector(registry=self.registry)
            GCCollector(registry=self.registry)

        self.step_duration_seconds = Histogram(
            "dbsync_sync_step_duration_seconds",
            "Duration of one sync step in seconds, labelled with the step and the sync's result.",
            labelnames=("step", "result"),
            buckets=STEP_DURATION_BUCKETS_SECONDS,
            registry=self.registry,
        )
        self.syncs = Counter(
            "dbsync_syncs",
            "Syncs finished, by resource and result.",
            labelnames=(*RESOURCE_LABELS, "result"),
            registry=self.registry,
        )
        self.schema_differences = Gauge(
            "dbsync_schema_differences",
            "Schema differences between source and target found by the last diff.",
            labelnames=RESOURCE_LABELS,
            registry=self.registry,
        )
        self.ledger_balanced = Gauge(
            "dbsync_ledger_balanced",
            "1 when the last ledger check passed, 0 when it found an imbalance.",
            labelnames=RESOURCE_LABELS,
            registry=self.registry,
        )
        self.last_success_timestamp_seconds = Gauge(
            "dbsync_last_success_timestamp_seconds",
            "Unix time in seconds of the last sync that met every success criterion.",
            labelnames=RESOURCE_LABELS,
            registry=self.registry,
        )
        self.syncs_running = Gauge(
            "dbsync_syncs_running",
            "Syncs in progress in this operator process.",
            registry=self.registry,
        )

    def record_sync(
        self,
        *,
        namespace: str,
        name: str,
        step_durations_seconds: Mapping[str, float],
        result: str,
    ) -> None:
        """Count one finished sync and observe the duration of each step it ran."""
        _require_label("namespace", namespace)
        _require_label("name", name)
        _require_label("result", result)

        # Validate every step before observing any, so a bad entry leaves no partial record.
        for step, duration_seconds in step_durations_seconds.items():
            _require_label("step", step)
            if not math.isfinite(duration_seconds) or duration_seconds < 0:
                raise ValueError(
                    f"invalid duration {duration_seconds!r} for step {step!r}: "
                    "pass a finite number of seconds, 0 or more"
                )

        for step, duration_seconds in step_durations_seconds.items():
            self.step_duration_seconds.labels(step=step, result=result).observe(duration_seconds)
        self.syncs.labels(namespace=namespace, name=name, result=result).inc()

    def set_drift(self, *, namespace: str, name: str, differences: int) -> None:
        """Set the number of schema differences the last diff found for a resource."""
        _require_label("namespace", namespace)
        _require_label("name", name)
        if differences < 0:
            raise ValueError(f"invalid schema difference count {differences!r}: pass 0 or more")
        self.schema_differences.labels(namespace=namespace, name=name).set(differences)

    def set_ledger_balanced(self, *, namespace: str, name: str, balanced: bool) -> None:
        """Set whether the last ledger check of a resource passed (1) or failed (0)."""
        _require_label("namespace", namespace)
        _require_label("name", name)
        self.ledger_balanced.labels(namespace=namespace, name=name).set(1 if balanced else 0)

    def mark_success(self, *, namespace: str, name: str) -> None:
        """Set a resource's last success timestamp to the current time."""
        _require_label("namespace", namespace)
        _require_label("name", name)
        gauge = self.last_success_timestamp_seconds.labels(namespace=namespace, name=name)
        gauge.set_to_current_time()

    @contextmanager
    def track_running(self) -> Iterator[None]:
        """Count a sync as running for the duration of the ``with`` block, even if it raises."""
        self.syncs_running.inc()
        try:
            yield
        finally:
            self.syncs_running.dec()

    def forget(self, *, namespace: str, name: str) -> None:
        """Remove every series labelled with a deleted resource's namespace and name."""
        resource = {"namespace": namespace, "name": name}
        self.syncs.remove_by_labels(resource)
        self.schema_differences.remove_by_labels(resource)
        self.ledger_balanced.remove_by_labels(resource)
        self.last_success_timestamp_seconds.remove_by_labels(resource)

    def serve(self, *, port: int, host: str = "0.0.0.0") -> WSGIServer:  # noqa: S104
        """Serve this registry over HTTP in a daemon thread and return the server.

        Port 0 binds a free port, which ``server.server_port`` then contains. Call
        ``server.shutdown()`` and ``server.server_close()`` to stop it.
        """
        server, _thread = start_http_server(port, addr=host, registry=self.registry)
        logger.info("serving metrics on %s:%d", host, server.server_port)
        return server


def _require_label(label: str, value: str) -> None:
    if not value:
        raise ValueError(f"empty {label} label: pass a non-empty string")


# The operator's shared instance, served by start_metrics_server().
METRICS = OperatorMetrics(include_process_metrics=True)


def record_sync(
    *,
    namespace: str,
    name: str,
    step_durations_seconds: Mapping[str, float],
    result: str,
) -> None:
    """Count one finished sync and observe the duration of each step it ran."""
    METRICS.record_sync(
        namespace=namespace,
        name=name,
        step_durations_seconds=step_durations_seconds,
        result=result,
    )


def set_drift(*, namespace: str, name: str, differences: int) -> None:
    """Set the number of schema differences the last diff found for a resource."""
    METRICS.set_drift(namespace=namespace, name=name, differences=differences)


def set_ledger_balanced(*, namespace: str, name: str, balanced: bool) -> None:
    """Set whether the last ledger check of a resource passed."""
    METRICS.set_ledger_balanced(namespace=namespace, name=name, balanced=balanced)


def mark_success(*, namespace: str, name: str) -> None:
    """Set a resource's last success timestamp to the current time."""
    METRICS.mark_success(namespace=namespace, name=name)


@contextmanager
def track_running() -> Iterator[None]:
    """Count a sync as running for the duration of the ``with`` block."""
    with METRICS.track_running():
        yield


def forget(*, namespace: str, name: str) -> None:
    """Remove every series of a deleted resource."""
    METRICS.forget(namespace=namespace, name=name)


def start_metrics_server(*, port: int, host: str = "0.0.0.0") -> None:  # noqa: S104
    """Serve the shared metrics over HTTP at ``/metrics`` in a daemon thread.

    Raises ``OSError`` if the port is taken, for example by a second call with the same port.
    """
    METRICS.serve(port=port, host=host)
