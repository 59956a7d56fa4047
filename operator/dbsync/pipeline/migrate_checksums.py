"""History integrity: SHA-256 checksums of applied revision files, kept on the target.

Alembic records only the current revision id, so an applied revision edited afterwards goes
unnoticed and the databases built from the old and the new file silently differ. dbsync
stores the checksum of every file it applies in ``dbsync_revision_checksums`` (created by
dbsync's own migration 0002) and compares them with the files before it changes anything.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Iterable
from dataclasses import dataclass

from sqlalchemy import Connection, text

from dbsync.pipeline.migrate_model import RevisionChecksumMismatchError
from dbsync.pipeline.migrate_scripts import RevisionFile

logger = logging.getLogger("dbsync.migrate")

TABLE = "dbsync_revision_checksums"


@dataclass(frozen=True)
class RecordedChecksum:
    """One row of the checksum table."""

    revision: str
    file_name: str
    sha256: str


@dataclass(frozen=True)
class ChecksumCheck:
    """The applied revisions whose files match, and those recorded for the first time."""

    verified: tuple[str, ...]
    untracked: tuple[RevisionFile, ...]


def table_exists(connection: Connection) -> bool:
    return connection.execute(text(f"SELECT to_regclass('{TABLE}')")).scalar() is not None


def read_checksums(connection: Connection) -> dict[str, RecordedChecksum]:
    """Return the recorded checksums by revision id ({} when the table does not exist)."""
    if not table_exists(connection):
        return {}
    rows = connection.execute(text(f"SELECT revision, file_name, sha256 FROM {TABLE}"))
    return {str(revision): RecordedChecksum(str(revision), str(file_name), str(sha256).strip())
            for revision, file_name, sha256 in rows}


def check_applied(applied: Iterable[RevisionFile],
                  recorded: dict[str, RecordedChecksum]) -> ChecksumCheck:
    """Compare applied revision files with their recorded checksums.

    Raises RevisionChecksumMismatchError naming every changed file and both checksums.
    """
    verified: list[str] = []
    untracked: list[RevisionFile] = []
    mismatches: list[str] = []
    for revision_file in applied:
        row = recorded.get(revision_file.revision)
        if row is None:
            untracked.append(revision_file)
        elif row.sha256 != revision_file.sha256:
            mismatches.append(
                f"{revision_file.path} (revision {revision_file.revision}): recorded sha256 "
                f"{row.sha256} when applied as {row.file_name}, the file now has sha256 "
                f"{revision_file.sha256}")
        else:
            verified.append(revision_file.revision)
    if mismatches:
        raise RevisionChecksumMismatchError(
            "already-applied revision files changed since they were applied, so the target "
            "no longer matches what the files describe: " + "; ".join(mismatches) +
            ". Restore the original files and put the change in a new revision")
    return ChecksumCheck(verified=tuple(verified), untracked=tuple(untracked))


def record(connection: Connection, files: Iterable[RevisionFile], *, sync_id: uuid.UUID,
           applied_now: bool) -> None:
    """Insert or replace the checksums of ``files`` in the current transaction.

    ``applied_now`` is False for revisions applied before dbsync tracked checksums, which
    then keep a NULL ``applied_at``.
    """
    rows = [{"revision": item.revision, "file_name": item.file_name, "sha256": item.sha256,
             "sync_id": sync_id, "applied": applied_now} for item in files]
    if not rows:
        return
    connection.execute(text(
        f"INSERT INTO {TABLE} (revision, file_name, sha256, applied_at, sync_id) "
        "VALUES (:revision, :file_name, :sha256, "
        "CASE WHEN :applied THEN now() END, :sync_id) "
        "ON CONFLICT (revision) DO UPDATE SET file_name = EXCLUDED.file_name, "
        "sha256 = EXCLUDED.sha256, applied_at = EXCLUDED.applied_at, "
        "recorded_at = now(), sync_id = EXCLUDED.sync_id"), rows)


def forget(connection: Connection, revisions: Iterable[str]) -> None:
    """Delete the checksums of downgraded revisions, in the current transaction."""
    ids = list(revisions)
    if ids:
        connection.execute(text(f"DELETE FROM {TABLE} WHERE revision = ANY(:ids)"),
                           {"ids": ids})
