"""Database faults during a sync: the server stopped and restarted, connections reset or hung.

Every test here runs its own PostgreSQL (:class:`LocalPostgres`, same port across a restart),
never the session's server, and parks the sync on a gated revision before the fault. Hung
connections go through :class:`tests.faultproxy.FaultProxy`, which stops forwarding while
keeping both sockets open.
"""

from __future__ import annotations

import contextlib
import json
import logging
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg import sql

from dbsync.k8s.demo import condition_of
from dbsync.pipeline.dsn import connect
from dbsync.testing.postgres import LocalPostgres
from tests.faultproxy import FaultProxy
from tests.reliability.cluster import (
    configmap_of_directory,
    operator_cluster,
    sync_manifest,
)
from tests.reliability.harness import (
    GATE_CLASS,
    GATED_LOCK_TIMEOUT_MS,
    REVISION_COUNT,
    applied_revision,
    audit_operations,
    probe,
    record_figure,
    revision_id,
    run_to_end,
    session_waiting_on,
    start_run,
    wait_until,
    write_gated_revisions,
)

HEAD = revision_id(REVISION_COUNT)
GATE = 3
NEEDS_KUBECTL = pytest.mark.skipif(shutil.which("kubectl") is None,
                                   reason="needs the kubectl binary")


@dataclass
class Dedicated:
    """A PostgreSQL server of this module's own, with a source at the gated head."""

    server: LocalPostgres
    source: str
    migrations: Path

    def new_target(self) -> str:
        name = f"fault_{time.monotonic_ns()}"
        with psycopg.connect(self.server.dsn(), autocommit=True) as connection:
            connection.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        return self.server.dsn(name)


@pytest.fixture(scope="module")
def dedicated(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Dedicated]:
    migrations = write_gated_revisions(tmp_path_factory.mktemp("dbfaults") / "gated")
    with LocalPostgres() as server:
        with psycopg.connect(server.dsn(), autocommit=True) as connection:
            connection.execute("CREATE DATABASE fault_source")
        source = server.dsn("fault_source")
        outcome = run_to_end({"source_dsn": source, "target_dsn": source,
                              "migrations_dir": str(migrations)})
        assert outcome.exit_code == 0, outcome.stdout + outcome.stderr
        yield Dedicated(server=server, source=source, migrations=migrations)


def _hold_gate(dsn: str) -> psycopg.Connection[tuple[Any, ...]]:
    """Hold the gate on a connection the fault may kill (so no context manager)."""
    connection = probe(dsn)
    connection.execute("SELECT pg_advisory_lock(%s, %s)", (GATE_CLASS, GATE))
    return connection


def _request(dedicated: Dedicated, target: str) -> dict[str, Any]:
    return {"source_dsn": dedicated.source, "target_dsn": target,
            "migrations_dir": str(dedicated.migrations), "transaction_mode": "per-revision",
            "lock_timeout_ms": GATED_LOCK_TIMEOUT_MS, "connect_timeout_seconds": 3}


def _report_of(path: Path) -> dict[str, Any]:
    # The indented report shares the file with JSON log lines, which are single lines.
    text = path.read_text("utf-8", errors="replace")
    start = text.find("{\n")
    if start < 0:
        return {}
    loaded, _ = json.JSONDecoder().raw_decode(text, start)
    return dict(loaded)


def test_server_restart_mid_sync_is_transient_and_recovers(dedicated: Dedicated,
                                                           tmp_path: Path) -> None:
    """Stopping PostgreSQL under a running sync fails it as transient; the next run succeeds."""
    target = dedicated.new_target()
    gate = _hold_gate(target)
    output = tmp_path / "child.out"
    child = start_run(_request(dedicated, target), output_path=output)
    wait_until(lambda: session_waiting_on(target, f"reliability gate {GATE} "),
               timeout_seconds=60, description="the sync parked at the gate")

    stopped_at = time.monotonic()
    dedicated.server.stop(mode="fast")
    exit_code = child.wait(timeout=60)
    failed_after = time.monotonic() - stopped_at
    dedicated.server.start()
    with contextlib.suppress(psycopg.Error):
        gate.close()
    report = _report_of(output)
    following = run_to_end(_request(dedicated, target))
    statuses = {operation["status"] for operation in
                audit_operations(target, str(report.get("sync_id")))}
    record_figure("database-faults", {"fault": "server stopped mid-sync",
                                      "failed_after_seconds": round(failed_after, 2),
                                      "transient": (report.get("error") or {}).get("transient"),
                                      "recovered": following.exit_code == 0})

    assert exit_code != 0
    assert report["error"]["transient"] is True, report.get("error")
    assert following.exit_code == 0, following.stdout + following.stderr
    assert applied_revision(target) == HEAD
    assert "IN_PROGRESS" not in statuses


@pytest.mark.slow
def test_reset_connection_mid_sync_is_transient(dedicated: Dedicated, tmp_path: Path) -> None:
    """A connection reset under a running sync fails it as transient; the next run succeeds."""
    target = dedicated.new_target()
    with FaultProxy(upstream_port=dedicated.server.port) as proxy:
        gate = _hold_gate(target)
        output = tmp_path / "child.out"
        child = start_run(_request(dedicated, proxy.dsn_for(target)), output_path=output)
        wait_until(lambda: session_waiting_on(target, f"reliability gate {GATE} "),
                   timeout_seconds=60, description="the sync parked at the gate")
        dropped = proxy.drop_connections()
        exit_code = child.wait(timeout=60)
        gate.close()
        report = _report_of(output)
        following = run_to_end(_request(dedicated, proxy.dsn_for(target)))
    record_figure("database-faults", {"fault": "connections reset mid-sync",
                                      "connections_dropped": dropped,
                                      "transient": (report.get("error") or {}).get("transient"),
                                      "recovered": following.exit_code == 0})

    assert dropped >= 2
    assert exit_code != 0
    assert report["error"]["transient"] is True, report.get("error")
    assert following.exit_code == 0, following.stdout + following.stderr
    assert applied_revision(target) == HEAD


@pytest.mark.slow
def test_hung_connection_ends_the_cli_run(dedicated: Dedicated, tmp_path: Path) -> None:
    """A connection that stops responding ends `dbsync run` as transient; the next run succeeds.

    Keepalives cannot see this fault (the proxy's kernel acknowledges them), so the bound is the
    connection's silence probe: after three connect timeouts without a byte, a second
    connection through the same hung path fails within one more connect timeout.
    """
    target = dedicated.new_target()
    with FaultProxy(upstream_port=dedicated.server.port) as proxy:
        gate = _hold_gate(target)
        output = tmp_path / "child.out"
        request = {**_request(dedicated, proxy.dsn_for(target)), "connect_timeout_seconds": 2}
        child = start_run(request, output_path=output)
        wait_until(lambda: session_waiting_on(target, f"reliability gate {GATE} "),
                   timeout_seconds=60, description="the sync parked at the gate")
        hung_at = time.monotonic()
        proxy.hang()
        exit_code = child.wait(timeout=120)
        bounded_after = time.monotonic() - hung_at
        proxy.resume()
        gate.close()
        report = _report_of(output)
        following = run_to_end(_request(dedicated, proxy.dsn_for(target)))
    record_figure("database-faults", {"fault": "hung connection under dbsync run",
                                      "bounded_after_seconds": round(bounded_after, 1),
                                      "transient": (report.get("error") or {}).get("transient"),
                                      "recovered": following.exit_code == 0})

    assert exit_code != 0
    assert report["error"]["transient"] is True, report.get("error")
    assert "no reply from" in output.read_text("utf-8", errors="replace")
    assert following.exit_code == 0, following.stdout + following.stderr
    assert applied_revision(target) == HEAD


def test_long_statement_outlives_silence_probe(dedicated: Dedicated,
                                               caplog: pytest.LogCaptureFixture) -> None:
    """A statement silent for longer than the probe threshold finishes: its backend is active."""
    caplog.set_level(logging.INFO, logger="dbsync.dsn")
    with connect(dedicated.source, role="target", connect_timeout_seconds=1) as connection:
        started = time.monotonic()
        row = connection.execute("SELECT pg_sleep(4.5), 42").fetchone()
        elapsed = time.monotonic() - started

    assert row is not None
    assert row[1] == 42
    assert elapsed >= 4.5
    assert any("is still active" in record.getMessage() for record in caplog.records)


def test_connections_carry_keepalive_parameters(dedicated: Dedicated) -> None:
    """dsn.connect sets libpq keepalives, and a DSN's own value wins."""
    with connect(dedicated.source, role="target") as connection:
        defaults = connection.info.get_parameters()
    with connect(dedicated.source + "?keepalives_idle=7", role="target") as connection:
        overridden = connection.info.get_parameters()

    assert defaults["keepalives"] == "1"
    assert defaults["keepalives_idle"] == "30"
    assert defaults["tcp_user_timeout"] == "60000"
    assert overridden["keepalives_idle"] == "7"


def _failures(resource: dict[str, Any]) -> int:
    return int((resource.get("status") or {}).get("failures", 0))


@pytest.mark.kubectl
@NEEDS_KUBECTL
@pytest.mark.slow
def test_operator_retries_through_server_restart(dedicated: Dedicated, tmp_path: Path) -> None:
    """The operator keeps a sync hit by a server restart Reconciling, retries, then is Ready."""
    target = dedicated.new_target()
    with operator_cluster(tmp_path) as cluster:
        cluster.apply_secret("fault-source", {"uri": dedicated.source})
        cluster.apply_secret("fault-target", {"uri": target})
        cluster.apply(configmap_of_directory("fault-migrations", dedicated.migrations))
        gate = _hold_gate(target)
        cluster.apply(sync_manifest(
            "restart-db", source_secret="fault-source", target_secret="fault-target",
            migrations={"configMaps": [{"name": "fault-migrations"}]},
            transactionMode="per-revision", lockTimeoutMs=GATED_LOCK_TIMEOUT_MS,
            connectTimeoutSeconds=2))
        wait_until(lambda: session_waiting_on(target, f"reliability gate {GATE} "),
                   timeout_seconds=60, description="the sync parked at the gate")
        stopped_at = time.monotonic()
        dedicated.server.stop(mode="fast")
        retrying = cluster.wait("restart-db", lambda resource: _failures(resource) >= 2,
                                description="two failed attempts", timeout_seconds=60)
        dedicated.server.start()
        with contextlib.suppress(psycopg.Error):
            gate.close()
        resource = cluster.wait_condition("restart-db", "Ready", "True", timeout_seconds=90)
        recovered_after = time.monotonic() - stopped_at
        cluster.assert_no_dropped_status_fields()
    reconciling = condition_of(retrying, "Reconciling") or {}
    stalled = condition_of(retrying, "Stalled") or {}
    record_figure("database-faults", {"fault": "server restart under the operator",
                                      "failed_attempts": _failures(retrying),
                                      "retry_reason": reconciling.get("reason"),
                                      "recovered_after_seconds": round(recovered_after, 1)})

    assert reconciling["status"] == "True"
    assert stalled["status"] == "False"
    assert resource["status"]["failures"] == 0
    assert applied_revision(target) == HEAD


@pytest.mark.kubectl
@NEEDS_KUBECTL
@pytest.mark.slow
def test_operator_bounds_a_hung_connection(dedicated: Dedicated, tmp_path: Path) -> None:
    """A connection that stops responding ends at syncTimeoutSeconds, is retried and recovers."""
    target = dedicated.new_target()
    with FaultProxy(upstream_port=dedicated.server.port) as proxy, \
            operator_cluster(tmp_path) as cluster:
        cluster.apply_secret("hang-source", {"uri": dedicated.source})
        cluster.apply_secret("hang-target", {"uri": proxy.dsn_for(target)})
        cluster.apply(configmap_of_directory("hang-migrations", dedicated.migrations))
        gate = _hold_gate(target)
        cluster.apply(sync_manifest(
            "hung", source_secret="hang-source", target_secret="hang-target",
            migrations={"configMaps": [{"name": "hang-migrations"}]},
            transactionMode="per-revision", lockTimeoutMs=GATED_LOCK_TIMEOUT_MS,
            syncTimeoutSeconds=10, connectTimeoutSeconds=2, lockWaitSeconds=5))
        wait_until(lambda: session_waiting_on(target, f"reliability gate {GATE} "),
                   timeout_seconds=60, description="the sync parked at the gate")
        hung_at = time.monotonic()
        proxy.hang()
        timed_out = cluster.wait(
            "hung", lambda resource: (condition_of(resource, "Reconciling") or {}).get(
                "reason") == "SyncTimedOut", description="SyncTimedOut", timeout_seconds=60)
        bounded_after = time.monotonic() - hung_at
        proxy.resume()
        gate.close()
        resource = cluster.wait_condition("hung", "Ready", "True", timeout_seconds=120)
        recovered_after = time.monotonic() - hung_at
        cluster.assert_no_dropped_status_fields()
    stalled = condition_of(timed_out, "Stalled") or {}
    record_figure("database-faults", {"fault": "hung connection under the operator",
                                      "bounded_after_seconds": round(bounded_after, 1),
                                      "recovered_after_seconds": round(recovered_after, 1)})

    assert stalled["status"] == "False"
    assert resource["status"]["failures"] == 0
    assert applied_revision(target) == HEAD
