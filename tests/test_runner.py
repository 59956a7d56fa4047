"""The whole pipeline on real PostgreSQL: migrate, diff, ledger, audit and the verdict."""

from __future__ import annotations

import shutil
from pathlib import Path

import psycopg
import pytest

from dbsync.cli.demo_command import SAMPLE_LEDGER_SQL
from dbsync.pipeline.ledger import load_ledger_config
from dbsync.pipeline.report import StepResult, SyncResult
from dbsync.pipeline.request import SyncRequest
from dbsync.pipeline.runner import run_sync
from tests.conftest import DatabasePair
from tests.dbtools import alembic_versions, execute, schema_dump
from tests.migration_fixtures import FAILING_REVISION

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
EXAMPLE_MIGRATIONS = EXAMPLES / "migrations"
EXAMPLE_HEAD = "0006_txn_status"


def _sync_source_to_head(pair: DatabasePair) -> None:
    report = run_sync(SyncRequest(source_dsn=pair.source, target_dsn=pair.source,
                                  migrations_dir=EXAMPLE_MIGRATIONS))
    assert report.exit_code == 0, report.render_text()


def _operations(dsn: str, sync_id: str) -> list[tuple[str, str | None, str]]:
    with psycopg.connect(dsn) as connection:
        rows = connection.execute(
            "SELECT operation_type, migration_name, status FROM sync_audit_operations "
            "WHERE sync_id = %s", (sync_id,)).fetchall()
    return [(str(row[0]), row[1], str(row[2])) for row in rows]


def test_sync_to_head_meets_every_criterion(db_pair: DatabasePair) -> None:
    """A fresh target is migrated to head, matches the source and the ledger balances."""
    _sync_source_to_head(db_pair)
    execute(db_pair.source, SAMPLE_LEDGER_SQL)
    ledger = load_ledger_config(EXAMPLES / "ledger.yaml")

    report = run_sync(SyncRequest(source_dsn=db_pair.source, target_dsn=db_pair.target,
                                  migrations_dir=EXAMPLE_MIGRATIONS, revision="source"))
    execute(db_pair.target, SAMPLE_LEDGER_SQL)
    checked = run_sync(SyncRequest(source_dsn=db_pair.source, target_dsn=db_pair.target,
                                   migrations_dir=EXAMPLE_MIGRATIONS, ledger=ledger))

    assert report.result is SyncResult.SUCCEEDED, report.render_text()
    assert report.migration is not None
    assert report.migration["revision_after"] == EXAMPLE_HEAD
    assert checked.result is SyncResult.SUCCEEDED, checked.render_text()
    assert all(criterion.ok for criterion in checked.criteria)
    assert [step.name for step in checked.steps] == [
        "preflight", "lock", "migrate", "diff", "ledger"]
    assert alembic_versions(db_pair.target) == [EXAMPLE_HEAD]


def test_failing_revision_leaves_target_unchanged(db_pair: DatabasePair, tmp_path: Path) -> None:
    """A revision failing half-way rolls back every revision; audit shows FAILED/ROLLED_BACK."""
    migrations = tmp_path / "migrations"
    shutil.copytree(EXAMPLE_MIGRATIONS, migrations)
    (migrations / "0007_fails.py").write_text(FAILING_REVISION)
    run_sync(SyncRequest(source_dsn=db_pair.source, target_dsn=db_pair.target,
                         migrations_dir=migrations, revision="0003_postings"))
    dump_before = schema_dump(db_pair.target)
    versions_before = alembic_versions(db_pair.target)

    report = run_sync(SyncRequest(source_dsn=db_pair.source, target_dsn=db_pair.target,
                                  migrations_dir=migrations, revision="head"))

    assert report.exit_code == 1
    assert report.error is not None
    assert report.error.reason == "MigrationFailed"
    assert "0007_fails" in report.error.message
    assert schema_dump(db_pair.target) == dump_before
    assert alembic_versions(db_pair.target) == versions_before
    operations = _operations(db_pair.target, report.sync_id)
    statuses = {status for _, _, status in operations}
    assert "FAILED" in statuses
    assert "ROLLED_BACK" in statuses
    assert ("SYNC", None, "FAILED") in operations


def test_dry_run_changes_nothing_but_writes_audit(db_pair: DatabasePair) -> None:
    """A plan-only dry run leaves the target's schema alone and is audited."""
    run_sync(SyncRequest(source_dsn=db_pair.source, target_dsn=db_pair.target,
                         migrations_dir=EXAMPLE_MIGRATIONS, revision="0002_transactions"))
    dump_before = schema_dump(db_pair.target)

    report = run_sync(SyncRequest(source_dsn=db_pair.source, target_dsn=db_pair.target,
                                  migrations_dir=EXAMPLE_MIGRATIONS, dry_run="plan"))  # type: ignore[arg-type]

    assert report.exit_code == 0, report.render_text()
    assert report.migration is not None
    planned = [outcome["revision"] for outcome in report.migration["outcomes"]]
    assert planned == ["0003_postings", "0004_currency", "0005_checks_index", "0006_txn_status"]
    assert all(outcome["sql"] for outcome in report.migration["outcomes"])
    assert schema_dump(db_pair.target) == dump_before
    assert alembic_versions(db_pair.target) == ["0002_transactions"]
    operations = _operations(db_pair.target, report.sync_id)
    assert ("SYNC", None, "SUCCESS") in operations
    assert sum(1 for kind, _, _ in operations if kind == "REVISION") == 4
    # The target still lacks the pending tables, which a dry run reports but never counts.
    text = report.render_text()
    assert "  info no_schema_differences:" in text
    assert "  FAIL " not in text


def test_revision_source_stops_at_source_revision(db_pair: DatabasePair) -> None:
    """With revision=source the target goes exactly to the source's current revision."""
    run_sync(SyncRequest(source_dsn=db_pair.source, target_dsn=db_pair.source,
                         migrations_dir=EXAMPLE_MIGRATIONS, revision="0004_currency"))

    report = run_sync(SyncRequest(source_dsn=db_pair.source, target_dsn=db_pair.target,
                                  migrations_dir=EXAMPLE_MIGRATIONS, revision="source"))

    assert report.exit_code == 0, report.render_text()
    assert alembic_versions(db_pair.target) == ["0004_currency"]


def test_drifted_target_reports_exactly_three_differences(db_pair: DatabasePair) -> None:
    """An extra column, a changed type and a missing index are the only differences."""
    _sync_source_to_head(db_pair)
    run_sync(SyncRequest(source_dsn=db_pair.source, target_dsn=db_pair.target,
                         migrations_dir=EXAMPLE_MIGRATIONS))
    execute(db_pair.target, "ALTER TABLE accounts ADD COLUMN nickname text")
    execute(db_pair.target, "ALTER TABLE transactions ALTER COLUMN reference TYPE varchar(80)")
    execute(db_pair.target, "DROP INDEX postings_account")

    report = run_sync(SyncRequest(source_dsn=db_pair.source, target_dsn=db_pair.target,
                                  migrations_dir=EXAMPLE_MIGRATIONS))

    assert report.exit_code == 1
    assert report.drift is not None
    found = sorted((item["kind"], item["name"], item["property"])
                   for item in report.drift["differences"])
    assert len(found) == 3, found
    assert any(kind == "column" and "nickname" in name for kind, name, _ in found)
    assert any(kind == "column" and "reference" in name and prop == "type"
               for kind, name, prop in found)
    assert any(kind == "index" and "postings_account" in name for kind, name, _ in found)
    diff_step = next(step for step in report.steps if step.name == "diff")
    assert diff_step.result is StepResult.FAILED


@pytest.mark.parametrize("bad_side", ["unbalanced"])
def test_unbalanced_ledger_names_transactions(db_pair: DatabasePair, bad_side: str) -> None:
    """An unbalanced posting makes the ledger criterion fail with the transaction id."""
    _sync_source_to_head(db_pair)
    run_sync(SyncRequest(source_dsn=db_pair.source, target_dsn=db_pair.target,
                         migrations_dir=EXAMPLE_MIGRATIONS))
    execute(db_pair.target, SAMPLE_LEDGER_SQL)
    execute(db_pair.target, "UPDATE postings SET amount = amount + 0.01 WHERE id = 7")
    with psycopg.connect(db_pair.target) as connection:
        row = connection.execute("SELECT transaction_id FROM postings WHERE id = 7").fetchone()
    assert row is not None
    broken_transaction = str(row[0])

    report = run_sync(SyncRequest(source_dsn=db_pair.source, target_dsn=db_pair.target,
                                  migrations_dir=EXAMPLE_MIGRATIONS,
                                  ledger=load_ledger_config(EXAMPLES / "ledger.yaml")))

    assert report.exit_code == 1, bad_side
    assert report.ledger is not None
    assert report.ledger["balanced"] is False
    balance = next(check for check in report.ledger["checks"]
                   if check["name"] == "transaction_balance")
    assert balance["status"] == "FAIL"
    assert any(broken_transaction in str(key) for key in balance["offending_keys"])
