"""Tests of the operator's Prometheus metrics, read back by scraping the HTTP endpoint."""

from __future__ import annotations

import socket
import time
import urllib.request
from collections.abc import Iterator

import pytest
from prometheus_client.parser import text_string_to_metric_families

from dbsync.k8s import metrics
from dbsync.k8s.metrics import OperatorMetrics

Sample = tuple[str, tuple[tuple[str, str], ...]]


def scrape(port: int) -> dict[Sample, float]:
    """Fetch /metrics from 127.0.0.1 and index each sample by name and sorted labels."""
    url = f"http://127.0.0.1:{port}/metrics"
    with urllib.request.urlopen(url, timeout=5) as response:
        body = response.read().decode("utf-8")
    samples: dict[Sample, float] = {}
    for family in text_string_to_metric_families(body):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def labels(**values: str) -> tuple[tuple[str, str], ...]:
    return tuple(sorted(values.items()))


@pytest.fixture
def served() -> Iterator[tuple[OperatorMetrics, int]]:
    """A fresh metrics instance served on a free port of 127.0.0.1."""
    instance = OperatorMetrics()
    server = instance.serve(port=0, host="127.0.0.1")
    yield instance, server.server_port
    server.shutdown()
    server.server_close()


def test_record_sync_counts_by_result(served: tuple[OperatorMetrics, int]) -> None:
    instance, port = served
    for result in ("Succeeded", "Succeeded", "Failed"):
        instance.record_sync(
            namespace="payments",
            name="uat",
            step_durations_seconds={"migrate": 1.0},
            result=result,
        )

    samples = scrape(port)

    succeeded = ("dbsync_syncs_total", labels(namespace="payments", name="uat", result="Succeeded"))
    failed = ("dbsync_syncs_total", labels(namespace="payments", name="uat", result="Failed"))
    assert samples[succeeded] == 2.0
    assert samples[failed] == 1.0


def test_record_sync_observes_each_step(served: tuple[OperatorMetrics, int]) -> None:
    instance, port = served
    instance.record_sync(
        namespace="payments",
        name="uat",
        step_durations_seconds={"migrate": 12.5, "diff": 0.2, "ledger": 3.0},
        result="Succeeded",
    )
    instance.record_sync(
        namespace="payments",
        name="staging",
        step_durations_seconds={"migrate": 7.5},
        result="Succeeded",
    )

    samples = scrape(port)

    migrate = labels(step="migrate", result="Succeeded")
    assert samples[("dbsync_sync_step_duration_seconds_count", migrate)] == 2.0
    assert samples[("dbsync_sync_step_duration_seconds_sum", migrate)] == 20.0
    diff_count = (
        "dbsync_sync_step_duration_seconds_count",
        labels(step="diff", result="Succeeded"),
    )
    assert samples[diff_count] == 1.0
    ledger_bucket = (
        "dbsync_sync_step_duration_seconds_bucket",
        labels(step="ledger", result="Succeeded", le="2.5"),
    )
    assert samples[ledger_bucket] == 0.0


def test_record_sync_rejects_negative_duration(served: tuple[OperatorMetrics, int]) -> None:
    """A bad duration raises and records nothing, not even the valid steps beside it."""
    instance, port = served
    with pytest.raises(ValueError, match="'ledger'"):
        instance.record_sync(
            namespace="payments",
            name="uat",
            step_durations_seconds={"migrate": 1.0, "ledger": -0.5},
            result="Succeeded",
        )

    samples = scrape(port)

    counted = ("dbsync_syncs_total", labels(namespace="payments", name="uat", result="Succeeded"))
    assert counted not in samples
    observed = (
        "dbsync_sync_step_duration_seconds_count",
        labels(step="migrate", result="Succeeded"),
    )
    assert observed not in samples


def test_record_sync_rejects_empty_result() -> None:
    instance = OperatorMetrics()
    with pytest.raises(ValueError, match="empty result label"):
        instance.record_sync(
            namespace="payments", name="uat", step_durations_seconds={}, result=""
        )


def test_drift_and_ledger_gauges(served: tuple[OperatorMetrics, int]) -> None:
    instance, port = served
    instance.set_drift(namespace="payments", name="uat", differences=4)
    instance.set_ledger_balanced(namespace="payments", name="uat", balanced=True)
    instance.set_ledger_balanced(namespace="payments", name="staging", balanced=False)

    samples = scrape(port)

    assert samples[("dbsync_schema_differences", labels(namespace="payments", name="uat"))] == 4.0
    assert samples[("dbsync_ledger_balanced", labels(namespace="payments", name="uat"))] == 1.0
    assert samples[("dbsync_ledger_balanced", labels(namespace="payments", name="staging"))] == 0.0


def test_set_drift_rejects_negative_count() -> None:
    instance = OperatorMetrics()
    with pytest.raises(ValueError, match="-1"):
        instance.set_drift(namespace="payments", name="uat", differences=-1)


def test_mark_success_sets_current_time(served: tuple[OperatorMetrics, int]) -> None:
    instance, port = served
    before = time.time()
    instance.mark_success(namespace="payments", name="uat")
    after = time.time()

    value = scrape(port)[
        ("dbsync_last_success_timestamp_seconds", labels(namespace="payments", name="uat"))
    ]

    assert before <= value
    assert value <= after


def test_track_running_counts_while_inside(served: tuple[OperatorMetrics, int]) -> None:
    instance, port = served
    running = ("dbsync_syncs_running", ())

    with instance.track_running(), instance.track_running():
        inside = scrape(port)[running]
    after = scrape(port)[running]

    assert inside == 2.0
    assert after == 0.0


def test_track_running_decrements_on_error(served: tuple[OperatorMetrics, int]) -> None:
    instance, port = served

    with pytest.raises(RuntimeError), instance.track_running():
        raise RuntimeError("sync failed")

    assert scrape(port)[("dbsync_syncs_running", ())] == 0.0


def test_forget_removes_only_that_resource(served: tuple[OperatorMetrics, int]) -> None:
    instance, port = served
    for name in ("uat", "staging"):
        instance.record_sync(
            namespace="payments",
            name=name,
            step_durations_seconds={"migrate": 1.0},
            result="Succeeded",
        )
        instance.record_sync(
            namespace="payments",
            name=name,
            step_durations_seconds={"migrate": 1.0},
            result="Failed",
        )
        instance.set_drift(namespace="payments", name=name, differences=1)
        instance.set_ledger_balanced(namespace="payments", name=name, balanced=True)
        instance.mark_success(namespace="payments", name=name)

    instance.forget(namespace="payments", name="uat")
    samples = scrape(port)

    remaining = {labels_ for (_, labels_) in samples if ("name", "uat") in labels_}
    assert remaining == set()
    kept = ("dbsync_schema_differences", labels(namespace="payments", name="staging"))
    assert samples[kept] == 1.0
    step_count = (
        "dbsync_sync_step_duration_seconds_count",
        labels(step="migrate", result="Failed"),
    )
    assert samples[step_count] == 2.0


def test_instances_do_not_share_series() -> None:
    """Each instance has its own registry, so one test's values never reach another's."""
    first = OperatorMetrics()
    second = OperatorMetrics()
    first.set_drift(namespace="payments", name="uat", differences=3)

    value = second.registry.get_sample_value(
        "dbsync_schema_differences", {"namespace": "payments", "name": "uat"}
    )

    assert value is None


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def test_module_functions_serve_shared_instance() -> None:
    """The module-level API the operator calls writes to the served, shared registry."""
    port = free_port()
    metrics.start_metrics_server(port=port, host="127.0.0.1")
    resource = {"namespace": "test-module-functions", "name": "uat"}

    with metrics.track_running():
        metrics.record_sync(**resource, step_durations_seconds={"diff": 0.1}, result="Succeeded")
        metrics.set_drift(**resource, differences=2)
        metrics.set_ledger_balanced(**resource, balanced=False)
        metrics.mark_success(**resource)
        samples = scrape(port)
    metrics.forget(**resource)
    after_forget = scrape(port)

    resource_labels = labels(**resource)
    assert samples[("dbsync_syncs_total", labels(**resource, result="Succeeded"))] == 1.0
    assert samples[("dbsync_schema_differences", resource_labels)] == 2.0
    assert samples[("dbsync_ledger_balanced", resource_labels)] == 0.0
    assert ("dbsync_last_success_timestamp_seconds", resource_labels) in samples
    assert samples[("dbsync_syncs_running", ())] >= 1.0
    assert ("process_resident_memory_bytes", ()) in samples
    assert ("dbsync_schema_differences", resource_labels) not in after_forget
