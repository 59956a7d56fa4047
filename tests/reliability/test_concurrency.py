"""Many DatabaseSync resources at once, through one operator process.

Resources that share a target are serialized by the target's advisory lock: every revision
is applied exactly once (one checksum row and one SUCCESS REVISION operation), every
resource reaches Ready without a failure or a Warning Event, and every status names a sync
that the audit trail shows as SUCCESS (no lost status update). The operator's peak RSS is
sampled and recorded.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from dbsync.testing.servers import TestServer
from tests.reliability.cluster import (
    NAMESPACE,
    MemorySampler,
    OperatorCluster,
    configmap_of_directory,
    operator_cluster,
    sync_manifest,
)
from tests.reliability.harness import (
    REVISION_COUNT,
    audit_operations,
    checksum_revisions,
    probe,
    record_figure,
    revision_id,
    run_to_end,
    write_gated_revisions,
)

pytestmark = [
    pytest.mark.kubectl,
    pytest.mark.skipif(shutil.which("kubectl") is None, reason="needs the kubectl binary"),
]


@pytest.fixture(scope="module")
def migrations(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_gated_revisions(tmp_path_factory.mktemp("concurrency") / "gated")


@pytest.fixture(scope="module")
def source(pg: TestServer, migrations: Path) -> Iterator[str]:
    """A source at the gated head."""
    name = pg.create_database("concsrc")
    dsn = pg.dsn(name)
    outcome = run_to_end({"source_dsn": dsn, "target_dsn": dsn,
                          "migrations_dir": str(migrations)})
    assert outcome.exit_code == 0, outcome.stdout + outcome.stderr
    yield dsn
    pg.drop_database(name)


def _revision_successes(dsn: str) -> dict[str, int]:
    """Count SUCCESS REVISION operations per revision over every sync on ``dsn``."""
    with probe(dsn) as connection:
        rows = connection.execute(
            "SELECT operation_name, count(*) FROM sync_audit_operations "
            "WHERE operation_type = 'REVISION' AND status = 'SUCCESS' "
            "GROUP BY operation_name").fetchall()
    return {str(row[0]): int(row[1]) for row in rows}


def run_fan_in(*, pg: TestServer, source: str, migrations: Path, workdir: Path,
               resources: int, databases: int, max_concurrent_syncs: int,
               timeout_seconds: float) -> dict[str, object]:
    """Sync ``resources`` resources spread over ``databases`` targets; return the findings."""
    names = [pg.create_database("conc") for _ in range(databases)]
    try:
        with operator_cluster(workdir, operator_arguments=(
                "--max-concurrent-syncs", str(max_concurrent_syncs))) as cluster:
            return _fan_in(cluster, pg=pg, source=source, migrations=migrations,
                           names=names, resources=resources, timeout_seconds=timeout_seconds)
    finally:
        for name in names:
            pg.drop_database(name)


def _fan_in(cluster: OperatorCluster, *, pg: TestServer, source: str, migrations: Path,
            names: list[str], resources: int, timeout_seconds: float) -> dict[str, object]:
    assert cluster.operator is not None
    sampler = MemorySampler(pid=cluster.operator.pid)
    sampler.start()
    cluster.apply_secret("conc-source", {"uri": source})
    for index, name in enumerate(names):
        cluster.apply_secret(f"conc-target-{index}", {"uri": pg.dsn(name)})
    cluster.apply(configmap_of_directory("conc-migrations", migrations))

    started = time.monotonic()
    manifests = [sync_manifest(f"conc-{number:03d}", source_secret="conc-source",
                               target_secret=f"conc-target-{number % len(names)}",
                               migrations={"configMaps": [{"name": "conc-migrations"}]},
                               lockWaitSeconds=600)
                 for number in range(resources)]
    cluster.apply(*manifests)
    finished = [cluster.wait_condition(str(manifest["metadata"]["name"]), "Ready", "True",
                                       timeout_seconds=timeout_seconds)
                for manifest in manifests]
    elapsed = time.monotonic() - started
    peak_bytes = sampler.stop()

    lost_status = []
    for resource in finished:
        target = pg.dsn(names[int(resource["metadata"]["name"][5:]) % len(names)])
        sync_id = resource["status"]["lastSync"]["syncId"]
        root = [operation for operation in audit_operations(target, sync_id)
                if operation["operation_type"] == "SYNC"]
        if [operation["status"] for operation in root] != ["SUCCESS"]:
            lost_status.append(resource["metadata"]["name"])
    warnings = [event for event in cluster.events() if event.get("type") == "Warning"
                and event.get("involvedObject", {}).get("namespace") == NAMESPACE]
    cluster.assert_no_dropped_status_fields()
    return {
        "ready": len(finished),
        "failures": sum(int(resource["status"].get("failures", 0)) for resource in finished),
        "lost_status": lost_status,
        "warnings": len(warnings),
        "warning_reasons": sorted({str(event.get("reason")) for event in warnings}),
        "revision_successes": [_revision_successes(pg.dsn(name)) for name in names],
        "checksums": [checksum_revisions_any(pg.dsn(name)) for name in names],
        "elapsed_seconds": round(elapsed, 1),
        "peak_rss_mib": round(peak_bytes / 2**20, 1),
    }


def checksum_revisions_any(dsn: str) -> list[str]:
    """Return every revision with a checksum row on ``dsn``, whichever sync wrote it."""
    with probe(dsn) as connection:
        rows = connection.execute(
            "SELECT revision FROM dbsync_revision_checksums ORDER BY revision").fetchall()
    return [str(row[0]) for row in rows]


EVERY_REVISION = [revision_id(number) for number in range(1, REVISION_COUNT + 1)]


@pytest.mark.parametrize(("resources", "databases"), [
    pytest.param(4, 2, id="4-over-2"),
    pytest.param(10, 1, id="10-on-1", marks=pytest.mark.slow),
    pytest.param(100, 20, id="100-over-20", marks=pytest.mark.slow),
])
def test_resources_sharing_targets_apply_each_revision_once(
        resources: int, databases: int, pg: TestServer, source: str, migrations: Path,
        tmp_path: Path) -> None:
    """Every resource is Ready, each revision runs once per target, no status is lost."""
    findings = run_fan_in(pg=pg, source=source, migrations=migrations, workdir=tmp_path,
                          resources=resources, databases=databases, max_concurrent_syncs=4,
                          timeout_seconds=60 + resources * 6)
    record_figure("concurrency", {"resources": resources, "databases": databases,
                                  **{key: value for key, value in findings.items()
                                     if key not in ("revision_successes", "checksums")}})

    assert findings["ready"] == resources
    assert findings["failures"] == 0
    assert findings["lost_status"] == []
    assert findings["warnings"] == 0, findings["warning_reasons"]
    assert findings["revision_successes"] == [dict.fromkeys(EVERY_REVISION, 1)] * databases
    assert findings["checksums"] == [EVERY_REVISION] * databases


@pytest.mark.slow
def test_checksum_rows_name_the_sync_that_applied_them(pg: TestServer, source: str,
                                                        migrations: Path) -> None:
    """The checksum rows of one target all come from a single sync (no interleaving)."""
    name = pg.create_database("concone")
    try:
        target = pg.dsn(name)
        request = {"source_dsn": source, "target_dsn": target,
                   "migrations_dir": str(migrations), "transaction_mode": "per-revision"}
        first = run_to_end(request)
        second = run_to_end(request)
    finally:
        rows = checksum_revisions(pg.dsn(name), first.report.get("sync_id", ""))
        pg.drop_database(name)

    assert first.exit_code == 0, first.stdout + first.stderr
    assert second.exit_code == 0, second.stdout + second.stderr
    assert rows == EVERY_REVISION
    assert second.report["migration"]["applied"] == []
