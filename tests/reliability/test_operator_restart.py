"""The operator process stopped in the middle of a sync, then started again on the same state.

The sync's child is parked on a gated revision when the operator stops, gracefully (SIGINT,
what kopf gets on a normal shutdown) or by SIGKILL (an evicted pod). A new operator process
resumes the resource. The sync must be neither lost (the resource ends Ready with a sync
the audit trail shows as SUCCESS) nor run twice (each revision has exactly one SUCCESS
REVISION operation and one checksum row). The resource carries no finalizer, so it can be
deleted while no operator runs.
"""

from __future__ import annotations

import os
import shutil
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import psutil  # type: ignore[import-untyped]
import pytest

from dbsync.testing.servers import TestServer
from tests.reliability.cluster import (
    configmap_of_directory,
    operator_cluster,
    sync_manifest,
)
from tests.reliability.harness import (
    REVISION_COUNT,
    audit_operations,
    held_gates,
    probe,
    record_figure,
    revision_id,
    run_to_end,
    session_waiting_on,
    wait_until,
    write_gated_revisions,
)

pytestmark = [
    pytest.mark.kubectl,
    pytest.mark.skipif(shutil.which("kubectl") is None, reason="needs the kubectl binary"),
]

EVERY_REVISION = [revision_id(number) for number in range(1, REVISION_COUNT + 1)]
GATE = 3


@pytest.fixture(scope="module")
def migrations(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_gated_revisions(tmp_path_factory.mktemp("restart") / "gated")


@pytest.fixture(scope="module")
def source(pg: TestServer, migrations: Path) -> Iterator[str]:
    name = pg.create_database("restartsrc")
    dsn = pg.dsn(name)
    outcome = run_to_end({"source_dsn": dsn, "target_dsn": dsn,
                          "migrations_dir": str(migrations)})
    assert outcome.exit_code == 0, outcome.stdout + outcome.stderr
    yield dsn
    pg.drop_database(name)


def _revision_successes(dsn: str) -> dict[str, int]:
    with probe(dsn) as connection:
        rows = connection.execute(
            "SELECT operation_name, count(*) FROM sync_audit_operations "
            "WHERE operation_type = 'REVISION' AND status = 'SUCCESS' "
            "GROUP BY operation_name").fetchall()
    return {str(row[0]): int(row[1]) for row in rows}


def _checksum_rows(dsn: str) -> list[str]:
    with probe(dsn) as connection:
        rows = connection.execute(
            "SELECT revision FROM dbsync_revision_checksums ORDER BY revision").fetchall()
    return [str(row[0]) for row in rows]


@pytest.mark.parametrize("stop_signal", [
    pytest.param(signal.SIGINT, id="graceful"),
    pytest.param(signal.SIGKILL, id="killed", marks=pytest.mark.slow),
])
def test_operator_restart_mid_sync_runs_it_once(
        stop_signal: signal.Signals, pg: TestServer, source: str, migrations: Path,
        tmp_path: Path) -> None:
    """A sync interrupted by an operator stop is finished once by the next operator."""
    target_name = pg.create_database("restart")
    target = pg.dsn(target_name)
    try:
        with operator_cluster(tmp_path) as cluster:
            cluster.apply_secret("restart-source", {"uri": source})
            cluster.apply_secret("restart-target", {"uri": target})
            cluster.apply(configmap_of_directory("restart-migrations", migrations))
            with held_gates(target, [GATE]) as release:
                cluster.apply(sync_manifest(
                    "restart", source_secret="restart-source", target_secret="restart-target",
                    migrations={"configMaps": [{"name": "restart-migrations"}]},
                    lockTimeoutMs=120_000, lockWaitSeconds=120))
                wait_until(lambda: session_waiting_on(target, f"reliability gate {GATE} "),
                           timeout_seconds=60, description="the sync parked at the gate")
                assert cluster.operator is not None
                operator_pid = cluster.operator.pid
                children = psutil.Process(operator_pid).children(recursive=True)
                stopped_at = time.monotonic()
                if stop_signal == signal.SIGKILL:
                    os.kill(operator_pid, signal.SIGKILL)
                cluster.stop_operator()
                stop_seconds = time.monotonic() - stopped_at
                release(GATE)
            orphans = [child.pid for child in children if child.is_running()
                       and child.status() != psutil.STATUS_ZOMBIE]

            cluster.start_operator()
            resource = cluster.wait_condition("restart", "Ready", "True", timeout_seconds=120)
            sync_id = resource["status"]["lastSync"]["syncId"]
            root = [operation["status"] for operation in audit_operations(target, sync_id)
                    if operation["operation_type"] == "SYNC"]
            successes = _revision_successes(target)
            checksums = _checksum_rows(target)
            finalizers = resource["metadata"].get("finalizers", [])

            cluster.stop_operator()
            deleted = cluster.kubectl.run("delete", "dbsync", "restart", "--wait=true",
                                          "--timeout=15s", check=False)
            gone = cluster.get("restart")
            record_figure("operator-restart", {
                "stop": stop_signal.name, "stop_seconds": round(stop_seconds, 2),
                "orphaned_children": len(orphans), "revisions_applied_once":
                    successes == dict.fromkeys(EVERY_REVISION, 1),
                "ready_after_restart": True})
    finally:
        pg.drop_database(target_name)

    assert root == ["SUCCESS"]
    assert successes == dict.fromkeys(EVERY_REVISION, 1)
    assert checksums == EVERY_REVISION
    assert finalizers == []
    assert deleted.returncode == 0, deleted.stderr
    assert gone is None
