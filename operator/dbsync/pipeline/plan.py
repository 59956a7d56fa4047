"""Sync plans: a deterministic description of what a sync would do to the target now.

A plan lists the pending revisions (ids, file checksums and offline SQL), the target's
current and requested revisions, a fingerprint of the target's schema and the ledger checks to
run.  Its hash, SHA-256 over a canonical JSON form, is what a reviewer approves.  A sync run
with an approved hash recomputes the plan under the advisory lock and applies nothing unless
the two hashes are equal, so what runs is exactly what was approved.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from dbsync.pipeline import dsn as dsn_module
from dbsync.pipeline.diff import DiffOptions, introspect_dsn
from dbsync.pipeline.diff_compare import visible_objects
from dbsync.pipeline.errors import DbsyncError
from dbsync.pipeline.ledger import LedgerConfig
from dbsync.pipeline.migrate import (
    load_scripts,
    pending_steps,
    read_current_revision,
    resolve_target,
)
from dbsync.pipeline.migrate_alembic import AlembicDriver, public_url
from dbsync.pipeline.migrate_scripts import RevisionFile

logger = logging.getLogger("dbsync.plan")

# Bumped when the plan's content changes shape, so old approvals never match new plans.
PLAN_FORMAT_VERSION = 1


class PlanChangedError(DbsyncError):
    """The plan computed under the lock differs from the approved one: nothing was applied."""

    reason = "PlanChanged"

    def __init__(self, message: str, *, approved_hash: str, current_hash: str,
                 changes: tuple[str, ...]) -> None:
        super().__init__(message)
        self.approved_hash = approved_hash
        self.current_hash = current_hash
        self.changes = changes


@dataclass(frozen=True, kw_only=True)
class PlannedRevision:
    """One pending revision as it will run: id, file, checksum and offline SQL."""

    revision: str
    file_name: str
    sha256: str
    transactional: bool
    sql: str

    def to_dict(self) -> dict[str, Any]:
        return {"revision": self.revision, "file_name": self.file_name, "sha256": self.sha256,
                "transactional": self.transactional, "sql": self.sql}


@dataclass(frozen=True, kw_only=True)
class SyncPlan:
    """Description of what a sync would do to the target now, identified by ``hash``."""

    target: str
    current_revision: str | None
    target_revision: str | None
    downgrade: bool
    revisions: tuple[PlannedRevision, ...]
    schema_fingerprint: str
    ledger_checks: tuple[str, ...]
    created_at: str = ""

    def canonical(self) -> dict[str, Any]:
        """Return the hashed content: everything but the creation time."""
        return {
            "format_version": PLAN_FORMAT_VERSION,
            "target": self.target,
            "current_revision": self.current_revision,
            "target_revision": self.target_revision,
            "downgrade": self.downgrade,
            "revisions": [revision.to_dict() for revision in self.revisions],
            "schema_fingerprint": self.schema_fingerprint,
            "ledger_checks": list(self.ledger_checks),
        }

    @property
    def hash(self) -> str:
        encoded = json.dumps(self.canonical(), sort_keys=True, separators=(",", ":"),
                             ensure_ascii=True)
        return hashlib.sha256(encoded.encode("ascii")).hexdigest()

    def to_dict(self) -> dict[str, Any]:
        return {**self.canonical(), "hash": self.hash, "created_at": self.created_at}

    def summary(self) -> dict[str, Any]:
        """Return the plan without SQL, small enough for a resource's status."""
        return {
            "hash": self.hash,
            "created_at": self.created_at,
            "current_revision": self.current_revision,
            "target_revision": self.target_revision,
            "downgrade": self.downgrade,
            "revisions": [revision.revision for revision in self.revisions],
            "non_transactional": [revision.revision for revision in self.revisions
                                  if not revision.transactional],
            "schema_fingerprint": self.schema_fingerprint,
            "ledger_checks": list(self.ledger_checks),
        }

    def render_text(self) -> str:
        """Return the plan for a reviewer: revisions, their SQL and the hash to approve."""
        lines = [
            f"plan for {self.target}",
            f"  current revision: {self.current_revision}",
            f"  target revision:  {self.target_revision}"
            + ("  (downgrade)" if self.downgrade else ""),
            f"  schema fingerprint: {self.schema_fingerprint}",
            f"  ledger checks: {', '.join(self.ledger_checks) or 'none'}",
            f"  pending revisions: {len(self.revisions)}",
        ]
        for revision in self.revisions:
            atomic = "" if revision.transactional else "  [NOT atomic: runs outside a transaction]"
            lines.append("")
            lines.append(f"-- {revision.revision} ({revision.file_name}, sha256 "
                         f"{revision.sha256}){atomic}")
            lines.append(revision.sql or "-- (no SQL rendered)")
        lines.append("")
        lines.append(f"plan hash: {self.hash}")
        return "\n".join(lines)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SyncPlan:
        """Rebuild a plan from :meth:`to_dict` output, as stored in the audit trail."""
        return cls(
            target=str(data.get("target", "")),
            current_revision=data.get("current_revision"),
            target_revision=data.get("target_revision"),
            downgrade=bool(data.get("downgrade", False)),
            revisions=tuple(PlannedRevision(
                revision=str(item["revision"]), file_name=str(item["file_name"]),
                sha256=str(item["sha256"]), transactional=bool(item["transactional"]),
                sql=str(item.get("sql", ""))) for item in data.get("revisions", [])),
            schema_fingerprint=str(data.get("schema_fingerprint", "")),
            ledger_checks=tuple(str(name) for name in data.get("ledger_checks", [])),
            created_at=str(data.get("created_at", "")),
        )


def schema_fingerprint(dsn: str, *, options: DiffOptions, connect_timeout_seconds: int) -> str:
    """Return SHA-256 over the target's catalog objects that the diff compares.

    dbsync's own tables are left out, so writing audit rows does not change the fingerprint.
    """
    schema = introspect_dsn(dsn, role="target", connect_timeout_seconds=connect_timeout_seconds)
    objects = visible_objects(schema, options)
    canonical = [
        [kind, list(key), [list(pair) for pair in item.properties]]
        for kind in sorted(objects)
        for key, item in sorted(objects[kind].items())
    ]
    encoded = json.dumps(canonical, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(encoded.encode("ascii")).hexdigest()


def compute_plan(*, target_dsn: str, source_dsn: str | None, migrations_dir: Path | None,
                 revision: str, allow_downgrade: bool, ledger: LedgerConfig | None,
                 diff_options: DiffOptions) -> SyncPlan:
    """Compute the plan of a sync of ``target_dsn`` without changing anything."""
    address = dsn_module.describe(target_dsn, role="target")
    current = read_current_revision(target_dsn)
    requested: str | None = current
    downgrade = False
    planned: list[PlannedRevision] = []

    if migrations_dir is not None:
        scripts = load_scripts(migrations_dir)
        requested = resolve_target(scripts, revision, source_dsn=source_dsn)
        steps, downgrade = pending_steps(scripts, current, requested,
                                         allow_downgrade=allow_downgrade, address=address)

        # Each revision is rendered alone, from the revision before it, so its SQL is its own.
        driver = AlembicDriver(scripts, offline_url=public_url(target_dsn))
        start = current
        for revision_file in steps:
            destination = (revision_file.revision if not downgrade
                           else _downgrade_destination(revision_file))
            sql = driver.render(start, destination, downgrade=downgrade)
            planned.append(PlannedRevision(
                revision=revision_file.revision, file_name=revision_file.file_name,
                sha256=revision_file.sha256,
                transactional=(revision_file.downgrade if downgrade
                               else revision_file.upgrade).transactional,
                sql=sql))
            start = destination

    fingerprint = schema_fingerprint(
        target_dsn, options=diff_options,
        connect_timeout_seconds=diff_options.connect_timeout_seconds)
    checks = tuple(check.value for check in ledger.selected_checks()) if ledger else ()
    plan = SyncPlan(
        target=str(address), current_revision=current, target_revision=requested,
        downgrade=downgrade, revisions=tuple(planned), schema_fingerprint=fingerprint,
        ledger_checks=checks, created_at=datetime.now(UTC).isoformat(timespec="seconds"))
    logger.info("computed plan %s for %s: %d pending revision(s)", plan.hash, address,
                len(planned))
    return plan


def _downgrade_destination(revision_file: RevisionFile) -> str:
    down = revision_file.down_revision
    if down is None:
        return "base"
    if isinstance(down, tuple):
        return str(down[0])
    return str(down)


def describe_changes(approved: SyncPlan | None, current: SyncPlan) -> tuple[str, ...]:
    """List, for people, what differs between the approved plan and the current one."""
    if approved is None:
        return ("the approved plan is not in the audit trail, so only its hash is known: "
                "compute a new plan with 'dbsync plan' and approve its hash",)
    changes: list[str] = []
    if approved.current_revision != current.current_revision:
        changes.append(f"the target's revision changed from {approved.current_revision} to "
                       f"{current.current_revision}")
    if approved.target_revision != current.target_revision:
        changes.append(f"the requested revision changed from {approved.target_revision} to "
                       f"{current.target_revision}")
    approved_files = {item.revision: item for item in approved.revisions}
    current_files = {item.revision: item for item in current.revisions}
    for revision in sorted(current_files.keys() - approved_files.keys()):
        changes.append(f"new revision {revision} ({current_files[revision].file_name})")
    for revision in sorted(approved_files.keys() - current_files.keys()):
        changes.append(f"revision {revision} is no longer pending")
    for revision in sorted(approved_files.keys() & current_files.keys()):
        if approved_files[revision].sha256 != current_files[revision].sha256:
            changes.append(
                f"revision {revision} was edited ({approved_files[revision].file_name}: sha256 "
                f"{approved_files[revision].sha256} then, {current_files[revision].sha256} now)")
    if approved.schema_fingerprint != current.schema_fingerprint:
        changes.append("the target's schema changed since the plan")
    if approved.ledger_checks != current.ledger_checks:
        changes.append("the ledger checks to run changed")
    if not changes:
        changes.append("the plan's content differs in a field not listed above")
    return tuple(changes)


def find_recorded_plan(audit_dsn: str, plan_hash: str, *,
                       connect_timeout_seconds: int = 10) -> SyncPlan | None:
    """Return the newest plan with ``plan_hash`` recorded by ``dbsync plan``, if any."""
    with dsn_module.connect(audit_dsn, role="audit", autocommit=True,
                            connect_timeout_seconds=connect_timeout_seconds) as connection:
        exists = connection.execute("SELECT to_regclass('sync_audit_operations')").fetchone()
        if exists is None or exists[0] is None:
            return None
        row = connection.execute(
            "SELECT metadata -> 'plan' FROM sync_audit_operations "
            "WHERE operation_type = 'PLAN' AND plan_hash = %s AND metadata ? 'plan' "
            "ORDER BY started_at DESC LIMIT 1", (plan_hash,)).fetchone()
    if row is None or not isinstance(row[0], dict):
        return None
    return SyncPlan.from_dict(row[0])
