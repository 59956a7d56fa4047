"""Invalid DatabaseSync manifests from the corpus, applied with the real kubectl.

Each manifest in ``tests/fixtures/bad_inputs/manifests`` is either rejected by the CRD
schema (kubectl fails and names the field) or accepted and then reported by the operator as
Stalled with a reason and a message naming the field. The operator must survive all of them
and still sync a valid resource afterwards, and a sentinel table on the target must survive
the manifests that carry SQL in identifiers, revisions and Secret values.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
import yaml

from dbsync.k8s.demo import condition_of
from dbsync.testing.servers import TestServer
from tests.reliability.cluster import (
    OperatorCluster,
    configmap_of_directory,
    operator_cluster,
    sync_manifest,
)
from tests.reliability.harness import record_figure, write_gated_revisions

pytestmark = [
    pytest.mark.kubectl,
    pytest.mark.skipif(shutil.which("kubectl") is None, reason="needs the kubectl binary"),
]

CORPUS = Path(__file__).resolve().parent / "fixtures" / "bad_inputs"
CASES: list[dict[str, Any]] = yaml.safe_load(
    (CORPUS / "cases.yaml").read_text("utf-8"))["manifests"]
REJECTED = [case for case in CASES if case["outcome"] == "rejected"]
STALLED = [case for case in CASES if case["outcome"] == "stalled"]


def _case_id(case: dict[str, Any]) -> str:
    return Path(str(case["file"])).stem


@pytest.fixture(scope="module")
def target(pg: TestServer) -> Iterator[str]:
    """The target every manifest points at, with a sentinel table and a ledger table."""
    name = pg.create_database("badk8s")
    dsn = pg.dsn(name)
    with psycopg.connect(dsn, autocommit=True) as connection:
        connection.execute("CREATE TABLE sentinel (id integer)")
        connection.execute("INSERT INTO sentinel VALUES (1)")
        connection.execute("CREATE TABLE postings (transaction_id bigint, amount numeric, "
                           "currency text)")
    yield dsn
    pg.drop_database(name)


@pytest.fixture(scope="module")
def cluster(pg: TestServer, target: str,
            tmp_path_factory: pytest.TempPathFactory) -> Iterator[OperatorCluster]:
    """An operator with the Secrets and ConfigMaps that the corpus refers to."""
    workdir = tmp_path_factory.mktemp("bad-manifests")
    source_name = pg.create_database("badk8ssrc")
    with operator_cluster(workdir, operator_arguments=("--max-concurrent-syncs", "4")) as running:
        running.apply_secret("bad-source-db", {"uri": pg.dsn(source_name)})
        running.apply_secret("bad-target-db", {"uri": target, "password": "unused"})
        running.apply_secret("bad-garbage-db", {"uri": "not a uri'; DROP TABLE sentinel; --"})
        running.apply(
            configmap_of_directory("bad-migrations", write_gated_revisions(workdir / "gated")),
            {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "bad-empty-migrations"},
             "data": {"README": "no revision files here"}})
        yield running
    pg.drop_database(source_name)


def _sentinel_rows(dsn: str) -> int:
    with psycopg.connect(dsn) as connection:
        row = connection.execute("SELECT count(*) FROM sentinel").fetchone()
    return int(row[0]) if row is not None else 0


@pytest.mark.parametrize("case", REJECTED, ids=[_case_id(case) for case in REJECTED])
def test_schema_rejects_manifest_naming_field(case: dict[str, Any],
                                              cluster: OperatorCluster) -> None:
    """kubectl apply fails, the error names the field, and nothing is stored."""
    completed = cluster.kubectl.run("apply", "-f", str(CORPUS / case["file"]), check=False)
    stored = cluster.get(_case_id(case))
    record_figure("bad-input-manifest", {"case": _case_id(case), "outcome": "rejected",
                                         "rejected": completed.returncode != 0})

    assert completed.returncode != 0, completed.stdout
    assert case["field"] in completed.stderr, completed.stderr
    assert stored is None


def test_operator_stalls_on_accepted_bad_manifests(cluster: OperatorCluster,
                                                   target: str, pg: TestServer) -> None:
    """Every accepted bad manifest ends Stalled with a reason and the field in its message."""
    for case in STALLED:
        cluster.kubectl.run("apply", "-f", str(CORPUS / case["file"]))

    problems: list[str] = []
    for case in STALLED:
        name = _case_id(case)
        resource = cluster.wait_condition(name, "Stalled", "True", timeout_seconds=90)
        stalled = condition_of(resource, "Stalled") or {}
        record_figure("bad-input-manifest", {"case": name, "outcome": "stalled",
                                             "reason": stalled.get("reason")})
        if case.get("reason") and stalled.get("reason") != case["reason"]:
            problems.append(f"{name}: reason {stalled.get('reason')}, not {case['reason']}")
        if case["field"] not in stalled.get("message", ""):
            problems.append(f"{name}: message {stalled.get('message')!r} does not name "
                            f"{case['field']}")

    # The operator is still serving: a valid resource on the same target becomes Ready.
    cluster.apply(sync_manifest("valid-after-corpus", source_secret="bad-source-db",
                                target_secret="bad-target-db",
                                diff={"failOnDrift": False}))
    cluster.wait_condition("valid-after-corpus", "Ready", "True", timeout_seconds=90)

    assert problems == [], "\n".join(problems)
    assert cluster.operator is not None
    assert cluster.operator.process is not None
    assert cluster.operator.process.poll() is None
    assert "Traceback" not in cluster.operator_logs()
    assert _sentinel_rows(target) == 1
    cluster.assert_no_dropped_status_fields()
