"""A canary password in every Secret and DSN must appear nowhere dbsync writes.

The canary is the password of a real login role, so the successful scenarios really use it.
The scenarios cover success, a failing migration, a wrong password, malformed DSNs (where
libpq's own parse errors quote parts of the string), an unreachable port and CLI runs. The
search covers the operator's logs (its sync children's output included), statuses, Events,
Jobs when the Job executor created any, the audit rows and the CLI's standard output and
error.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import psycopg
import pytest
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from dbsync.k8s.demo import condition_of
from dbsync.pipeline import dsn as dsn_module
from dbsync.pipeline.errors import DbsyncError
from dbsync.testing.postgres import find_free_port
from dbsync.testing.servers import TestServer
from tests.reliability.cluster import (
    OperatorCluster,
    configmap_of_directory,
    operator_cluster,
    sync_manifest,
)
from tests.reliability.harness import child_environment, record_figure, write_gated_revisions

CANARY = "canaryPw-3e1b77a0c9"
CANARY_ROLE = "canary_owner"

FAILING_REVISION = '''"""Fail after creating a table.

Revision ID: r06
Revises: r05
"""

from alembic import op

revision = "r06"
down_revision = "r05"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute("CREATE TABLE doomed (id integer)")
    op.execute("SELECT 1 / 0")


def downgrade() -> None:
    op.execute("DROP TABLE doomed")
'''

# Malformed connection strings whose parse errors used to quote the password.
MALFORMED_DSNS = [
    f"postgresql://app:{CANARY} x@127.0.0.1:5432/app",
    f"postgresql://app:{CANARY}%zz@127.0.0.1:5432/app",
    f"postgresql://app:{CANARY}@[::1/app",
    f"host=127.0.0.1 password={CANARY} dbname",
    f"host=127.0.0.1 password='{CANARY}",
    f"postgresql://app:{CANARY}@127.0.0.1:notaport/app",
    f"postgresql://app:{CANARY}@127.0.0.1:5432/app?sslmode=sometimes",
    # An unescaped "@" in the password: libpq takes the rest of it as the host name.
    f"postgresql://app:pre@{CANARY}@127.0.0.1:5432/app",
]


def _canary_hits(text: str) -> int:
    return text.count(CANARY) + text.count(quote(CANARY, safe=""))


@pytest.mark.parametrize("malformed", MALFORMED_DSNS, ids=range(len(MALFORMED_DSNS)))
def test_malformed_dsn_error_hides_password(malformed: str) -> None:
    """Parsing or connecting with a malformed DSN raises an error without the password."""
    with pytest.raises(DbsyncError) as raised:
        dsn_module.connect(malformed, role="target", connect_timeout_seconds=1)

    assert _canary_hits(str(raised.value)) == 0, str(raised.value)


def _with_canary_role(admin_dsn: str, database: str) -> str:
    """Return a DSN for ``database`` as the canary role, with the canary password."""
    params = conninfo_to_dict(admin_dsn)
    return make_conninfo(admin_dsn, dbname=database, user=CANARY_ROLE, password=CANARY,
                         **({"host": str(params["host"])} if "host" in params else {}))


@pytest.fixture(scope="module")
def canary_databases(pg: TestServer) -> Iterator[Callable[[str], str]]:
    """A superuser login role whose password is the canary, and a database factory.

    The databases are dropped before the role, which owns objects in them.
    """
    with psycopg.connect(pg.admin_dsn, autocommit=True) as connection:
        connection.execute(sql.SQL("DROP ROLE IF EXISTS {}").format(sql.Identifier(CANARY_ROLE)))
        connection.execute(sql.SQL("CREATE ROLE {} LOGIN SUPERUSER PASSWORD {}").format(
            sql.Identifier(CANARY_ROLE), sql.Literal(CANARY)))
    created: list[str] = []

    def create(prefix: str) -> str:
        created.append(pg.create_database(prefix))
        return created[-1]

    yield create
    for name in created:
        pg.drop_database(name)
    with psycopg.connect(pg.admin_dsn, autocommit=True) as connection:
        connection.execute(sql.SQL("DROP ROLE {}").format(sql.Identifier(CANARY_ROLE)))


def _settled(resource: dict[str, Any]) -> bool:
    stalled = condition_of(resource, "Stalled") or {}
    reconciling = condition_of(resource, "Reconciling") or {}
    return stalled.get("status") == "True" or reconciling.get("status") == "False"


def _audit_text(dsn: str) -> str:
    """Return every audit row of ``dsn`` as JSON text (empty when there is no audit table)."""
    with psycopg.connect(dsn) as connection:
        exists = connection.execute("SELECT to_regclass('sync_audit_logs')").fetchone()
        if exists is None or exists[0] is None:
            return ""
        rows = connection.execute("SELECT to_jsonb(l)::text FROM sync_audit_logs l").fetchall()
    return "\n".join(str(row[0]) for row in rows)


def _dbsync(*arguments: str, stdin: str | None = None) -> str:
    completed = subprocess.run(
        [sys.executable, "-m", "dbsync.cli.main", *arguments], input=stdin,
        capture_output=True, text=True, timeout=120, env=child_environment(), check=False)
    return completed.stdout + completed.stderr


@pytest.fixture(scope="module")
def gated(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Five quick revisions, and the same plus a sixth that fails."""
    base = tmp_path_factory.mktemp("leak")
    good = write_gated_revisions(base / "good")
    failing = write_gated_revisions(base / "failing")
    (failing / "r06_fails.py").write_text(FAILING_REVISION, encoding="utf-8")
    return {"good": good, "failing": failing}


def test_cli_output_and_audit_hold_no_canary(pg: TestServer,
                                             canary_databases: Callable[[str], str],
                                             gated: dict[str, Path]) -> None:
    """dbsync run (text and JSON, success and failures) never prints or stores the canary."""
    source = _with_canary_role(pg.admin_dsn, canary_databases("leaksrc"))
    target_name = canary_databases("leaktgt")
    target = _with_canary_role(pg.admin_dsn, target_name)
    wrong = make_conninfo(pg.dsn(target_name), password=CANARY + "-wrong")
    closed = f"postgresql://app:{CANARY}@127.0.0.1:{find_free_port()}/app"
    outputs = [
        _dbsync("run", "--request", "-", "--output", "json", stdin=json.dumps(
            {"source_dsn": source, "target_dsn": target, "migrations_dir": str(gated["good"])})),
        _dbsync("run", "--source", source, "--target", target, "--migrations",
                str(gated["failing"]), "--output", "json"),
        _dbsync("run", "--source", source, "--target", wrong, "--migrations",
                str(gated["good"])),
        _dbsync("run", "--source", closed, "--target", MALFORMED_DSNS[0],
                "--connect-timeout", "2"),
    ]
    audit = _audit_text(target)
    cli_hits = sum(_canary_hits(output) for output in outputs)
    record_figure("secret-leak", {"scope": "cli", "texts_searched": len(outputs) + 1,
                                  "canary_hits": cli_hits + _canary_hits(audit)})

    assert "r05" in outputs[0]
    assert audit != ""
    assert cli_hits == 0, "\n".join(output for output in outputs if CANARY in output)
    assert _canary_hits(audit) == 0


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[OperatorCluster]:
    """An operator process and the emulator, with nothing applied yet."""
    if shutil.which("kubectl") is None:
        pytest.skip("needs the kubectl binary")
    with operator_cluster(tmp_path_factory.mktemp("leak-operator")) as running:
        yield running


@pytest.mark.kubectl
def test_operator_artifacts_hold_no_canary(pg: TestServer,
                                           canary_databases: Callable[[str], str],
                                           gated: dict[str, Path],
                                           cluster: OperatorCluster) -> None:
    """Logs, statuses, Events, Jobs and audit rows of five operator scenarios hold no canary."""
    source = _with_canary_role(pg.admin_dsn, canary_databases("leakksrc"))
    targets = {name: canary_databases("leakk") for name in ("ok", "failing", "hostform")}
    params = conninfo_to_dict(pg.admin_dsn)
    cluster.apply_secret("leak-source", {"uri": source})
    cluster.apply_secret("leak-ok", {"uri": _with_canary_role(pg.admin_dsn, targets["ok"])})
    cluster.apply_secret("leak-failing",
                         {"uri": _with_canary_role(pg.admin_dsn, targets["failing"])})
    cluster.apply_secret("leak-wrong", {"uri": make_conninfo(
        pg.dsn(targets["ok"]), password=CANARY + "-wrong")})
    cluster.apply_secret("leak-malformed", {"uri": MALFORMED_DSNS[0]})
    cluster.apply_secret("leak-password", {"password": CANARY})
    cluster.apply(configmap_of_directory("leak-good", gated["good"]),
                  configmap_of_directory("leak-failing", gated["failing"]))
    good = {"configMaps": [{"name": "leak-good"}]}
    manifests = [
        sync_manifest("leak-ok", source_secret="leak-source", target_secret="leak-ok",
                      migrations=good, diff={"failOnDrift": False}),
        sync_manifest("leak-failing", source_secret="leak-source", target_secret="leak-failing",
                      migrations={"configMaps": [{"name": "leak-failing"}]}),
        sync_manifest("leak-wrong", source_secret="leak-source", target_secret="leak-wrong",
                      backoffLimit=1),
        sync_manifest("leak-malformed", source_secret="leak-source",
                      target_secret="leak-malformed"),
    ]
    # The host form needs a TCP host: spec.target.host does not take a Unix-socket directory.
    host = str(params.get("host") or "127.0.0.1")
    tcp = not host.startswith("/")
    if tcp:
        host_form = sync_manifest("leak-hostform", source_secret="leak-source",
                                  target_secret="unused", migrations=good,
                                  diff={"failOnDrift": False})
        host_form["spec"]["target"] = {
            "host": host, "port": int(params.get("port") or 5432),
            "database": targets["hostform"], "user": CANARY_ROLE,
            "passwordFrom": {"secretKeyRef": {"name": "leak-password", "key": "password"}}}
        manifests.append(host_form)
    cluster.apply(*manifests)

    cluster.wait_condition("leak-ok", "Ready", "True", timeout_seconds=90)
    if tcp:
        cluster.wait_condition("leak-hostform", "Ready", "True", timeout_seconds=90)
    cluster.wait_condition("leak-failing", "Stalled", "True", "MigrationFailed",
                           timeout_seconds=90)
    # On a trust-authenticated server (a Unix socket in CI) the wrong password still logs
    # in, so that sync ends on its findings instead of Stalled: wait for either.
    cluster.wait("leak-wrong", _settled, description="settled (Stalled, or done Reconciling)",
                 timeout_seconds=90)
    cluster.wait_condition("leak-malformed", "Stalled", "True", timeout_seconds=90)

    texts = {
        "operator logs": cluster.operator_logs(),
        "resources": json.dumps(cluster.kubectl.get_json("databasesyncs")),
        "events": json.dumps(cluster.events()),
        "jobs": json.dumps(cluster.kubectl.get_json("jobs")),
        "audit": "\n".join(_audit_text(pg.dsn(name)) for name in targets.values()),
    }
    hits = {area: _canary_hits(text) for area, text in texts.items()}
    record_figure("secret-leak", {"scope": "operator", "texts_searched": len(texts),
                                  "canary_hits": sum(hits.values())})

    assert texts["audit"] != ""
    assert hits == dict.fromkeys(texts, 0)
    cluster.assert_no_dropped_status_fields()


@pytest.mark.kubectl
@pytest.mark.slow
def test_job_executor_artifacts_hold_no_canary(pg: TestServer,
                                               canary_databases: Callable[[str], str],
                                               gated: dict[str, Path],
                                               tmp_path: Path) -> None:
    """In Job mode, Job specs, pod output and everything else hold no canary either."""
    if shutil.which("kubectl") is None:
        pytest.skip("needs the kubectl binary")
    source = _with_canary_role(pg.admin_dsn, canary_databases("leakjsrc"))
    targets = {name: canary_databases("leakj") for name in ("ok", "failing")}
    with operator_cluster(tmp_path, kubelet=True, operator_arguments=(
            "--executor", "job", "--no-prestart")) as cluster:
        cluster.apply_secret("leak-source", {"uri": source})
        for name, database in targets.items():
            cluster.apply_secret(f"leak-{name}",
                                 {"uri": _with_canary_role(pg.admin_dsn, database)})
        cluster.apply(configmap_of_directory("leak-good", gated["good"]),
                      configmap_of_directory("leak-failing", gated["failing"]))
        cluster.apply(
            sync_manifest("job-ok", source_secret="leak-source", target_secret="leak-ok",
                          migrations={"configMaps": [{"name": "leak-good"}]},
                          diff={"failOnDrift": False}),
            sync_manifest("job-failing", source_secret="leak-source",
                          target_secret="leak-failing",
                          migrations={"configMaps": [{"name": "leak-failing"}]}))
        cluster.wait_condition("job-ok", "Ready", "True", timeout_seconds=120)
        cluster.wait_condition("job-failing", "Stalled", "True", timeout_seconds=120)
        jobs = cluster.kubectl.get_json("jobs")
        texts = {
            "operator logs": cluster.operator_logs(),
            "resources": json.dumps(cluster.kubectl.get_json("databasesyncs")),
            "events": json.dumps(cluster.events()),
            "jobs": json.dumps(jobs),
            "pods": json.dumps(cluster.kubectl.get_json("pods")),
            "pod output": "\n".join(path.read_text("utf-8", errors="replace") for path in
                                    sorted((tmp_path / "kubelet").rglob("output.log"))),
            "audit": "\n".join(_audit_text(pg.dsn(name)) for name in targets.values()),
        }
        cluster.assert_no_dropped_status_fields()
    hits = {area: _canary_hits(text) for area, text in texts.items()}
    record_figure("secret-leak", {"scope": "job executor", "texts_searched": len(texts),
                                  "canary_hits": sum(hits.values())})

    assert jobs["items"] != []
    assert texts["pod output"] != ""
    assert hits == dict.fromkeys(texts, 0)
