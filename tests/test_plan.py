"""Plans and approval: apply only the approved plan, and reject it once the target changed."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import psycopg

from tests.conftest import DatabasePair
from tests.dbtools import alembic_versions, execute, schema_dump

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"

NEW_REVISION = '''"""Add an IBAN to accounts.

Revision ID: 0007_iban
Revises: 0006_txn_status
"""

import sqlalchemy as sa
from alembic import op

revision = "0007_iban"
down_revision = "0006_txn_status"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("accounts", sa.Column("iban", sa.String(34)))


def downgrade() -> None:
    op.drop_column("accounts", "iban")
'''


def _dbsync(*arguments: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "dbsync.cli.main", *arguments],
                          capture_output=True, text=True, timeout=120, check=False)


def _plan(pair: DatabasePair, migrations: Path, *extra: str) -> dict[str, object]:
    completed = _dbsync("plan", "--source", pair.source, "--target", pair.target,
                        "--migrations", str(migrations), "--output", "json", *extra)
    assert completed.returncode == 0, completed.stderr
    plan: dict[str, object] = json.loads(completed.stdout)
    return plan


def _run_approved(pair: DatabasePair, migrations: Path, plan_hash: str
                  ) -> subprocess.CompletedProcess[str]:
    return _dbsync("run", "--source", pair.source, "--target", pair.target,
                   "--migrations", str(migrations), "--approved-plan", plan_hash,
                   "--approver", "alice@example.com", "--output", "json")


def _prepare(pair: DatabasePair, tmp_path: Path) -> Path:
    migrations = tmp_path / "migrations"
    shutil.copytree(EXAMPLES / "migrations", migrations)
    completed = _dbsync("run", "--source", pair.source, "--target", pair.target,
                        "--migrations", str(migrations), "--revision", "0003_postings")
    assert alembic_versions(pair.target) == ["0003_postings"], completed.stderr
    return migrations


def test_plan_hash_is_deterministic(db_pair: DatabasePair, tmp_path: Path) -> None:
    """Two plans of an unchanged target have the same hash."""
    migrations = _prepare(db_pair, tmp_path)

    first = _plan(db_pair, migrations)
    second = _plan(db_pair, migrations)

    assert first["hash"] == second["hash"]
    assert len(str(first["hash"])) == 64


def test_approved_plan_applies_planned_revisions(db_pair: DatabasePair, tmp_path: Path) -> None:
    """Approving the hash applies exactly the planned revisions, audited with hash and approver."""
    migrations = _prepare(db_pair, tmp_path)
    plan = _plan(db_pair, migrations)
    planned = [item["revision"] for item in plan["revisions"]]  # type: ignore[attr-defined]

    completed = _run_approved(db_pair, migrations, str(plan["hash"]))

    assert completed.returncode in (0, 1), completed.stderr
    report = json.loads(completed.stdout)
    applied = [item["revision"] for item in report["migration"]["outcomes"]
               if item["status"] == "applied"]
    assert applied == planned
    assert alembic_versions(db_pair.target) == ["0006_txn_status"]
    with psycopg.connect(db_pair.target) as connection:
        rows = connection.execute(
            "SELECT DISTINCT plan_hash, approver FROM sync_audit_logs WHERE sync_id = %s",
            (report["sync_id"],)).fetchall()
    assert rows == [(plan["hash"], "alice@example.com")]


def test_schema_change_after_plan_rejects_approval(db_pair: DatabasePair,
                                                   tmp_path: Path) -> None:
    """A manual change on the target after planning fails with PlanChanged and applies nothing."""
    migrations = _prepare(db_pair, tmp_path)
    plan = _plan(db_pair, migrations)
    execute(db_pair.target, "ALTER TABLE accounts ADD COLUMN hand_made text")
    dump_before = schema_dump(db_pair.target)

    completed = _run_approved(db_pair, migrations, str(plan["hash"]))

    assert completed.returncode == 1
    report = json.loads(completed.stdout)
    assert report["error"]["reason"] == "PlanChanged"
    assert "schema changed since the plan" in report["error"]["message"]
    assert str(plan["hash"]) in report["error"]["message"]
    assert schema_dump(db_pair.target) == dump_before
    assert alembic_versions(db_pair.target) == ["0003_postings"]


def test_new_revision_after_plan_rejects_approval(db_pair: DatabasePair,
                                                  tmp_path: Path) -> None:
    """A revision added after planning fails with PlanChanged naming it, and applies nothing."""
    migrations = _prepare(db_pair, tmp_path)
    plan = _plan(db_pair, migrations)
    (migrations / "0007_add_iban.py").write_text(NEW_REVISION)

    completed = _run_approved(db_pair, migrations, str(plan["hash"]))

    assert completed.returncode == 1
    report = json.loads(completed.stdout)
    assert report["error"]["reason"] == "PlanChanged"
    assert "new revision 0007_iban" in report["error"]["message"]
    assert alembic_versions(db_pair.target) == ["0003_postings"]


def test_edited_pending_revision_rejects_approval(db_pair: DatabasePair,
                                                  tmp_path: Path) -> None:
    """Editing a planned revision's file changes the plan, and the message names the file."""
    migrations = _prepare(db_pair, tmp_path)
    plan = _plan(db_pair, migrations)
    edited = migrations / "0004_add_posting_currency.py"
    edited.write_text(edited.read_text().replace('server_default="EUR"', 'server_default="USD"'))

    completed = _run_approved(db_pair, migrations, str(plan["hash"]))

    assert completed.returncode == 1
    report = json.loads(completed.stdout)
    assert "revision 0004_currency was edited" in report["error"]["message"]
    assert alembic_versions(db_pair.target) == ["0003_postings"]
